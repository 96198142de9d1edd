"""What each strength signal costs per RL step of corrpo-train (docs/results.md, part c),
measured side by side in one run on the same batch: the step's own work (sampling the
rollouts, one training forward+backward) against computing S for every rollout with each
``--strength`` in-process, and through a model-backed server (``--server-model``: weights
reload plus a tokens request).

    python bench/bench_train_signals.py [--config configs/study-paper.toml] [--threads 1] [--repeats 3]

The policy is the study's architecture with its initial weights (the cost does not depend
on what the weights have learned); rollouts are the task's written-out solutions, as long
as the trained model's own.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/study-paper.toml"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))

    import corrpo
    from corrpo.client import RewardClient
    from corrpo.train import config as configuration
    from corrpo.train.loop import build_model, save_model
    from corrpo.train.model import generate
    from corrpo.train.strengths import ParameterStrengths
    from corrpo.train.task import EOS, PAD, AdditionTask
    from corrpo_server import ServerProcess

    cfg = configuration.load(args.config, {})
    task = AdditionTask(cfg.digits, cfg.data_seed, cfg.eval_size)
    model = build_model(cfg, task)
    n = cfg.prompts_per_step * cfg.group_size
    problems = task.train_problems(n, np.random.default_rng(0))
    solutions = [task.solution_ids(p) for p in problems]
    width = max(map(len, solutions))
    prompts = torch.tensor([task.prompt_ids(p) for p in problems])
    responses = torch.tensor([s + [PAD] * (width - len(s)) for s in solutions])
    lengths = torch.tensor([len(s) for s in solutions])
    mask = torch.arange(width)[None] < lengths[:, None]
    seeds = list(range(cfg.prompts_per_step))

    def sample() -> None:
        with torch.no_grad():
            generate(model, prompts, task.max_response_len, temperature=1.0, uniforms=None, eos=EOS, pad=PAD)

    def train_pass() -> None:
        model.zero_grad(set_to_none=True)
        _, logits = model(torch.cat([prompts, responses], 1))
        logits[:, prompts.shape[1] - 1 : -1][mask].float().logsumexp(-1).sum().backward()

    def logit_grad() -> None:
        with torch.no_grad():
            hidden, _ = model(torch.cat([prompts, responses], 1))
        h = hidden[:, prompts.shape[1] - 1 : -1][mask]
        corrpo.token_stats_from_hidden(h, model.lm_head.weight.detach(), responses[mask], lengths=lengths.numpy())

    strengths = ParameterStrengths(model, cfg.objective)
    rows = [("sample the rollouts (the step's own work)", best_of(args.repeats, sample))]
    base = best_of(args.repeats, train_pass)
    rows.append(("one training forward+backward (the unit)", base))
    rows.append(("logit_grad (token_stats_from_hidden)", best_of(args.repeats, logit_grad)))
    for estimator, k in (("exact", None), ("subsample", 16), ("jvp", 32), ("last_block", None)):
        label = f"{estimator}" + (f" (k={k})" if k else "")
        rows.append((label, best_of(args.repeats, lambda: strengths(prompts, responses, lengths, estimator=estimator, k=k, seeds=seeds))))

    with tempfile.TemporaryDirectory() as tmp:
        weights = save_model(model, cfg, Path(tmp) / "policy")
        env = {"OMP_NUM_THREADS": str(args.threads), "RAYON_NUM_THREADS": str(args.threads)}
        with ServerProcess("--model", str(weights), "--device", "cpu", env=env, ready_timeout=300) as server, RewardClient(
            server.target, timeout=600
        ) as client:
            rows_ids = [list(p) for p in prompts.numpy()]
            response_ids = [responses[i, : lengths[i]].numpy() for i in range(n)]

            def served(estimator: str) -> None:
                save_model(model, cfg, weights)
                client.reload_weights(str(weights), "bench")
                client.score(prompt_ids=rows_ids, token_ids=response_ids, group_sizes=cfg.group_size, estimator=estimator, weights_version="bench")

            for estimator in ("subsample", "exact"):
                rows.append((f"--server-model, {estimator} (reload + tokens request)", best_of(args.repeats, lambda: served(estimator))))

    table = Table(title=f"{n} rollouts ({int(lengths.sum())} response tokens), model {cfg.model}, {args.threads} thread(s)")
    for column in ("signal", "seconds", "x fwd+bwd"):
        table.add_column(column, justify="left" if column == "signal" else "right")
    for label, seconds in rows:
        table.add_row(label, f"{seconds:.3f}", f"{seconds / base:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
