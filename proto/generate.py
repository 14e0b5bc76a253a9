"""Generate the Python code of the wire contract: proto/tierline/v1/*.proto -> tierline/v1/ (ignored by git).

Run by setup.py whenever the package is built (so `pip install .` of a clean clone ships the
generated code) and by `make proto`. Needs grpcio-tools (a build requirement in pyproject.toml).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT  # protoc writes tierline/v1/... under it, mirroring proto/tierline/v1/
PACKAGE = Path("tierline") / "v1"


def sources() -> list[Path]:
    return sorted((PROTO_DIR / PACKAGE).glob("*.proto"))


def outputs_current() -> bool:
    """Every generated module is newer than every .proto file."""
    made = [OUT_DIR / PACKAGE / f"{p.stem}{suffix}" for p in sources() for suffix in ("_pb2.py", "_pb2_grpc.py")]
    newest = max(p.stat().st_mtime for p in sources())
    return all(m.is_file() and m.stat().st_mtime >= newest for m in made)


def generate(force: bool = False) -> None:
    if not force and outputs_current():
        return
    from grpc_tools import protoc  # a build requirement; imported only when something must be made

    include = Path(protoc.__file__).parent / "_proto"  # the well-known types
    for proto in sources():
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={OUT_DIR}", f"--pyi_out={OUT_DIR}",
                f"--grpc_python_out={OUT_DIR}", str(proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    (OUT_DIR / PACKAGE / "__init__.py").write_text('"""Generated from proto/tierline/v1 (proto/generate.py)."""\n')


if __name__ == "__main__":
    generate(force="--force" in sys.argv)
