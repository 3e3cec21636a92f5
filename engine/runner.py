"""ModelRunner: the one host<->device seam.

Owns: the device state (weights as flat leaves, the paged KV cache: one pool per KV cache group,
each layer's array sized for its group), the AOT-compiled step programs, bucket choice, and the
per-step conversion of a Schedule into fixed-shape arrays (a page table and slot mapping per
group) and of the sampled result back into numpy. Must not: decide what runs (the scheduler
does), know request lifecycles, or detokenize.

Two programs make a step. `forward` runs the model over the step's flat, padded token stream
(prefill chunks and decodes mixed) and gathers the hidden state at each request's last token into a
[max_batch_size, D] buffer; it compiles once per token bucket. `sample` computes logits for those
rows and samples; it compiles once per request bucket and sampling variant. Splitting them keeps
the compile count at |token buckets| + |request buckets| x variants instead of their product.
Every program is compiled ahead of time at warmup; serving looks them up by shape and never traces,
so a shape that slipped past warmup fails loudly instead of compiling on the hot path.
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
    """One step's host arrays, padded to its buckets, ready for the programs."""

    t_pad: int
    r_pad: int
    variant: SampleVariant
    input_ids: np.ndarray  # [T_pad] int32
    md: AttentionMetadata
    logits_indices: np.ndarray  # [R_max] int32
    smd: sampling.SamplingMetadata
    targets: np.ndarray | None  # [T_pad] int32, when some chunk asked for prompt logprobs
    num_rows: int
    num_tokens: int


@dataclasses.dataclass(frozen=True)
class SampleVariant:
    """The static sampler flags: each combination is its own compiled program."""

    all_greedy: bool
    use_penalties: bool
    num_top_logprobs: int


def _forward(graphdef, treedef, leaves, kv_caches, input_ids, md, logits_indices):
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    with jax.named_scope("forward"):
        hidden, kv_caches = model(input_ids, kv_caches, md)  # [T, D]
    return hidden[logits_indices], hidden, kv_caches  # [R_max, D], [T, D]


_PROMPT_LOGPROB_CHUNK = 16  # tokens per lm_head slice: bounds the [chunk, V] logits held at once


def _prompt_logprobs(graphdef, treedef, leaves, hidden, targets):
    """log p(targets[t] | tokens <= t) for every flat token t. [T] f32."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    t = hidden.shape[0]
    pad = -t % _PROMPT_LOGPROB_CHUNK
    hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, _PROMPT_LOGPROB_CHUNK, hidden.shape[-1])
    targets = jnp.pad(targets, (0, pad)).reshape(-1, _PROMPT_LOGPROB_CHUNK)

    def one(args):
        h, tgt = args  # [C, D], [C]
        logits = model.compute_logits(h)  # [C, V] float32
        return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tgt[:, None], -1)[:, 0]

    with jax.named_scope("prompt_logprobs"):
        return jax.lax.map(one, (hidden, targets)).reshape(-1)[:t]


def _sample(graphdef, treedef, leaves, hidden_last, smd, *, num_rows, variant):
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    with jax.named_scope("logits"):
        logits = model.compute_logits(hidden_last[:num_rows])  # [R, V] float32
    with jax.named_scope("sample"):
        return sampling.sample(
            logits,
            smd,
            all_greedy=variant.all_greedy,
            use_penalties=variant.use_penalties,
            num_top_logprobs=variant.num_top_logprobs,
        )


class ModelRunner:
    def __init__(
        self, model: nnx.Module, limits: Limits, *, max_top_n_tokens: int, enable_prefill_logprobs: bool = False
    ) -> None:
        self.config = model.config
        self.limits = limits
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
            jnp.zeros(shapes[mc.kv_group_of(i)], self.kv_dtype) for i in range(mc.num_layers)
        )  # L x [2, P_group, S, K, H]
        self._forward_jit = jax.jit(functools.partial(_forward, graphdef, treedef), donate_argnums=(1,))
        self._sample_jit = jax.jit(
            functools.partial(_sample, graphdef, treedef), static_argnames=("num_rows", "variant")
        )
        self._prompt_jit = jax.jit(functools.partial(_prompt_logprobs, graphdef, treedef))
        self._forward_programs: dict[int, jax.stages.Compiled] = {}
        self._prompt_programs: dict[int, jax.stages.Compiled] = {}
        self._sample_programs: dict[tuple[int, SampleVariant], jax.stages.Compiled] = {}
        self._history_len = limits.max_total_tokens

    @staticmethod
    def _param_dtype(leaves, default):
        floats = [x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
        return floats[0] if floats else default

    # ---- compilation -------------------------------------------------------------------------

    @property
    def num_compiled_programs(self) -> int:
        return len(self._forward_programs) + len(self._sample_programs) + len(self._prompt_programs)

    def sample_variants(self) -> list[SampleVariant]:
        tops = sorted({0, self.max_top_n_tokens})
        return [SampleVariant(g, p, n) for g, p, n in itertools.product((True, False), (False, True), tops)]

    def warmup(self, progress: Progress | None = None) -> float:
        """Compiles every (bucket, variant) program; returns the seconds it took."""
        start = time.perf_counter()
        jobs = [("forward", t) for t in self.limits.token_buckets] + [
            ("sample", (r, v)) for r in self.limits.request_buckets for v in self.sample_variants()
        ]
        if self.enable_prefill_logprobs:
            jobs += [("prompt_logprobs", t) for t in self.limits.token_buckets]
        for i, (kind, key) in enumerate(jobs):
            if progress:
                progress(i, len(jobs), f"compiling {kind} {key}")
            if kind == "forward":
                self._forward_programs[key] = self._compile_forward(key)
            elif kind == "prompt_logprobs":
                hidden = jax.ShapeDtypeStruct((key, self.config.hidden_size), self.kv_dtype)
                targets = jax.ShapeDtypeStruct((key,), jnp.int32)
                self._prompt_programs[key] = self._prompt_jit.lower(self._leaves, hidden, targets).compile()
            else:
                self._sample_programs[key] = self._compile_sample(*key)
        if progress:
            progress(len(jobs), len(jobs), "compiled")
        elapsed = time.perf_counter() - start
        log.info("warmup compiled %d programs in %.1f s", self.num_compiled_programs, elapsed)
        return elapsed

    def _compile_forward(self, num_tokens: int) -> jax.stages.Compiled:
        r_max = self.limits.request_buckets[-1]
        i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
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
        return self._forward_jit.lower(self._leaves, self._kv_caches, i32(num_tokens), md, i32(r_max)).compile()

    def _compile_sample(self, num_rows: int, variant: SampleVariant) -> jax.stages.Compiled:
        r_max = self.limits.request_buckets[-1]
        hidden = jax.ShapeDtypeStruct((r_max, self.config.hidden_size), self.kv_dtype)
        history = self._history_len if variant.use_penalties else None
        smd = sampling.build_sampling_metadata([], num_rows, history)
        return self._sample_jit.lower(self._leaves, hidden, smd, num_rows=num_rows, variant=variant).compile()

    # ---- one step ----------------------------------------------------------------------------

    def _prepare_inputs(self, schedule: Schedule) -> _StepInputs:
        chunks = schedule.chunks
        num_tokens = sum(c.num_tokens for c in chunks)
        t_pad = self._bucket(self.limits.token_buckets, num_tokens, "tokens")
        r_pad = self._bucket(self.limits.request_buckets, len(chunks), "requests")
        r_max = self.limits.request_buckets[-1]
        page_size = self.limits.page_size
        num_groups = len(self.limits.kv_groups)

        input_ids = np.zeros(t_pad, np.int32)
        positions = np.zeros(t_pad, np.int32)
        slot_mapping = np.zeros((num_groups, t_pad), np.int32)  # per KV cache group
        token_seq = np.zeros(t_pad, np.int32)
        page_table = np.zeros((num_groups, r_max, self.limits.max_pages_per_seq), np.int32)
        seq_lens = np.zeros(r_max, np.int32)
        logits_indices = np.zeros(r_max, np.int32)
        want_prompt = self.enable_prefill_logprobs and any(
            c.request.params.prompt_logprobs and c.start < c.request.num_prompt_tokens for c in chunks
        )
        targets = np.zeros(t_pad, np.int32) if want_prompt else None
        offset = 0
        for row, chunk in enumerate(chunks):
            req, n = chunk.request, chunk.num_tokens
            pos = np.arange(chunk.start, chunk.start + n, dtype=np.int32)
            span = slice(offset, offset + n)
            input_ids[span] = chunk.token_ids
            positions[span] = pos
            token_seq[span] = row
            for g, group_pages in enumerate(req.pages):
                # Entries of pages released from a sliding window are 0: the trash page, masked.
                pages = np.asarray(group_pages, np.int32)
                assert pages[chunk.start // page_size], "a step would write into a released page"
                slot_mapping[g, span] = pages[pos // page_size] * page_size + pos % page_size
                page_table[g, row, : len(pages)] = pages
            seq_lens[row] = chunk.start + n
            if targets is not None:
                following = req.all_token_ids[chunk.start + 1 : chunk.start + n + 1]
                targets[offset : offset + len(following)] = following
            offset += n
            logits_indices[row] = offset - 1
        # Padding tokens keep position 0 / slot 0: they write into the reserved page 0.
        md = AttentionMetadata(
            positions, slot_mapping[0], token_seq, page_table[0], seq_lens,
            group_page_tables=tuple(page_table[1:]), group_slot_mappings=tuple(slot_mapping[1:]),
        )

        rows, variant = self._sampling_rows(schedule)
        history = self._history_len if variant.use_penalties else None
        smd = sampling.build_sampling_metadata(rows, r_pad, history)
        return _StepInputs(
            t_pad, r_pad, variant, input_ids, md, logits_indices, smd, targets, len(chunks), num_tokens
        )

    def execute(self, schedule: Schedule) -> StepOutput:
        with phase("prepare_inputs"):
            x = self._prepare_inputs(schedule)
        # Dispatch is asynchronous on accelerators: the programs' device time shows on the trace's
        # device rows, and on the host inside `wait`.
        with phase("device_execute"):
            forward = self._forward_programs[x.t_pad]
            hidden_last, hidden, self._kv_caches = forward(
                self._leaves, self._kv_caches, x.input_ids, x.md, x.logits_indices
            )
            with phase("sample"):
                out = self._sample_programs[(x.r_pad, x.variant)](self._leaves, hidden_last, x.smd)
            prompt_lp = None
            if x.targets is not None:
                prompt_lp = self._prompt_programs[x.t_pad](self._leaves, hidden, x.targets)
            with phase("wait"):
                out, prompt_lp = jax.device_get((out, prompt_lp))
        n = x.num_rows
        return StepOutput(
            tokens=np.asarray(out.tokens[:n]),
            logprobs=np.asarray(out.logprobs[:n]),
            top_ids=np.asarray(out.top_ids[:n]),
            top_logprobs=np.asarray(out.top_logprobs[:n]),
            next_token_logprobs=None if prompt_lp is None else np.asarray(prompt_lp[: x.num_tokens]),
        )

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
