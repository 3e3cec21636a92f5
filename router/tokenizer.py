"""Router-side tokenizer: token counting, /tokenize offsets and chat templates.

Owns: the one Hugging Face tokenizer the router process loads (from EngineInfo.tokenizer_dir) and
the few operations the HTTP layer needs from it. Must not: decode engine output (the engine streams
text already) or hold per-request state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router.errors import TemplateError


class RouterTokenizer:
    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer

    @classmethod
    def from_dir(cls, path: str) -> RouterTokenizer:
        from transformers import AutoTokenizer  # heavy import kept off the module import path

        return cls(AutoTokenizer.from_pretrained(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def tokens_with_offsets(
        self, text: str, add_special_tokens: bool = True
    ) -> list[tuple[int, str, int, int]]:
        """(id, text, start, stop) per token; offsets are UTF-8 byte offsets, as TGI reports them."""
        enc = self.hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        # Python offsets count characters; TGI (Rust) reports bytes, so map char index -> byte index.
        byte_at = [0]
        for ch in text:
            byte_at.append(byte_at[-1] + len(ch.encode("utf-8")))
        out = []
        for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
            out.append((int(tid), text[s:e], byte_at[s], byte_at[e]))
        return out

    def decode_one(self, token_id: int) -> str:
        return self.hf.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> str:
        if not getattr(self.hf, "chat_template", None):
            raise TemplateError("the model's tokenizer has no chat template")
        # TGI continues a trailing assistant message instead of opening a new turn.
        continue_final = bool(messages) and messages[-1].get("role") == "assistant"
        try:
            return self.hf.apply_chat_template(
                list(messages),
                tokenize=False,
                add_generation_prompt=not continue_final,
                continue_final_message=continue_final,
            )
        except Exception as e:  # jinja raise_exception, bad roles, ...: a client problem, not a 500
            raise TemplateError(str(e)) from e
