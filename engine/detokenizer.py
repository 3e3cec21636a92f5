"""IncrementalDetokenizer: one request's generated tokens turned into text, token by token.

Owns: streaming decode of the output (through tokenizers' DecodeStream, primed with the end of the
prompt so the first token gets its spacing right), stop-sequence matching on the cumulative output
text, and how much of that text is safe to stream while a stop sequence may still be forming.
Must not: import jax or numpy, decide that a request finished (the engine tells the scheduler),
or hand-roll byte-level/UTF-8 reassembly that DecodeStream already does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Prompt tokens replayed into the stream before the first output token. A few are enough for
# spacing (Metaspace strips the leading space of a decode's first token only) and cover the up to
# three trailing tokens of a UTF-8 character that byte-level tokenizers can leave unfinished.
_PRIME_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class DetokenizedStep:
    text: str  # new output text for this token; "" while a multi-byte character is incomplete
    stop_sequence: str | None  # the stop sequence this token completed, if any


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: tuple[str, ...] = (),
    ) -> None:
        """tokenizer: a transformers fast tokenizer, or a tokenizers.Tokenizer."""
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop sequences must be non-empty strings")
        self._tokenizer: Tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not isinstance(self._tokenizer, Tokenizer):
            raise ValueError("IncrementalDetokenizer needs a fast tokenizer (with a `backend_tokenizer`)")
        self._stop = tuple(stop)
        self._text = ""
        self._stop_sequence: str | None = None
        self._num_tokens = 0
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        # Replayed one token at a time, not passed as DecodeStream(ids=...): a prompt ending inside a
        # UTF-8 character would then leave the stream without a prefix, and the first output token
        # would re-emit the prompt's tail. Stepping makes the last complete point the prefix.
        for token_id in prompt_token_ids[-_PRIME_TOKENS:]:
            self._stream.step(self._tokenizer, token_id)

    @property
    def output_text(self) -> str:
        return self._text

    @property
    def num_tokens(self) -> int:
        """Tokens added so far."""
        return self._num_tokens

    @property
    def stop_sequence(self) -> str | None:
        return self._stop_sequence

    @property
    def is_stopped(self) -> bool:
        return self._stop_sequence is not None

    def add(self, token_id: int) -> DetokenizedStep:
        if self._stop_sequence is not None:
            raise RuntimeError(f"add() after the stop sequence {self._stop_sequence!r} ended the output")
        self._num_tokens += 1
        piece = self._stream.step(self._tokenizer, token_id) or ""
        if not piece:
            return DetokenizedStep("", None)
        old_len = len(self._text)
        self._text += piece
        match = self._find_stop(old_len)
        if match is None:
            return DetokenizedStep(piece, None)
        end, stop = match
        self._text = self._text[:end]
        self._stop_sequence = stop
        return DetokenizedStep(self._text[old_len:], stop)

    @property
    def safe_text_len(self) -> int:
        """Length of the prefix of output_text that can be streamed now: it excludes a tail that
        could still grow into a stop sequence. Once the output is done (stopped, EOS, length), all
        of output_text is final and the engine sends the rest."""
        text = self._text
        if self._stop_sequence is not None or not self._stop:
            return len(text)
        held = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return len(text) - held

    def _find_stop(self, old_len: int) -> tuple[int, str] | None:
        """The stop sequence that ends first in the text, looking only at matches that end in the
        newly added text (earlier ones were found on earlier calls). Ties go to the longer one."""
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for stop in self._stop:
            start = self._text.find(stop, max(0, old_len - len(stop) + 1))
            if start < 0:
                continue
            key = (start + len(stop), -len(stop), stop)
            if best is None or key < best:
                best = key
        if best is None:
            return None
        return best[0], best[2]
