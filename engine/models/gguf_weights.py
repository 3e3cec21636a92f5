"""GGUF weights: read a llama.cpp GGUF file's tensors as Hugging Face-named, dequantized numpy arrays.

Owns: opening the file with the `gguf` package, mapping GGUF tensor names to HF names with that
package's own name tables (asked in the HF -> GGUF direction for the names our model has, then
inverted, as transformers does), dequantizing with that package, and undoing what llama.cpp's
converter changed: the q/k row permutation of llama-arch checkpoints and the +1 folded into Gemma's
norm weights. The result equals what transformers' GGUF loader produces.
Must not: parse the file format or dequantize by hand (the `gguf` package does both), read config or
tokenizer metadata (transformers does that, see engine.models.metadata), know the parameter tree
beyond the names it is given, or put arrays on devices.
Every failure is a ModelLoadError naming the file (and tensor) at fault.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from engine.models.sources import ModelLoadError

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]

# llama.cpp's converter permutes q/k rows of these architectures only (transformers' GGUF loader
# reverses it for exactly this set).
PERMUTED_QK_ARCHS = frozenset({"llama"})
# ... and stores every norm weight of these as 1 + w, the factor Gemma's RMSNorm applies; HF
# checkpoints (and our RMSNorm(unit_offset=True)) hold w.
UNIT_OFFSET_NORM_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    gguf_name: str
    shape: tuple[int, ...]  # in HF (numpy, row-major) order: [out, in] for a linear weight
    quant_type: str  # e.g. "Q4_1", "F32"


class GGUFFile:
    """An open GGUF file (memory-mapped; tensors are only dequantized when read)."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            self._reader = GGUFReader(self.path)
        except FileNotFoundError as e:
            raise ModelLoadError(f"GGUF file {self.path} does not exist.") from e
        except Exception as e:  # the reader raises ValueError/struct errors/etc. on a bad file
            raise ModelLoadError(
                f"Could not read {self.path}: it is truncated or not a GGUF file ({e})."
            ) from e
        self._tensors = {t.name: t for t in self._reader.tensors}

    @property
    def architecture(self) -> str:
        field = self._reader.get_field("general.architecture")
        if field is None:
            raise ModelLoadError(f"{self.path} has no general.architecture entry: not a model GGUF.")
        return str(field.contents())

    def tensor_infos(self) -> dict[str, GGUFTensorInfo]:
        return {
            name: GGUFTensorInfo(name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name)
            for name, t in self._tensors.items()
        }

    def read(self, gguf_name: str) -> np.ndarray:
        """One tensor, dequantized to float32 (or its stored float type), in HF order."""
        from gguf.quants import dequantize

        tensor = self._tensors[gguf_name]
        shape = tuple(int(d) for d in reversed(tensor.shape))
        try:
            array = np.asarray(dequantize(tensor.data, tensor.tensor_type))
            return array.reshape(shape)
        except Exception as e:
            raise ModelLoadError(f"Could not dequantize tensor {gguf_name} of {self.path}: {e}") from e


def gguf_to_hf_names(arch: str, num_layers: int, hf_names: Iterable[str]) -> dict[str, str]:
    """{GGUF tensor name: HF name} for the HF names given, from the gguf package's tables."""
    import gguf

    arch_enum = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), None)
    if arch_enum is None:
        raise ModelLoadError(f"GGUF architecture {arch!r} is unknown to the installed gguf package.")
    name_map = gguf.get_tensor_name_map(arch_enum, num_layers)
    mapping: dict[str, str] = {}
    for hf_name in hf_names:
        base, _, suffix = hf_name.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, suffix = hf_name, ""
        gguf_base = name_map.get_name(base)
        if gguf_base is not None:
            mapping[gguf_base + ("." + suffix if suffix else "")] = hf_name
    return mapping


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reverses llama.cpp's q/k permutation: per head, it interleaved the two rotary halves of the rows.

    llama.cpp reorders each head's rows from [first half | second half] (HF's rotate_half layout) to
    pairs (GPT-J layout); this puts them back. Works for weights [rows, in] and biases [rows].
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    if n_heads * half * 2 != rows:
        raise ModelLoadError(f"Cannot undo q/k permutation: {rows} rows do not split into {n_heads} heads.")
    by_pair = weight.reshape(n_heads, half, 2, *weight.shape[1:])
    return np.ascontiguousarray(by_pair.swapaxes(1, 2).reshape(weight.shape))


def map_tensors(
    gguf_file: GGUFFile, hf_names: Iterable[str], *, num_layers: int
) -> dict[str, GGUFTensorInfo]:
    """{HF name: the GGUF tensor holding it}, from headers only; GGUF tensors our model lacks are skipped.

    An HF name with no GGUF tensor is simply absent: the caller reports what is missing.
    """
    mapping = gguf_to_hf_names(gguf_file.architecture, num_layers, hf_names)
    infos = gguf_file.tensor_infos()
    skipped = sorted(set(infos) - set(mapping))
    if skipped:
        # e.g. llama3's rope_freqs.weight, which the model recomputes from its config
        logger.info("Ignoring %d GGUF tensors the model has no parameter for: %s", len(skipped), skipped[:8])
    return {mapping[name]: info for name, info in infos.items() if name in mapping}


def read_gguf_tensors(
    gguf_file: GGUFFile,
    tensors: dict[str, GGUFTensorInfo],
    *,
    num_heads: int,
    num_kv_heads: int,
    dtypes: Mapping[str, np.dtype] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, np.ndarray]:
    """Reads and dequantizes `tensors` (from map_tensors), keyed by HF name, cast per `dtypes` entry."""
    permute = gguf_file.architecture in PERMUTED_QK_ARCHS
    unit_offset = gguf_file.architecture in UNIT_OFFSET_NORM_ARCHS
    out: dict[str, np.ndarray] = {}
    for done, (hf_name, info) in enumerate(tensors.items(), start=1):
        array = gguf_file.read(info.gguf_name)
        if permute and ".attn_q." in info.gguf_name:
            array = unpermute_qk(array, num_heads)
        elif permute and ".attn_k." in info.gguf_name:
            array = unpermute_qk(array, num_kv_heads)
        elif unit_offset and info.gguf_name.endswith("norm.weight"):
            array = array - 1.0  # in float32, before any cast, as transformers does
        target = dtypes.get(hf_name) if dtypes else None
        if target is not None and array.dtype != target:
            array = array.astype(target)  # now, so the host holds the smaller copy
        out[hf_name] = array
        if progress is not None:
            progress(done, len(tensors), hf_name)
    return out
