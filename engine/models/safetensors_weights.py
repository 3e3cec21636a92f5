"""Safetensors checkpoints: find the weight files of a Hugging Face model directory and read them.

Owns: locating `model.safetensors` or the shards named by `model.safetensors.index.json`, listing
every tensor's name, shape and file from the headers alone, and reading tensors into numpy (bf16
included, through ml_dtypes: no torch needed). Must not: know the model's parameter tree, put arrays
on devices, or guess at other weight formats (a .bin-only checkpoint is refused with a clear message).
Every failure is a ModelLoadError naming the file (and tensor) at fault.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from engine.models.sources import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

ProgressFn = Callable[[int, int, str], None]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # the safetensors dtype name, e.g. "BF16"
    file: Path


def weight_files(directory: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The checkpoint's weight files, and the index's tensor -> file map when the checkpoint is sharded."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"Could not read the shard index {index}: {e}") from e
        by_name = {name: directory / fname for name, fname in weight_map.items()}
        files = sorted(set(by_name.values()))
        for path in files:
            if not path.is_file():
                raise ModelLoadError(f"Weight shard {path} (listed in {index.name}) is missing.")
        return files, by_name
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single], None
    others = sorted(directory.glob("*.safetensors"))
    if len(others) == 1:  # some repos name their only file differently (e.g. consolidated.safetensors)
        return others, None
    if others:
        names = ", ".join(p.name for p in others)
        raise ModelLoadError(f"{directory} has several .safetensors files ({names}) but no {INDEX_FILE}.")
    legacy = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = (
        f" It has only PyTorch pickles ({', '.join(legacy)}): convert them to safetensors." if legacy else ""
    )
    raise ModelLoadError(f"No {SINGLE_FILE} or {INDEX_FILE} in {directory}.{hint}")


def list_tensors(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, from the file headers only (no tensor data is read)."""
    from safetensors import safe_open

    files, index = weight_files(directory)
    infos: dict[str, TensorInfo] = {}
    for path in files:
        try:
            with safe_open(path, framework="numpy") as f:
                headers = {k: f.get_slice(k) for k in f.keys()}
                found = {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in headers.items()}
        except Exception as e:  # safetensors raises its own SafetensorError for a truncated/corrupt file
            raise ModelLoadError(
                f"Could not read {path}: it is truncated or not a safetensors file ({e})."
            ) from e
        for key, (shape, dtype) in found.items():
            if key in infos:
                raise ModelLoadError(f"Tensor {key} is stored twice: in {infos[key].file} and in {path}.")
            infos[key] = TensorInfo(shape, dtype, path)
    if index is not None:
        for name, path in index.items():
            if name not in infos or infos[name].file != path:
                raise ModelLoadError(f"{path} does not hold tensor {name}, which {INDEX_FILE} says it does.")
    return infos


def read_tensors(
    infos: dict[str, TensorInfo],
    names: Iterable[str],
    *,
    dtypes: Mapping[str, np.dtype] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, np.ndarray]:
    """Reads `names` (keys of `infos`) file by file, each cast to its entry in `dtypes` if it has one."""
    from safetensors import safe_open

    wanted = list(names)
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(infos[name].file, []).append(name)
    out: dict[str, np.ndarray] = {}
    total = len(wanted)
    for path, file_names in by_file.items():
        current = ""
        try:
            with safe_open(path, framework="numpy") as f:
                for current in file_names:
                    array = f.get_tensor(current)
                    target = dtypes.get(current) if dtypes else None
                    if target is not None and array.dtype != target:
                        array = array.astype(target)  # now, so the host holds the smaller copy
                    out[current] = array
                    if progress is not None:
                        progress(len(out), total, current)
        except Exception as e:
            raise ModelLoadError(f"Could not read tensor {current or '?'} from {path}: {e}") from e
    return out
