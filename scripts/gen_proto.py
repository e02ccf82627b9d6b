"""Generate the Python protobuf and gRPC code for ``proto/edgeloop/v1/*.proto``.

This is the only way generated code enters the tree; never edit the ``*_pb2*.py`` files by hand.
Run from anywhere: ``python scripts/gen_proto.py`` (needs ``grpcio-tools``, in the ``dev`` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto" / "edgeloop" / "v1"


def main() -> int:
    """Run protoc over every .proto file, writing code beside it; return protoc's exit code."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(p.relative_to(ROOT).as_posix() for p in PROTO_DIR.glob("*.proto"))
    if not protos:
        print(f"no .proto files under {PROTO_DIR}", file=sys.stderr)
        return 1
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
