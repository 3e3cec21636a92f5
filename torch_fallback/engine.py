"""TorchEngine: LLMEngine's interface over a transformers model, for architectures without a Flax port.

Owns: start-up (load, size the KV cache with the same `resolve_limits` as the Flax engine, pick the
backend: transformers' continuous batching when the model passes a logits self-check, else one
forward per request), admission and validation (TGI's limits and wording, plus a clear refusal of
what this path cannot do), each step's outputs (detokenized through IncrementalDetokenizer, stop
sequences, EOS, max_new_tokens, cancellation) and stats. Must not: import jax, run a thread of its
own (the engine loop steps it), or choose tokens itself (torch_fallback.sampler does).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import tempfile
from collections.abc import Callable, Sequence

import torch

from engine.api import EngineInfo, GeneratedToken, RequestOutput, TokenLogprob
from engine.config import EngineConfig, KVGroupSpec, Limits, resolve_limits
from engine.detokenizer import IncrementalDetokenizer
from engine.models.sources import ModelLoadError, ModelSource
from engine.request import FinishReason, Request
from engine.sampling_params import SamplingParams
from torch_fallback import loading, sampler
from torch_fallback.cb_backend import CBBackend
from torch_fallback.eager_backend import EagerBackend

log = logging.getLogger("tgx.torch_fallback")

SELF_CHECK_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 1e-2}  # relative, on logits
_SELF_CHECK_ID = "__tgx_self_check__"


@dataclasses.dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_compiled_programs: int


@dataclasses.dataclass(eq=False)
class _Track:
    request: Request
    backend_id: str
    detok: IncrementalDetokenizer
    special_ids: frozenset[int]
    pending: sampler.Sampled | None = None  # what the chooser picked this step, until CB reports it


class TorchEngine:
    def __init__(self, cfg: EngineConfig, *, source: ModelSource, hf_config: dict, progress=None) -> None:
        self.cfg = cfg
        self.architecture = (hf_config.get("architectures") or ["?"])[0]
        loaded = loading.load(source, hf_config, cfg.dtype, progress)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        model = loaded.model
        budget, is_accel = loading.kv_memory_budget(loaded.device, cfg.memory_fraction)
        self.limits: Limits = resolve_limits(
            cfg,
            max_position_embeddings=loading.max_positions(model),
            # One full-attention pool: CB pages sliding layers inside it, the eager backend reserves.
            kv_groups=[
                KVGroupSpec(window=None, bytes_per_token=loading.kv_bytes_per_token(model, cfg.dtype))
            ],
            free_memory_bytes=budget,
            is_accelerator=is_accel,
        )
        self._tracks: dict[str, _Track] = {}
        self._by_backend_id: dict[str, _Track] = {}
        self._ids = itertools.count()
        self._special_ids = frozenset(self.tokenizer.all_special_ids)
        self._captured: list[torch.Tensor] | None = None  # logits of the self-check's rows
        self.backend, self.backend_reason = self._build_backend(model)
        log.info(
            "torch fallback for %s: %s (%s)",
            self.architecture,
            type(self.backend).__name__,
            self.backend_reason,
        )
        self._tokenizer_dir = tempfile.TemporaryDirectory(prefix="tgx-tokenizer-")
        self.tokenizer.save_pretrained(self._tokenizer_dir.name)
        self.info = EngineInfo(
            model_id=source.display_name,
            model_dtype=cfg.dtype,
            max_batch_size=self.limits.max_batch_size,
            max_input_tokens=self.limits.max_input_tokens,
            max_total_tokens=self.limits.max_total_tokens,
            max_batch_prefill_tokens=self.limits.max_batch_prefill_tokens,
            max_batch_total_tokens=self.limits.kv_capacity_tokens,
            page_size=self.limits.page_size,
            max_top_n_tokens=cfg.max_top_n_tokens,
            vocab_size=loaded.vocab_size,
            eos_token_ids=tuple(loaded.eos_token_ids),
            tokenizer_dir=self._tokenizer_dir.name,
        )

    def _build_backend(self, model) -> tuple[CBBackend | EagerBackend, str]:
        limits = self.limits
        if getattr(model, "_supports_attention_backend", False):
            cb = None
            try:
                cb = CBBackend(
                    model,
                    self._choose,
                    max_batch_size=limits.max_batch_size,
                    max_batch_tokens=limits.max_batch_prefill_tokens + limits.max_batch_size,
                    num_blocks=limits.kv_capacity_tokens // limits.page_size,
                    page_size=limits.page_size,
                )
                err = self._self_check(cb)
                if err <= SELF_CHECK_TOLERANCE[self.cfg.dtype]:
                    return cb, f"transformers continuous batching; self-check rel. err {err:.1e}"
                why = f"its logits differ from a plain forward by {err:.1e} (relative)"
            except MemoryError as e:
                raise ValueError(
                    f"the KV cache does not fit ({e}): lower --max-batch-total-tokens or --memory-fraction"
                ) from None
            except (ValueError, NotImplementedError, TypeError, RuntimeError, IndexError, KeyError) as e:
                why = f"it failed: {' '.join(str(e).split())[:200]}"
            if cb is not None:
                cb.close()
        else:
            why = f"{type(model).__name__} does not implement transformers' attention interface"
        log.warning("transformers continuous batching cannot serve %s: %s", self.architecture, why)
        eager = EagerBackend(
            model,
            self._choose,
            max_batch_size=limits.max_batch_size,
            max_batch_prefill_tokens=limits.max_batch_prefill_tokens,
            kv_capacity_tokens=limits.kv_capacity_tokens,
        )
        try:
            err = self._self_check(eager)
        except Exception as e:  # noqa: BLE001 - any failure here means the model cannot be served
            err, detail = float("inf"), f": {' '.join(str(e).split())[:200]}"
        else:
            detail = f" (logits off by {err:.1e}, relative)"
        if not err <= SELF_CHECK_TOLERANCE[self.cfg.dtype]:
            raise ModelLoadError(
                f"transformers cannot run {self.architecture} one token at a time with its cache{detail}; "
                "this model cannot be served by tgx"
            )
        return eager, f"one forward per request, since {why}"

    def _self_check(self, backend) -> float:
        """Runs a fixed prompt for two tokens (prefill, then one decode step) through `backend` and
        returns the largest relative difference between the logits it produced and a plain forward
        over the same ids. A model whose attention ignores the backend's cache shows up here."""
        model = self.loaded.model
        prompt = [t % self.loaded.vocab_size for t in range(3, 3 + 7 * 11, 11)]  # [7]
        self._captured = []
        backend.submit(_SELF_CHECK_ID, prompt, 2, [])
        tokens: list[int] = []
        try:
            for _ in range(8):
                for produced in backend.step():
                    tokens.extend(produced.tokens)
                if len(tokens) >= 2:
                    break
            captured = self._captured
        finally:
            self._captured = None
            backend.cancel(_SELF_CHECK_ID)
        if len(captured) < 2 or len(tokens) < 2:
            return float("inf")
        worst = 0.0
        with torch.no_grad():
            for ids, got in ((prompt, captured[0]), (prompt + tokens[:1], captured[1])):
                want = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].float()
                worst = max(worst, float((got - want).norm() / want.norm().clamp_min(1e-6)))
        return worst

    # ---- admission ---------------------------------------------------------------------------

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return [int(t) for t in prompt]

    def validate(self, prompt: str | Sequence[int], params: SamplingParams) -> list[int]:
        """Tokenizes and checks the request; raises ValueError with TGI's wording."""
        if params.prompt_logprobs:
            raise ValueError(
                "Input validation error: `decoder_input_details` (prompt logprobs) is not supported for "
                f"{self.architecture} (torch fallback path): transformers' continuous batching keeps only "
                "the logits of the last prompt token"
            )
        ids = self.tokenize(prompt)
        self.limits.check_request(ids, params.max_new_tokens, params.top_n_tokens,
                                  max_top_n_tokens=self.cfg.max_top_n_tokens, vocab_size=self.loaded.vocab_size)
        return ids

    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> Request:
        ids = self.validate(prompt, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._tracks:
            raise ValueError(f"request id {request_id!r} is already in use")
        eos = frozenset(self.loaded.eos_token_ids)
        req = Request.create(request_id, ids, params, eos)
        # A fresh backend id per request: an id the client reuses never meets its predecessor's state.
        backend_id = f"{request_id}#{next(self._ids)}"
        detok = IncrementalDetokenizer(
            self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop
        )
        track = _Track(req, backend_id, detok, self._special_ids)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
        self.backend.submit(backend_id, ids, params.max_new_tokens, sorted(stop_ids))
        self._tracks[request_id] = track
        self._by_backend_id[backend_id] = track
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        track = self._tracks.get(request_id)
        if track is None:
            return None
        self._drop(track)
        return self._output(track, (), "", FinishReason.CANCELLED, None)

    def _drop(self, track: _Track) -> None:
        self.backend.cancel(track.backend_id)
        self._tracks.pop(track.request.request_id, None)
        self._by_backend_id.pop(track.backend_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._tracks)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.backend.num_running,
            num_waiting=self.backend.num_waiting,
            kv_cache_usage=self.backend.kv_usage(),
            num_compiled_programs=0,
        )

    # ---- the step ------------------------------------------------------------------------------

    def _choose(self, backend_ids: Sequence[str], logits: torch.Tensor) -> list[int]:
        """The backends' chooser: one token per row, recorded on the request for step() to report."""
        tracks = [self._by_backend_id.get(b) for b in backend_ids]
        if self._captured is not None:
            self._captured.extend(logits[i].float().clone() for i, t in enumerate(tracks) if t is None)
        rows = [
            sampler.SampleRow(SamplingParams(), 0, (), 0)  # the start-up self-check: greedy
            if t is None
            else sampler.SampleRow(
                t.request.params, t.request.seed, t.request.all_token_ids, t.request.num_prompt_tokens
            )
            for t in tracks
        ]
        picks = sampler.sample(logits, rows)
        for track, pick in zip(tracks, picks):
            if track is not None:
                track.pending = pick
        return [p.token_id for p in picks]

    def step(self) -> list[RequestOutput]:
        outputs = []
        for produced in self.backend.step():
            track = self._by_backend_id.get(produced.request_id)
            if track is None:
                continue
            for token_id in produced.tokens:
                out = self._accept(track, token_id)
                outputs.append(out)
                if out.finished:
                    break
            else:
                if produced.finished and track.request.request_id in self._tracks:
                    # The backend stopped without our rules saying so: only a length cap can do that.
                    outputs.append(self._finish(track, FinishReason.LENGTH, "", None, ()))
        return outputs

    def _accept(self, track: _Track, token_id: int) -> RequestOutput:
        req = track.request
        pick, track.pending = track.pending, None
        if pick is None or pick.token_id != token_id:
            raise RuntimeError(f"backend reported token {token_id} for {req.request_id}, not the one chosen")
        req.append_output_token(token_id)
        piece = track.detok.add(token_id)
        token = GeneratedToken(
            token_id=token_id,
            text=piece.text,
            logprob=pick.logprob,
            is_special=token_id in track.special_ids,
            top=tuple(TokenLogprob(i, self.tokenizer.decode([i]), lp) for i, lp in pick.top),
        )
        params = req.params
        # The Flax scheduler's order: EOS, stop token, length; a stop string only if none of those.
        reason = None
        if not params.ignore_eos and token_id in req.eos_token_ids:
            reason = FinishReason.EOS
        elif token_id in params.stop_token_ids:
            reason = FinishReason.STOP_SEQUENCE
        elif req.num_output_tokens >= params.max_new_tokens:
            reason = FinishReason.LENGTH
        elif piece.stop_sequence is not None:
            reason = FinishReason.STOP_SEQUENCE
        if reason is None:
            return self._output(track, (token,), piece.text, None, None)
        return self._finish(track, reason, piece.text, piece.stop_sequence, (token,))

    def _finish(
        self, track: _Track, reason: FinishReason, text: str, stop: str | None, tokens
    ) -> RequestOutput:
        self._drop(track)  # frees the backend's cache now if it still holds the request
        return self._output(track, tokens, text, reason, stop)

    @staticmethod
    def _output(
        track: _Track, tokens, text: str, reason: FinishReason | None, stop: str | None
    ) -> RequestOutput:
        req = track.request
        return RequestOutput(
            request_id=req.request_id,
            tokens=tokens,
            text=text,
            finished=reason is not None,
            finish_reason=reason.value if reason is not None else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_generated_tokens=req.num_output_tokens,
            seed=None if req.params.is_greedy else req.seed,
            stop_sequence=stop,
        )

    def run_until_done(self, on_output: Callable[[RequestOutput], None] | None = None) -> None:
        while self.has_unfinished():
            for out in self.step():
                if on_output:
                    on_output(out)
