"""LLMEngine: one model's engine, driven one step at a time from a single thread.

Owns: start-up (load, size the KV cache, warm up), request admission and validation, and each
step's loop: schedule -> runner.execute -> scheduler.update -> detokenize and check stop strings.
Must not: block on anything but the device, hold asyncio objects (engine.async_engine does), or
touch device arrays (the runner does).

Scale-out (engine.sharding): the weights and KV cache may be split over a (data, model) mesh. Each
data-parallel replica has its own scheduler and KV page pools; a new request goes to the least
loaded replica, and one step runs every replica's schedule in one program. With several processes
(multi-host), process 0 is the leader: it schedules, broadcasts each step's inputs, and serves;
every other process is a follower that runs `follow()`, executing the leader's steps until it stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import tempfile
from collections.abc import Callable, Sequence

import jax

from engine.api import EngineInfo, GeneratedToken, RequestOutput, TokenLogprob
from engine.config import EngineConfig, Limits
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import KVCacheGroup, KVCacheGroups, PageAllocator
from engine.models.base import set_attention_fn, set_row_gemv
from engine.models.loader import LoadedModel
from engine.pallas_kernels.dispatch import attention_fn_for, row_gemv_for
from engine.profiling import phase
from engine.request import FinishReason, Request
from engine.runner import ModelRunner, Pending, Progress, StepOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import RequestUpdate, Schedule, Scheduler, SchedulerConfig
from engine.served_model import mesh_for, served_limits, served_model
from engine.sharding import distributed
from engine.sharding.attention import shard_attention
from engine.sharding.config import LayoutError
from engine.sharding.mesh import data_parallel

log = logging.getLogger(__name__)
_STOP = b"stop"  # the leader's last plan: followers exit cleanly


@dataclasses.dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # of the most-used KV cache group: the pool that runs out first
    num_compiled_programs: int


@dataclasses.dataclass(frozen=True)
class _Launched:
    """A step on the device whose samples the host has not seen yet."""

    schedules: list[Schedule]  # one per replica
    pending: Pending
    # Per replica: the scheduler's updates, applied at launch with placeholder tokens, each with the
    # index of its output token (-1 for a chunk that does not sample).
    updates: list[list[tuple[RequestUpdate, int]]]


class LLMEngine:
    def __init__(self, cfg: EngineConfig, *, loaded: LoadedModel | None = None, random_weights: bool = False,
                 progress: Progress | None = None):
        """loaded: a model to serve as it is (tests); random_weights: benchmarks only (engine.served_model)."""
        self.cfg = cfg
        self.mesh = mesh_for(cfg)
        self.process = distributed.ProcessInfo(jax.process_index(), jax.process_count())
        loaded = served_model(cfg, self.mesh, loaded=loaded, random_weights=random_weights, progress=progress)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        mc = loaded.config
        self.limits: Limits = served_limits(cfg, loaded, self.mesh)
        page_size = self.limits.page_size
        num_replicas = 1 if self.mesh is None else data_parallel(self.mesh)
        # One scheduler and one set of page pools per data-parallel replica: replicas share nothing.
        self.replica_kv_groups = [
            KVCacheGroups(
                [KVCacheGroup(g.window, PageAllocator(g.num_pages, page_size)) for g in self.limits.kv_groups]
            )
            for _ in range(num_replicas)
        ]
        self.kv_groups = self.replica_kv_groups[0]
        self._log_kv_groups()
        sched_cfg = SchedulerConfig(
            max_batch_size=self.limits.max_batch_size,
            max_batch_prefill_tokens=self.limits.max_batch_prefill_tokens,
            max_total_tokens=self.limits.max_total_tokens,
            enable_chunked_prefill=cfg.enable_chunked_prefill,
        )
        self.schedulers = [Scheduler(sched_cfg, groups) for groups in self.replica_kv_groups]
        self.scheduler = self.schedulers[0]
        self._replica_of: dict[str, int] = {}
        attention_fn = attention_fn_for(backend=cfg.attention_backend)
        log.info("attention: %s (%s backend)", attention_fn.__name__, cfg.attention_backend)
        if self.mesh is not None:
            attention_fn = shard_attention(attention_fn, self.mesh)
        set_attention_fn(loaded.model, attention_fn)
        # Only on one device: the one-row GEMV needs fused projections, which a mesh never has.
        if self.mesh is None and set_row_gemv(loaded.model, row_gemv_for(backend=cfg.attention_backend)):
            log.info("one-row steps: fused GEMV kernels")
        self.runner = ModelRunner(
            loaded.model,
            self.limits,
            max_top_n_tokens=cfg.max_top_n_tokens,
            enable_prefill_logprobs=cfg.enable_prefill_logprobs,
            mesh=self.mesh,
        )
        # Compiled before any step runs, so the step watchdog never times a compilation.
        self.warmup_seconds = self.runner.warmup(progress)
        self._channel = self._watchdog = None
        if self.process.num_processes > 1:
            timeout = cfg.sharding.step_timeout_s
            self._channel = distributed.PlanChannel(self.process, timeout_s=timeout)
            self._watchdog = distributed.StepWatchdog(timeout, name=f"process {self.process.process_id}")
            # The leader serves only once every host has compiled: a step would otherwise wait in its
            # collectives on a host still compiling, and the watchdog would call that host hung.
            self._channel.barrier("warm", cfg.sharding.initialization_timeout_s)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._inflight: _Launched | None = None
        # Requests whose next step needs this step's real tokens on the host (penalties read the
        # history; prompt logprobs are gathered per chunk): while any is unfinished, steps run one
        # at a time.
        self._needs_sync: set[str] = set()
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
        replicas = len(self.replica_kv_groups)
        each = f" per replica ({replicas} replicas)" if replicas > 1 else ""
        log.info("KV cache: %d tokens for the running batch%s", limits.kv_capacity_tokens, each)
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
        replica = self._least_loaded()
        self.schedulers[replica].add_request(req)
        self._replica_of[request_id] = replica
        if params.prompt_logprobs and self.cfg.enable_prefill_logprobs:
            self._prompt_logprobs[request_id] = [math.nan]  # nothing precedes the first prompt token
            self._needs_sync.add(request_id)
        if params.uses_penalties:
            self._needs_sync.add(request_id)
        self._detokenizers[request_id] = IncrementalDetokenizer(
            self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop
        )
        return req

    def _least_loaded(self) -> int:
        """The replica with the fewest unfinished requests; the emptier KV cache breaks ties."""
        if len(self.schedulers) == 1:
            return 0
        loads = [(s.num_running + s.num_waiting, g.usage()) for s, g in zip(self.schedulers, self.replica_kv_groups)]
        return loads.index(min(loads))

    def abort(self, request_id: str) -> RequestOutput | None:
        replica = self._replica_of.get(request_id)
        req = self.schedulers[replica].abort_request(request_id) if replica is not None else None
        if req is None:
            # Unknown, done, or ended by length when its last step launched (async steps): that
            # step's output still ends the request, so its detokenizer stays for step() to use.
            return None
        self._replica_of.pop(request_id, None)
        self._detokenizers.pop(request_id, None)
        self._prompt_logprobs.pop(request_id, None)
        self._needs_sync.discard(request_id)
        return self._output(req, (), "", FinishReason.CANCELLED, None)

    def has_unfinished(self) -> bool:
        return self._inflight is not None or any(s.has_unfinished() for s in self.schedulers)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=sum(s.num_running for s in self.schedulers),
            num_waiting=sum(s.num_waiting for s in self.schedulers),
            kv_cache_usage=max(g.usage() for g in self.replica_kv_groups),
            num_compiled_programs=self.runner.num_compiled_programs,
        )

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Returns the outputs of one step. With asynchronous scheduling the next step is already
        launched when this returns: the host's work for step n+1 (schedule, inputs) and for step n
        (update, detokenize) runs while the device computes step n+1."""
        # The phases show as host ranges tgx.* in a profiler trace (engine/profiling.py).
        with phase("step"):
            if self._inflight is None:
                launched = self._schedule_and_launch()
                if launched is None:
                    return []
            else:
                launched = self._inflight
            self._inflight = None
            if self.cfg.async_scheduling and not self._needs_sync:
                # Scheduled as if no request stopped in `launched`; a row of one that did is dropped.
                self._inflight = self._schedule_and_launch()
            return self._finish_step(launched)

    def _schedule_and_launch(self) -> _Launched | None:
        with phase("schedule"):
            schedules = [s.schedule() for s in self.schedulers]
        if all(s.is_empty for s in schedules):
            return None
        with phase("prepare_inputs"):
            x = self.runner.prepare(schedules)
            if self._channel is not None:
                self._channel.publish(self.runner.encode_plan(x))  # the followers run the same step
        pending = self.runner.dispatch(x)
        placeholder = Request.PLACEHOLDER
        updates = []
        for scheduler, schedule in zip(self.schedulers, schedules, strict=True):
            ups = scheduler.update(schedule, [placeholder] * len(schedule.chunks))
            updates.append([(u, u.request.num_output_tokens - 1 if u.new_token is not None else -1) for u in ups])
        return _Launched(schedules, pending, updates)

    def _finish_step(self, launched: _Launched) -> list[RequestOutput]:
        with self._watchdog.step() if self._watchdog is not None else contextlib.nullcontext():
            results = self.runner.collect(launched.pending)
        with phase("outputs"):  # real tokens in, token stops, detokenize, stop strings
            outputs = []
            for scheduler, schedule, result, updates in zip(
                self.schedulers, launched.schedules, results, launched.updates, strict=True
            ):
                outputs += self._outputs(scheduler, schedule, result, updates)
            return outputs

    # ---- multi-host ------------------------------------------------------------------------------

    def on_idle(self) -> None:
        """Called by the engine loop while there is nothing to run: keeps followers from timing out."""
        if self._channel is not None and self._channel.keepalive_due():
            self._channel.publish(b"")

    def follow(self) -> None:
        """A follower's whole life: run the leader's steps until it says stop. PeerFailure when the
        leader dies or hangs; a step that outlives the step timeout ends the process (watchdog)."""
        if self._channel is None or self.process.is_leader:
            raise LayoutError("only a follower process of a multi-host engine follows plans")
        while (payload := self._channel.receive()) != _STOP:
            if payload:  # empty: the leader's keep-alive
                with self._watchdog.step():
                    self.runner.run(self.runner.decode_plan(payload))
        log.info("process %d: the leader stopped the engine", self.process.process_id)

    def shutdown(self) -> None:
        """A leader tells its followers to exit cleanly (else they would count it as dead)."""
        if self._channel is not None and self.process.is_leader:
            self._channel.publish(_STOP)

    def _outputs(
        self, scheduler: Scheduler, schedule: Schedule, result: StepOutput, updates: list[tuple[RequestUpdate, int]]
    ) -> list[RequestOutput]:
        row_of = {id(chunk.request): row for row, chunk in enumerate(schedule.chunks)}
        if result.next_token_logprobs is not None:
            self._collect_prompt_logprobs(schedule, result.next_token_logprobs)
        outputs = []
        tokens, logprobs = result.tokens.tolist(), result.logprobs.tolist()  # Python ints/floats, once
        for update, index in updates:
            if update.new_token is None:
                continue
            req = update.request
            detok = self._detokenizers.get(req.request_id)
            if detok is None:  # aborted, or stopped at an earlier step while this one ran: dropped
                continue
            row = row_of[id(req)]
            token_id = tokens[row]
            req.set_output_token(index, token_id)
            reason = update.finish_reason if update.is_finished else None
            if (stop := scheduler.token_stop_reason(req, token_id)) is not None:
                reason = self._stop_at(scheduler, req, index, stop)
            piece = detok.add(token_id)
            if piece.stop_sequence is not None and reason is None:
                reason = self._stop_at(scheduler, req, index, FinishReason.STOP_SEQUENCE)
            token = GeneratedToken(
                token_id=token_id,
                text=piece.text,
                logprob=logprobs[row],
                is_special=token_id in self._special_ids,
                top=self._top(result, row, req.params.top_n_tokens),
            )
            if reason is not None:
                self._detokenizers.pop(req.request_id, None)
                self._replica_of.pop(req.request_id, None)
                self._needs_sync.discard(req.request_id)
            out = self._output(req, (token,), piece.text, reason, piece.stop_sequence)
            prompt_lps = self._prompt_logprobs.pop(req.request_id, None)
            if prompt_lps is not None:
                out = dataclasses.replace(out, prompt_tokens=self._prompt_tokens(req, prompt_lps))
            outputs.append(out)
        return outputs

    @staticmethod
    def _stop_at(scheduler: Scheduler, req: Request, index: int, reason: FinishReason) -> FinishReason:
        """Ends `req` at its output token `index`, dropping placeholders of steps launched after it.
        Its pages may go back while a launched step still writes them: steps run in launch order,
        so a later owner's writes always land after."""
        if req.is_finished:  # ended by length at launch, on this very token: the token's reason wins
            req.finish_reason = reason
        else:
            scheduler.finish_request(req.request_id, reason)
        req.truncate_output(index + 1)
        return reason

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
