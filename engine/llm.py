"""LLM: the blocking Python API, for scripts, benchmarks and tests.

Owns: submitting many prompts at once and collecting whole completions. Must not: run its own
scheduling; it only drives the engine's step (LLMEngine or TorchEngine) until its requests are done.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.api import Completion, RequestOutput
from engine.config import EngineConfig
from engine.engine_factory import create_engine
from engine.runner import Progress
from engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, cfg: EngineConfig | None = None, *, progress: Progress | None = None, **overrides) -> None:
        cfg = cfg or EngineConfig(**overrides)
        self.engine = create_engine(cfg, progress=progress)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Runs every prompt to completion, batched together; results come back in prompt order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        requests = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        collected: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        self.engine.run_until_done(lambda out: collected[out.request_id].append(out))
        return [self._completion(r, collected[r.request_id]) for r in requests]

    @staticmethod
    def _completion(req, outputs: list[RequestOutput]) -> Completion:
        tokens = tuple(t for out in outputs for t in out.tokens)
        return Completion(
            request_id=req.request_id,
            prompt_token_ids=tuple(req.prompt_token_ids),
            token_ids=tuple(t.token_id for t in tokens),
            text="".join(out.text for out in outputs),
            finish_reason=outputs[-1].finish_reason if outputs else "cancelled",
            tokens=tokens,
            seed=outputs[-1].seed if outputs else None,
        )
