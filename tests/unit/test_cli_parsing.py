"""``llamactl`` without a server: options, usage errors, exit statuses, output, pass-through."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner, Result

from llama_mesh.client import __version__
from llama_mesh.client._cli_output import emit_result, table
from llama_mesh.client._cli_state import State
from llama_mesh.client.cli import llamactl
from llama_mesh.server import serve as serve_module
from llama_mesh.server.service import __main__ as worker_module

CLOSED = "http://127.0.0.1:1"
"""A server URL where nothing listens: connection refused at once."""


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read the developer's profile file or environment."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name in ("ADDRESS", "API_KEY", "TLS_CA", "TLS_CERT", "TLS_KEY"):
        monkeypatch.delenv(f"LLAMA_MESH_{name}", raising=False)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(llamactl, list(args), prog_name="llamactl")


def test_help_lists_every_command() -> None:
    """The root help names the 0.8 verbs and the new ones."""
    result = invoke("--help")
    assert result.exit_code == 0
    for command in (
        "config",
        "deploy",
        "deployments",
        "run",
        "send-event",
        "serve",
        "services",
        "sessions",
        "status",
        "tasks",
        "wait",
        "worker",
    ):
        assert f"  {command} " in result.stdout, command


def _commands(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of ``command`` and of every command below it."""
    found = [path]
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            found += _commands(sub, (*path, name))
    return found


def _command_at(path: tuple[str, ...]) -> click.Command:
    command: click.Command = llamactl
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", _commands(llamactl), ids=lambda p: " ".join(p) or "llamactl")
def test_every_help_text_is_whole(path: tuple[str, ...]) -> None:
    """Every command's --help: no summary cut off with '...', no raw RST markup, a help
    text for every option; ``serve`` and ``worker`` show their own usage under their
    llamactl names."""
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "``" not in text
    if path in (("serve",), ("worker",)):
        assert text.startswith(f"usage: llamactl {path[0]} ")
        return
    listing = text.partition("\nCommands:\n")[2]
    assert not [line for line in listing.splitlines() if line.rstrip().endswith("...")]
    for param in _command_at(path).params:
        if isinstance(param, click.Option):
            assert param.help, f"{' '.join(path)} {param.opts[0]} has no help"


@pytest.mark.parametrize("name", ["serve", "worker"])
def test_serve_and_worker_options_say_what_and_default(name: str) -> None:
    """Every option of ``serve`` and ``worker`` has a help text, and every one that takes a
    value and is not required names its default."""
    parser = serve_module.build_parser() if name == "serve" else worker_module.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = action.option_strings[0] if action.option_strings else action.dest
        assert action.help, f"{name} {label} has no help"
        if action.option_strings and action.nargs != 0 and not action.required:
            assert "default" in action.help, f"{name} {label} does not name its default"


def test_output_option_after_the_command_too(tmp_path: Path) -> None:
    """``-o`` is accepted after the command as well as before it; after it wins."""
    config = str(tmp_path / "profiles.yaml")
    after = invoke("-c", config, "config", "get-profiles", "-o", "json")
    assert after.exit_code == 0, after.output
    assert json.loads(after.stdout)[0]["name"] == "default"
    both = invoke("-c", config, "-o", "json", "config", "get-profiles", "-o", "yaml")
    assert both.exit_code == 0, both.output
    assert yaml.safe_load(both.stdout)[0]["name"] == "default"
    assert invoke("-c", config, "config", "get-profiles", "-o", "xml").exit_code == 2


def test_version() -> None:
    """``--version`` prints the client's version."""
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"llamactl, version {__version__}"


@pytest.mark.parametrize(
    "args",
    [
        ["run", "-a", "k", "v"],  # no -d
        ["run", "-d", "x", "-a", "only-key"],  # -a takes KEY VALUE
        ["-o", "xml", "status"],
        ["-t", "-1", "status"],
        ["tasks", "list", "-d", "x", "--status", "bogus"],
        ["tasks", "events", "-d", "x", "t", "--from-index", "-1"],
        ["send-event", "-d", "x", "t"],  # no --type
        ["send-event", "-d", "x", "t", "--type", "E", "--data", "{bad json"],
        ["send-event", "-d", "x", "t", "--type", "E", "--data", "[1, 2]"],
        ["deploy", "/no/such/file.yml"],
        ["deployments", "delete", "x"],  # not a terminal and no --yes
        ["no-such-command"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    """Bad command lines exit with status 2 before any server is contacted."""
    result = invoke("-s", CLOSED, *args)
    assert result.exit_code == 2, result.output
    assert "Error:" in result.stderr


def test_api_errors_exit_1_with_message_on_stderr() -> None:
    """An unreachable server is an API error: exit 1, ``Error: ...`` on stderr, stdout empty."""
    result = invoke("-s", CLOSED, "status")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error: cannot reach the server at 127.0.0.1:1")


def test_server_accepts_url_or_host_port() -> None:
    """``-s`` takes 0.8's http URL or a plain host:port; both resolve to the same target."""
    for server in ("http://127.0.0.1:1", "127.0.0.1:1"):
        assert "at 127.0.0.1:1:" in invoke("-s", server, "status").stderr


def test_unknown_profile_is_an_error(tmp_path: Path) -> None:
    """``-p`` naming a missing profile fails like 0.8: ``Profile X does not exist.``"""
    result = invoke("-p", "nope", "status")
    assert result.exit_code == 1
    assert "Profile nope does not exist" in result.stderr


def test_profile_supplies_the_server(tmp_path: Path) -> None:
    """Without ``-s``, the current profile's server (an http URL) is used."""
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump({"current_profile": "p", "profiles": {"p": {"server": CLOSED}}})
    )
    result = invoke("-c", str(config), "status")
    assert result.exit_code == 1
    assert "at 127.0.0.1:1:" in result.stderr


def test_wait_times_out_with_status_1() -> None:
    """``wait --timeout`` gives up after the timeout with exit status 1."""
    result = invoke("-s", CLOSED, "wait", "--timeout", "0.3")
    assert result.exit_code == 1
    assert "did not answer within 0.3 s" in result.stderr


def test_config_profile_commands(tmp_path: Path) -> None:
    """0.8's profile commands edit the YAML file named by ``-c``."""
    path = str(tmp_path / "cfg" / "config.yaml")
    assert invoke("-c", path, "config", "current-profile").stdout == "default\n"
    set_server = invoke("-c", path, "config", "set-profile-vars", "server", "http://h:1")
    assert set_server.exit_code == 0
    assert (
        invoke("-c", path, "-p", "b", "config", "set-profile-vars", "timeout", "5").exit_code == 0
    )
    bad = invoke("-c", path, "config", "set-profile-vars", "insecure", "perhaps")
    assert bad.exit_code == 1 and "invalid truth value" in bad.stderr
    assert invoke("-c", path, "config", "set-profile-vars", "colour", "red").exit_code == 1
    assert invoke("-c", path, "config", "use-profile", "b").exit_code == 0
    assert invoke("-c", path, "config", "delete-profile", "b").exit_code == 1  # in use
    assert invoke("-c", path, "config", "rename-profile", "b", "c").exit_code == 0
    assert invoke("-c", path, "config", "delete-profile", "default").exit_code == 0
    assert invoke("-c", path, "config", "use-profile", "zzz").exit_code == 1
    listed = json.loads(invoke("-c", path, "-o", "json", "config", "get-profiles").stdout)
    assert listed == [
        {"name": "c", "current": True, "server": "http://localhost:4501", "insecure": False}
        | {"timeout": 5.0}
    ]
    assert yaml.safe_load(Path(path).read_text())["current_profile"] == "c"
    table_out = invoke("-c", path, "-o", "table", "config", "get-profiles").stdout
    assert table_out.splitlines()[1].split() == ["*", "c", "http://localhost:4501"]


def pem_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Stand-ins for a CA, a client certificate and its key (their bytes are their names)."""
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "cert.pem", "key.pem"))
    for path in (ca, cert, key):
        path.write_bytes(path.name.encode())
    return ca, cert, key


def test_tls_options_reach_the_client(tmp_path: Path) -> None:
    """``--tls-ca``, ``--tls-cert`` and ``--tls-key`` become the client's CA and certificate;
    half a pair, or a missing file, is a usage error (2)."""
    ca, cert, key = pem_files(tmp_path)
    result = invoke("--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key))
    assert result.exit_code == 0, result.output
    state = State(server="127.0.0.1:1", tls_ca=ca, tls_cert=cert, tls_key=key)
    settings = state.client().settings
    assert (settings.tls, settings.root_certificates) == (True, b"ca.pem")
    assert (settings.certificate_chain, settings.private_key) == (b"cert.pem", b"key.pem")
    half = invoke("-s", CLOSED, "--tls-cert", str(cert), "status")
    assert half.exit_code == 2
    assert "--tls-cert and --tls-key: give both or neither" in half.stderr
    missing = invoke("-s", CLOSED, "--tls-ca", str(tmp_path / "nope.pem"), "status")
    assert missing.exit_code == 2 and "--tls-ca" in missing.stderr


def test_profile_tls_settings(tmp_path: Path) -> None:
    """``config set-profile-vars tls_ca|tls_cert|tls_key`` save absolute paths the client then
    uses; an empty value unsets one, a missing file is refused, half a pair fails a call."""
    ca, cert, key = pem_files(tmp_path)
    path = str(tmp_path / "config.yaml")
    for param, file in (("tls_ca", ca), ("tls_cert", cert), ("tls_key", key)):
        result = invoke("-c", path, "config", "set-profile-vars", param, str(file))
        assert result.exit_code == 0, result.output
    listed = json.loads(invoke("-c", path, "-o", "json", "config", "get-profiles").stdout)
    assert (listed[0]["tls_ca"], listed[0]["tls_cert"], listed[0]["tls_key"]) == tuple(
        str(file) for file in (ca, cert, key)
    )
    settings = State(server="127.0.0.1:1", config_path=Path(path)).client().settings
    assert (settings.root_certificates, settings.certificate_chain) == (b"ca.pem", b"cert.pem")
    missing = invoke("-c", path, "config", "set-profile-vars", "tls_ca", str(tmp_path / "no"))
    assert missing.exit_code == 1 and "no such file" in missing.stderr
    assert invoke("-c", path, "config", "set-profile-vars", "tls_key", "").exit_code == 0
    assert "tls_key" not in yaml.safe_load(Path(path).read_text())["profiles"]["default"]
    half = invoke("-c", path, "-s", CLOSED, "status")
    assert half.exit_code == 1
    assert "profiles.default.tls_cert and tls_key: set both or neither" in half.stderr


def test_serve_without_the_server_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` and ``worker`` explain how to get the server when it is not installed."""
    for name in ("llama_mesh.server", "llama_mesh.server.serve", "llama_mesh.server.service"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "llama_mesh.server.service.__main__", None)
    for command in ("serve", "worker"):
        result = invoke(command, "--port", "1")
        assert result.exit_code == 1
        assert "install llama-mesh to run the server" in result.stderr


def test_serve_and_worker_pass_their_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every argument after ``serve``/``worker`` (``--help`` too) reaches the server's main."""
    calls: list[tuple[str, Any]] = []

    def fake(module: str, code: int) -> types.ModuleType:
        mod = types.ModuleType(module)

        def main(argv: list[str], prog: str | None = None) -> int:
            calls.append((module, (argv, prog)))
            return code

        mod.main = main  # type: ignore[attr-defined]
        return mod

    monkeypatch.setitem(sys.modules, "llama_mesh.server.serve", fake("serve", 0))
    monkeypatch.setitem(sys.modules, "llama_mesh.server.service.__main__", fake("worker", 3))
    assert invoke("serve", "app.yml", "--port", "9", "--help").exit_code == 0
    worker = invoke("worker", "--nats", "nats://x", "--deployment", "d", "--service", "s")
    assert worker.exit_code == 3
    assert calls == [
        ("serve", (["app.yml", "--port", "9", "--help"], "llamactl serve")),
        (
            "worker",
            (["--nats", "nats://x", "--deployment", "d", "--service", "s"], "llamactl worker"),
        ),
    ]


def test_results_print_like_08(capsys: pytest.CaptureFixture[str]) -> None:
    """Results: strings as plain text, other values as JSON; an explicit -o json quotes all."""
    emit_result("echo: hi", None)
    emit_result({"ticks": 3}, None)
    emit_result("echo: hi", "json")
    emit_result([1, 2], "yaml")
    assert capsys.readouterr().out == 'echo: hi\n{"ticks": 3}\n"echo: hi"\n- 1\n- 2\n'


def test_tables_align_columns() -> None:
    """Tables: headers first, columns padded to the widest cell, no trailing blanks."""
    assert table([["a", "bbb"], ["cccc", ""]], ["X", "Y"]) == "X     Y\na     bbb\ncccc"


def test_control_planes_are_served_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` serves deployments' 0.8 control planes by default; ``--no-control-planes``
    or ``LLAMA_MESH_NO_CONTROL_PLANES=1`` turns them off."""
    from llama_mesh.server.serve import build_parser, settings_from_args

    monkeypatch.delenv("LLAMA_MESH_NO_CONTROL_PLANES", raising=False)
    assert settings_from_args(build_parser().parse_args([])).control_planes
    off = build_parser().parse_args(["--no-control-planes"])
    assert not settings_from_args(off).control_planes
    monkeypatch.setenv("LLAMA_MESH_NO_CONTROL_PLANES", "1")
    assert not settings_from_args(build_parser().parse_args([])).control_planes
