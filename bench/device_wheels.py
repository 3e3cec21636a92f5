"""Downloads the wheels `tgx serve` needs on the GPU device machines that their image lacks, into .whl/.

Owns: the list of what the router and launcher import beyond the device image (litestar, msgspec,
uvicorn, opentelemetry and their own requirements), pinned to this checkout's .venv versions, and
the `pip download` for the device's platform (CPython 3.12, manylinux x86_64). Must not: be needed
anywhere but before a device serving benchmark (`.whl` is ignored by git; the device README says
how a run installs it).

    .venv/bin/python bench/device_wheels.py    # then run(..., carry=[".whl"]) and, on the device:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

# pytest: to run the `gpu`-marked tests there (JAX_PLATFORMS=cuda python3 -m pytest -m gpu tests/...).
ROOTS = (
    "litestar", "msgspec", "uvicorn", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-grpc", "pytest",
)
# On the device, but too old or missing there (seen 2026-11-22): grpcio 1.84 fails our generated
# stubs' version check (they need >= 1.85.1), protobuf must match grpcio, and sniffio is absent.
ALWAYS = ("grpcio", "protobuf", "sniffio")
# In the device image already (KINDS.md, "Python packages already there"): never carried.
ON_DEVICE = set("""absl-py accelerate aiofiles anyio attrs certifi charset-normalizer click filelock flax
fsspec grpcio h11 httpcore httpx huggingface-hub idna jax jaxlib jinja2 markdown-it-py markupsafe mdurl
msgpack multidict numpy packaging prometheus-client protobuf psutil pygments pyyaml regex requests rich
safetensors sentencepiece six sniffio tokenizers torch tqdm transformers typing-extensions urllib3 uvloop
wrapt yarl zipp typing-inspect mypy-extensions""".split())
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure() -> dict[str, str]:
    """{distribution: version} of the roots and everything they require, minus the device's own."""
    todo, seen = [*ROOTS, *ALWAYS], {}
    while todo:
        name = _norm(todo.pop())
        if name in seen or (name in ON_DEVICE and name not in ALWAYS):
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional requirement not installed here
        seen[name] = dist.version
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    return seen


def main() -> int:
    out = Path(__file__).resolve().parents[1] / ".whl"
    out.mkdir(exist_ok=True)
    pins = [f"{n}=={v}" for n, v in sorted(closure().items())]
    print("carrying:", " ".join(pins))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(out), *[a for p in PLATFORMS for a in ("--platform", p)], *pins]
    rc = subprocess.run(cmd, check=False).returncode
    size = sum(f.stat().st_size for f in out.glob("*.whl"))
    print(f"{len(list(out.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
