"""CBBackend: transformers' continuous batching (paged KV cache, FIFO scheduler, chunked prefill,
one varlen forward per step), driven one step at a time from the engine's thread.

Owns: the one seam with transformers' continuous-batching internals (pinned to the transformers
5.2x layout: ContinuousBatchingManager, its batch processor and output queue), replacing its token
choice with ours, per-request submission / cancellation, and the step's new tokens.
Must not: decide when a request stops beyond what CB is told (max_new_tokens, EOS ids), detokenize,
or run CB's own background thread (the engine loop is the one thread that steps the model).

Why not CB as shipped: its sampling is one do_sample flag for the whole manager, one global seed,
per-request only temperature/top-k/top-p, and no repetition penalty (RepetitionPenaltyLogitsProcessor
says supports_continuous_batching = False); its logprobs are taken after those warpers. So the
logits-processor list CB calls on the rows that get a new token is replaced by `_TokenChooser`,
which picks each row's token with torch_fallback.sampler and hands CB scores whose argmax is that
pick (CB runs with do_sample=False). CUDA graphs and torch.compile are off: the chooser runs
Python per step, which a captured graph would replay stale.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList

log = logging.getLogger("tgx.torch_fallback.cb")

# (row request ids, logits [R, V]) -> the token of each row
Choose = Callable[[Sequence[str], torch.Tensor], list[int]]


@dataclasses.dataclass(frozen=True)
class Produced:
    request_id: str
    tokens: tuple[int, ...]  # new since the previous step
    finished: bool  # the backend let go of the request (EOS id or max_new_tokens reached)


class _TokenChooser(ContinuousBatchingLogitsProcessorList):
    """Stands in for CB's logits-processor list: CB prepares it with the batch, then calls it on the
    logit rows of the requests that get a token this step, in the same order."""

    def __init__(self, choose: Choose) -> None:
        # No super().__init__: that builds HF processors from a GenerationConfig; this list has none.
        self.logits_processor = LogitsProcessorList()
        self.tensors_required = 0
        self.supported_keys = {}
        self.ignored_keys = set()
        self.do_processing = True
        self._choose = choose
        self._rows: list[str] = []

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        pass

    def check_kwargs(self, kwargs: dict) -> None:
        if kwargs:
            raise ValueError(f"per-request processor kwargs are not used here: {sorted(kwargs)}")

    def prepare_tensor_args(self, requests_in_batch, arg_storage: torch.Tensor) -> torch.Tensor:
        self._rows = [r.state.request_id for r in requests_in_batch if r.has_new_token]
        return arg_storage

    def __call__(self, input_ids, scores: torch.Tensor, logits_processor_args) -> torch.Tensor:
        n = len(self._rows)  # scores [n, V]: CB pads nothing without CUDA graphs
        if n == 0:  # every request in the step is mid-prefill (a chunk that is not its last)
            return scores
        picks = torch.tensor(self._choose(self._rows, scores[:n]), device=scores.device, dtype=torch.long)
        out = torch.full_like(scores, float("-inf"))
        out[n:, 0] = 0.0  # rows past n (none today) get a harmless token 0
        out[torch.arange(n, device=scores.device), picks] = 0.0
        return out


class CBBackend:
    def __init__(
        self,
        model,
        choose: Choose,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        num_blocks: int,
        page_size: int,
    ) -> None:
        cb_config = ContinuousBatchingConfig(
            page_size=page_size,
            num_blocks=num_blocks,
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=max_batch_size,
            use_cuda_graph=False,
            use_async_batching=False,  # the chooser reads each request's tokens of the previous step
            default_compile_level=0,
            return_logprobs=False,  # ours come from the chooser, under the raw distribution
            # Prefix sharing keeps finished requests' full blocks cached and counted as used, so
            # kv usage would never return to 0 once idle; the Flax engine has no prefix cache either.
            allow_block_sharing=False,
        )
        generation = GenerationConfig(do_sample=False, eos_token_id=-1)
        self._model = model
        self._manager = model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=cb_config
        )
        self._chooser = _TokenChooser(choose)
        self._manager.logit_processor = self._chooser
        try:
            self._processor = self._manager._create_batch_processor()
        except BaseException:
            self.close()
            raise
        self._manager.batch_processor = self._processor
        self._pending: dict[str, tuple[list[int], int, list[int]]] = {}  # submitted, not yet in CB
        self._seen: dict[str, int] = {}  # tokens already reported, per request CB holds

    def close(self) -> None:
        """Gives the model back its own attention implementation (CB may have switched it to a paged
        one), for a caller that serves it some other way after all."""
        original = getattr(self._manager, "_original_attn_impl", None)
        if original is not None:
            self._model.set_attn_implementation(original)
            self._manager._original_attn_impl = None

    # ---- requests ------------------------------------------------------------------------------

    def submit(self, request_id: str, prompt: list[int], max_new_tokens: int, eos_ids: Sequence[int]) -> None:
        self._pending[request_id] = (list(prompt), max_new_tokens, list(eos_ids))

    def cancel(self, request_id: str) -> None:
        """Drops the request and frees its KV blocks now."""
        if self._pending.pop(request_id, None) is not None:
            return
        if self._seen.pop(request_id, None) is None:
            return
        scheduler = self._processor.scheduler
        scheduler.set_request_cancellation(request_id)
        scheduler.clear_cancelled_requests()

    # ---- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Produced]:
        for request_id, (prompt, max_new, eos) in self._pending.items():
            # The step below moves it from the manager's queue into CB's scheduler, so between
            # steps every request CB knows of is in the scheduler, where cancel() can free it.
            self._manager.add_request(
                prompt, request_id=request_id, max_new_tokens=max_new, streaming=True, eos_token_id=eos
            )
            self._seen[request_id] = 0
        self._pending.clear()
        if self._processor.prepare_next_batch():
            self._processor._generation_step(self._model)
            self._processor.update_batch()
        produced = []
        queue = self._manager.output_router.output_queue
        while not queue.empty():
            out = queue.get_nowait()
            if out.error is not None:
                raise RuntimeError(
                    f"transformers continuous batching failed request {out.request_id}: {out.error}"
                )
            seen = self._seen.get(out.request_id)
            if seen is None:
                continue
            new = tuple(out.generated_tokens[seen:])
            finished = out.is_finished()
            if finished:
                del self._seen[out.request_id]
            else:
                self._seen[out.request_id] = seen + len(new)
            produced.append(Produced(out.request_id, new, finished))
        return produced

    # ---- stats ---------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._processor.scheduler.active_requests)

    @property
    def num_waiting(self) -> int:
        return len(self._processor.scheduler.waiting_requests) + len(self._pending)

    def kv_usage(self) -> float:
        return max(0.0, 1.0 - self._processor.cache.compute_free_capacity())
