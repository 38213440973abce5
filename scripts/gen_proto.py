"""Regenerate the committed Python code of the FlashCP wire contract.

Runs ``python -m grpc_tools.protoc -Iproto --python_out --grpc_python_out --pyi_out``
on every ``.proto`` under ``proto/flashcp`` and writes ``*_pb2.py``,
``*_pb2_grpc.py`` and ``*_pb2.pyi`` next to them (or under ``--out``).
``--check`` regenerates into a temporary directory and exits 1 when the
committed files differ (tests/service/test_proto_generated.py runs it).

Usage::

    python scripts/gen_proto.py            # rewrite proto/flashcp/v1/*_pb2*
    python scripts/gen_proto.py --check    # verify they are up to date
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """Every ``.proto`` file of the contract, relative to ``root``."""
    return sorted(p.relative_to(root) for p in (root / "flashcp").rglob("*.proto"))


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc into ``out_dir``; return the generated files relative to it.

    Raises:
        RuntimeError: protoc failed (its stderr is in the message).
    """
    protos = proto_files(root)
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{root}",
        f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}",
        *(str(p) for p in protos),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}): {result.stderr.strip()}")
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def stale_files(root: Path = PROTO_ROOT) -> list[str]:
    """Generated files whose committed copy differs from a fresh generation (or is missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_dir = Path(tmp)
        stale = []
        for rel in generate(fresh_dir, root):
            committed = root / rel
            if not committed.exists() or committed.read_bytes() != (fresh_dir / rel).read_bytes():
                stale.append(str(rel))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the committed code is up to date")
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: proto/)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code (run python scripts/gen_proto.py):", *stale, sep="\n  ", file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    for rel in generate(args.out):
        print(args.out / rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
