"""The device side of an engine step: the pure functions the runner compiles, one program per shape.

Owns: what runs inside `jit(forward)` (the model over the flat token stream, reading decodes' inputs
from the previous step's samples on the device), `jit(sample)` (logits and sampling for the rows
that sample) and `jit(prompt_logprobs)`, the sampler's static variants, and the row buckets the
sampler is compiled for. Must not: hold state, choose buckets for a step, or touch the host (the
runner does all three). Each function takes the model as (graphdef, treedef, leaves), so one
compiled program serves any weights of the same shapes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from engine import sampling


@dataclasses.dataclass(frozen=True)
class SampleVariant:
    """The static sampler flags: each combination is its own compiled program."""

    all_greedy: bool
    use_penalties: bool
    num_top_logprobs: int


def forward(graphdef, treedef, leaves, kv_caches, prev_tokens, input_ids, prev_index, md, logits_indices):
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    # Decodes whose input is the previous step's sample read it here: it never went to the host.
    input_ids = jnp.where(prev_index >= 0, prev_tokens[jnp.maximum(prev_index, 0)], input_ids)  # [T]
    with jax.named_scope("forward"):
        hidden, kv_caches = model(input_ids, kv_caches, md)  # [T, D]
    return hidden[logits_indices], hidden, kv_caches  # [R_max, D], [T, D]


PROMPT_LOGPROB_CHUNK = 16  # tokens per lm_head slice: bounds the [chunk, V] logits held at once


def prompt_logprobs(graphdef, treedef, leaves, hidden, targets):
    """log p(targets[t] | tokens <= t) for every flat token t. [T] f32."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    t = hidden.shape[0]
    pad = -t % PROMPT_LOGPROB_CHUNK
    hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, PROMPT_LOGPROB_CHUNK, hidden.shape[-1])
    targets = jnp.pad(targets, (0, pad)).reshape(-1, PROMPT_LOGPROB_CHUNK)

    def one(args):
        h, tgt = args  # [C, D], [C]
        logits = model.compute_logits(h)  # [C, V] float32
        return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tgt[:, None], -1)[:, 0]

    with jax.named_scope("prompt_logprobs"):
        return jax.lax.map(one, (hidden, targets)).reshape(-1)[:t]


def sample(graphdef, treedef, leaves, hidden_last, smd, *, num_rows, variant):
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    with jax.named_scope("logits"):
        logits = model.compute_logits(hidden_last[:num_rows])  # [R, V] float32
    with jax.named_scope("sample"):
        out = sampling.sample(
            logits,
            smd,
            all_greedy=variant.all_greedy,
            use_penalties=variant.use_penalties,
            num_top_logprobs=variant.num_top_logprobs,
        )
    # The next step's forward reads these at a fixed shape, whatever this step's row bucket.
    tokens = jnp.pad(out.tokens, (0, hidden_last.shape[0] - num_rows))  # [R_max]
    return out, tokens


def sample_buckets(request_buckets: tuple[int, ...], platform: str) -> tuple[int, ...]:
    """Row counts the sampler is compiled for. On an accelerator the lm_head reads its whole weight
    whatever the rows (Llama-3.1-8B, H100: 0.37 ms from 1 to 32 rows), so 16, 64, 256, ... and the
    largest bucket do: a third of the programs to trace at every start. A CPU computes every row,
    so it keeps every power of two."""
    if platform == "cpu":
        return request_buckets
    top = request_buckets[-1]
    return tuple(b for b in request_buckets if b == top or (b >= 16 and (b.bit_length() - 1) % 2 == 0))
