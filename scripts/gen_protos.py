#!/usr/bin/env python3
"""Regenerate gpuorch/v1 from protos/gpuorch/v1/*.proto (code, gRPC stubs, type stubs).

    python scripts/gen_protos.py            # write into the tree
    python scripts/gen_protos.py --out DIR  # write elsewhere (the freshness test does this)

The generated code is committed; tests/test_protos_fresh.py fails when it is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PACKAGE_DIR = Path("gpuorch") / "v1"
DESCRIPTOR_SET = "descriptors.binpb"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_root: Path) -> None:
    """Writes <out_root>/gpuorch/v1/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py and descriptors.binpb."""
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        # Served by the coordinator's reflection service so `grpcurl describe` shows the comments.
        "--include_source_info",
        "--include_imports",
        f"--descriptor_set_out={out_root / PACKAGE_DIR / DESCRIPTOR_SET}",
        *(str(path.relative_to(PROTO_ROOT)) for path in proto_files()),
    ]
    status = protoc.main(args)
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO, help="root to write gpuorch/v1 under")
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
