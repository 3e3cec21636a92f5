"""EagerBackend: for models transformers' continuous batching cannot run, one forward per request per step.

Owns: admission by KV budget (each admitted request reserves prompt + max_new_tokens tokens, so
nothing is ever preempted), each request's own transformers cache, and one token per running
request per step, chosen together by the engine's chooser. New requests join at any step, so the
batch is continuous; the forwards are not batched together.
Must not: detokenize, decide stops beyond max_new_tokens and EOS ids, or share a cache between
requests.

Why it exists: CB feeds the model its paged cache through transformers' attention interface; a
model class without it (`_supports_attention_backend` false: Bloom, GPT-J, CodeGen, Falcon, ...)
ignores that cache and silently produces wrong tokens, and recurrent layers (Mamba) have no paged
form at all. Such models are served correctly here, at one forward per request.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import torch

from torch_fallback.cb_backend import Choose, Produced


@dataclasses.dataclass(eq=False)
class _Seq:
    request_id: str
    feed: list[int]  # tokens the next forward reads: the prompt, then the last token
    reserved: int  # prompt + max_new_tokens, held against the KV budget while running
    max_new_tokens: int
    eos_ids: frozenset[int]
    num_generated: int = 0
    cache: object | None = None  # the model's own past_key_values


class EagerBackend:
    def __init__(
        self,
        model,
        choose: Choose,
        *,
        max_batch_size: int,
        max_batch_prefill_tokens: int,
        kv_capacity_tokens: int,
    ) -> None:
        self._model = model
        self._choose = choose
        self._max_batch_size = max_batch_size
        self._max_prefill = max_batch_prefill_tokens
        self._capacity = kv_capacity_tokens
        self._waiting: collections.OrderedDict[str, _Seq] = collections.OrderedDict()
        self._running: dict[str, _Seq] = {}
        self._reserved = 0

    def submit(self, request_id: str, prompt: list[int], max_new_tokens: int, eos_ids: Sequence[int]) -> None:
        self._waiting[request_id] = _Seq(
            request_id, list(prompt), len(prompt) + max_new_tokens, max_new_tokens, frozenset(eos_ids)
        )

    def cancel(self, request_id: str) -> None:
        if self._waiting.pop(request_id, None) is not None:
            return
        seq = self._running.pop(request_id, None)
        if seq is not None:
            self._reserved -= seq.reserved  # its cache goes with it

    def _admit(self) -> None:
        budget = self._max_prefill
        while self._waiting and len(self._running) < self._max_batch_size:
            seq = next(iter(self._waiting.values()))
            # The first prompt of a step is always admitted (validation capped it), later ones fit.
            if self._reserved + seq.reserved > self._capacity or (
                len(seq.feed) > budget and budget < self._max_prefill
            ):
                break
            del self._waiting[seq.request_id]
            self._running[seq.request_id] = seq
            self._reserved += seq.reserved
            budget -= len(seq.feed)

    @torch.no_grad()
    def step(self) -> list[Produced]:
        self._admit()
        seqs = list(self._running.values())
        if not seqs:
            return []
        device = self._model.device
        rows = []
        for seq in seqs:
            ids = torch.tensor([seq.feed], device=device)  # [1, T]
            out = self._model(input_ids=ids, past_key_values=seq.cache, use_cache=True)
            seq.cache = out.past_key_values
            rows.append(out.logits[0, -1])  # [V]
        tokens = self._choose([s.request_id for s in seqs], torch.stack(rows))  # [R, V] -> R tokens
        produced = []
        for seq, token in zip(seqs, tokens):
            seq.num_generated += 1
            seq.feed = [token]
            finished = token in seq.eos_ids or seq.num_generated >= seq.max_new_tokens
            if finished:
                self.cancel(seq.request_id)
            produced.append(Produced(seq.request_id, (token,), finished))
        return produced

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def kv_usage(self) -> float:
        return self._reserved / self._capacity if self._capacity else 0.0
