"""Token choice for the torch fallback: one token per row of a step's logits, each row by its own request's rules.

Owns: the PyTorch twin of engine/sampling.py's rules, so a request means the same on both paths:
logit bias, repetition penalty (prompt + output, CTRL-style), frequency / presence penalties (output
only), then for sampled rows temperature, top-k, top-p and typical-p with HF's keep rules (ties
kept), and a Gumbel-max draw keyed by (seed, step) only; logprobs and top-n alternatives under the
raw distribution. Must not: import jax, hold request state (callers pass each row's), or let one
row's result depend on another row of the batch.

Shapes: R rows, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class SampleRow:
    params: SamplingParams
    seed: int  # 0 <= seed < 2**64
    token_ids: Sequence[int]  # prompt + output so far; read only by penalties
    num_prompt: int

    @property
    def step(self) -> int:
        return len(self.token_ids) - self.num_prompt


@dataclasses.dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float  # log_softmax of the raw logits at token_id
    top: tuple[tuple[int, float], ...]  # (token id, raw logprob), best first; top_n_tokens long


def penalize(x: torch.Tensor, row: SampleRow) -> torch.Tensor:
    """Logit bias, repetition, frequency and presence penalties on one row [V] (a new tensor)."""
    p = row.params
    if not p.uses_penalties:
        return x
    v = x.shape[-1]
    x = x.clone()
    if p.logit_bias:
        ids = torch.tensor([i for i, _ in p.logit_bias], device=x.device)
        bias = torch.tensor([b for _, b in p.logit_bias], device=x.device, dtype=x.dtype)
        keep = (ids >= 0) & (ids < v)  # ids the lm_head cannot emit are dropped, as on the Flax path
        x.index_add_(0, ids[keep], bias[keep])
    history = torch.tensor(list(row.token_ids), device=x.device, dtype=torch.long)  # [L]
    valid = (history >= 0) & (history < v)
    if p.repetition_penalty != 1.0:
        seen = torch.unique(history[valid])
        s = x[seen]
        x[seen] = torch.where(s < 0, s * p.repetition_penalty, s / p.repetition_penalty)
    if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
        output = history[row.num_prompt :]
        count = torch.bincount(output[(output >= 0) & (output < v)], minlength=v).to(x.dtype)  # [V]
        x = x - p.frequency_penalty * count - p.presence_penalty * (count > 0).to(x.dtype)
    return x


def _keep_ranked(x: torch.Tensor, key: torch.Tensor, weight: torch.Tensor, budget: float) -> torch.Tensor:
    """Keeps tokens whose key is >= the first key (best first) at which the weight ranked strictly
    above drops under budget: HF's "keep while the mass before is < p", ties kept. [V] -> [V]."""
    sorted_key, order = torch.sort(key, descending=True)
    before = torch.cumsum(weight[order], 0) - weight[order]  # [V], exclusive
    num_keep = max(int((before < budget).sum()), 1)  # monotone, so the kept ones form a prefix
    return torch.where(key >= sorted_key[num_keep - 1], x, float("-inf"))


def warp(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, typical-p on one sampled row [V]; filtered tokens -> -inf."""
    x = x / p.temperature
    v = x.shape[-1]
    if 0 < p.top_k < v:
        kth = torch.topk(x, p.top_k).values[-1]
        x = torch.where(x >= kth, x, float("-inf"))
    if p.top_p < 1.0:
        probs = torch.softmax(x, -1)
        x = _keep_ranked(x, x, probs, p.top_p)
    if p.typical_p < 1.0:
        logp = torch.log_softmax(x, -1)
        probs = logp.exp()
        entropy = -torch.where(probs > 0, probs * logp, 0.0).sum()
        x = _keep_ranked(x, -(-logp - entropy).abs(), probs, p.typical_p)
    return x


def _mix(seed: int, step: int) -> int:
    """A 64-bit generator seed from (seed, step) (splitmix64 finalizer), so draws ignore the batch."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def gumbel(seed: int, step: int, vocab: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(_mix(seed, step))
    u = torch.rand(vocab, generator=gen, device=device)  # [V] in [0, 1)
    # Clamped so the noise stays finite: -inf (filtered) logits must stay out of reach.
    return -torch.log(-torch.log(u.clamp_(min=1e-30)))


@torch.no_grad()
def sample(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[Sampled]:
    """One token per row of logits [R, V] (R == len(rows))."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} requests")
    logits = logits.float()
    raw = torch.log_softmax(logits, -1)  # [R, V]
    tokens = torch.argmax(logits, -1)  # [R], final for plain greedy rows
    for i, row in enumerate(rows):
        p = row.params
        if p.is_greedy and not p.uses_penalties:
            continue
        x = penalize(logits[i], row)
        if not p.is_greedy:
            x = warp(x, p) + gumbel(row.seed, row.step, x.shape[-1], x.device)
        tokens[i] = torch.argmax(x)
    chosen = raw.gather(1, tokens[:, None])[:, 0].tolist()  # [R]
    n = max((r.params.top_n_tokens for r in rows), default=0)
    top_lp, top_ids = torch.topk(raw, min(n, raw.shape[-1]), -1) if n else (None, None)  # [R, n]
    out = []
    for i, (row, tok) in enumerate(zip(rows, tokens.tolist())):
        k = row.params.top_n_tokens
        top = tuple(zip(top_ids[i, :k].tolist(), top_lp[i, :k].tolist())) if k else ()
        out.append(Sampled(int(tok), float(chosen[i]), top))
    return out
