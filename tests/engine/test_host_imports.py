"""The host-side engine core must stay importable without jax, so the router and tests of request
handling never pay for (or depend on) an accelerator runtime. Checked in a fresh interpreter,
because this test process may already have imported jax for other tests."""

from __future__ import annotations

import pathlib
import subprocess
import sys

HOST_MODULES = (
    "engine.request",
    "engine.kv_cache",
    "engine.scheduler",
    "engine.step_arrays",
    "engine.detokenizer",
    "engine.sampling_params",
)


def test_host_modules_do_not_import_jax():
    code = (
        "import importlib, sys\n"
        f"for name in {HOST_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib')))\n"
        "assert not leaked, leaked[:5]\n"
    )
    repo_root = pathlib.Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
