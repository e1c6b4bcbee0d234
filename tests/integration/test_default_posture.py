"""``serve`` listens beyond loopback only with API keys, or when told it may go without.

Anyone who reaches a server without keys can deploy code that runs as the server's user,
so a non-loopback ``--host`` or ``--grpc-host`` without ``--api-key``/``--admin-key``
refuses to start (saying why and what to do) unless ``--insecure-no-auth`` is given.
Through the real entry point: argument parsing, then the refusal before anything starts.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from llama_mesh.server.app import MeshServer
from llama_mesh.server.serve import build_parser, main, settings_from_args


@pytest.fixture(autouse=True)
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tripwire: ``main()`` reaching the start of a server fails the test at once instead
    of serving (on a non-loopback address) until someone stops it."""

    async def started(*args: object, **kwargs: object) -> MeshServer:
        raise AssertionError("serve went on to start a server")

    monkeypatch.setattr(MeshServer, "start", started)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--host", "0.0.0.0"], "--host 0.0.0.0"),
        (["--host", "192.0.2.7"], "--host 192.0.2.7"),
        (["--host", "::"], "--host ::"),
        (["--host", "mesh.example.com"], "--host mesh.example.com"),
        (["--grpc-host", "0.0.0.0"], "--grpc-host 0.0.0.0"),
        (["--no-gateway", "--grpc-host", "10.1.2.3"], "--grpc-host 10.1.2.3"),
    ],
)
def test_an_exposed_server_without_keys_refuses_to_start(
    args: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A non-loopback address without keys is a usage error (exit 2) naming the option,
    the risk and both ways out; nothing is started (the data dir stays empty)."""
    data_dir = tmp_path / "data"
    with pytest.raises(SystemExit) as exited:
        main([*args, "--data-dir", str(data_dir)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert named in err
    assert "deploy code that runs as this user" in err
    assert "--api-key" in err and "--insecure-no-auth" in err
    assert not data_dir.exists()


def test_the_environment_cannot_expose_it_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``LLAMA_MESH_HOST=0.0.0.0`` is refused like ``--host 0.0.0.0``; keys from
    ``LLAMA_MESH_API_KEYS`` or ``LLAMA_MESH_INSECURE_NO_AUTH=1`` let it through."""
    monkeypatch.setenv("LLAMA_MESH_HOST", "0.0.0.0")
    with pytest.raises(SystemExit):
        main(["--data-dir", str(tmp_path)])
    assert "--host 0.0.0.0" in capsys.readouterr().err
    monkeypatch.setenv("LLAMA_MESH_ALLOWED_HOSTS", "mesh.example.com")
    monkeypatch.setenv("LLAMA_MESH_API_KEYS", "k-0123456789abcdef")
    assert settings_from_args(build_parser().parse_args([])).host == "0.0.0.0"
    monkeypatch.delenv("LLAMA_MESH_API_KEYS")
    monkeypatch.setenv("LLAMA_MESH_INSECURE_NO_AUTH", "1")
    assert settings_from_args(build_parser().parse_args([])).host == "0.0.0.0"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--host", "localhost", "--grpc-host", "::1"],
        ["--host", "127.0.0.2"],
        ["--host", "0.0.0.0", "--allowed-host", "m.example", "--api-key", "user-0123456789abcdef"],
        [
            "--host",
            "0.0.0.0",
            "--allowed-host",
            "m.example",
            "--admin-key",
            "admin-0123456789abcdef",
        ],
        ["--host", "::", "--allowed-host", "*", "--grpc-host", "0.0.0.0", "--insecure-no-auth"],
        ["--host", "0.0.0.0", "--no-gateway"],  # no gateway: --host binds nothing
    ],
)
def test_loopback_keys_or_the_explicit_opt_out_are_accepted(args: list[str]) -> None:
    """Loopback addresses, API keys, or ``--insecure-no-auth`` give settings to start with."""
    settings = settings_from_args(build_parser().parse_args(args))
    assert settings.port == 4501


async def test_the_serve_command_refuses_and_exits(tmp_path: Path) -> None:
    """``python -m llama_mesh.server --grpc-host 192.0.2.7`` (an address of no host here, so
    that nothing could listen on it anyway) exits with status 2 and says why on stderr,
    before it starts anything."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llama_mesh.server",
        *("--grpc-host", "192.0.2.7", "--no-gateway", "--data-dir", str(tmp_path / "data")),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2, (out, err)
    assert b"--grpc-host 192.0.2.7 listens beyond this machine" in err
    assert b"ready" not in out
    assert not (tmp_path / "data").exists()
