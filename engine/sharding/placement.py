"""Putting host arrays onto global shardings, and making sharded arrays on the devices.

Owns: the one way host data becomes a (possibly multi-host) global array, for weights at load and
for each step's inputs. Must not: choose layouts (engine.sharding.rules does) or import models, so
every host process can use it cheaply.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding


def place(x: Any, sharding: NamedSharding, dtype: Any | None = None) -> jax.Array:
    """A host array as a global array with `sharding`; each process copies only its own shards.

    Not jax.device_put: on a multi-process mesh it all-gathers every host array to check the
    hosts agree (a full copy of each weight through the network at load, and of each step's
    inputs), and on CPU that check failed on float tensors that were bit-identical.
    """
    x = np.asarray(x)
    if dtype is not None and x.dtype != dtype:
        x = x.astype(dtype)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def zeros(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding) -> jax.Array:
    """A global zero array made on its shards (nothing crosses hosts or passes through the host)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
