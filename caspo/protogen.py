"""Generate ``caspo.protos`` from ``protos/*.proto`` with grpcio-tools (run by the build, never by hand).

protoc names generated modules after the proto package (``caspo.v1``), which would collide with this
Python package, so the generated code lives in ``caspo/protos/v1`` and its cross-imports, and the module
name its message classes record (pickle imports it: Ray Serve pickles gRPC requests), are rewritten
from ``caspo.v1`` to ``caspo.protos.v1``.

    python -m caspo.protogen            # (re)generate
    python -m caspo.protogen --check    # exit 1 when the generated code is missing or stale
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = Path(__file__).resolve().parent / "protos"


def generate(proto_dir: Path = PROTO_DIR, out_dir: Path = OUT_DIR) -> list[Path]:
    protos = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(grpc_tools.__file__).parent / "_proto"
        rc = protoc.main(
            ["grpc_tools.protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        src_root = Path(tmp) / "caspo" / "v1"
        (out_dir / "v1").mkdir(exist_ok=True)
        for f in sorted(src_root.iterdir()):
            text = re.sub(r"\bfrom caspo\.v1 import\b", "from caspo.protos.v1 import", f.read_text())
            # the module name messages record (and pickle by): Ray Serve pickles requests between processes
            text = re.sub(r"'caspo\.v1\.(\w+_pb2)'", r"'caspo.protos.v1.\1'", text)
            target = out_dir / "v1" / f.name
            target.write_text(text)
            written.append(target)
        for init in (out_dir / "__init__.py", out_dir / "v1" / "__init__.py"):
            init.write_text('"""Generated from protos/ by caspo.protogen; do not edit."""\n')
        return written


def is_stale(proto_dir: Path = PROTO_DIR, out_dir: Path = OUT_DIR) -> list[str]:
    """Names of generated files that differ from what the .proto files produce now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(proto_dir, Path(tmp))
        stale = []
        for f in fresh:
            have = out_dir / "v1" / f.name
            if not have.exists() or not filecmp.cmp(f, have, shallow=False):
                stale.append(f.name)
        return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m caspo.protogen")
    ap.add_argument("--check", action="store_true", help="exit 1 when generated code is missing or stale")
    args = ap.parse_args(argv)
    if args.check:
        stale = is_stale()
        if stale:
            print("stale generated protobuf code: " + ", ".join(stale) + " (run: python -m caspo.protogen)", file=sys.stderr)
            return 1
        print("generated protobuf code is current")
        return 0
    for f in generate():
        print(f"wrote {f.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
