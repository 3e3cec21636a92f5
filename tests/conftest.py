"""Test-wide setup: CPU only, 8 simulated devices, float32 matmuls at full precision.

Owns: process-level JAX settings every test needs, set before jax is first imported.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
