"""ModelRunner: the one host<->device seam.

Owns: the device state (weights as flat leaves, the paged KV cache: one pool per KV cache group,
each layer's array sized for its group), the AOT-compiled step programs, bucket choice, and the
per-step conversion of a Schedule into fixed-shape arrays (a page table and slot mapping per
group) and of the sampled result back into numpy. Must not: decide what runs (the scheduler
does), know request lifecycles, or detokenize.

Two programs make a step (their bodies are in engine.step_programs). `forward` runs the model over
the step's flat, padded token stream (prefill chunks and decodes mixed) and gathers the hidden state
at each request's last token into a [max_batch_size, D] buffer; it compiles once per token bucket.
`sample` computes logits for those rows and samples; it compiles once per request bucket and
sampling variant. Splitting them keeps the compile count at |token buckets| + |request buckets| x
variants instead of their product. Every program is compiled ahead of time at warmup; serving looks
them up by shape and never traces, so a shape that slipped past warmup fails loudly instead of
compiling on the hot path.

On a mesh (engine.sharding.step_layout) the same programs run tensor-parallel, and with several
data-parallel replicas each takes one Schedule per replica, padded to common buckets and stacked on
a leading replica axis: one program launch drives every device. A step's host arrays (_StepInputs)
are also what a multi-host leader broadcasts (encode_plan/decode_plan), so every host runs it.

Asynchronous steps: `dispatch` launches a step without waiting and `collect` fetches its samples,
so the engine can prepare and launch step n+1 while step n runs. A decode of step n+1 whose input
is step n's still-unknown sample carries Request.PLACEHOLDER as its token id; the runner points it
at the request's row of step n, and the forward program reads the token from step n's sampled
tokens, which never leave the device (`prev_index`, [T] int32, -1 where the host's id is real).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engine import sampling
from engine.config import Limits
from engine.pallas_kernels.ragged_paged_attention.metadata import AttentionMetadata, kv_cache_shape
from engine.profiling import phase
from engine.sampling_params import SamplingParams
from engine.scheduler import Schedule
from engine.sharding.distributed import decode_arrays, encode_arrays
from engine.sharding.step_layout import StepLayout
from engine.step_arrays import build_step_arrays
from engine.step_programs import SampleVariant, forward, prompt_logprobs, sample, sample_buckets

log = logging.getLogger(__name__)
_NEUTRAL = SamplingParams()  # what rows whose sample is discarded are given

Progress = Callable[[int, int, str], None]


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """Host copies of one step's samples, one row per scheduled chunk."""

    tokens: np.ndarray  # [C] int32
    logprobs: np.ndarray  # [C] float32
    top_ids: np.ndarray  # [C, n] int32
    top_logprobs: np.ndarray  # [C, n] float32
    # [T] float32 when some chunk asked for prompt logprobs: entry i is the logprob of the token
    # following flat token i (the runner's targets), in the order the chunks were laid out.
    next_token_logprobs: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _StepInputs:
    """One step's host arrays, padded to its buckets, ready for the programs.

    With several replicas every array has a leading replica axis, and num_rows/num_tokens one
    entry per replica.
    """

    t_pad: int
    r_pad: int
    variant: SampleVariant
    input_ids: np.ndarray  # [T_pad] int32
    md: AttentionMetadata
    logits_indices: np.ndarray  # [R_max] int32
    smd: sampling.SamplingMetadata
    targets: np.ndarray | None  # [T_pad] int32, when some chunk asked for prompt logprobs
    num_rows: tuple[int, ...]
    num_tokens: tuple[int, ...]
    prev_index: np.ndarray | None = None  # [T_pad] int32: row of the previous step's sample, or -1

    @property
    def arrays(self) -> tuple:
        return self.input_ids, self.prev_index, self.md, self.logits_indices, self.smd, self.targets


@dataclasses.dataclass(frozen=True)
class Pending:
    """A launched step: its device outputs, fetched by ModelRunner.collect."""

    out: sampling.SampleOutput
    prompt_lp: jax.Array | None
    num_rows: tuple[int, ...]
    num_tokens: tuple[int, ...]


class ModelRunner:
    def __init__(
        self, model: nnx.Module, limits: Limits, *, max_top_n_tokens: int, enable_prefill_logprobs: bool = False,
        mesh: jax.sharding.Mesh | None = None,
    ) -> None:
        """mesh: the (data, model) mesh `model`'s weights are laid out on; None for one device."""
        self.config = model.config
        self.limits = limits
        self.layout = StepLayout(mesh)
        self.num_replicas = self.layout.num_replicas
        self.max_top_n_tokens = max_top_n_tokens
        self.enable_prefill_logprobs = enable_prefill_logprobs
        graphdef, state = nnx.split(model)
        # Flattened once: re-walking the state pytree on every call costs host time per step.
        leaves, treedef = jax.tree.flatten(state)
        self._leaves = leaves
        dtype = leaves[0].dtype if leaves else jnp.float32
        self.kv_dtype = jnp.dtype(self._param_dtype(leaves, dtype))
        mc = self.config
        if len(limits.kv_groups) != len(mc.kv_cache_windows()):
            raise ValueError(f"{len(limits.kv_groups)} KV group limits for windows {mc.kv_cache_windows()}")
        shapes = [
            kv_cache_shape(g.num_pages, limits.page_size, mc.num_kv_heads, mc.head_dim) for g in limits.kv_groups
        ]
        self._kv_caches = tuple(
            self.layout.kv_cache(shapes[mc.kv_group_of(i)], self.kv_dtype) for i in range(mc.num_layers)
        )  # L x [2, P_group, S, K, H], each with a leading replica axis when there are several
        self._graph = graphdef, treedef
        self._forward_jit = jax.jit(
            self.layout.program(functools.partial(forward, graphdef, treedef)), donate_argnums=(1,)
        )
        self._prompt_jit = jax.jit(
            self.layout.program(functools.partial(prompt_logprobs, graphdef, treedef), readable=True)
        )
        self._forward_programs: dict[int, jax.stages.Compiled] = {}
        self._prompt_programs: dict[int, jax.stages.Compiled] = {}
        self._sample_programs: dict[tuple[int, SampleVariant], jax.stages.Compiled] = {}
        # Where warmup's time went, per program kind: [programs, trace+lower s, compile s]. Python
        # tracing and lowering run on every start; compiling is what the persistent cache skips.
        self.warmup_breakdown: dict[str, list] = {}
        self._history_len = limits.max_total_tokens
        self.sample_buckets = sample_buckets(limits.request_buckets, jax.default_backend())
        r_max = limits.request_buckets[-1]
        # The last launched step's sampled tokens [R_max] (on device), and each sampled request's row.
        self._prev_tokens = self.layout.put(
            self.layout.stack([np.zeros(r_max, np.int32)] * self.num_replicas), readable=True
        )
        self._prev_rows: list[dict[int, int]] = [{} for _ in range(self.num_replicas)]

    @staticmethod
    def _param_dtype(leaves, default):
        floats = [x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
        return floats[0] if floats else default

    # ---- compilation -------------------------------------------------------------------------

    @property
    def num_compiled_programs(self) -> int:
        return len(self._forward_programs) + len(self._sample_programs) + len(self._prompt_programs)

    def forward_program(self, t_pad: int) -> jax.stages.Compiled:
        """The compiled forward of one token bucket (benchmarks read its optimized HLO)."""
        return self._forward_programs[t_pad]

    def sample_variants(self) -> list[SampleVariant]:
        tops = sorted({0, self.max_top_n_tokens})
        return [SampleVariant(g, p, n) for g, p, n in itertools.product((True, False), (False, True), tops)]

    def warmup(self, progress: Progress | None = None) -> float:
        """Compiles every (bucket, variant) program; returns the seconds it took."""
        start = time.perf_counter()
        jobs = [("forward", t) for t in self.limits.token_buckets] + [
            ("sample", (r, v)) for r in self.sample_buckets for v in self.sample_variants()
        ]
        if self.enable_prefill_logprobs:
            jobs += [("prompt_logprobs", t) for t in self.limits.token_buckets]
        for i, (kind, key) in enumerate(jobs):
            if progress:
                progress(i, len(jobs), f"compiling {kind} {key}")
            t0 = time.perf_counter()
            if kind == "forward":
                lowered = self._lower_forward(key)
            elif kind == "prompt_logprobs":
                hidden = self.layout.abstract((key, self.config.hidden_size), self.kv_dtype)
                targets = self.layout.abstract((key,), jnp.int32)
                with self.layout.tracing():
                    lowered = self._prompt_jit.lower(self._leaves, hidden, targets)
            else:
                lowered = self._lower_sample(*key)
            t1 = time.perf_counter()
            programs = {"forward": self._forward_programs, "prompt_logprobs": self._prompt_programs}
            programs.get(kind, self._sample_programs)[key] = lowered.compile()
            acc = self.warmup_breakdown.setdefault(kind, [0, 0.0, 0.0])
            acc[0] += 1
            acc[1] += t1 - t0
            acc[2] += time.perf_counter() - t1
        if progress:
            progress(len(jobs), len(jobs), "compiled")
        elapsed = time.perf_counter() - start
        log.info("warmup compiled %d programs in %.1f s (%s)", self.num_compiled_programs, elapsed, ", ".join(
            f"{k}: {n} programs, trace+lower {lo:.1f} s, compile {c:.1f} s"
            for k, (n, lo, c) in self.warmup_breakdown.items()
        ))
        return elapsed

    def _lower_forward(self, num_tokens: int) -> jax.stages.Lowered:
        r_max = self.limits.request_buckets[-1]
        i32 = lambda *shape: self.layout.abstract(shape, jnp.int32)
        others = range(len(self.limits.kv_groups) - 1)
        md = AttentionMetadata(
            positions=i32(num_tokens),
            slot_mapping=i32(num_tokens),
            token_seq=i32(num_tokens),
            page_table=i32(r_max, self.limits.max_pages_per_seq),
            seq_lens=i32(r_max),
            group_page_tables=tuple(i32(r_max, self.limits.max_pages_per_seq) for _ in others),
            group_slot_mappings=tuple(i32(num_tokens) for _ in others),
        )
        with self.layout.tracing():
            lowered = self._forward_jit.lower(
                self._leaves, self._kv_caches, self.layout.abstract((r_max,), jnp.int32, readable=True),
                i32(num_tokens), i32(num_tokens), md, i32(r_max),
            )
        return lowered

    def _lower_sample(self, num_rows: int, variant: SampleVariant) -> jax.stages.Lowered:
        r_max = self.limits.request_buckets[-1]
        hidden = self.layout.abstract((r_max, self.config.hidden_size), self.kv_dtype)
        history = self._history_len if variant.use_penalties else None
        smd = self.layout.abstract_like(sampling.build_sampling_metadata([], num_rows, history))
        fn = functools.partial(sample, *self._graph, num_rows=num_rows, variant=variant)
        with self.layout.tracing():
            return jax.jit(self.layout.program(fn, readable=True)).lower(self._leaves, hidden, smd)

    # ---- one step ----------------------------------------------------------------------------

    def _step_shape(
        self, schedules: list[Schedule], variants: list[SampleVariant]
    ) -> tuple[int, int, SampleVariant, bool]:
        """Buckets, sampler variant and whether prompt logprobs are wanted: common to every replica."""
        t_pad = self._bucket(self.limits.token_buckets, max(s.num_tokens for s in schedules), "tokens")
        r_pad = self._bucket(self.sample_buckets, max(len(s.chunks) for s in schedules), "requests")
        variant = SampleVariant(
            all(v.all_greedy for v in variants),
            any(v.use_penalties for v in variants),
            max(v.num_top_logprobs for v in variants),
        )
        return t_pad, r_pad, variant, any(self._wants_prompt_logprobs(s) for s in schedules)

    def _wants_prompt_logprobs(self, schedule: Schedule) -> bool:
        return self.enable_prefill_logprobs and any(
            c.request.params.prompt_logprobs and c.start < c.request.num_prompt_tokens for c in schedule.chunks
        )

    def prepare(self, schedules: list[Schedule]) -> _StepInputs:
        """One step's host arrays: one schedule per replica (an empty one for an idle replica)."""
        if len(schedules) != self.num_replicas:
            raise ValueError(f"{len(schedules)} schedules for {self.num_replicas} replicas")
        if self.num_replicas == 1:
            return self._prepare_inputs(schedules[0])
        sampling_rows = [self._sampling_rows(s) for s in schedules]  # built once per replica
        shape = self._step_shape(schedules, [v for _, v in sampling_rows])
        parts = [
            self._prepare_inputs(s, shape, replica=i, sampling_rows=sampling_rows[i][0])
            for i, s in enumerate(schedules)
        ]
        first = parts[0]
        stacked = self.layout.stack([p.arrays for p in parts])
        input_ids, prev_index, md, logits_indices, smd, targets = stacked
        return _StepInputs(
            first.t_pad, first.r_pad, first.variant, input_ids, md, logits_indices, smd, targets,
            num_rows=tuple(r for p in parts for r in p.num_rows),
            num_tokens=tuple(t for p in parts for t in p.num_tokens), prev_index=prev_index,
        )

    def _prepare_inputs(
        self, schedule: Schedule, shape: tuple[int, int, SampleVariant, bool] | None = None, replica: int = 0,
        sampling_rows: list[sampling.SamplingRow] | None = None,
    ) -> _StepInputs:
        """shape (t_pad, r_pad, variant, prompt logprobs) forces the buckets: replicas share one.
        sampling_rows: the schedule's rows when the caller built them already (with `shape`)."""
        chunks = schedule.chunks
        num_tokens = sum(c.num_tokens for c in chunks)
        if shape is None:
            t_pad = self._bucket(self.limits.token_buckets, num_tokens, "tokens")
            r_pad = self._bucket(self.sample_buckets, len(chunks), "requests")
        else:
            t_pad, r_pad = shape[:2]
        want_prompt = self._wants_prompt_logprobs(schedule) if shape is None else shape[3]
        a = build_step_arrays(
            chunks, t_pad=t_pad, r_max=self.limits.request_buckets[-1], max_pages=self.limits.max_pages_per_seq,
            page_size=self.limits.page_size, num_groups=len(self.limits.kv_groups),
            prev_rows=self._prev_rows[replica], want_targets=want_prompt,
        )
        md = AttentionMetadata(
            a.positions, a.slot_mapping[0], a.token_seq, a.page_table[0], a.seq_lens,
            group_page_tables=tuple(a.page_table[1:]), group_slot_mappings=tuple(a.slot_mapping[1:]),
        )
        rows_now = {id(c.request): row for row, c in enumerate(chunks) if c.samples}
        self._prev_rows[replica] = rows_now
        if shape is None:
            rows, variant = self._sampling_rows(schedule)
        else:
            rows = self._sampling_rows(schedule)[0] if sampling_rows is None else sampling_rows
            variant = shape[2]
        history = self._history_len if variant.use_penalties else None
        smd = sampling.build_sampling_metadata(rows, r_pad, history)
        return _StepInputs(
            t_pad, r_pad, variant, a.input_ids, md, a.logits_indices, smd, a.targets, (len(chunks),),
            (num_tokens,), a.prev_index,
        )

    def execute(self, schedule: Schedule) -> StepOutput:
        """One step of a one-replica runner."""
        return self.execute_replicas([schedule])[0]

    def execute_replicas(self, schedules: list[Schedule]) -> list[StepOutput]:
        """One step: schedules[i] runs on replica i; one StepOutput per replica."""
        with phase("prepare_inputs"):
            x = self.prepare(schedules)
        return self.run(x)

    def run(self, x: _StepInputs) -> list[StepOutput]:
        """Runs prepared inputs (this process's own, or a multi-host leader's plan) and waits."""
        return self.collect(self.dispatch(x))

    def dispatch(self, x: _StepInputs) -> Pending:
        """Launches the step's programs without waiting for them (jax dispatch is asynchronous)."""
        # The programs' device time shows on the trace's device rows, and on the host inside `wait`.
        # The step's shape rides on the range: traces show bucket padding and the decode/prefill mix.
        shape = {"tokens": sum(x.num_tokens), "t_pad": x.t_pad, "rows": sum(x.num_rows), "r_pad": x.r_pad}
        with phase("device_execute", **shape):
            input_ids, prev_index, md, logits_indices, smd, targets = self.layout.put(x.arrays)
            forward = self._forward_programs[x.t_pad]
            hidden_last, hidden, self._kv_caches = forward(
                self._leaves, self._kv_caches, self._prev_tokens, input_ids, prev_index, md, logits_indices
            )
            with phase("sample"):
                out, self._prev_tokens = self._sample_programs[(x.r_pad, x.variant)](
                    self._leaves, hidden_last, smd
                )
            prompt_lp = None
            if targets is not None:
                prompt_lp = self._prompt_programs[x.t_pad](self._leaves, hidden, targets)
        return Pending(out, prompt_lp, x.num_rows, x.num_tokens)

    def collect(self, p: Pending) -> list[StepOutput]:
        """Waits for a dispatched step and copies its samples to the host, one StepOutput per replica."""
        with phase("wait"):
            out, prompt_lp = jax.device_get((p.out, p.prompt_lp))
        outs = self.layout.unstack(out)
        lps = self.layout.unstack(prompt_lp) if prompt_lp is not None else [None] * len(outs)
        return [
            StepOutput(
                tokens=np.asarray(o.tokens[:n]),
                logprobs=np.asarray(o.logprobs[:n]),
                top_ids=np.asarray(o.top_ids[:n]),
                top_logprobs=np.asarray(o.top_logprobs[:n]),
                next_token_logprobs=None if lp is None else np.asarray(lp[:t]),
            )
            for o, lp, n, t in zip(outs, lps, p.num_rows, p.num_tokens, strict=True)
        ]

    # ---- multi-host plans ------------------------------------------------------------------------

    def encode_plan(self, x: _StepInputs) -> bytes:
        """A step's inputs as bytes for the other hosts (typed arrays, no pickle)."""
        leaves = jax.tree.leaves(x.arrays)
        header = np.array([x.t_pad, x.r_pad, x.variant.all_greedy, x.variant.use_penalties,
                           x.variant.num_top_logprobs, x.targets is not None, *x.num_rows, *x.num_tokens], np.int64)
        return encode_arrays({"header": header, **{f"a{i}": leaf for i, leaf in enumerate(leaves)}})

    def decode_plan(self, payload: bytes) -> _StepInputs:
        arrays = decode_arrays(payload)
        h = [int(v) for v in arrays.pop("header")]
        t_pad, r_pad, variant, want = h[0], h[1], SampleVariant(bool(h[2]), bool(h[3]), h[4]), bool(h[5])
        n = self.num_replicas
        # The tree's structure (not its values) from an empty step of the same shape.
        template = self._prepare_inputs(Schedule(chunks=()), (t_pad, r_pad, variant, want))
        tree = jax.tree.unflatten(jax.tree.structure(template.arrays), [arrays[f"a{i}"] for i in range(len(arrays))])
        input_ids, prev_index, md, logits_indices, smd, targets = tree
        return _StepInputs(t_pad, r_pad, variant, input_ids, md, logits_indices, smd, targets,
                           num_rows=tuple(h[6:6 + n]), num_tokens=tuple(h[6 + n:]), prev_index=prev_index)

    def _sampling_rows(self, schedule: Schedule) -> tuple[list[sampling.SamplingRow], SampleVariant]:
        rows, greedy, penalties, top_n = [], True, False, 0
        for chunk in schedule.chunks:
            req = chunk.request
            if not chunk.samples:
                # A mid-prompt chunk's sample is discarded: a neutral greedy row keeps the fast path.
                rows.append(sampling.SamplingRow(_NEUTRAL, 0, 0, None, 0))
                continue
            p = req.params
            greedy &= p.is_greedy
            penalties |= p.uses_penalties
            top_n = max(top_n, p.top_n_tokens)
            tokens = req.all_token_ids if p.uses_penalties else None
            rows.append(sampling.SamplingRow(p, req.seed, req.num_output_tokens, tokens, req.num_prompt_tokens))
        variant = SampleVariant(greedy, penalties, self.max_top_n_tokens if top_n else 0)
        return rows, variant

    @staticmethod
    def _bucket(buckets: tuple[int, ...], n: int, what: str) -> int:
        i = bisect.bisect_left(buckets, n)
        if i == len(buckets):
            raise ValueError(f"step of {n} {what} exceeds the largest compiled bucket {buckets[-1]}")
        return buckets[i]
