"""Parameters by Hugging Face name: listing them and filling them from a checkpoint's tensors.

Owns: the mapping between a model's NNX state paths and HF state_dict names ('.'.join(path)), and
the validation of a tensor set against it. Must not: read files or know any family; the loader
reads checkpoints, the model tree decides the names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Tensors some checkpoints carry that no port needs (non-persistent rotary buffers saved by old
# transformers versions).
_HARMLESS = re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$")
_LISTED = 20  # names shown per problem kind; a wrong-family checkpoint would list thousands


def named_params(model: nnx.Module) -> dict[str, nnx.Param]:
    """Every parameter of the model under its HF name, e.g. 'model.layers.0.self_attn.q_proj.weight'."""
    return {
        ".".join(str(p) for p in path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Param)
    }


def _harmless(name: str, model: nnx.Module) -> bool:
    # A tied checkpoint may still ship lm_head.weight (a copy of the embedding); the port has none.
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return bool(_HARMLESS.search(name)) or (tied and name == "lm_head.weight")


def assign_params(
    model: nnx.Module, tensors: Mapping[str, np.ndarray | jax.Array], dtype: jnp.dtype
) -> None:
    """Fills every parameter from `tensors` (by HF name), cast to dtype, or raises ValueError.

    Works on concrete models and on abstract ones (built under nnx.eval_shape); a parameter whose
    current value carries a sharding gets the new value placed with that sharding. Nothing is
    written unless the whole set is valid.
    """
    params = named_params(model)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(n for n in set(tensors) - set(params) if not _harmless(n, model))
    mismatched = [
        f"{name}: expected {tuple(params[name].shape)}, got {tuple(np.shape(t))}"
        for name, t in sorted(tensors.items())
        if name in params and tuple(np.shape(t)) != tuple(params[name].shape)
    ]
    if missing or unexpected or mismatched:
        arch = getattr(getattr(model, "config", None), "architecture", type(model).__name__)
        lines = [f"checkpoint tensors do not match the {arch} model:"]
        for title, names in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", mismatched)):
            if names:
                more = f", ... and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
                lines.append(f"  {title} ({len(names)}): " + ", ".join(names[:_LISTED]) + more)
        raise ValueError("\n".join(lines))
    for name, param in params.items():
        sharding = getattr(param.get_value(), "sharding", None)
        if sharding is not None:  # place first, cast there: no full copy on the default device
            param.set_value(jax.device_put(tensors[name], sharding).astype(dtype))
        else:
            param.set_value(jnp.asarray(tensors[name], dtype=dtype))
