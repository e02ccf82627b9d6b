"""Generate the Python protobuf and gRPC code for ``proto/edgeloop/v1/*.proto``.

This is the only way generated code enters the tree; never edit the ``*_pb2*.py`` files by hand.
``python scripts/gen_proto.py`` regenerates in place; ``--check`` regenerates into a temporary directory and
fails if the committed files differ (run by ``make test``). Needs ``grpcio-tools`` (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto" / "edgeloop" / "v1"
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: Path) -> int:
    """Run protoc over every .proto file, writing code under ``out_root``; return protoc's exit code."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(p.relative_to(ROOT).as_posix() for p in PROTO_DIR.glob("*.proto"))
    if not protos:
        print(f"no .proto files under {PROTO_DIR}", file=sys.stderr)
        return 1
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{include}"]
    args += [f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *protos]
    code = int(protoc.main(args))
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
    return code


def check() -> int:
    """Regenerate into a temporary tree and compare with the committed generated files."""
    with tempfile.TemporaryDirectory() as tmp:
        code = generate(Path(tmp))
        if code != 0:
            return code
        fresh = Path(tmp) / "proto" / "edgeloop" / "v1"
        stale = []
        for proto in sorted(PROTO_DIR.glob("*.proto")):
            for suffix in GENERATED:
                name = proto.stem + suffix
                committed = PROTO_DIR / name
                if not committed.exists() or not filecmp.cmp(fresh / name, committed, shallow=False):
                    stale.append(name)
        if stale:
            print(f"generated code is stale or edited by hand: {stale}; run scripts/gen_proto.py", file=sys.stderr)
            return 1
    print("generated protobuf code is up to date")
    return 0


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the committed generated code, write nothing")
    args = parser.parse_args()
    if args.check:
        return check()
    with tempfile.TemporaryDirectory() as tmp:
        code = generate(Path(tmp))
        if code == 0:
            for path in (Path(tmp) / "proto" / "edgeloop" / "v1").iterdir():
                shutil.copy2(path, PROTO_DIR / path.name)
    return code


if __name__ == "__main__":
    sys.exit(main())
