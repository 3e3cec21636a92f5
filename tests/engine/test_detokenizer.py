"""Tests for engine/detokenizer.py with the real SmolLM2 tokenizer (byte-level BPE) and a tiny
Metaspace tokenizer: streaming equals a full decode, no U+FFFD, prompt priming, stop sequences."""

from __future__ import annotations


import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engine.detokenizer import IncrementalDetokenizer
from tests.support import smollm2_tokenizer_dir

MULTILINGUAL = "Hello, 世界! 😀👍🏽 naïve café — 日本語のテキスト 🇫🇷 한국어 مرحبا Ωμέγα ok"


@pytest.fixture(scope="module")
def tok():
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(smollm2_tokenizer_dir()))


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    return [detok.add(t).text for t in token_ids]


def until_stop(detok: IncrementalDetokenizer, token_ids: list[int]) -> None:
    for token in token_ids:
        if detok.add(token).stop_sequence is not None:
            return


def test_stream_equals_full_decode_without_replacement_chars(tok):
    prompt = encode(tok, "Translate:")
    output = encode(tok, MULTILINGUAL)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = stream(detok, output)
    assert "".join(pieces) == detok.output_text == tok.decode(output) == MULTILINGUAL
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces, "the text should split some characters across byte-level tokens"


def test_each_token_can_start_the_output(tok):
    """The stream may start at any token, including one mid-way through a character's bytes."""
    ids = encode(tok, MULTILINGUAL)
    for cut in range(1, len(ids)):
        prompt, output = ids[:cut], ids[cut:]
        pieces = stream(IncrementalDetokenizer(tok, prompt), output)
        assert not any("\ufffd" in p for p in pieces), cut
        full, head = tok.decode(ids), tok.decode(prompt)
        if "\ufffd" not in head:
            assert "".join(pieces) == full[len(head) :], cut


def test_character_split_between_prompt_and_output_is_emitted_once(tok):
    ids = encode(tok, "Say 日")
    assert tok.decode(ids[:-1]).endswith("\ufffd"), "the prompt must end inside a character"
    detok = IncrementalDetokenizer(tok, ids[:-1])
    pieces = stream(detok, [ids[-1], *encode(tok, " ok")])
    # The token " 日" began in the prompt and the output completes it: it is emitted with the
    # output, whole, and nothing of the prompt before it is repeated.
    assert detok.output_text == " 日 ok" and "\ufffd" not in "".join(pieces)


def test_skip_special_tokens(tok):
    output = [*encode(tok, "Hi"), tok.convert_tokens_to_ids("<|im_end|>"), *encode(tok, " there")]
    skipped = IncrementalDetokenizer(tok, encode(tok, "x"))
    kept = IncrementalDetokenizer(tok, encode(tok, "x"), skip_special_tokens=False)
    assert "".join(stream(skipped, output)) == "Hi there"
    assert "".join(stream(kept, output)) == "Hi<|im_end|> there"


def test_prompt_primes_spacing_for_metaspace_tokenizers():
    """Metaspace decoders drop the space of a decode's first token; priming with the prompt keeps it."""
    vocab = {"<unk>": 0, "▁hello": 1, "▁world": 2, "▁again": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    output = tokenizer.encode("world again").ids
    assert tokenizer.decode(output) == "world again"
    primed = IncrementalDetokenizer(tokenizer, tokenizer.encode("hello").ids)
    assert stream(primed, output) == [" world", " again"]
    unprimed = IncrementalDetokenizer(tokenizer, [])
    assert stream(unprimed, output) == ["world", " again"]


def test_stop_sequence_across_token_boundaries_truncates_after_it(tok):
    text = "The answer is 42. Done, and more text."
    output = encode(tok, text)
    detok = IncrementalDetokenizer(tok, encode(tok, "Q:"), stop=("Done", "swer i"))
    pieces, stop_at = [], None
    for i, token in enumerate(output):
        step = detok.add(token)
        pieces.append(step.text)
        if step.stop_sequence is not None:
            stop_at = i
            break
    assert detok.stop_sequence == "swer i" and detok.is_stopped
    assert detok.output_text == "The answer i" == "".join(pieces)
    assert tok.decode(output[: stop_at + 1]).startswith(detok.output_text)
    with pytest.raises(RuntimeError):
        detok.add(output[stop_at + 1])


def test_stop_sequence_inside_one_token_drops_the_rest_of_it(tok):
    output = encode(tok, "Hello wonderful world")
    assert tok.decode(output[1:2]) == " wonderful"
    detok = IncrementalDetokenizer(tok, [], stop=("wond",))
    until_stop(detok, output)
    assert (detok.output_text, detok.stop_sequence, detok.num_tokens) == ("Hello wond", "wond", 2)


def test_stop_sequence_with_multibyte_characters(tok):
    detok = IncrementalDetokenizer(tok, [], stop=("界!",))
    until_stop(detok, encode(tok, MULTILINGUAL))
    assert detok.output_text == "Hello, 世界!"


@pytest.mark.parametrize(
    ("stop", "expected"), [(("cd", "abc", "b"), ("b", "xab")), (("b", "ab"), ("ab", "xab"))]
)
def test_earliest_ending_stop_sequence_wins_ties_to_the_longest(tok, stop, expected):
    detok = IncrementalDetokenizer(tok, [], stop=stop)
    until_stop(detok, encode(tok, "xabcd"))
    assert (detok.stop_sequence, detok.output_text) == expected


def test_safe_text_len_withholds_a_possible_stop_prefix(tok):
    text, stops = "We are done. Done? Done!", ("Done!", "STOP")
    detok = IncrementalDetokenizer(tok, [], stop=stops)
    streamed, num_held_back = "", 0
    for token in encode(tok, text):
        step = detok.add(token)
        out = detok.output_text
        safe = out[: detok.safe_text_len]
        assert safe.startswith(streamed)  # what was streamed is never taken back
        streamed = safe
        if step.stop_sequence is None:
            held = max((k for s in stops for k in range(1, len(s)) if out.endswith(s[:k])), default=0)
            assert detok.safe_text_len == len(out) - held
            num_held_back += held > 0
    assert detok.output_text == text and detok.safe_text_len == len(text)
    assert num_held_back >= 2  # " Done" twice before the "!"


def test_safe_text_len_is_everything_without_stop_sequences(tok):
    detok = IncrementalDetokenizer(tok, [])
    stream(detok, encode(tok, "Do"))
    assert detok.safe_text_len == len(detok.output_text) == 2


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="stop sequences"):
        IncrementalDetokenizer(tok, [], stop=("",))
    with pytest.raises(ValueError, match="fast tokenizer"):
        IncrementalDetokenizer(object(), [])
