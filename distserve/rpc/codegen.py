"""Regenerates the protobuf/grpc modules under distserve/v1 from protos/distserve/v1.

The generated files are committed; `python -m distserve.rpc.codegen --check` (run by the tests)
fails when regenerating would change them.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "distserve" / "v1"


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc  # test/dev dependency only

    import grpc_tools

    protos = sorted((PROTO_ROOT / "distserve" / "v1").glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_root / "distserve" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        stale = []
        for f in files:
            target = OUT / f.name
            if args.check:
                if not target.exists() or not filecmp.cmp(f, target, shallow=False):
                    stale.append(f.name)
            else:
                target.write_bytes(f.read_bytes())
        committed = {p.name for p in OUT.glob("*_pb2*.py*")}
        extra = committed - {f.name for f in files}
        if args.check and (stale or extra):
            print(f"generated code is stale: {sorted(stale + list(extra))}; run python -m distserve.rpc.codegen")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
