"""Shared fixtures: real servers (nats-server, envoy) started on free ports.

Also the Hypothesis profile of the suite: ``mesh``, selected unless ``HYPOTHESIS_PROFILE``
names another. It has no deadline: a machine shared with other work runs one example in
hundreds of milliseconds now and then, and the fuzz tests pin behaviour, not speed. Tests
set no deadline of their own (``tests/unit/test_hypothesis_profile.py`` checks both).
"""

import os

from hypothesis import HealthCheck, settings

HYPOTHESIS_PROFILE = "mesh"

settings.register_profile(
    HYPOTHESIS_PROFILE, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", HYPOTHESIS_PROFILE))

pytest_plugins = [
    "tests.fixtures.logs",
    "tests.fixtures.nats",
    "tests.fixtures.rabbitmq",
    "tests.fixtures.brokers",
    "tests.fixtures.envoy",
    "tests.fixtures.mesh",
    "tests.fixtures.pki",
    "tests.fixtures.nats_jwt",
    "tests.fixtures.redis",
]
