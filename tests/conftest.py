"""Shared fixtures: real servers (nats-server, envoy) started on free ports."""

pytest_plugins = [
    "tests.fixtures.nats",
    "tests.fixtures.envoy",
    "tests.fixtures.mesh",
    "tests.fixtures.pki",
    "tests.fixtures.nats_jwt",
]
