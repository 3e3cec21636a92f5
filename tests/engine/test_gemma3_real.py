"""The engine end to end on a second real model, Gemma 3 270M (GGUF Q4_K_M), float32, against transformers.

Covers what SmolLM2 cannot: the Gemma 3 port (sandwich norms, (1 + w) norms, q/k norms, scaled
embeddings, local and global rotary, alternating sliding-window layers with their own KV groups)
on real weights, the gemma3 GGUF tensor map with llama.cpp's +1 norm convention undone, K-quant
dequantization, and the tokenizer (the file is the base model and ships no chat template, so the
turn-formatted prompts are written out as text).
Greedy continuations must equal transformers' `generate` on the same GGUF token for token.
"""

from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.engine.conftest import run_all
from tests.support import gemma3_gguf

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:\n1.",
]
# Gemma's turn format, written out: this base-model GGUF ships no chat template.
TURNS = [
    "<start_of_turn>user\nWhat is 12 times 7?<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\nYou are a terse assistant.\n\nName a fruit.<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\nWrite a haiku about the ocean.<end_of_turn>\n<start_of_turn>model\n",
]
# Longer than the 512-token window of the sliding layers, so those layers drop their oldest keys.
LONG = "Numbers, one after another: " + ", ".join(f"{n} is written {n:b} in binary" for n in range(40))


@pytest.fixture(scope="module")
def hf_config():
    """transformers' reading of the file's metadata, done once for both loaders: even with the file's
    parse shared (tests.support.shared_gguf_reads), turning its 262k-token vocabulary into config
    values takes seconds each time."""
    from engine.models import metadata
    from engine.models.sources import resolve_model

    return metadata.read_hf_config(resolve_model(str(gemma3_gguf())))


@pytest.fixture(scope="module")
def gemma3_f32(hf_config):
    from engine.models import metadata
    from engine.models.loader import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metadata, "read_hf_config", lambda source: dict(hf_config))
        return load_model(str(gemma3_gguf()), dtype="float32")


@pytest.fixture(scope="module")
def gemma3_engine(gemma3_f32):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    # Small buckets and no prompt-logprob programs: compiling for a 262k vocabulary is the slow part.
    config = EngineConfig(dtype="float32", max_batch_size=8, max_batch_prefill_tokens=128,
                          max_total_tokens=1024, max_batch_total_tokens=4096, max_top_n_tokens=0,
                          enable_prefill_logprobs=False)
    return LLMEngine(config, loaded=gemma3_f32)


@pytest.fixture(scope="module")
def hf_gemma3(hf_config):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = gemma3_gguf()
    config = AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config,
                                                 dtype=torch.float32)
    return model.eval()


def _prompt_ids(tok) -> list[list[int]]:
    ids = [tok(p)["input_ids"] for p in [*RAW_PROMPTS, LONG, *TURNS]]
    return [list(x) for x in ids]


def test_loaded_as_gemma3(gemma3_f32):
    c, tok = gemma3_f32.config, gemma3_f32.tokenizer
    assert c.architecture == "Gemma3ForCausalLM" and c.num_layers == 18 and c.sliding_window == 512
    assert c.layer_types.count("full_attention") == 3 and c.layer_types[5] == "full_attention"
    assert (c.rope_theta, c.local_rope_theta) == (1e6, 1e4) and c.qk_norm and c.tie_word_embeddings
    # <eos> from the file, and <end_of_turn>, which ends Gemma's chat turns.
    assert gemma3_f32.eos_token_ids == (tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>"))
    assert not tok.chat_template  # the base model: chat requests are refused, not guessed at
    turn = tok(TURNS[0])["input_ids"]
    assert turn[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<start_of_turn>") in turn


def test_weights_equal_transformers_gguf_loader(gemma3_f32, hf_gemma3):
    """Dequantized, renamed and with llama.cpp's 1 + w norms undone, bit for bit as transformers has them."""
    import numpy as np

    from engine.models.params import named_params

    ours = named_params(gemma3_f32.model)
    theirs = {k: v.numpy() for k, v in hf_gemma3.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(ours) == set(theirs)
    for name, param in ours.items():
        np.testing.assert_array_equal(np.asarray(param.get_value()), theirs[name], err_msg=name)


def test_greedy_matches_transformers(gemma3_engine, hf_gemma3):
    tok = gemma3_engine.tokenizer
    prompts = _prompt_ids(tok)
    assert len(prompts) >= 8 and len(prompts[len(RAW_PROMPTS)]) > 512
    ours = run_all(gemma3_engine, prompts, SamplingParams(max_new_tokens=NEW_TOKENS))
    eos = list(gemma3_engine.loaded.eos_token_ids)
    for ids, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf_gemma3.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     eos_token_id=eos, pad_token_id=tok.pad_token_id)
        want = ref[0, len(ids):].tolist()
        assert got == want, f"prompt {tok.decode(ids)[-80:]!r}: {got} != {want}"
    assert gemma3_engine.kv_groups.is_full_free()
