"""LLMEngine: one model's engine, driven one step at a time from a single thread.

Owns: start-up (load, size the KV cache, warm up), request admission and validation, and each
step's loop: schedule -> runner.execute -> scheduler.update -> detokenize and check stop strings.
Must not: block on anything but the device, hold asyncio objects (engine.async_engine does), or
touch device arrays (the runner does).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence

import jax

from engine.api import EngineInfo, GeneratedToken, RequestOutput, TokenLogprob
from engine.config import EngineConfig, KVGroupSpec, Limits, resolve_limits
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import KVCacheGroup, KVCacheGroups, PageAllocator
from engine.models.base import set_attention_fn
from engine.models.config import ModelConfig
from engine.models.loader import LoadedModel, load_model
from engine.pallas_kernels.dispatch import attention_fn_for
from engine.profiling import phase
from engine.request import FinishReason, Request
from engine.runner import ModelRunner, Progress, StepOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Schedule, Scheduler, SchedulerConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # of the most-used KV cache group: the pool that runs out first
    num_compiled_programs: int


def _kv_memory_budget(cfg: EngineConfig) -> tuple[int, bool]:
    """Bytes the KV cache may take on device 0 after the weights are loaded, and whether it's an accelerator."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        limit = stats["bytes_limit"]
        # Keep a tenth back for activations, logits and XLA's scratch space.
        budget = int(limit * cfg.memory_fraction) - stats.get("bytes_in_use", 0) - limit // 10
        return max(budget, 0), True
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * cfg.memory_fraction) // 2, False


def _kv_group_specs(mc: ModelConfig, itemsize: int) -> list[KVGroupSpec]:
    """Per KV cache group of the model: its window and the K/V bytes of one token over its layers."""
    per_layer = 2 * mc.num_kv_heads * mc.head_dim * itemsize
    windows = mc.kv_cache_windows()
    layers = [sum(1 for i in range(mc.num_layers) if mc.kv_group_of(i) == g) for g in range(len(windows))]
    return [KVGroupSpec(w, n * per_layer) for w, n in zip(windows, layers)]


class LLMEngine:
    def __init__(self, cfg: EngineConfig, *, loaded: LoadedModel | None = None, progress: Progress | None = None):
        self.cfg = cfg
        if loaded is None:
            # The served length picks static rope variants (Phi-3 longrope short/long factors).
            loaded = load_model(cfg.model_id, revision=cfg.revision, dtype=cfg.dtype, progress=progress,
                                max_model_len=cfg.max_total_tokens)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        mc = loaded.config
        budget, is_accel = _kv_memory_budget(cfg)
        self.limits: Limits = resolve_limits(
            cfg,
            max_position_embeddings=mc.max_position_embeddings,
            kv_groups=_kv_group_specs(mc, jax.numpy.dtype(loaded.dtype).itemsize),
            free_memory_bytes=budget,
            is_accelerator=is_accel,
        )
        page_size = self.limits.page_size
        self.kv_groups = KVCacheGroups(
            [KVCacheGroup(g.window, PageAllocator(g.num_pages, page_size)) for g in self.limits.kv_groups]
        )
        self._log_kv_groups()
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch_size=self.limits.max_batch_size,
                max_batch_prefill_tokens=self.limits.max_batch_prefill_tokens,
                max_total_tokens=self.limits.max_total_tokens,
                enable_chunked_prefill=cfg.enable_chunked_prefill,
            ),
            self.kv_groups,
        )
        attention_fn = attention_fn_for(backend=cfg.attention_backend)
        set_attention_fn(loaded.model, attention_fn)
        log.info("attention: %s (%s backend)", attention_fn.__name__, cfg.attention_backend)
        self.runner = ModelRunner(
            loaded.model,
            self.limits,
            max_top_n_tokens=cfg.max_top_n_tokens,
            enable_prefill_logprobs=cfg.enable_prefill_logprobs,
        )
        self.warmup_seconds = self.runner.warmup(progress)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        # Prompt logprobs gathered chunk by chunk until the request's first output carries them.
        self._prompt_logprobs: dict[str, list[float]] = {}
        self._tokenizer_dir = tempfile.TemporaryDirectory(prefix="tgx-tokenizer-")
        self.tokenizer.save_pretrained(self._tokenizer_dir.name)
        self._ids = itertools.count()
        self._special_ids = frozenset(self.tokenizer.all_special_ids)
        self.info = EngineInfo(
            model_id=loaded.source.display_name,
            model_dtype=str(loaded.dtype),
            max_batch_size=self.limits.max_batch_size,
            max_input_tokens=self.limits.max_input_tokens,
            max_total_tokens=self.limits.max_total_tokens,
            max_batch_prefill_tokens=self.limits.max_batch_prefill_tokens,
            max_batch_total_tokens=self.limits.kv_capacity_tokens,
            page_size=self.limits.page_size,
            max_top_n_tokens=cfg.max_top_n_tokens,
            vocab_size=mc.vocab_size,
            eos_token_ids=tuple(loaded.eos_token_ids),
            tokenizer_dir=self._tokenizer_dir.name,
        )

    def _log_kv_groups(self) -> None:
        limits = self.limits
        log.info("KV cache: %d tokens for the running batch", limits.kv_capacity_tokens)
        for g in limits.kv_groups:
            log.info(
                "KV cache group %s: %d pages of %d (%d tokens, %.1f MiB)",
                "full attention" if g.window is None else f"window {g.window}",
                g.num_pages - 1,
                limits.page_size,
                (g.num_pages - 1) * limits.page_size,
                g.num_pages * g.bytes_per_page / 2**20,
            )

    # ---- admission ---------------------------------------------------------------------------

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return [int(t) for t in prompt]

    def validate(self, prompt: str | Sequence[int], params: SamplingParams) -> list[int]:
        """Tokenizes and checks the request against the limits; raises ValueError with TGI's wording."""
        ids = self.tokenize(prompt)
        self.limits.check_request(ids, params.max_new_tokens, params.top_n_tokens,
                                  max_top_n_tokens=self.cfg.max_top_n_tokens, vocab_size=self.loaded.config.vocab_size)
        return ids

    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> Request:
        ids = self.validate(prompt, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._detokenizers:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request.create(request_id, ids, params, frozenset(self.loaded.eos_token_ids))
        self.scheduler.add_request(req)
        if params.prompt_logprobs and self.cfg.enable_prefill_logprobs:
            self._prompt_logprobs[request_id] = [math.nan]  # nothing precedes the first prompt token
        self._detokenizers[request_id] = IncrementalDetokenizer(
            self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop
        )
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.scheduler.abort_request(request_id)
        self._detokenizers.pop(request_id, None)
        self._prompt_logprobs.pop(request_id, None)
        if req is None:
            return None
        return self._output(req, (), "", FinishReason.CANCELLED, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.kv_groups.usage(),
            num_compiled_programs=self.runner.num_compiled_programs,
        )

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        # The phases show as host ranges tgx.* in a profiler trace (engine/profiling.py).
        with phase("step"):
            with phase("schedule"):
                schedule = self.scheduler.schedule()
            if schedule.is_empty:
                return []
            result = self.runner.execute(schedule)
            with phase("outputs"):  # scheduler update, detokenize, stop strings
                return self._outputs(schedule, result)

    def _outputs(self, schedule: Schedule, result: StepOutput) -> list[RequestOutput]:
        row_of = {id(chunk.request): row for row, chunk in enumerate(schedule.chunks)}
        if result.next_token_logprobs is not None:
            self._collect_prompt_logprobs(schedule, result.next_token_logprobs)
        outputs = []
        for update in self.scheduler.update(schedule, result.tokens.tolist()):
            if update.new_token is None:
                continue
            req = update.request
            row = row_of[id(req)]
            detok = self._detokenizers[req.request_id]
            piece = detok.add(update.new_token)
            reason = update.finish_reason if update.is_finished else None
            if piece.stop_sequence is not None and reason is None:
                self.scheduler.finish_request(req.request_id, FinishReason.STOP_SEQUENCE)
                reason = FinishReason.STOP_SEQUENCE
            token = GeneratedToken(
                token_id=update.new_token,
                text=piece.text,
                logprob=float(result.logprobs[row]),
                is_special=update.new_token in self._special_ids,
                top=self._top(result, row, req.params.top_n_tokens),
            )
            if reason is not None:
                self._detokenizers.pop(req.request_id, None)
            out = self._output(req, (token,), piece.text, reason, piece.stop_sequence)
            prompt_lps = self._prompt_logprobs.pop(req.request_id, None)
            if prompt_lps is not None:
                out = dataclasses.replace(out, prompt_tokens=self._prompt_tokens(req, prompt_lps))
            outputs.append(out)
        return outputs

    def _collect_prompt_logprobs(self, schedule, next_token_logprobs) -> None:
        offset = 0
        for chunk in schedule.chunks:
            req = chunk.request
            lps = self._prompt_logprobs.get(req.request_id)
            # lps holds prompt tokens [0, len); the next one needed follows position len - 1. Taking
            # only from there on keeps a recompute after preemption from adding entries twice.
            first = len(lps) - 1 if lps is not None else -1
            if chunk.start <= first < chunk.start + chunk.num_tokens:
                upto = min(chunk.start + chunk.num_tokens, req.num_prompt_tokens - 1)
                lps.extend(next_token_logprobs[offset + first - chunk.start : offset + upto - chunk.start].tolist())
            offset += chunk.num_tokens

    def _prompt_tokens(self, req: Request, lps: list[float]) -> tuple[TokenLogprob, ...]:
        ids = req.prompt_token_ids
        texts = self.tokenizer.batch_decode([[i] for i in ids])
        return tuple(TokenLogprob(i, t, lp) for i, t, lp in zip(ids, texts, lps))

    def _top(self, result, row: int, n: int) -> tuple[TokenLogprob, ...]:
        if n == 0:
            return ()
        ids = result.top_ids[row, :n].tolist()
        lps = result.top_logprobs[row, :n].tolist()
        return tuple(TokenLogprob(i, self.tokenizer.decode([i]), lp) for i, lp in zip(ids, lps))

    @staticmethod
    def _output(req: Request, tokens, text: str, reason: FinishReason | None, stop: str | None) -> RequestOutput:
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
