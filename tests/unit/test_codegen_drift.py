"""The drift check: a proto changed without regenerating makes `gen.py --check` fail."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


def load_gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llama_mesh_gen", ROOT / "scripts" / "gen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """gen.py reading a copy of proto/ (its outputs are still compared with the checkout)."""
    module = load_gen()
    copy = tmp_path / "proto"
    shutil.copytree(ROOT / "proto" / "llama_mesh", copy / "llama_mesh")
    monkeypatch.setattr(module, "PROTO_DIR", copy)
    python_only: classmethod[Any, [], Any] = classmethod(
        lambda cls: (cls(typescript=False, go=False), [])
    )
    monkeypatch.setattr(module.Targets, "installed", python_only)
    return module


def test_unchanged_protos_pass(gen: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    """Regenerating from the committed protos reproduces the committed files exactly."""
    assert gen.check() == 0
    assert "up to date" in capsys.readouterr().out


def test_changed_proto_without_regeneration_fails(
    gen: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """A field added to a proto but not regenerated is reported, naming the stale file."""
    types = gen.PROTO_DIR / "llama_mesh" / "v1" / "types.proto"
    text = types.read_text().replace(
        "  bool local = 11;\n}", "  bool local = 11;\n  // extra is new.\n  string extra = 12;\n}"
    )
    assert "string extra = 12" in text
    types.write_text(text)
    assert gen.check() == 1
    err = capsys.readouterr().err
    assert "out of date" in err
    assert "differs: client/llama_mesh/v1/types_pb2.py" in err


def test_changed_proto_comment_makes_the_openapi_document_stale(
    gen: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """The OpenAPI document is generated too: a changed comment of an RPC with an HTTP route
    (which changes no Python stub) is reported as a stale openapi.json."""
    api = gen.PROTO_DIR / "llama_mesh" / "v1" / "apiserver.proto"
    old = "  // CancelTask cancels a queued or running task.\n"
    text = api.read_text()
    assert old in text
    api.write_text(text.replace(old, "  // CancelTask cancels a queued or running task, now.\n"))
    assert gen.check() == 1
    err = capsys.readouterr().err
    assert "differs: server/llama_mesh/server/gateway/openapi.json" in err
