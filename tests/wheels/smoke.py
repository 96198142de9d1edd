"""The smoke test of the built wheels, run by tests/wheels/smoke.sh inside a fresh venv that
has corrpo and corrpo-server installed from `make wheels`' folder and no Rust toolchain:

1. corrpo is the installed manylinux2014 wheel, not the checkout;
2. token_stats (float32, float16, bfloat16 logits, -inf masked entries, a vocabulary that is
   no multiple of the SIMD width) and score (two configs, a rollout too short for a rho,
   tied strengths) against the float64 oracle corrpo.reference, on every instruction set
   this CPU supports (CORRPO_SIMD, one child process each: the choice is made once per process);
3. a server started from the installed `corrpo-server` console script on a free port, a
   client scoring through it (statistics reduced here, and logits streamed for the server to
   reduce) with the same numbers as in-process, then a graceful stop.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import ml_dtypes
import numpy as np

import corrpo
from corrpo import reference

CONFIGS = [
    corrpo.ScoreConfig(),
    corrpo.ScoreConfig(method="pearson", min_tokens=5, coef=0.5, gate="correct", threshold=0.5, advantage="drgrpo"),
]
# Rollout lengths (one of 3 tokens: too short for a rho at min_tokens 5 or 8) in two groups.
LENGTHS = [41, 3, 37, 30, 19, 23]
GROUP_SIZES = [3, 3]
VOCAB = 1009  # prime: every SIMD path ends on a partial vector


def check_installed() -> None:
    """corrpo is imported from this venv, from the manylinux2014 wheel, with no Rust at hand."""
    for tool in ("cargo", "rustc"):
        assert shutil.which(tool) is None, f"{tool} is on PATH: {shutil.which(tool)}"
    here = Path(sys.prefix).resolve()
    for module in (corrpo, corrpo.reference):
        assert here in Path(module.__file__).resolve().parents, f"{module.__name__} from {module.__file__}, not {here}"
    wheel = metadata.distribution("corrpo").read_text("WHEEL")
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    assert any(t.startswith("cp310-abi3-manylinux2014_") for t in tags), tags
    print(f"corrpo {corrpo.__version__} from {Path(corrpo.__file__).parent} ({', '.join(tags)})")


def random_batch(rng: np.random.Generator):
    rows = sum(LENGTHS)
    z = (3.0 * rng.standard_normal((rows, VOCAB))).astype(np.float32)
    ids = rng.integers(0, VOCAB, rows)
    masked = rng.random((rows, VOCAB)) < 0.1
    masked[np.arange(rows), ids] = False
    z[masked] = -np.inf
    rewards = rng.integers(0, 2, len(LENGTHS)).astype(np.float64)
    return z, ids, rewards


def check_token_stats(z: np.ndarray, ids: np.ndarray) -> corrpo.TokenStats:
    """SPEC 2's accuracy bounds against the float64 oracle on the same (widened) values."""
    for dtype in (np.float32, np.float16, ml_dtypes.bfloat16):
        logits = z.astype(dtype)
        got = corrpo.token_stats(logits, ids)
        want = reference.token_stats(logits.astype(np.float64), ids)
        h, lp = want["entropy"], want["logprob"]
        np.testing.assert_array_less(np.abs(got.entropy - h), 1e-4 * np.maximum(1, h) + 1e-12)
        np.testing.assert_array_less(np.abs(got.logprob - lp), 1e-4 * np.maximum(1, np.abs(lp)) + 1e-12)
        np.testing.assert_array_less(np.abs(got.collision - want["collision"]), 1e-6)
        np.testing.assert_array_less(np.abs(got.grad_norm - want["grad_norm"]), 1e-5)
    return corrpo.token_stats(z, ids)


def check_score(h: np.ndarray, g: np.ndarray, ids: np.ndarray, rewards: np.ndarray) -> None:
    for config in CONFIGS:
        got = corrpo.score(h, g, LENGTHS, GROUP_SIZES, rewards=rewards, token_ids=ids, config=config)
        rc = reference.rollout_correlations(h, g, LENGTHS, method=config.method, min_tokens=config.min_tokens)
        assert np.isnan(rc["rho"][1]) and got.reasons == rc["reasons"], (got.reasons, rc["reasons"])
        np.testing.assert_allclose(got.rho, rc["rho"], rtol=1e-9, atol=1e-12)
        out = reference.regularize(
            rewards, rc["rho"], GROUP_SIZES, coef=config.coef, gate=config.gate, threshold=config.threshold,
            advantage=config.advantage,
        )  # fmt: skip
        np.testing.assert_allclose(got.rewards, out["rewards"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.advantages, out["advantages"], rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(got.regularized, out["applied"])
        fp = reference.fingerprint(h, g, ids, LENGTHS, method=config.method, min_tokens=config.min_tokens)
        for name in ("rho_pooled", "rho_unique", "rho_rollout_mean", "entropy_mean", "strength_mean"):
            np.testing.assert_allclose(getattr(got.fingerprint, name), fp[name], rtol=1e-9, atol=1e-12, err_msg=name)


def check_api(seed: int) -> None:
    z, ids, rewards = random_batch(np.random.default_rng(seed))
    stats = check_token_stats(z, ids)
    h, g = stats.entropy.astype(np.float64), stats.grad_norm.astype(np.float64)
    check_score(h, g, ids, rewards)
    # Ties: Spearman's average ranks where many strengths are equal.
    check_score(h, np.round(g, 1), ids, rewards)
    print(f"API matches corrpo.reference on {corrpo.simd_isa()} (seed {seed})")


def check_every_isa(seed: int) -> None:
    """check_api here on the widest instruction set, and in a child per narrower one."""
    assert corrpo.simd_isa() == corrpo.supported_isas()[-1], (corrpo.simd_isa(), corrpo.supported_isas())
    check_api(seed)
    for isa in corrpo.supported_isas()[:-1]:
        env = {**os.environ, "CORRPO_SIMD": isa}
        subprocess.run([sys.executable, __file__, "--api-only", "--isa", isa, "--seed", str(seed)], env=env, check=True)


def start_server(command: list[str], workdir: Path) -> tuple[subprocess.Popen, str, Path]:
    port_file, log = workdir / "ports.json", workdir / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "serve", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"corrpo-server did not start (exit {process.poll()}):\n{log.read_text()}")
        time.sleep(0.05)
    return process, f"127.0.0.1:{json.loads(port_file.read_text())['port']}", log


def check_scores_through(client, z: np.ndarray, ids: np.ndarray, rewards: np.ndarray) -> None:
    bounds = np.cumsum([0, *LENGTHS])
    logits = [z[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    token_ids = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    stats = corrpo.token_stats(z, ids)
    for config in CONFIGS:
        settings = {k: getattr(config, k) for k in ("method", "min_tokens", "coef", "gate", "threshold", "advantage")}
        want = corrpo.score(stats.entropy, stats.grad_norm, LENGTHS, GROUP_SIZES, rewards=rewards, token_ids=ids, config=config)
        for send in ("stats", "logits"):
            got = client.score(
                logits=logits, token_ids=token_ids, rewards=rewards.tolist(), group_sizes=GROUP_SIZES, send=send,
                block_bytes=1 << 16, **settings,
            )  # fmt: skip
            # The same native code on the same numbers: the same bits.
            for name in ("rho", "rewards", "advantages", "regularized", "n_tokens"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=f"{send} {name}")
            assert got.reasons == want.reasons
            assert got.fingerprint.rho_pooled == want.fingerprint.rho_pooled
            assert got.backend == f"cpu/{corrpo.simd_isa()}", got.backend


def check_server(command: list[str], seed: int) -> None:
    from corrpo.client import RewardClient

    z, ids, rewards = random_batch(np.random.default_rng(seed + 1))
    with tempfile.TemporaryDirectory(prefix="corrpo-smoke-") as tmp:
        process, target, log = start_server(command, Path(tmp))
        try:
            with RewardClient(target, timeout=120) as client:
                assert client.health() == "SERVING"
                check_scores_through(client, z, ids, rewards)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
        assert code == 0, f"corrpo-server exited with {code}:\n{log.read_text()}"
    print(f"{shlex.join(command)} on {target}: the same scores as in-process, stopped cleanly")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-only", action="store_true", help="only check_api (the child per instruction set)")
    parser.add_argument("--isa", help="the instruction set this process must run (with --api-only)")
    parser.add_argument(
        "--server-command",
        help="how to start the installed console script (default: the corrpo-server beside this "
        "interpreter; an emulator's wrapper for a foreign-architecture wheel)",
    )
    args = parser.parse_args()
    if args.api_only:
        assert args.isa is None or corrpo.simd_isa() == args.isa, (corrpo.simd_isa(), args.isa)
        check_api(args.seed)
        return
    check_installed()
    check_every_isa(args.seed)
    command = shlex.split(args.server_command) if args.server_command else [str(Path(sys.executable).parent / "corrpo-server")]
    check_server(command, args.seed)
    print("wheel smoke test passed")


if __name__ == "__main__":
    main()
