"""Conversions between the engine's records and their protobuf messages.

Owns: SamplingParams, EngineInfo, RequestOutput and StepStats (engine.api) <-> protobuf.
Must not: import jax or grpc; both processes use it.
Optional proto fields map to None so a missing seed or finish reason round-trips exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from engine.api import EngineInfo, GeneratedToken, RequestOutput, StepStats, TokenLogprob
from engine.rpc import engine_pb2 as pb
from engine.sampling_params import SamplingParams


# ---- sampling params ---------------------------------------------------------------------------


def params_to_pb(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        typical_p=p.typical_p,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        top_n_tokens=p.top_n_tokens,
        skip_special_tokens=p.skip_special_tokens,
        prompt_logprobs=p.prompt_logprobs,
        logit_bias=[pb.LogitBias(token_id=t, bias=b) for t, b in p.logit_bias],
    )
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def params_from_pb(m: pb.SamplingParams) -> SamplingParams:
    """Rebuilds SamplingParams; raises ValueError (the same message as in-process) on bad values."""
    return SamplingParams(
        max_new_tokens=m.max_new_tokens,
        temperature=m.temperature,
        top_k=m.top_k,
        top_p=m.top_p,
        typical_p=m.typical_p,
        repetition_penalty=m.repetition_penalty,
        frequency_penalty=m.frequency_penalty,
        presence_penalty=m.presence_penalty,
        seed=m.seed if m.HasField("seed") else None,
        stop=tuple(m.stop),
        stop_token_ids=tuple(m.stop_token_ids),
        ignore_eos=m.ignore_eos,
        top_n_tokens=m.top_n_tokens,
        skip_special_tokens=m.skip_special_tokens,
        prompt_logprobs=m.prompt_logprobs,
        logit_bias=tuple((b.token_id, b.bias) for b in m.logit_bias),
    )


def submit_request(request_id: str, prompt: str | Sequence[int], params: SamplingParams) -> pb.SubmitRequest:
    msg = pb.SubmitRequest(request_id=request_id, params=params_to_pb(params))
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        ids = [int(t) for t in prompt]
        if any(t < 0 for t in ids):  # uint32 on the wire; the engine's range check names the limit
            raise ValueError("Input validation error: token ids must be non-negative")
        msg.token_ids.ids.extend(ids)
    return msg


def submit_prompt(m: pb.SubmitRequest) -> str | list[int]:
    return m.text if m.WhichOneof("prompt") == "text" else list(m.token_ids.ids)


# ---- engine info ---------------------------------------------------------------------------------


def info_to_pb(i: EngineInfo) -> pb.EngineInfo:
    return pb.EngineInfo(
        model_id=i.model_id,
        model_dtype=i.model_dtype,
        max_batch_size=i.max_batch_size,
        max_input_tokens=i.max_input_tokens,
        max_total_tokens=i.max_total_tokens,
        max_batch_prefill_tokens=i.max_batch_prefill_tokens,
        max_batch_total_tokens=i.max_batch_total_tokens,
        page_size=i.page_size,
        max_top_n_tokens=i.max_top_n_tokens,
        vocab_size=i.vocab_size,
        eos_token_ids=list(i.eos_token_ids),
        tokenizer_dir=i.tokenizer_dir,
    )


def info_from_pb(m: pb.EngineInfo) -> EngineInfo:
    return EngineInfo(
        model_id=m.model_id,
        model_dtype=m.model_dtype,
        max_batch_size=m.max_batch_size,
        max_input_tokens=m.max_input_tokens,
        max_total_tokens=m.max_total_tokens,
        max_batch_prefill_tokens=m.max_batch_prefill_tokens,
        max_batch_total_tokens=m.max_batch_total_tokens,
        page_size=m.page_size,
        max_top_n_tokens=m.max_top_n_tokens,
        vocab_size=m.vocab_size,
        eos_token_ids=tuple(m.eos_token_ids),
        tokenizer_dir=m.tokenizer_dir,
    )


# ---- outputs -------------------------------------------------------------------------------------


def _lp_to_pb(t: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=t.token_id, text=t.text, logprob=t.logprob)


def _lp_from_pb(m: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(m.token_id, m.text, m.logprob)


def output_to_pb(o: RequestOutput) -> pb.RequestOutput:
    msg = pb.RequestOutput(
        request_id=o.request_id,
        tokens=[
            pb.GeneratedToken(
                token_id=t.token_id,
                text=t.text,
                logprob=t.logprob,
                is_special=t.is_special,
                top=[_lp_to_pb(x) for x in t.top],
            )
            for t in o.tokens
        ],
        text=o.text,
        finished=o.finished,
        num_prompt_tokens=o.num_prompt_tokens,
        num_generated_tokens=o.num_generated_tokens,
        prompt_tokens=[_lp_to_pb(x) for x in o.prompt_tokens],
    )
    if o.finish_reason is not None:
        msg.finish_reason = o.finish_reason
    if o.seed is not None:
        msg.seed = o.seed
    if o.stop_sequence is not None:
        msg.stop_sequence = o.stop_sequence
    return msg


def output_from_pb(m: pb.RequestOutput) -> RequestOutput:
    return RequestOutput(
        request_id=m.request_id,
        tokens=tuple(
            GeneratedToken(
                token_id=t.token_id,
                text=t.text,
                logprob=t.logprob,
                is_special=t.is_special,
                top=tuple(_lp_from_pb(x) for x in t.top),
            )
            for t in m.tokens
        ),
        text=m.text,
        finished=m.finished,
        finish_reason=m.finish_reason if m.HasField("finish_reason") else None,
        num_prompt_tokens=m.num_prompt_tokens,
        num_generated_tokens=m.num_generated_tokens,
        seed=m.seed if m.HasField("seed") else None,
        stop_sequence=m.stop_sequence if m.HasField("stop_sequence") else None,
        prompt_tokens=tuple(_lp_from_pb(x) for x in m.prompt_tokens),
    )


def stats_to_pb(s: StepStats) -> pb.StepStats:
    return pb.StepStats(**dataclasses.asdict(s))


def stats_from_pb(m: pb.StepStats) -> StepStats:
    return StepStats(**{f.name: getattr(m, f.name) for f in dataclasses.fields(StepStats)})


def event_to_pb(outputs: Sequence[RequestOutput], stats: StepStats) -> pb.StepEvent:
    return pb.StepEvent(outputs=[output_to_pb(o) for o in outputs], stats=stats_to_pb(stats))
