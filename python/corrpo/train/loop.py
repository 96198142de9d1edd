"""The training loop: SFT on written-out solutions, then GRPO/CorR-PO with the reward
server scoring every batch of rollouts.

One RL step, as a trainer wires corrpo in:
  1. sample G rollouts for each prompt (KV cache, temperature) and verify them;
  2. per response token, the entropy H and the strength S of ``--strength``: the paper's
     parameter-space measure by an estimator of ``corrpo.gradients`` (``train/strengths.py``),
     or ``logit_grad`` from the training forward pass's hidden states and LM head with
     ``corrpo.token_stats_from_hidden`` (the Rust core on the CPU, the fused Triton kernel
     on a GPU);
  3. send those statistics and the verifier rewards to the server (a few bytes per token),
     which returns r - coef * rho(H, S) and the group advantages; with ``--server-model``
     send the token ids instead to a model-backed server synced every ``sync_every`` steps;
  4. take PPO-clipped steps on the advantages (optionally with KL to the SFT model).
GRPO is the same loop with coef 0, still through the server, so the two differ in the
regularizer alone.

Randomness is drawn per (seed, phase, step[, prompt]) rather than from a running
generator: a resumed run and a run split over ranks draw the same problems and rollouts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import corrpo
from corrpo.progress import Progress

from .config import SIZES, TrainConfig
from .dist import World
from .loss import policy_loss, token_logprobs
from .model import ModelConfig, Transformer, generate
from .hf import OPTIMIZER_FILE, pretrained_weights, read_trainer_file, save_pretrained
from .state import MetricsLog, read_metrics, settle_dir, write_dir_atomic
from .strengths import ParameterStrengths, Strengths
from .task import EOS, PAD, AdditionTask, Problem

# Streams of randomness, one per use.
_SFT_DATA, _SFT_SAMPLES, _RL_DATA, _RL_SAMPLES, _RL_STRENGTH = range(5)
# Settings that decide the SFT phase: a run may start RL from another run's SFT model only
# when these agree.
SFT_SETTINGS = ("task", "digits", "data_seed", "eval_size", "model", "sft_steps", "sft_batch", "sft_lr", "seed", "temperature", "weight_decay", "grad_clip")


def draw(cfg: TrainConfig, *key: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, *key])


def build_model(cfg: TrainConfig, task: AdditionTask) -> Transformer:
    d_model, n_layers, n_heads = SIZES[cfg.model]
    torch.manual_seed(cfg.seed)
    return Transformer(
        ModelConfig(
            vocab_size=task.tokenizer.vocab_size,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            max_len=task.prompt_len + task.max_response_len,
        )
    )


def save_model(model: Transformer, cfg: TrainConfig, path: Path) -> Path:
    """``model`` as a Hugging Face directory at ``path`` (replaced whole), for corrpo's
    loaders: a model-backed server, the fingerprint tool, a run that starts from it."""
    write_dir_atomic(path, lambda d: save_pretrained(model, d, cfg.training_identity()))
    return path


def initial_weights(cfg: TrainConfig, path: Path) -> Path:
    """The run's initial model at ``path``, for a model-backed server to start from (the
    run reloads its policy before the server scores anything)."""
    return save_model(build_model(cfg, AdditionTask(cfg.digits, cfg.data_seed, cfg.eval_size)), cfg, path)


def response_lengths(responses: torch.Tensor) -> torch.Tensor:
    """Tokens per row up to and including the first EOS; the whole row when none."""
    is_eos = responses == EOS
    first = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1) + 1, responses.shape[1])
    return first


def span_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def _split(n: int, world: World) -> range:
    """This rank's contiguous share of ``n`` items (rank order is item order)."""
    bounds = np.linspace(0, n, world.size + 1).round().astype(int)
    return range(bounds[world.rank], bounds[world.rank + 1])


@dataclass
class Batch:
    """Prompts and responses of one rank, and the training forward pass over them."""

    prompts: torch.Tensor  # [B, P]
    responses: torch.Tensor  # [B, S], PAD after the end
    lengths: torch.Tensor  # [B]

    @property
    def mask(self) -> torch.Tensor:
        return span_mask(self.lengths, self.responses.shape[1])

    def forward(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states and logits at the positions that predict the response."""
        hidden, logits = model(torch.cat([self.prompts, self.responses], dim=1))
        start = self.prompts.shape[1] - 1
        width = self.responses.shape[1]
        return hidden[:, start : start + width], logits[:, start : start + width]


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        out: Path,
        world: World,
        *,
        init_from: Path | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.out = out
        self.world = world
        self.init_from = init_from
        self.progress = progress and world.is_root
        if cfg.pool_threads:
            torch.set_num_threads(cfg.pool_threads)
        if cfg.deterministic:
            # Weights come from torch.manual_seed(seed) (build_model), every draw from a
            # generator keyed by (seed, stream, step, prompt) (draw): all that is left to fix is
            # which kernels run, and the thread counts that split their sums.
            torch.use_deterministic_algorithms(True)
        self.task = AdditionTask(cfg.digits, cfg.data_seed, cfg.eval_size)
        self.policy = build_model(cfg, self.task).to(world.device)
        self.model: torch.nn.Module = self.policy
        if world.size > 1:
            self.model = DistributedDataParallel(self.policy)
        self.reference: Transformer | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.metrics = MetricsLog(out / "metrics.jsonl")
        ident = json.dumps(cfg.training_identity(), sort_keys=True)
        self.run_id = hashlib.sha1(ident.encode()).hexdigest()[:12]
        # The paper's measure needs per-token backward passes through a Llama mirror.
        self.parameter_strengths = ParameterStrengths(self.policy, cfg.objective) if cfg.strength != "logit_grad" else None

    # ---- state ----------------------------------------------------------------------

    def _new_optimizer(self, phase: str) -> torch.optim.Optimizer:
        lr = self.cfg.sft_lr if phase == "sft" else self.cfg.rl_lr
        return torch.optim.AdamW(self.policy.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=self.cfg.weight_decay)

    def _checkpoint(self, phase: str, step: int) -> None:
        if self.world.is_root:
            resume = {"phase": phase, "step": step, "metrics_lines": self.metrics.lines()}
            optimizer = None if self.optimizer is None else self.optimizer.state_dict()
            write_dir_atomic(
                self.out / "checkpoint",
                lambda d: save_pretrained(self.policy, d, self.cfg.training_identity(), resume=resume, optimizer=optimizer),
            )
        self.world.barrier()

    def restore(self) -> tuple[str, int]:
        """Where to start: this run's checkpoint, else ``init_from``'s SFT model, else the
        beginning. Returns (phase, steps of it already done)."""
        own = self.out / "checkpoint"
        if self.world.is_root:
            settle_dir(own)
        self.world.barrier()
        if own.exists():
            state = read_trainer_file(own)
            if state["settings"] != self.cfg.training_identity():
                changed = sorted(k for k, v in self.cfg.training_identity().items() if state["settings"].get(k) != v)
                raise ValueError(
                    f"{self.out} holds a run with other settings ({', '.join(changed)}); "
                    "give another --out, or remove that directory to start over"
                )
            self.policy.load_state_dict(pretrained_weights(own)[1])
            if (own / OPTIMIZER_FILE).exists():
                self.optimizer = self._new_optimizer(state["phase"])
                self.optimizer.load_state_dict(torch.load(own / OPTIMIZER_FILE, map_location="cpu"))
            if self.world.is_root:
                self.metrics.truncate(state["metrics_lines"])
                print(f"corrpo-train: resuming {self.out} at {state['phase']} step {state['step']}", file=sys.stderr)
            self.world.barrier()
            return state["phase"], state["step"]
        if self.world.is_root:
            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics.truncate(0)
        if self.init_from is not None:
            sft = self.init_from / "sft"
            settings = read_trainer_file(sft)["settings"]
            mismatched = [k for k in SFT_SETTINGS if settings.get(k) != getattr(self.cfg, k)]
            if mismatched:
                raise ValueError(f"{self.init_from}'s SFT was run with other settings: {', '.join(mismatched)}")
            self.policy.load_state_dict(pretrained_weights(sft)[1])
            if self.world.is_root:
                shutil.rmtree(self.out / "sft", ignore_errors=True)
                shutil.copytree(sft, self.out / "sft")
                for record in read_metrics(self.init_from / "metrics.jsonl"):
                    if record["phase"] == "sft":
                        self.metrics.append(record)
            self.world.barrier()
            return "rl", 0
        self.world.barrier()
        return "sft", 0

    # ---- pieces of a step -----------------------------------------------------------

    def _token_stats(self, hidden: torch.Tensor, logits_ids: torch.Tensor, lengths: torch.Tensor) -> dict[str, np.ndarray]:
        """Per-token entropy and grad_norm of this rank's response tokens, from the final
        hidden states of the forward pass and the LM head (host arrays)."""
        stats = corrpo.token_stats_from_hidden(
            hidden.detach(),
            self.policy.lm_head.weight.detach(),
            logits_ids,
            temperature=self.cfg.temperature,
            lengths=lengths.cpu().numpy(),
        )
        return Strengths(
            entropy=stats.entropy,
            strength=stats.grad_norm,
            grad_norm=stats.grad_norm,
            token_ids=logits_ids.cpu().numpy(),
            lengths=lengths.cpu().numpy(),
        ).arrays()

    def _seeds(self, step: int, prompts: range) -> list[int]:
        """One seed per prompt for the estimators' draws, the same on any rank."""
        return [int(draw(self.cfg, _RL_STRENGTH, step, i).integers(2**63)) for i in prompts]

    def _sft_strengths(self, step: int, sampled: Batch, share: range) -> dict[str, np.ndarray] | None:
        """The paper's measure, exact, on the model's own solutions of this SFT step (at the
        steps that evaluate): how rho(H, S) moves during SFT."""
        if self.parameter_strengths is None:
            return None
        arrays = self.parameter_strengths(
            sampled.prompts, sampled.responses, sampled.lengths, estimator="exact", k=None, seeds=[0] * len(share)
        ).arrays()
        return {**arrays, "prompts": sampled.prompts.cpu().numpy()}

    def _gathered(self, part: dict[str, Any]) -> dict[str, np.ndarray] | None:
        """This step's per-rank arrays concatenated on rank 0 in rank order."""
        parts = self.world.gather(part)
        if parts is None:
            return None
        return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in part}

    def _sample(self, problems: list[Problem], noise: list[np.ndarray] | None) -> Batch:
        device = self.world.device
        prompts = torch.tensor([self.task.prompt_ids(p) for p in problems], device=device)
        uniforms = None if noise is None else torch.from_numpy(np.concatenate(noise)).float().to(device)
        responses = generate(
            self.policy,
            prompts,
            self.task.max_response_len,
            temperature=self.cfg.temperature,
            uniforms=uniforms,
            eos=EOS,
            pad=PAD,
        )
        return Batch(prompts, responses, response_lengths(responses))

    def _verify(self, problems: list[Problem], batch: Batch) -> np.ndarray:
        rows = batch.responses.cpu().tolist()
        return np.array([float(self.task.verify_ids(p, r)) for p, r in zip(problems, rows)])

    def evaluate(self) -> float:
        """Greedy accuracy on the held-out split (rank 0)."""
        batch = self._sample(self.task.held_out, None)
        return float(self._verify(self.task.held_out, batch).mean())

    def _step_optimizer(self, loss: torch.Tensor) -> float:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        return float(norm)

    def _sft_lr(self, step: int) -> float:
        """Linear warm-up over the first 10% of SFT, then cosine down to a tenth."""
        total, warm = self.cfg.sft_steps, max(1, self.cfg.sft_steps // 10)
        if step <= warm:
            return self.cfg.sft_lr * step / warm
        progress = (step - warm) / max(1, total - warm)
        return self.cfg.sft_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    # ---- the phases -----------------------------------------------------------------

    def sft_step(self, step: int) -> dict[str, Any]:
        cfg, world, task = self.cfg, self.world, self.task
        problems = task.train_problems(cfg.sft_batch, draw(cfg, _SFT_DATA, step))
        mine = [problems[i] for i in _split(len(problems), world)]
        device = world.device
        solutions = [task.solution_ids(p) for p in mine]
        width = max(len(s) for s in solutions)
        batch = Batch(
            prompts=torch.tensor([task.prompt_ids(p) for p in mine], device=device),
            responses=torch.tensor([s + [PAD] * (width - len(s)) for s in solutions], device=device),
            lengths=torch.tensor([len(s) for s in solutions], device=device),
        )
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = self._sft_lr(step)
        self.policy.train()
        hidden, logits = batch.forward(self.model)
        mask = batch.mask
        targets = batch.responses[mask]
        (n_tokens,) = world.sum(float(mask.sum()))
        loss_sum = F.cross_entropy(logits[mask].float(), targets, reduction="sum")
        stats = self._token_stats(hidden[mask], targets, batch.lengths)
        self._step_optimizer(loss_sum / n_tokens * world.size)
        # The model's own solutions of this step's prompts: how often it already gets them right.
        # The model's own solutions of this step's prompts: how often they are right, and
        # the fingerprint on its own tokens (what RL will score) beside the one on the data.
        self.policy.eval()
        noise = [draw(cfg, _SFT_SAMPLES, step, i).random((1, task.max_response_len)) for i in _split(len(problems), world)]
        sampled = self._sample(mine, noise)
        correct = self._verify(mine, sampled).sum()
        with torch.no_grad():
            sampled_hidden, _ = sampled.forward(self.policy)
            sampled_mask = sampled.mask
            own = self._token_stats(sampled_hidden[sampled_mask], sampled.responses[sampled_mask], sampled.lengths)
        measured = self._sft_strengths(step, sampled, _split(len(problems), world)) if self._evaluates(step, cfg.sft_steps) else None
        loss_total, correct_total = world.sum(float(loss_sum.detach()), float(correct))
        record: dict[str, Any] = {
            "phase": "sft",
            "step": step,
            "loss": loss_total / n_tokens,
            "accuracy": correct_total / len(problems),
            "reward_mean": correct_total / len(problems),
            "lr": self._sft_lr(step),
        }
        on_data, on_samples = self._gathered(stats), self._gathered(own)
        if on_data is not None and on_samples is not None:
            # rho(H, G) on the written-out solutions (the data) and on the model's own.
            record.update(_suffixed(_fingerprint_figures(self._fingerprint(on_data)), "_logit_grad"))
            own_fp = _fingerprint_figures(self._fingerprint(on_samples))
            record.update(_suffixed(own_fp, "_samples_logit_grad"))
            if self.parameter_strengths is None:
                record.update(_suffixed(own_fp, "_samples"))
        gathered = None if measured is None else self._gathered(measured)
        if gathered is not None:
            record.update(_suffixed(_fingerprint_figures(self._fingerprint(gathered, "strength")), "_samples"))
            self._save_strengths(gathered, f"sft-{step:05d}")
        return record

    def _evaluates(self, step: int, last: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == last

    def _save_strengths(self, arrays: dict[str, np.ndarray], name: str) -> None:
        """The per-token values behind a step's figures, for confidence intervals later."""
        folder = self.out / "strengths"
        folder.mkdir(exist_ok=True)
        np.savez_compressed(folder / f"{name}.npz", **arrays)

    def _fingerprint(self, stats: dict[str, np.ndarray], key: str = "grad_norm") -> corrpo.Fingerprint:
        return corrpo.fingerprint(stats["entropy"], stats[key], stats["token_ids"], stats["lengths"], min_tokens=self.cfg.min_tokens)

    def rl_step(self, step: int, score: Callable[..., Any] | None) -> dict[str, Any]:
        cfg, world, task = self.cfg, self.world, self.task
        problems = task.train_problems(cfg.prompts_per_step, draw(cfg, _RL_DATA, step))
        share = _split(len(problems), world)
        mine = [problems[i] for i in share for _ in range(cfg.group_size)]
        noise = [draw(cfg, _RL_SAMPLES, step, i).random((cfg.group_size, task.max_response_len)) for i in share]
        self.policy.eval()
        batch = self._sample(mine, noise)
        rewards = self._verify(mine, batch)

        started = time.perf_counter()
        if self.parameter_strengths is not None and not cfg.server_model:
            stats = self.parameter_strengths(
                batch.prompts, batch.responses, batch.lengths, estimator=cfg.strength, k=cfg.strength_k or None, seeds=self._seeds(step, share)
            ).arrays()
        strength_s = time.perf_counter() - started
        self.policy.train()
        hidden, logits = batch.forward(self.model)
        mask = batch.mask
        ids = batch.responses[mask]
        logp = token_logprobs(logits[mask], ids, cfg.temperature)
        if self.parameter_strengths is None and not cfg.server_model:
            started = time.perf_counter()
            stats = self._token_stats(hidden[mask], ids, batch.lengths)
            strength_s = time.perf_counter() - started
        if cfg.server_model:  # the server computes H and S from the ids
            stats = {"prompts": batch.prompts.cpu().numpy(), "response_ids": ids.cpu().numpy(), "lengths": batch.lengths.cpu().numpy()}

        # The server scores the whole batch at once: rewards, rho and advantages are per
        # group, and the fingerprint is the batch's.
        gathered = self._gathered({**stats, "rewards": rewards})
        reply = None
        if gathered is not None:
            assert score is not None
            # A resumed run syncs first: its server may hold any weights.
            if cfg.server_model and ((step - 1) % cfg.sync_every == 0 or score.version is None):
                self._sync_server(score, step)
            started = time.perf_counter()
            reply = score(gathered, request_id=f"corrpo-train/{self.run_id}/rl/{step}")
            reply["strength_s"] = strength_s + (time.perf_counter() - started if cfg.server_model else 0.0)
            if self._evaluates(step, cfg.rl_steps) and not cfg.server_model:
                self._save_strengths({k: v for k, v in gathered.items() if k != "rewards"}, f"rl-{step:05d}")
        reply = world.broadcast(reply)
        first = share.start * cfg.group_size
        advantages = torch.tensor(reply["advantages"][first : first + len(mine)], dtype=torch.float32, device=world.device)
        token_adv = advantages[:, None].expand_as(mask)[mask]

        old = logp.detach()
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                _, ref_logits = batch.forward(self.reference)
                ref = token_logprobs(ref_logits[mask], ids, cfg.temperature)
        (n_tokens,) = world.sum(float(mask.sum()))
        losses, clipped, kls = [], [], []
        for epoch in range(cfg.ppo_epochs):
            if epoch:
                _, logits = batch.forward(self.model)
                logp = token_logprobs(logits[mask], ids, cfg.temperature)
            terms = policy_loss(logp, old, token_adv, cfg.clip_eps, ref, cfg.kl_coef)
            loss_sum = terms.loss.sum()
            self._step_optimizer(loss_sum / n_tokens * world.size)
            sums = world.sum(float(loss_sum.detach()), float(terms.clipped.sum()), float(terms.kl.sum()))
            losses.append(sums[0] / n_tokens)
            clipped.append(sums[1] / n_tokens)
            kls.append(sums[2] / n_tokens)

        record: dict[str, Any] = {
            "phase": "rl",
            "step": step,
            "loss": losses[0],
            "reward_mean": reply["reward_mean"],
            "accuracy": reply["reward_mean"],
            "reward_reg_mean": reply["reward_reg_mean"],
            "rho_defined": reply["rho_defined"],
            "response_len": n_tokens / (len(problems) * cfg.group_size),
            "clip_frac": float(np.mean(clipped)),
            "kl": float(np.mean(kls)),
            "strength_s": reply["strength_s"],
        }
        record.update(reply["fingerprint"])
        record.update(_suffixed(reply["logit_grad"], "_logit_grad"))
        return record

    def _sync_server(self, score: Any, step: int) -> None:
        """Hands the model-backed server the policy that sampled this step's rollouts."""
        path = save_model(self.policy, self.cfg, self.out / "server-weights")
        score.reload(path, f"{self.run_id}/rl/{step}")

    def run(self, score_client: Any | None = None) -> list[dict[str, Any]]:
        """Runs (or resumes) SFT then RL; returns the metrics of the whole run."""
        cfg = self.cfg
        phase, done = self.restore()
        score = None if score_client is None else _Scorer(score_client, cfg)
        total = cfg.sft_steps + cfg.rl_steps
        start_at = done if phase == "sft" else cfg.sft_steps + done
        with ExitStack() as stack:
            bar = stack.enter_context(_progress(total, start_at, self.progress))
            started = time.perf_counter()
            if phase == "sft":
                if self.optimizer is None:
                    self.optimizer = self._new_optimizer("sft")
                for step in range(done + 1, cfg.sft_steps + 1):
                    record = self.sft_step(step)
                    self._finish_step(record, step, cfg.sft_steps, step, "sft", bar, started)
                if self.world.is_root:
                    save_model(self.policy, cfg, self.out / "sft")
                self.optimizer = None
                self._checkpoint("rl", 0)
                phase, done = "rl", 0
            if self.optimizer is None:
                self.optimizer = self._new_optimizer("rl")
            if cfg.kl_coef > 0:
                self.reference = copy.deepcopy(self.policy)
                self.reference.load_state_dict(pretrained_weights(self.out / "sft")[1])
                self.reference.requires_grad_(False)
            for step in range(done + 1, cfg.rl_steps + 1):
                record = self.rl_step(step, score)
                self._finish_step(record, step, cfg.rl_steps, cfg.sft_steps + step, "rl", bar, started)
        return self.metrics.read() if self.world.is_root else []

    def _finish_step(self, record: dict[str, Any], step: int, last: int, global_step: int, phase: str, bar: Any, started: float) -> None:
        cfg = self.cfg
        record["global_step"] = global_step
        evaluate = step % cfg.eval_every == 0 or step == last
        record["eval_accuracy"] = self.evaluate() if evaluate and self.world.is_root else None
        record["elapsed_s"] = round(time.perf_counter() - started, 3)
        if self.world.is_root:
            self.metrics.append(record)
            bar.update(1, status=_postfix(record), milestone=record["eval_accuracy"] is not None)
        if step % cfg.checkpoint_every == 0 and step != last:
            self._checkpoint(phase, step)
        elif step == last and phase == "rl":
            self._checkpoint(phase, step)


def _fingerprint_figures(fp: corrpo.Fingerprint) -> dict[str, Any]:
    return {
        "rho_pooled": fp.rho_pooled,
        "rho_unique": fp.rho_unique,
        "rho_rollout_mean": fp.rho_rollout_mean,
        "entropy_mean": fp.entropy_mean,
        "grad_norm_mean": fp.strength_mean,
    }


def _suffixed(figures: dict[str, Any], suffix: str) -> dict[str, Any]:
    return {k + suffix: v for k, v in figures.items()}


class _Scorer:
    """Sends a step's gathered statistics (or, with ``server_model``, its token ids) and
    rewards to the reward server; returns what every rank needs of its answer."""

    def __init__(self, client: Any, cfg: TrainConfig) -> None:
        self.client = client
        self.cfg = cfg
        self.version: str | None = None

    def reload(self, path: Path, version: str) -> None:
        self.client.reload_weights(str(path), version)
        self.version = version

    def __call__(self, batch: dict[str, np.ndarray], request_id: str) -> dict[str, Any]:
        cfg = self.cfg
        bounds = np.cumsum(batch["lengths"])[:-1]
        settings: dict[str, Any] = dict(
            rewards=batch["rewards"],
            group_sizes=cfg.group_size,
            coef=cfg.score_coef,
            gate=cfg.gate,
            advantage=cfg.advantage,
            min_tokens=cfg.min_tokens,
            request_id=request_id,
            measure=cfg.measure,
        )
        if cfg.strength != "logit_grad":
            settings.update(estimator=cfg.strength, objective=cfg.objective, estimator_k=cfg.strength_k or None)
        if cfg.server_model:
            scores = self.client.score(
                prompt_ids=list(batch["prompts"]),
                token_ids=np.split(batch["response_ids"], bounds),
                weights_version=self.version,
                **settings,
            )
        else:
            if cfg.strength != "logit_grad":
                settings["strength"] = np.split(batch["strength"], bounds)
            scores = self.client.score(
                entropy=np.split(batch["entropy"], bounds),
                grad_norm=np.split(batch["grad_norm"], bounds),
                token_ids=np.split(batch["token_ids"], bounds),
                **settings,
            )
        defined = np.isfinite(scores.rho)
        figures = _fingerprint_figures(scores.fingerprint)
        return {
            "advantages": scores.advantages.tolist(),
            "reward_mean": float(np.mean(batch["rewards"])),
            "reward_reg_mean": float(np.mean(scores.rewards)),
            "rho_defined": float(defined.mean()),
            "fingerprint": figures,
            "logit_grad": figures if scores.logit_grad is None else _fingerprint_figures(scores.logit_grad),
        }


def _postfix(record: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    rho = record.get("rho_pooled", record.get("rho_pooled_samples"))
    parts = [record["phase"], f"loss {fmt(record['loss'])}", f"acc {fmt(record['accuracy'])}", f"rho {fmt(rho)}"]
    if record["phase"] == "rl":
        parts.insert(2, f"reward {fmt(record['reward_reg_mean'])}")
    if record.get("eval_accuracy") is not None:
        parts.append(f"held-out {fmt(record['eval_accuracy'])}")
    return " | ".join(parts)


def _progress(total: int, initial: int, enabled: bool) -> Progress:
    # A bar on a terminal; in a log, a line at each evaluation (and a minute apart at most).
    return Progress(total, initial=initial, enabled=enabled, desc="corrpo-train", unit="step")
