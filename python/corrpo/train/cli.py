"""``corrpo-train``: the reference GRPO/CorR-PO trainer.

    corrpo-train run   --config configs/cpu.toml --method corrpo --seed 0 --out runs/corrpo-s0
    corrpo-train study --config configs/cpu.toml --seeds 0 1 2 --out runs/study
    corrpo-train plot  runs/corrpo-s0 [runs/study ...]

``run`` trains one model (under ``torchrun --nproc_per_node=N`` as well); ``study`` runs
GRPO and CorR-PO (or any arms of settings) for several seeds from a shared SFT model per
seed, then tables and plots them; ``plot`` redraws the figures of finished runs or studies. Every setting of
``TrainConfig`` is a flag (``--rl-steps 50``) and a key of the TOML file.

Needs the trainer's extra and the server, from the corrpo checkout: pip install '.[train]' ./server
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import fields
from pathlib import Path
from typing import Any

from . import config as configuration
from .config import METHODS, TrainConfig


# The CPU thread pools of a run: torch's and MKL's (OpenMP), OpenBLAS's, and the native
# core's (rayon).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")


def _set_threads(threads: int) -> None:
    """Sizes every CPU thread pool of this process and of the processes it starts (the local
    corrpo-server, a study's runs) to ``threads``. Set before torch and the native core start
    their pools, and inherited by children. On a busy machine a pool sized to every core
    waits on whichever of its threads was preempted: a training step of the demo's model took
    0.13-0.16 s with one torch thread and 0.7-1.7 s with two on a 2-core machine at load 5,
    while one thread per process only loses its fair share."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)


def _set_deterministic() -> None:
    """Before torch starts CUDA: cuBLAS needs a fixed workspace for deterministic matrix
    products (torch.use_deterministic_algorithms refuses them without it); children inherit
    it. The trainer turns torch's deterministic algorithms on (``Trainer``)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _local_server(out: Path, cfg: TrainConfig) -> Any:
    try:
        from corrpo_server import ServerProcess
    except ImportError:
        raise SystemExit(
            "corrpo-train starts a local corrpo-server unless --server host:port is given, "
            "and corrpo-server is not installed: pip install ./server (from the corrpo repository)"
        ) from None
    args: list[str] = []
    if cfg.server_model:
        # The server starts on the run's initial model; the first RL step reloads the policy.
        from .loop import initial_weights

        args = ["--model", str(initial_weights(cfg, out / "server-weights")), "--device", cfg.device]
    return ServerProcess(*args, log=out / "server.log", ready_timeout=300)


def _client(target: str) -> Any:
    import grpc

    from corrpo.client import RewardClient, ServerUnavailableError

    client = RewardClient(target)
    try:
        status = client.health(timeout=10.0)
    except ServerUnavailableError as err:  # it names the target and what to check
        client.close()
        raise SystemExit(f"corrpo-train: {err}") from None
    except grpc.RpcError as err:  # e.g. DEADLINE_EXCEEDED: gRPC's str() is its debug text
        client.close()
        raise SystemExit(f"corrpo-train: the corrpo-server at {target} did not answer its health check: {err.code().name}: {err.details()}") from None
    if status != "SERVING":
        client.close()
        raise SystemExit(f"the corrpo-server at {target} reports {status}")
    return client


def _serve(stack: ExitStack, cfg: TrainConfig, out: Path) -> str:
    """The server's target: the configured one, or a local server for the length of ``stack``."""
    if cfg.server:
        return cfg.server
    out.mkdir(parents=True, exist_ok=True)
    server = stack.enter_context(_local_server(out, cfg))
    print(f"corrpo-server started for this run on {server.target} (log: {server.log_path})", file=sys.stderr)
    return server.target


def cmd_run(args: argparse.Namespace) -> int:
    cfg = configuration.load(args.config, configuration.overrides(args))
    if cfg.pool_threads:
        _set_threads(cfg.pool_threads)
    if cfg.deterministic:
        _set_deterministic()
    from . import dist, report
    from .loop import Trainer

    world = dist.init(cfg.device)
    out = Path(args.out)
    try:
        with ExitStack() as stack:
            client = None
            if world.is_root:
                client = stack.enter_context(_client(_serve(stack, cfg, out)))
            trainer = Trainer(cfg, out, world, init_from=args.init_from, progress=not args.no_progress)
            records = trainer.run(client)
        if world.is_root:
            import torch

            # What the settings came to in this process (threads = 0 leaves torch its default).
            runtime = {"torch_threads": torch.get_num_threads(), "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
            summary = {
                "config": cfg.to_dict(), "world_size": world.size, "device": str(world.device), "runtime": runtime, **report.summarize(records)
            }  # fmt: skip
            from .state import write_json

            write_json(out / "config.json", cfg.to_dict())
            write_json(out / "summary.json", summary)
            plot = report.plot_run(records, out / "training.png", _describe(cfg))
            report.print_table(report.summary_table(summary, f"corrpo-train: {cfg.method}, seed {cfg.seed}"))
            print(report.reading(summary, cfg.to_dict()))
            print(f"metrics: {out / 'metrics.jsonl'}\nsummary: {out / 'summary.json'}\nplot:    {plot}")
    finally:
        dist.shutdown()
    return 0


def _describe(cfg: TrainConfig) -> str:
    """A run's settings that a plot's title needs."""
    method = f"CorR-PO (coef {cfg.coef}, gate {cfg.gate})" if cfg.method == "corrpo" else "GRPO"
    return f"{method}, S = {cfg.measure} by {cfg.strength}; {cfg.model} model, {cfg.digits}-digit addition, seed {cfg.seed}"


def parse_arm(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:setting=value,...`` (an arm named after a method trains with it)."""
    name, _, rest = spec.partition(":")
    kinds = {f.name: type(f.default) for f in fields(TrainConfig)}
    settings: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in kinds:
            raise ValueError(f"arm {spec!r}: {item!r} is not setting=value with a known setting")
        if kinds[key] is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError(f"arm {spec!r}: {key} must be true or false, got {value!r}")
            settings[key] = value.lower() == "true"
        else:
            settings[key] = kinds[key](value)
    if "method" not in settings:
        if name not in METHODS:
            raise ValueError(f"arm {spec!r} needs method=... (its name is not one of {list(METHODS)})")
        settings["method"] = name
    if not name or name == "sft" or "/" in name:
        raise ValueError(f"arm {spec!r}: the name must be a plain directory name other than 'sft'")
    return name, settings


def _toml(cfg: TrainConfig) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.to_dict().items())


def cmd_study(args: argparse.Namespace) -> int:
    """SFT once per seed, then each method from that SFT model, in parallel subprocesses."""
    cfg = configuration.load(args.config, configuration.overrides(args))
    from corrpo.progress import Progress

    from . import report
    from .state import MetricsLog, write_json

    arms = dict(parse_arm(a) for a in args.arms)
    for settings in arms.values():
        cfg.replace(**settings)  # refuses bad values before anything runs
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // jobs)
    _set_threads(threads)
    started = time.perf_counter()
    with ExitStack() as stack:
        target = _serve(stack, cfg, root)
        base = cfg.replace(server=target, threads=threads)
        (root / "config.toml").write_text(_toml(base))
        # Steps of each run, after the lines it starts with (a method run copies its SFT's).
        runs: dict[Path, tuple[int, int]] = {}
        for seed in args.seeds:
            runs[root / f"seed{seed}" / "sft"] = (0, cfg.sft_steps)
            for arm in arms:
                runs[root / f"seed{seed}" / arm] = (cfg.sft_steps, cfg.rl_steps)

        def launch(out: Path, *flags: str) -> None:
            out.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "corrpo.train", "run", "--config", str(root / "config.toml"), "--out", str(out), "--no-progress", *flags]
            with open(out / "run.log", "w") as log:
                done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode:
                raise RuntimeError(f"{out} failed with exit code {done.returncode}:\n{(out / 'run.log').read_text()[-3000:]}")

        def seed_runs(seed: int) -> None:
            sft = root / f"seed{seed}" / "sft"
            launch(sft, "--seed", str(seed), "--rl-steps", "0")
            with ThreadPoolExecutor(len(arms)) as pool:
                for f in [
                    pool.submit(launch, root / f"seed{seed}" / arm, "--seed", str(seed), "--init-from", str(sft), *_flags(settings))
                    for arm, settings in arms.items()
                ]:
                    f.result()

        # Polled each second; in a log, a line a minute at most and one at the end.
        with Progress(sum(n for _, n in runs.values()), desc="corrpo-train study", unit="step") as bar, ThreadPoolExecutor(jobs) as pool:
            futures: list[Future[None]] = [pool.submit(seed_runs, s) for s in args.seeds]
            while not all(f.done() for f in futures):
                time.sleep(1.0)
                bar.goto(sum(min(n, max(0, MetricsLog(out / "metrics.jsonl").lines() - skip)) for out, (skip, n) in runs.items()))
            for f in futures:
                f.result()
            bar.goto(bar.total)
    study = report.load_study(root)
    rows, table = report.study_table(study)
    minutes = (time.perf_counter() - started) / 60
    write_json(root / "study.json", {"config": base.to_dict(), "arms": arms, "seeds": args.seeds, "minutes": minutes, "results": rows})
    (root / "results.md").write_text(table)
    title = f"{' vs '.join(arms)}: {cfg.model} model, {cfg.digits}-digit addition"
    plot = report.plot_study(study, root / "study.png", title)
    report.print_table(report.study_console_table(rows))
    print(report.study_reading(rows, study, base.to_dict()))
    print(f"study: {root / 'study.json'}\ntable: {root / 'results.md'}\nplot:  {plot}\ntime:  {minutes:.1f} min")
    return 0


def _flags(settings: dict[str, Any]) -> list[str]:
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    if settings.get("server_model"):
        # Each such run reloads weights into its own model-backed server.
        flags += ["--server", ""]
    return flags


def cmd_plot(args: argparse.Namespace) -> int:
    from . import report
    from .state import read_metrics

    for path in map(Path, args.paths):
        if (path / "metrics.jsonl").exists():
            print(report.plot_run(read_metrics(path / "metrics.jsonl"), path / "training.png", path.name))
        else:
            study = report.load_study(path)
            if not study:
                raise SystemExit(f"{path} holds neither a run (metrics.jsonl) nor a study (seed*/<method>/metrics.jsonl)")
            print(report.plot_study(study, path / "study.png", path.name))
            report.print_table(report.study_console_table(report.study_table(study)[0]))
    return 0


def parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a misspelled flag (--rl-step) is refused, not read as the one it prefixes.
    top = argparse.ArgumentParser(
        prog="corrpo-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train one model: SFT, then GRPO or CorR-PO", allow_abbrev=False)
    run.add_argument("--config", type=Path, help="TOML file of settings (flags override it)")
    run.add_argument("--out", type=Path, required=True, help="output directory; a run there with a checkpoint is resumed")
    run.add_argument("--init-from", type=Path, help="start RL from the SFT model of this run directory")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    configuration.add_flags(run)
    run.set_defaults(handler=cmd_run)

    study = sub.add_parser("study", help="GRPO vs CorR-PO over seeds, with table and plot", allow_abbrev=False)
    study.add_argument("--config", type=Path, help="TOML file of settings (flags override it)")
    study.add_argument("--out", type=Path, required=True)
    study.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    study.add_argument(
        "--arms",
        nargs="+",
        default=list(METHODS),
        metavar="ARM",
        help="what to compare: a method name, or NAME:setting=value,... such as corrpo-gated:method=corrpo,gate=correct "
        "(default: grpo corrpo)",
    )
    study.add_argument("--jobs", type=int, default=2, help="seeds trained at once")
    configuration.add_flags(study)
    study.set_defaults(handler=cmd_study)

    plot = sub.add_parser("plot", help="redraw the plots of runs or studies", allow_abbrev=False)
    plot.add_argument("paths", nargs="+")
    plot.set_defaults(handler=cmd_plot)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as err:  # settings and run-directory mismatches: a message, not a traceback
        print(f"corrpo-train: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # installed without its extra: torch and friends are imported on use
        print(
            f"corrpo-train: error: {err.name} is not installed; corrpo-train needs its extra and the local reward "
            "server: pip install '.[train]' ./server (in the corrpo checkout)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
