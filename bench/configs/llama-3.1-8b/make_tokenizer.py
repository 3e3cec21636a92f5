"""Writes this directory's tokenizer.json and tokenizer_config.json: a stand-in for Llama 3's tokenizer.

Owns: a byte-level BPE with Llama 3's id layout (128,000 regular tokens, then 256 special tokens
from 128000: <|begin_of_text|>, <|end_of_text|>, reserved ones, <|eot_id|> at 128009), so every id
below the model's vocab_size (128,256) decodes, and decoding costs what a byte-level vocabulary of
this size costs. Must not: pretend to be Meta's tokenizer: its regular tokens are all 1- to 3-symbol
strings over the byte alphabet and it has no merges, so text encodes byte by byte. The benchmarks
send token ids, never text, so only decoding matters to them. Run once; the output is committed:

    python bench/configs/llama-3.1-8b/make_tokenizer.py
"""

from __future__ import annotations

import itertools
import json
import pathlib

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

NUM_REGULAR = 128_000
NUM_SPECIAL = 256
NAMED_SPECIAL = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 9: "<|eot_id|>"}


def main() -> None:
    here = pathlib.Path(__file__).resolve().parent
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 symbols bytes map to
    pieces = itertools.chain(
        alphabet,
        ("".join(p) for p in itertools.product(alphabet, repeat=2)),
        ("".join(p) for p in itertools.product(alphabet, repeat=3)),
    )
    vocab = {piece: i for i, piece in enumerate(itertools.islice(pieces, NUM_REGULAR))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [NAMED_SPECIAL.get(i, f"<|reserved_special_token_{i}|>") for i in range(NUM_SPECIAL)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    assert tok.get_vocab_size() == NUM_REGULAR + NUM_SPECIAL
    assert tok.token_to_id("<|begin_of_text|>") == NUM_REGULAR
    tok.save(str(here / "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
    }
    (here / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
