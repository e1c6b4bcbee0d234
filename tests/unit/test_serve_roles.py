"""``serve --roles``: which combinations run, and a one-line reason (exit 2) for the others."""

from __future__ import annotations

import pytest

from llama_mesh.server.serve import build_parser, main, settings_from_args

NATS = ["--nats-url", "nats://n1:4222,nats://n2:4222"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ROLES", "NATS_URL", "QUEUE", "API_KEYS", "ADMIN_KEYS", "INSECURE_NO_AUTH"):
        monkeypatch.delenv(f"LLAMA_MESH_{name}", raising=False)


@pytest.mark.parametrize(
    ("argv", "roles", "supervise", "gateway"),
    [
        ([], None, (), True),
        (["--no-gateway"], None, (), False),
        (["--roles", "api", *NATS], {"api"}, (), False),
        (
            ["--roles", "supervisor", "--supervise", "a", "--supervise", "b", *NATS],
            {"supervisor"},
            ("a", "b"),
            False,
        ),
        (["--roles", "api, gateway", *NATS], {"api", "gateway"}, (), True),
        (["--roles", "api,supervisor,gateway", *NATS], {"api", "supervisor", "gateway"}, (), True),
    ],
)
def test_roles_that_run(
    argv: list[str], roles: set[str] | None, supervise: tuple[str, ...], gateway: bool
) -> None:
    """No --roles is the all-in-one; named roles are one server of several, with a gateway
    only when it is among them."""
    settings = settings_from_args(build_parser().parse_args(argv))
    expected = None if roles is None else frozenset(roles)
    assert (settings.roles, settings.supervise, settings.gateway) == (expected, supervise, gateway)


def test_roles_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_MESH_ROLES", "supervisor")
    monkeypatch.setenv("LLAMA_MESH_NATS_URL", "nats://n1:4222")
    settings = settings_from_args(build_parser().parse_args([]))
    assert settings.roles == frozenset({"supervisor"}) and settings.has_role("supervisor")
    assert not settings.has_role("api")


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--roles", "api"], "share an external NATS (--nats-url)"),
        (["--roles", "api", "--queue", "inprocess", *NATS], "share an external NATS"),
        (["--roles", "api,cook", *NATS], "name one or more of api, supervisor, gateway"),
        (["--roles", ",", *NATS], "roles (--roles): none"),
        (["--roles", "gateway", *NATS], "the gateway role fronts the api role"),
        (["--roles", "supervisor,gateway", *NATS], "the gateway role fronts the api role"),
        (["--roles", "api", "--supervise", "a", *NATS], "needs the supervisor role"),
        (["--supervise", "a"], "needs --roles with supervisor"),
        (["--roles", "api", "--grpc-host", "0.0.0.0", *NATS], "--grpc-host 0.0.0.0 listens"),
    ],
)
def test_nonsense_is_exit_2_with_the_reason(
    argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("llamactl serve: error: ") and reason in error


def test_a_supervisor_alone_may_listen_beyond_loopback_without_keys() -> None:
    """It serves health checks only (no key needed for those anyway)."""
    argv = ["--roles", "supervisor", "--grpc-host", "0.0.0.0", *NATS]
    assert settings_from_args(build_parser().parse_args(argv)).grpc_host == "0.0.0.0"
