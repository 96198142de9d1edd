"""Every setting of a training run: one dataclass, read from a TOML file and overridden by
command-line flags (``--rl-steps 50`` sets ``rl_steps``).

Imports no torch, so that ``corrpo-train --help`` and a refused setting answer at once."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .task import TASKS

METHODS = ("grpo", "corrpo")
#: d_model, n_layers, n_heads of each model size (``corrpo.train.model`` builds them).
SIZES = {
    "tiny": (32, 2, 2),
    "small": (96, 3, 4),
    "base": (256, 6, 8),
    "large": (512, 8, 8),
}
#: ``--strength``: the logit-space G, or the paper's measure by one of these estimators
#: (``corrpo.train.strengths`` computes them).
STRENGTHS = ("logit_grad", "exact", "subsample", "jvp", "last_block", "local")
#: The parameter-space measure every estimator gives.
MEASURE = "l1_mean"


@dataclass(frozen=True)
class TrainConfig:
    """A run. Comments name what each setting is; the TOML file uses the same names."""

    # The task
    task: str = "add"
    digits: int = 4  # operand digits
    data_seed: int = 0  # draws the held-out split (the same for every seed of a study)
    eval_size: int = 256  # held-out problems
    # The model
    model: str = "small"  # tiny | small | base | large (see SIZES)
    # SFT warm start on written-out solutions
    sft_steps: int = 300
    sft_batch: int = 64
    sft_lr: float = 3e-3
    # RL
    rl_steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8
    # A fresh Adam's first steps move every weight by about lr whatever its gradient's
    # size, so RL needs a far smaller rate than the end of SFT (3e-4 undid SFT in a step).
    rl_lr: float = 1e-5
    temperature: float = 1.0  # sampling, and the policy whose statistics are scored
    ppo_epochs: int = 1  # updates per batch of rollouts; > 1 makes the clip bite
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # k3 KL to the policy at the start of RL; 0 keeps no reference model
    # CorR-PO (SPEC 5); grpo is the same loop with coef 0, still scored by the server
    method: str = "corrpo"
    coef: float = 0.1
    # correct | none. Not SPEC 5's wire default (none): ungated CorR-PO collapsed the weakest
    # policy of docs/results.md's study with the paper's measure (and two of three with G).
    gate: str = "correct"
    advantage: str = "grpo"  # grpo | drgrpo
    min_tokens: int = 8
    # The per-token strength S correlated with entropy: the paper's parameter-space measure
    # (l1_mean) by an estimator of corrpo.gradients (exact | subsample | jvp | last_block | local), or
    # logit_grad, the logit-space G (not the paper's measure; its rho with H is often positive but
    # not always: -0.26 at this trainer's initialisation, docs/fingerprint.md).
    strength: str = "local"
    objective: str = "logit"  # logit (the paper's) | logprob: the seed of each token's backward
    strength_k: int = 0  # tokens per rollout (subsample) or directions (jvp); 0: the estimator's default
    # Score tokens on a model-backed corrpo-server instead (sending ids, not statistics); the
    # run reloads the server's weights every sync_every RL steps.
    server_model: bool = False
    sync_every: int = 1
    # Infrastructure
    server: str = ""  # host:port of a corrpo-server; empty starts a local one for the run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # CPU threads of each pool (torch, OpenMP/MKL/OpenBLAS, the native core's rayon) in each
    # process of the run, the local server included; 0 leaves every library its default.
    threads: int = 0
    # Repeat a run bit for bit on one machine: torch's deterministic algorithms (and cuBLAS's
    # fixed workspace on a GPU) and fixed thread counts (threads, or 1 where threads is 0).
    # Another CPU or GPU still gives other numbers: its kernels round differently.
    deterministic: bool = False
    eval_every: int = 25  # held-out accuracy every this many steps of each phase (and at the end)
    checkpoint_every: int = 25
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.task in TASKS, f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        need(self.model in SIZES, f"model must be one of {sorted(SIZES)}, got {self.model!r}")
        need(self.method in METHODS, f"method must be one of {list(METHODS)}, got {self.method!r}")
        need(self.gate in ("none", "correct"), f"gate must be 'none' or 'correct', got {self.gate!r}")
        need(self.advantage in ("grpo", "drgrpo"), f"advantage must be 'grpo' or 'drgrpo', got {self.advantage!r}")
        need(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        need(self.strength in STRENGTHS, f"strength must be one of {list(STRENGTHS)}, got {self.strength!r}")
        need(self.objective in ("logit", "logprob"), f"objective must be 'logit' or 'logprob', got {self.objective!r}")
        need(self.strength_k >= 0, f"strength_k must be >= 0, got {self.strength_k}")
        need(
            self.strength_k == 0 or self.strength in ("subsample", "jvp"),
            f"strength_k applies to the subsample and jvp strengths, not {self.strength!r}",
        )
        for name in ("sft_steps", "rl_steps", "threads", "kl_coef", "coef", "weight_decay"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("sft_batch", "prompts_per_step", "ppo_epochs", "eval_every", "checkpoint_every", "eval_size", "sync_every"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.group_size >= 2, f"group_size must be >= 2 (advantages compare rollouts of a prompt), got {self.group_size}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(0 < self.clip_eps < 1, f"clip_eps must be in (0, 1), got {self.clip_eps}")

    @property
    def score_coef(self) -> float:
        """The coefficient sent to the server: GRPO is CorR-PO with coef 0."""
        return self.coef if self.method == "corrpo" else 0.0

    @property
    def measure(self) -> str:
        """The measure the run's rho is of."""
        return "logit_grad" if self.strength == "logit_grad" else MEASURE

    @property
    def pool_threads(self) -> int:
        """The size of every CPU thread pool of the run (0: each library's default)."""
        return self.threads or (1 if self.deterministic else 0)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_identity(self) -> dict[str, Any]:
        """The settings that decide what is computed (a resumed run must match them)."""
        return {
            k: v for k, v in self.to_dict().items() if k not in ("server", "threads", "deterministic", "eval_every", "checkpoint_every", "server_model")
        }


_TOML_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _typed(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``key``'s default (an integer is accepted for a float), or a
    ValueError that names the key, the type it needs and the value given."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        given = _TOML_KINDS.get(type(value), f"a TOML {type(value).__name__}")
        example = str(default).lower() if kind is bool else repr(default).replace("'", '"')
        raise ValueError(f"{key} must be {_TOML_KINDS[kind]} (e.g. {key} = {example}), got {value!r} ({given})")
    return value


def load(path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The config of ``path`` (TOML; its keys are TrainConfig's fields) with ``overrides``.
    A missing or unreadable file, a key that is not a setting and a value of the wrong type
    are ValueErrors that name the file and the key."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            raise ValueError(f"{path}: no such config file (configs/ holds the shipped ones)") from None
        except OSError as err:
            raise ValueError(f"{path}: cannot read the config file: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from None
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        unknown = sorted(set(values) - set(defaults))
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; known are {sorted(defaults)}")
        for key, value in values.items():
            try:
                values[key] = _typed(key, value, defaults[key])
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per setting, defaulting to None so that only given flags override the file."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=f"(default {f.default})")
            continue
        choices = {
            "task": sorted(TASKS),
            "model": sorted(SIZES),
            "method": list(METHODS),
            "strength": list(STRENGTHS),
            "objective": ["logit", "logprob"],
        }.get(f.name)
        parser.add_argument(flag, dest=f.name, type=kind, default=None, choices=choices, help=f"(default {f.default!r})")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
