"""load_model: from a model id to a CausalLM with its weights on device, its config and its tokenizer.

Owns: the loading sequence (resolve files, read config and tokenizer, check the checkpoint against the
parameter tree the config implies, read the tensors with progress, put them into the model), the
dtype choices, and turning every failure into one ModelLoadError with a message fit for the user.
Must not: know any family's layers (engine.models.registry builds the model, engine.models.params
assigns the tensors), reach the network, or parse file formats itself (sources, safetensors_weights,
gguf_weights and metadata do).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from engine.config import DTYPES, parse_dtype
from engine.models.config import ModelConfig
from engine.models.sources import ModelLoadError, ModelSource, resolve_model

__all__ = [
    "DTYPES",
    "LoadedModel",
    "ModelLoadError",
    "ModelSource",
    "load_model",
    "parse_dtype",
    "resolve_model",
]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]

# Checkpoint tensors that are derived buffers, not parameters: skipped rather than called unexpected.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model: Any  # the NNX CausalLM, weights as device arrays
    config: ModelConfig
    tokenizer: Any  # transformers fast tokenizer, with the model's chat template when it has one
    eos_token_ids: tuple[int, ...]
    source: ModelSource
    dtype: str  # canonical name: "bfloat16" | "float16" | "float32"
    # Set when loaded onto a mesh of several devices: the mesh and kv-head plan the weights follow.
    # `config` is then the config as run (kv heads replicated for the shard count).
    layout: Any = None  # engine.sharding.load.ShardedModel


def load_model(
    model_id: str | None,
    *,
    revision: str | None = None,
    dtype: Any = "bfloat16",
    progress: ProgressFn | None = None,
    max_model_len: int | None = None,
    mesh: Any = None,
    memory_fraction: float = 0.9,
    fuse_projections: bool = False,
) -> LoadedModel:
    """Loads `model_id` (None: the embedded default) with weights in `dtype`; raises ModelLoadError.

    max_model_len is the longest sequence the caller will serve (None: the model's
    max_position_embeddings); LongRoPE models pick their rotary factors from it, once.
    mesh: a jax Mesh of several devices to split the weights over (engine.sharding.rules): each
    tensor goes straight from the file onto its shards, so no device ever holds the whole model.
    A layout the model cannot take, or weights that cannot fit in `memory_fraction` of each device,
    raise engine.sharding.config.LayoutError before any weight is read.
    fuse_projections: run q/k/v and gate/up as one matrix each with the norms before them folded in
    (engine.models.fuse), done on the host as they are read; ignored with a mesh.
    """
    try:
        dtype_name = parse_dtype(dtype)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    start = time.monotonic()
    source = resolve_model(model_id, revision)
    where = source.gguf_path if source.kind == "gguf" else source.directory
    logger.info("Loading %s from %s (%s)", source.display_name, where, dtype_name)

    from engine.models import gguf_weights, metadata

    # Opened first: a truncated or foreign file then fails with our message, not transformers' parse error.
    gguf = gguf_weights.GGUFFile(source.gguf_path) if source.kind == "gguf" else None
    hf_config = metadata.read_hf_config(source)
    config = _model_config(hf_config, source)
    tokenizer = metadata.load_tokenizer(source)
    eos = metadata.eos_token_ids(source, hf_config, tokenizer)
    config = dataclasses.replace(config, eos_token_ids=eos, max_model_len=max_model_len)
    logger.info(
        "%s: %d layers, hidden %d, vocab %d, EOS ids %s (%.1fs)",
        config.architecture,
        config.num_layers,
        config.hidden_size,
        config.vocab_size,
        list(eos),
        time.monotonic() - start,
    )

    model = _abstract_model(config, dtype_name)
    expected = _expected_params(model)  # the checkpoint's layout, whatever the mesh
    layout = None
    if mesh is not None:
        from engine.sharding.load import abstract_sharded_model, check_fits, layout_report

        layout = abstract_sharded_model(config, dtype=dtype_name, mesh=mesh)
        # Weights alone, from shapes: the KV cache's share is checked once the limits are known.
        check_fits(layout_report(layout, kv_dtype=dtype_name, memory_fraction=memory_fraction), min_kv_tokens=0)
    tensors = _read_weights(source, gguf, config, expected, _with_logging(progress))
    if layout is None:
        if fuse_projections:
            model, config, tensors = _fused(config, dtype_name, tensors, np)
        model = _fill(model, dtype_name, tensors, source)
    else:
        model, config = _fill_sharded(layout, dtype_name, tensors, source), layout.config
    logger.info("Loaded %s in %.1fs", source.display_name, time.monotonic() - start)
    return LoadedModel(model, config, tokenizer, eos, source, dtype_name, layout)


def _config_file(source: ModelSource) -> str:
    return str(source.gguf_path if source.kind == "gguf" else source.directory / "config.json")


def _model_config(hf_config: dict[str, Any], source: ModelSource) -> ModelConfig:
    from engine.models import registry

    try:
        return registry.config_from_hf(hf_config)
    except registry.UnsupportedArchitectureError as e:
        raise ModelLoadError(f"{source.display_name}: {e}") from e
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"The model config in {_config_file(source)} is not usable: {e}") from e


def _abstract_model(config: ModelConfig, dtype_name: str) -> Any:
    """The model with shape-only params (nothing allocated): its tree says what the checkpoint must hold."""
    import jax.numpy as jnp

    from engine.models import registry

    return registry.build_abstract_model(config, dtype=jnp.dtype(dtype_name))


def _expected_params(model: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{HF name: (shape, dtype)} of every parameter of `model`."""
    from engine.models.params import named_params

    out = {}
    for name, param in named_params(model).items():
        value = param.get_value()
        out[name] = (tuple(value.shape), np.dtype(value.dtype))
    return out


def _check(
    expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    found: Mapping[str, tuple[tuple[int, ...], str]],
    what: str,
    config_file: str,
) -> None:
    """Raises ModelLoadError for the first missing, unexpected or mis-shaped tensor, naming its file."""
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(
            f"{what} has no tensor {missing[0]}{more}, which the config ({config_file}) calls for."
        )
    for name, (shape, where) in found.items():
        if name not in expected:
            raise ModelLoadError(
                f"{where} holds tensor {name}, which the model built from {config_file} has no parameter for."
            )
        if tuple(shape) != expected[name][0]:
            raise ModelLoadError(
                f"Tensor {name} in {where} has shape {tuple(shape)}, but the config ({config_file}) "
                f"implies {expected[name][0]}."
            )


def _read_weights(
    source: ModelSource,
    gguf: Any,  # the open gguf_weights.GGUFFile of a GGUF source, else None
    config: ModelConfig,
    expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    progress: ProgressFn,
) -> dict[str, np.ndarray]:
    dtypes = {name: dt for name, (_, dt) in expected.items()}
    if gguf is not None:
        from engine.models import gguf_weights

        infos = gguf_weights.map_tensors(gguf, expected, num_layers=config.num_layers)
        found = {
            name: (info.shape, f"{source.gguf_path} (as {info.gguf_name})") for name, info in infos.items()
        }
        _check(expected, found, f"GGUF file {source.gguf_path}", _config_file(source))
        return gguf_weights.read_gguf_tensors(
            gguf,
            infos,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            dtypes=dtypes,
            progress=progress,
        )
    from engine.models import checkpoint_layout as cl
    from engine.models import safetensors_weights as st

    infos = st.list_tensors(source.directory)
    skip = {n for n in infos if n.endswith(_DERIVED_SUFFIXES)}
    if config.tie_word_embeddings and "lm_head.weight" not in expected:
        skip.add("lm_head.weight")  # some tied checkpoints still store the (identical) head
    what = f"The checkpoint in {source.directory}"
    try:  # per-expert tensors -> stacked params, renames (engine.models.checkpoint_layout)
        planned = cl.plan(cl.layout_for(config.architecture),
                          {name: info.shape for name, info in infos.items() if name not in skip})
    except ValueError as e:
        raise ModelLoadError(f"{what} does not fit {config.architecture}'s layout: {e}") from e
    found = {name: (p.shape, cl.describe(p, lambda src: str(infos[src].file))) for name, p in planned.items()}
    _check(expected, found, what, _config_file(source))
    total, done = sum(len(planned[n].sources) for n in expected), [0]

    def read(names: Iterable[str], src_dtypes: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
        def tick(_done: int, _total: int, name: str) -> None:
            done[0] += 1
            progress(done[0], total, name)

        return st.read_tensors(infos, names, dtypes=src_dtypes, progress=tick)

    return cl.assemble_all({n: planned[n] for n in expected}, read, dtypes)


def _fused(config: ModelConfig, dtype_name: str, tensors: dict[str, Any], xp: Any) -> tuple:
    """(abstract fused model, its config, `tensors` fused and folded to its names); a no-op for a
    fused config. xp: numpy (host tensors) or jax.numpy (device tensors)."""
    from engine.models import fuse

    if fuse.is_fused(config):
        return _abstract_model(config, dtype_name), config, tensors
    config = fuse.fused_config(config)
    model = _abstract_model(config, dtype_name)
    tensors = fuse.fuse_tensors(tensors, _expected_params(model), xp.concatenate)
    return model, config, fuse.fold_norms(tensors, config, xp)


def _fill(model: Any, dtype_name: str, tensors: Mapping[str, np.ndarray], source: ModelSource) -> Any:
    import jax.numpy as jnp

    from engine.models import params

    try:
        params.assign_params(model, tensors, jnp.dtype(dtype_name))
    except ValueError as e:  # the checks above should have caught it; keep the message on one line
        detail = " ".join(str(e).split())
        raise ModelLoadError(f"The weights of {source.display_name} do not fit its config: {detail}") from e
    return model


def _fill_sharded(layout: Any, dtype_name: str, tensors: Mapping[str, np.ndarray], source: ModelSource) -> Any:
    from engine.sharding.load import fill_sharded

    try:
        return fill_sharded(layout, tensors, dtype=dtype_name).model
    except ValueError as e:
        detail = " ".join(str(e).split())
        raise ModelLoadError(f"The weights of {source.display_name} do not fit its config: {detail}") from e


def _with_logging(progress: ProgressFn | None) -> ProgressFn:
    """Wraps the caller's callback with INFO log lines at every tenth of the way."""
    state = {"next": 0.0, "start": time.monotonic()}

    def report(done: int, total: int, name: str) -> None:
        if progress is not None:
            progress(done, total, name)
        if total and done / total >= state["next"]:
            logger.info(
                "Loading weights: %d/%d tensors (%.1fs)", done, total, time.monotonic() - state["start"]
            )
            state["next"] = (int(done * 10 / total) + 1) / 10

    return report


def random_model(
    model_dir: str, *, dtype: Any = "bfloat16", seed: int = 0, mesh: Any = None, fuse_projections: bool = False
) -> LoadedModel:
    """A model of the HF config in `model_dir` (config.json + tokenizer files, no weights needed)
    with random weights made on the device: for benchmarks of shapes we cannot download.

    With a mesh the model is made whole on the default device, then split over the mesh; every
    process of a multi-host engine makes the same weights from the same seed.
    fuse_projections (ignored with a mesh): the same weights, fused on the device after they are made,
    so a seed gives the same model fused or not."""
    import jax.numpy as jnp
    from flax import nnx

    from engine.models import metadata, registry

    dtype_name = parse_dtype(dtype)
    source = resolve_model(model_dir)
    if source.kind != "dir":
        raise ModelLoadError(f"random weights need a directory with config.json, not {model_dir}")
    hf_config = metadata.read_hf_config(source)
    config = _model_config(hf_config, source)
    tokenizer = metadata.load_tokenizer(source)
    eos = metadata.eos_token_ids(source, hf_config, tokenizer)
    config = dataclasses.replace(config, eos_token_ids=eos)
    model = registry.build_model(config, dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(seed))
    logger.info("Built %s with random %s weights", source.display_name, dtype_name)
    if mesh is None and fuse_projections:
        from engine.models.params import named_params

        tensors = {name: p.get_value() for name, p in named_params(model).items()}
        del model  # the dict holds the only references: each layer's parts are freed as it is fused
        model, config, tensors = _fused(config, dtype_name, tensors, jnp)
        model = _fill(model, dtype_name, tensors, source)
    if mesh is None:
        return LoadedModel(model, config, tokenizer, eos, source, dtype_name)
    from engine.sharding.load import shard_model

    layout = shard_model(model, mesh)
    return LoadedModel(layout.model, layout.config, tokenizer, eos, source, dtype_name, layout)
