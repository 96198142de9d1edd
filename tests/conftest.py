import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def rng():
    return np.random.default_rng(20260526)


@pytest.fixture(scope="session")
def server():
    """One reward server process on an ephemeral loopback port, shared by read-only tests."""
    from corrpo_server.process import ServerProcess

    with ServerProcess("--metrics-port", "0", "--max-message-mib", "16", "--max-tokens", "200000") as process:
        yield process


@pytest.fixture(scope="session")
def client(server):
    from corrpo.client import RewardClient

    with RewardClient(server.target, timeout=60) as c:
        yield c
