"""``serve`` reads the Llama Deploy 0.8 API server's variables after its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_mesh.server.serve import build_parser, rc_files, settings_from_args

OURS = ("LLAMA_MESH_HOST", "LLAMA_MESH_PORT", "LLAMA_MESH_RC_PATH", "LLAMA_MESH_METRICS_PORT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OURS:
        monkeypatch.delenv(name, raising=False)
    for name in ("HOST", "PORT", "RC_PATH", "PROMETHEUS_ENABLED", "PROMETHEUS_PORT"):
        monkeypatch.delenv(f"LLAMA_DEPLOY_APISERVER_{name}", raising=False)


def test_llama_deploy_variables_are_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """0.8's HOST, PORT, RC_PATH and PROMETHEUS_PORT fill serve's options when nothing of
    llama-mesh's sets them."""
    monkeypatch.setenv("LLAMA_DEPLOY_APISERVER_HOST", "10.1.2.3")
    monkeypatch.setenv("LLAMA_DEPLOY_APISERVER_PORT", "4600")
    monkeypatch.setenv("LLAMA_DEPLOY_APISERVER_RC_PATH", "/opt/rc")
    monkeypatch.setenv("LLAMA_DEPLOY_APISERVER_PROMETHEUS_PORT", "9100")
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.rc_path, args.metrics_port) == (
        "10.1.2.3",
        4600,
        Path("/opt/rc"),
        9100,
    )


def test_our_variables_then_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLAMA_MESH_* beats LLAMA_DEPLOY_APISERVER_*, and a flag beats both."""
    for name, value in (("HOST", "10.0.0.8"), ("PORT", "4600"), ("RC_PATH", "/opt/rc")):
        monkeypatch.setenv(f"LLAMA_DEPLOY_APISERVER_{name}", value)
    monkeypatch.setenv("LLAMA_DEPLOY_APISERVER_PROMETHEUS_PORT", "9100")
    monkeypatch.setenv("LLAMA_MESH_PORT", "4700")
    monkeypatch.setenv("LLAMA_MESH_RC_PATH", "/srv/rc")
    monkeypatch.setenv("LLAMA_MESH_METRICS_PORT", "9200")
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.rc_path, args.metrics_port) == (
        "10.0.0.8",
        4700,
        Path("/srv/rc"),
        9200,
    )
    flags = ["--host", "127.0.0.1", "--port", "4800", "--rc-path", "rc", "--metrics-port", "1"]
    args = build_parser().parse_args(flags)
    assert (args.host, args.port, args.rc_path, args.metrics_port) == (
        "127.0.0.1",
        4800,
        Path("rc"),
        1,
    )


@pytest.mark.parametrize(
    ("enabled", "port", "expected"),
    [
        (None, None, None),  # nothing of 0.8 set: llama-mesh's default (off)
        ("true", None, 9000),  # 0.8's default port
        ("True", "9100", 9100),
        ("false", "9100", None),
        ("0", None, None),
        (None, "9100", 9100),  # 0.8 enables metrics by default
    ],
)
def test_prometheus_settings(
    monkeypatch: pytest.MonkeyPatch, enabled: str | None, port: str | None, expected: int | None
) -> None:
    """PROMETHEUS_ENABLED / PROMETHEUS_PORT become --metrics-port as 0.8 meant them."""
    if enabled is not None:
        monkeypatch.setenv("LLAMA_DEPLOY_APISERVER_PROMETHEUS_ENABLED", enabled)
    if port is not None:
        monkeypatch.setenv("LLAMA_DEPLOY_APISERVER_PROMETHEUS_PORT", port)
    assert build_parser().parse_args([]).metrics_port == expected


def test_rc_files_are_the_yaml_files_in_name_order(tmp_path: Path) -> None:
    """The rc folder's *.yml and *.yaml files, sorted; other files, folders and a missing
    folder give nothing."""
    for name in ("b.yaml", "a.yml", "notes.txt", "c.yml.bak"):
        (tmp_path / name).write_text("x")
    (tmp_path / "d.yml").mkdir()
    assert rc_files(tmp_path) == [tmp_path / "a.yml", tmp_path / "b.yaml"]
    assert rc_files(tmp_path / "missing") == []


def test_the_default_broker_comes_from_its_variable_then_the_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--broker`` (``LLAMA_MESH_BROKER_URL``) sets the broker of deployments that name
    none; unset, they run on the server's own."""
    monkeypatch.delenv("LLAMA_MESH_BROKER_URL", raising=False)
    assert settings_from_args(build_parser().parse_args([])).broker_url is None
    monkeypatch.setenv("LLAMA_MESH_BROKER_URL", "redis://h:6379/0")
    assert settings_from_args(build_parser().parse_args([])).broker_url == "redis://h:6379/0"
    args = build_parser().parse_args(["--broker", "amqp://u:p@h:5672/"])
    assert settings_from_args(args).broker_url == "amqp://u:p@h:5672/"


def test_nats_sync_comes_from_its_variable_then_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--nats-sync`` (``LLAMA_MESH_NATS_SYNC``) sets when the embedded nats-server fsyncs;
    unset, after every write."""
    monkeypatch.delenv("LLAMA_MESH_NATS_SYNC", raising=False)
    assert settings_from_args(build_parser().parse_args([])).nats_sync == "always"
    monkeypatch.setenv("LLAMA_MESH_NATS_SYNC", "2s")
    assert settings_from_args(build_parser().parse_args([])).nats_sync == "2s"
    args = build_parser().parse_args(["--nats-sync", "1m30s"])
    assert settings_from_args(args).nats_sync == "1m30s"


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--nats-sync", "often"], "'often': use 'always'"),
        (["--nats-sync", "10"], "'10': use 'always'"),
        (["--nats-sync", "2s "], "'2s ': use 'always'"),
        (["--nats-sync", "0ms"], "above zero"),
        (["--nats-sync", "1s", "--nats-url", "nats://h:4222"], "embedded nats-server only"),
        (["--nats-sync", "1s", "--queue", "inprocess"], "embedded nats-server only"),
    ],
)
def test_a_bad_nats_sync_is_refused_naming_the_option(
    monkeypatch: pytest.MonkeyPatch, flags: list[str], problem: str
) -> None:
    """A sync interval nats-server would not take, or one for a server ``serve`` does not
    start, fails at once, naming ``--nats-sync``."""
    monkeypatch.delenv("LLAMA_MESH_NATS_SYNC", raising=False)
    args = build_parser().parse_args(flags)
    with pytest.raises(ValueError, match=r"--nats-sync\)") as raised:
        settings_from_args(args)
    assert problem in str(raised.value)
