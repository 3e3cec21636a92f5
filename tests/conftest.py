"""Test-wide setup: CPU only, 8 simulated devices, float32 matmuls at full precision.

Owns: process-level JAX settings every test needs, set before jax is first imported, and where
Python bytecode goes when the environment turns writing it off.
"""

import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The suite starts dozens of Python processes (engine servers, routers, launchers, multi-host
# workers) that import jax, torch and transformers; without bytecode each recompiles their sources,
# about 4 s a process on 2 cores. Where PYTHONDONTWRITEBYTECODE is set, bytecode is kept in the
# repo's .cache (ignored by git, like the test caches) instead of beside the sources, which stay
# untouched; elsewhere Python's own __pycache__ already does this.
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
    pycache = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "pycache"
    sys.pycache_prefix = os.environ.setdefault("PYTHONPYCACHEPREFIX", str(pycache))
    sys.dont_write_bytecode = False
