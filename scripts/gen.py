"""Generate code from proto/: the one producer of every generated file in the repository.

Outputs (committed; never edit them by hand):

* ``client/llama_mesh/v1/*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``, ``*_pb2_grpc.pyi``
* ``server/llama_mesh/server/gateway/llama_mesh.binpb``: the descriptor set Envoy's
  gRPC-JSON transcoder reads (with imports, and ``google/rpc`` status and error details so
  that gRPC errors can be rendered as JSON).

Usage::

    python scripts/gen.py           # regenerate in place
    python scripts/gen.py --check   # regenerate into a temporary tree; fail on any difference
    python scripts/gen.py --deps    # only place google/api and google/rpc protos for buf

The google protos come from installed wheels (googleapis-common-protos, grpcio-tools), never
from a remote registry; ``proto/google/`` is a git-ignored copy made for ``buf lint``.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PY_OUT = ROOT / "client"
PY_PACKAGE = Path("llama_mesh") / "v1"
DESCRIPTOR = Path("server") / "llama_mesh" / "server" / "gateway" / "llama_mesh.binpb"
GOOGLE_DEPS = (
    "google/api/annotations.proto",
    "google/api/http.proto",
    "google/api/httpbody.proto",
    "google/api/field_behavior.proto",
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
    "google/rpc/code.proto",
)
# Put in the descriptor set so the transcoder can render rich gRPC errors as JSON.
DESCRIPTOR_EXTRAS = ("google/rpc/status.proto", "google/rpc/error_details.proto")
INIT_TEXT = (
    '"""Generated protobuf and gRPC code of the llama_mesh.v1 contracts (scripts/gen.py)."""\n'
)


def _googleapis_root() -> Path:
    import google.api.annotations_pb2 as annotations

    return Path(annotations.__file__).resolve().parent.parent.parent


def _well_known_root() -> Path:
    import grpc_tools

    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def place_google_deps() -> None:
    """Copy the google/api and google/rpc protos buf needs next to ours (git-ignored)."""
    src_root = _googleapis_root()
    for rel in GOOGLE_DEPS:
        dest = PROTO_DIR / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_root / rel, dest)


def _protos() -> list[str]:
    return sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / PY_PACKAGE).glob("*.proto"))


def _protoc(args: list[str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{_googleapis_root()}",
        f"-I{_well_known_root()}",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"protoc failed:\n{proc.stderr}")


def generate(out_root: Path) -> None:
    """Write every generated file below ``out_root`` (the repository layout)."""
    py_out = out_root / PY_OUT.relative_to(ROOT)
    pkg = py_out / PY_PACKAGE
    if pkg.exists():
        for old in pkg.glob("*_pb2*.py*"):
            old.unlink()
    pkg.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    protos = _protos()
    _protoc(
        [
            f"--python_out={py_out}",
            f"--grpc_python_out={py_out}",
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"--mypy_out=quiet:{py_out}",
            f"--mypy_grpc_out=quiet:{py_out}",
            *protos,
        ]
    )
    (pkg / "__init__.py").write_text(INIT_TEXT)
    (pkg / "py.typed").write_text("")
    descriptor = out_root / DESCRIPTOR
    descriptor.parent.mkdir(parents=True, exist_ok=True)
    _protoc(
        [
            f"--descriptor_set_out={descriptor}",
            "--include_imports",
            *protos,
            *DESCRIPTOR_EXTRAS,
        ]
    )


def _generated_files(root: Path) -> set[Path]:
    pkg = root / PY_OUT.relative_to(ROOT) / PY_PACKAGE
    files = {p.relative_to(root) for p in pkg.iterdir() if p.is_file()} if pkg.exists() else set()
    if (root / DESCRIPTOR).exists():
        files.add(DESCRIPTOR)
    return files


def check() -> int:
    """Regenerate into a temporary tree and compare with the working tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh, current = _generated_files(fresh_root), _generated_files(ROOT)
        problems = [f"missing: {p}" for p in sorted(fresh - current)]
        problems += [f"not produced by gen.py: {p}" for p in sorted(current - fresh)]
        problems += [
            f"differs: {p}"
            for p in sorted(fresh & current)
            if not filecmp.cmp(fresh_root / p, ROOT / p, shallow=False)
        ]
    if problems:
        print("generated code is out of date; run ./dev gen", file=sys.stderr)
        print("\n".join(problems), file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if regeneration changes files")
    parser.add_argument("--deps", action="store_true", help="only place google protos for buf")
    args = parser.parse_args()
    place_google_deps()
    if args.deps:
        return 0
    if args.check:
        return check()
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
