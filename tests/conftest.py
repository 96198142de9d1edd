import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which
# must be chosen before they are first imported (here, and in server processes started by
# the tests, which inherit it). With a GPU the same tests run on the device.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def rng():
    return np.random.default_rng(20260526)


SERVER_ARGS = ("--max-message-mib", "16", "--max-tokens", "200000")


@pytest.fixture(scope="session")
def server():
    """One reward server process on an ephemeral loopback port, shared by read-only tests."""
    from corrpo_server import ServerProcess

    with ServerProcess("--metrics-port", "0", *SERVER_ARGS) as process:
        yield process


@pytest.fixture(scope="session")
def triton_server():
    """The same with --backend triton: the GPU where there is one, else Triton's interpreter."""
    from corrpo_server import ServerProcess

    with ServerProcess("--backend", "triton", *SERVER_ARGS) as process:
        yield process


@pytest.fixture(scope="session")
def client(server):
    from corrpo.client import RewardClient

    with RewardClient(server.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer (corrpo.testing.build_tiny_model, seed 0)."""
    from corrpo.testing import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_server(tiny_model_dir):
    """A server holding the tiny model (--model): tokens payloads get the paper's measure."""
    from corrpo_server import ServerProcess

    with ServerProcess("--model", str(tiny_model_dir), "--device", "cpu", env={"OMP_NUM_THREADS": "1"}, ready_timeout=180) as s:
        yield s
