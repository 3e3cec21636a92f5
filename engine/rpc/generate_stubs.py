"""Regenerates engine_pb2.py and engine_pb2_grpc.py from engine.proto.

The stubs are committed, so running tgx needs no grpcio-tools.

Owns: the one protoc invocation. Must not: run at import time anywhere; it is a developer command:

    cd /work/main && .venv/bin/python -m engine.rpc.generate_stubs
"""

from __future__ import annotations

import pathlib
import re
import sys


def main() -> int:
    from grpc_tools import protoc

    here = pathlib.Path(__file__).resolve().parent
    root = here.parents[1]
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{root}",
            f"--python_out={root}",
            f"--grpc_python_out={root}",
            str(here / "engine.proto"),
        ]
    )
    if rc != 0:
        print("generate_stubs: protoc failed", file=sys.stderr)
        return rc
    # protoc writes `from engine.rpc import engine_pb2` already, because -I is the repo root.
    grpc_file = here / "engine_pb2_grpc.py"
    text = grpc_file.read_text()
    if not re.search(r"^from engine\.rpc import engine_pb2", text, re.M):
        print("generate_stubs: unexpected import in engine_pb2_grpc.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
