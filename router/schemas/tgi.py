"""TGI-native wire schemas: request bodies of /generate, /generate_stream, / and /tokenize.

Owns: msgspec Structs whose field names, types and defaults match TGI's `GenerateParameters`
(unsigned fields are `ge=0` so a negative value is a deserialize error, as in TGI). Must not:
validate semantics (ranges with TGI's messages live in router/validation.py).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgspec ints stop at 2**64 - 1 anyway


class GenerateParameters(msgspec.Struct, kw_only=True):
    best_of: U32 | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: U32 | None = None
    return_full_text: bool | None = None
    stop: list[str] = []
    truncate: U32 | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: U64 | None = None
    top_n_tokens: U32 | None = None
    grammar: dict[str, Any] | None = None
    adapter_id: str | None = None


class GenerateRequest(msgspec.Struct, kw_only=True):
    inputs: str
    parameters: GenerateParameters | None = None


class CompatGenerateRequest(msgspec.Struct, kw_only=True):
    inputs: str
    parameters: GenerateParameters | None = None
    stream: bool = False


class SimpleToken(msgspec.Struct):
    id: int
    text: str
    start: int
    stop: int
