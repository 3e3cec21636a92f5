"""TGI `parameters` validation: GenerateParameters -> SamplingParams, with TGI's exact messages.

Owns: the rules of TGI's validation.rs in TGI's order (best_of, temperature, penalties, top_p,
typical_p, top_k, max_new_tokens, stop, seed, top_n_tokens, inputs, truncate), the token-limit
checks every route shares, and the 422s for TGI parameters this engine cannot honour. Must not:
touch the engine or the concurrency permit.
"""

from __future__ import annotations

import dataclasses
import secrets

from engine.api import EngineInfo
from engine.sampling_params import SamplingParams
from router.errors import InputValidationError as Invalid
from router.schemas.tgi import GenerateParameters
from router.settings import RouterSettings
from router.tokenizer import RouterTokenizer

# TGI reserves KV for at most this many new tokens per chunk, so its length check uses
# min(max_new_tokens, 1024); we mirror that and then clamp to the real room left.
DEFAULT_GENERATION_LENGTH = 1024


@dataclasses.dataclass(frozen=True)
class Prepared:
    input_ids: tuple[int, ...]
    params: SamplingParams
    best_of: int
    sampling: bool
    details: bool
    decoder_input_details: bool
    return_full_text: bool


def check_lengths(num_input: int, max_new_tokens: int | None, info: EngineInfo) -> int:
    """TGI's validate_input: returns the max_new_tokens to run with."""
    if max_new_tokens is None:
        max_new_tokens = max(info.max_total_tokens - num_input, 1)
        checked = min(max_new_tokens, DEFAULT_GENERATION_LENGTH)
    else:
        checked = min(max_new_tokens, DEFAULT_GENERATION_LENGTH)
    if num_input + checked > info.max_total_tokens:
        raise Invalid(
            f"`inputs` tokens + `max_new_tokens` must be <= {info.max_total_tokens}. "
            f"Given: {num_input} `inputs` tokens and {checked} `max_new_tokens`"
        )
    if num_input > info.max_input_tokens:
        raise Invalid(f"`inputs` must have less than {info.max_input_tokens} tokens. Given: {num_input}")
    return max(1, min(max_new_tokens, info.max_total_tokens - num_input))


def make_params(**kw: object) -> SamplingParams:
    try:
        return SamplingParams(**kw)  # type: ignore[arg-type]
    except ValueError as e:
        raise Invalid(str(e)) from e


def validate_generate(
    p: GenerateParameters | None,
    inputs: str,
    settings: RouterSettings,
    info: EngineInfo,
    tokenizer: RouterTokenizer,
    *,
    stream: bool,
) -> Prepared:
    if p is None:  # TGI quirk: a request without `parameters` samples
        p = GenerateParameters(do_sample=True)
    if stream and p.best_of is not None and p.best_of > 1:
        raise Invalid("`best_of` != 1 is not supported when streaming tokens")
    if stream and p.decoder_input_details:
        raise Invalid("`decoder_input_details` == true is not supported when streaming tokens")
    best_of = p.best_of or 1  # TGI treats 0 as 1
    sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
    if best_of > 1 and not sampling:
        raise Invalid("you must use sampling when `best_of` is > 1")
    if settings.max_best_of == 1 and best_of != 1:
        raise Invalid("`best_of` != 1 is not allowed for this endpoint")
    if best_of > settings.max_best_of:
        raise Invalid(f"`best_of` must be > 0 and <= {settings.max_best_of}. Given: {best_of}")
    temperature = 1.0 if p.temperature is None else p.temperature
    if temperature <= 0:
        raise Invalid("`temperature` must be strictly positive")
    repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
    if repetition_penalty <= 0:
        raise Invalid("`repetition_penalty` must be strictly positive")
    frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
    if not -2.0 <= frequency_penalty <= 2.0:
        raise Invalid("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise Invalid("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise Invalid("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise Invalid("`top_k` must be strictly positive")
    if p.max_new_tokens == 0:
        raise Invalid("`max_new_tokens` must be strictly positive")
    if len(p.stop) > settings.max_stop_sequences:
        raise Invalid(
            f"`stop` supports up to {settings.max_stop_sequences} stop sequences. Given: {len(p.stop)}"
        )
    if best_of > 1 and p.seed is not None:
        raise Invalid("`seed` must not be set when `best_of` > 1")
    top_n = p.top_n_tokens or 0
    max_top_n = min(settings.max_top_n_tokens, info.max_top_n_tokens)
    if top_n > max_top_n:
        raise Invalid(f"`top_n_tokens` must be >= 0 and <= {max_top_n}. Given: {top_n}")
    if not inputs:
        raise Invalid("`inputs` cannot be empty")
    if p.truncate is not None and not 0 < p.truncate <= info.max_input_tokens:
        raise Invalid(
            f"`truncate` must be strictly positive and less than {info.max_input_tokens}. Given: {p.truncate}"
        )
    # Parameters TGI accepts but this engine cannot honour: refuse loudly instead of ignoring them.
    if p.grammar is not None:
        raise Invalid("grammar is not supported")
    if p.watermark:
        raise Invalid("`watermark` is not supported by this server")
    if p.adapter_id is not None:
        raise Invalid("`adapter_id` is not supported: this server serves only its base model")
    ids = tokenizer.encode(inputs)
    if p.truncate is not None:
        ids = ids[-p.truncate :]  # TGI keeps the last `truncate` tokens
    max_new = check_lengths(len(ids), p.max_new_tokens, info)
    seed = p.seed
    if sampling and seed is None:
        seed = secrets.randbits(63)  # drawn here so details can echo it, and best_of copies differ
    params = make_params(
        max_new_tokens=max_new,
        temperature=temperature if sampling else 0.0,
        top_k=p.top_k or 0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        typical_p=p.typical_p if p.typical_p is not None else 1.0,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed if sampling else None,
        stop=tuple(p.stop),
        top_n_tokens=top_n,
        prompt_logprobs=p.decoder_input_details,
    )
    return Prepared(
        input_ids=tuple(ids),
        params=params,
        best_of=best_of,
        sampling=sampling,
        details=p.details,
        decoder_input_details=p.decoder_input_details,
        return_full_text=bool(p.return_full_text),
    )
