"""``FingerprintCallback`` in a real TRL ``SFTTrainer`` (TRL 1.16, on the CPU) on a tiny random
Llama: what it logs at the last step must equal a brute-force oracle (one backward per token
in float64, norms by torch.linalg, Spearman by scipy) on the trained model, for the paper's
statistic (unique ids x nuclear_qkvo) and the pooled and within views of l1_mean; and a run
with the callback must train the same weights as a run without it."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("datasets")
scipy_stats = pytest.importorskip("scipy.stats")

from corrpo.errors import ConfigError  # noqa: E402
from corrpo.testing import build_tiny_model  # noqa: E402

TRAIN = ["the cat sat on the mat", "two plus three is five", "a dog ran in the park", "one and one make two"] * 4
TEXTS = ["the cat sat on the mat and the dog ran in the park", "what is four plus four ? two plus three is five"]
PROMPTS = ["the cat sat on", [{"role": "user", "content": "what is four plus four ?"}]]


def sft_trainer(tmp_path, name: str, *, dtype=torch.float64, bf16: bool = False, max_steps: int = 4, dropout: float = 0.0):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    build_tiny_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=dtype, attention_dropout=dropout)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    args = SFTConfig(
        output_dir=str(tmp_path / name), use_cpu=True, per_device_train_batch_size=4, max_steps=max_steps,
        learning_rate=1e-2, report_to="none", logging_steps=1, seed=0, bf16=bf16, max_length=32, save_strategy="no",
    )  # fmt: skip
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TRAIN}), processing_class=tokenizer)


def brute_force(model, ids: list[int], positions: list[int]) -> dict[str, list[float]]:
    """Per token t: a fresh forward, the backward of the target logit at t-1, then the mean
    over blocks of the L1 norm of the block's gradient and of the Q, K, V, O weight gradients'
    nuclear norms; H in bits from the logits."""
    x = torch.tensor([ids])
    out = {"h": [], "l1_mean": [], "nuclear_qkvo": []}
    for t in positions:
        model.zero_grad(set_to_none=True)
        z = model(x[:, : t + 1]).logits[0, t - 1]
        z[ids[t]].backward()
        layers = model.model.layers
        out["l1_mean"].append(np.mean([sum(float(p.grad.abs().sum()) for p in b.parameters()) for b in layers]))
        attn = [b.self_attn for b in layers]
        out["nuclear_qkvo"].append(
            np.mean([sum(float(torch.linalg.svdvals(getattr(a, n).weight.grad).sum()) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) for a in attn])
        )
        p = torch.softmax(z.detach(), -1)
        out["h"].append(float(-(p * torch.log2(p)).sum()))
    model.zero_grad(set_to_none=True)
    return out


def test_sft_trainer_logs_the_oracles_statistics_at_the_last_step(tmp_path) -> None:
    from corrpo.fingerprinting.generate import Prompt, encode_prompt
    from corrpo.integrations.trl import FingerprintCallback

    trainer = sft_trainer(tmp_path, "run")
    cb = FingerprintCallback(trainer, texts=TEXTS, prompts=PROMPTS, every=3, max_new_tokens=6, estimator="exact", n_boot=200)
    trainer.add_callback(cb)
    trainer.train()

    logged = [e for e in trainer.state.log_history if "fingerprint/n_tokens" in e]
    assert [e["step"] for e in logged] == [0, 3, 4], "at the start, every 3 steps and at the last step"
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3, 4], "the trainer's own log is kept"
    last = logged[-1]
    # The oracle: the probe set rebuilt from what the callback wrote, scored by brute force.
    columns = np.load(tmp_path / "run" / "fingerprint" / "step-000004.npz")
    tok = trainer.processing_class
    rows = [tok(t)["input_ids"] for t in TEXTS]
    for i, prompt in enumerate(PROMPTS):
        _, ids = encode_prompt(tok, prompt if isinstance(prompt, str) else Prompt(i, i, messages=prompt))
        rows.append(ids + columns["token_id"][columns["response"] == len(TEXTS) + i].tolist())
    h, tokens, response, per = [], [], [], {"l1_mean": [], "nuclear_qkvo": []}
    model = trainer.model.eval()
    for r, ids in enumerate(rows):
        start = 1 if r < len(TEXTS) else len(rows[r]) - int((columns["response"] == r).sum())
        positions = list(range(start, len(ids)))
        o = brute_force(model, ids, positions)
        h += o["h"]
        tokens += [ids[t] for t in positions]
        response += [r] * len(positions)
        for m in per:
            per[m] += o[m]
    h, tokens, response = np.array(h), np.array(tokens), np.array(response)
    np.testing.assert_array_equal(columns["token_id"], tokens)
    np.testing.assert_allclose(columns["entropy_bits"], h, rtol=1e-9)
    np.testing.assert_allclose(columns["nuclear_qkvo"], per["nuclear_qkvo"], rtol=1e-9)
    assert last["fingerprint/n_tokens"] == len(tokens) and last["fingerprint/n_responses"] == len(rows)

    # The paper's statistic: Spearman of per-id mean H against per-id mean strength.
    ids = np.unique(tokens)
    assert last["fingerprint/n_ids"] == len(ids)
    mean = lambda v: np.array([v[tokens == i].mean() for i in ids])  # noqa: E731
    unique = scipy_stats.spearmanr(mean(h), mean(np.array(per["nuclear_qkvo"])))[0]
    assert last["fingerprint/unique/nuclear_qkvo"] == pytest.approx(unique, abs=1e-9)
    pooled = scipy_stats.spearmanr(h, per["l1_mean"])[0]
    assert last["fingerprint/pooled/l1_mean"] == pytest.approx(pooled, abs=1e-9)
    within = np.mean([scipy_stats.spearmanr(h[response == r], np.array(per["l1_mean"])[response == r])[0] for r in range(len(rows)) if (response == r).sum() >= 8])
    assert last["fingerprint/within/l1_mean"] == pytest.approx(within, abs=1e-9)
    for key in ("fingerprint/unique/nuclear_qkvo", "fingerprint/pooled/l1_mean"):
        assert last[f"{key}/ci_low"] <= last[key] <= last[f"{key}/ci_high"]

    history = [json.loads(line) for line in (tmp_path / "run" / "fingerprint" / "history.jsonl").read_text().splitlines()]
    assert [e["step"] for e in history] == [0, 3, 4] and history[-1]["metrics"] == {k: v for k, v in last.items() if k.startswith("fingerprint/")}
    assert history[0]["metrics"]["fingerprint/unique/nuclear_qkvo"] != last["fingerprint/unique/nuclear_qkvo"], "the weights moved"


def test_a_run_with_the_callback_trains_the_same_weights(tmp_path) -> None:
    """Sampling the prompts' answers draws from a forked RNG, and the model's train mode is
    restored: the monitored run is the unmonitored one (with dropout, which draws from the
    RNG at every training step), here under TRL's bf16 autocast."""
    from corrpo.integrations.trl import FingerprintCallback

    plain = sft_trainer(tmp_path, "plain", dtype=torch.float32, bf16=True, dropout=0.3)
    plain.train()
    watched = sft_trainer(tmp_path, "watched", dtype=torch.float32, bf16=True, dropout=0.3)
    cb = FingerprintCallback(watched, texts=TEXTS[:1], prompts=PROMPTS, every=2, max_new_tokens=6, estimator="local", n_boot=50)
    watched.add_callback(cb)
    watched.train()
    assert len(cb.history) == 3 and all(np.isfinite(e["metrics"]["fingerprint/pooled/l1_mean"]) for e in cb.history)
    for (name, a), b in zip(plain.model.named_parameters(), watched.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert watched.model.training

    # Gradients held by the model are left as they were.
    watched.model(torch.tensor([[2, 5, 6, 7]]), labels=torch.tensor([[2, 5, 6, 7]])).loss.backward()
    before = [p.grad.clone() for p in watched.model.parameters()]
    watched.state.global_step += 1
    cb.on_step_end(watched.args, watched.state, watched.control)
    assert len(cb.history) == 4 and watched.model.training
    for p, g in zip(watched.model.parameters(), before):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"needs a probe set: texts= \(teacher-forced\) or prompts="),
        ({"texts": TEXTS, "every": 0}, r"every must be an integer >= 1"),
        ({"texts": ["cat"]}, r"texts\[0\] is 1 token\(s\): a teacher-forced text needs at least 2"),
        ({"prompts": [{"content": "x"}]}, r"prompts\[0\] must be a string or a conversation"),
        ({"prompts": PROMPTS, "max_new_tokens": 100, "max_tokens": 150}, r"scores up to 200 tokens per evaluation .* over max_tokens=150"),
        ({"texts": TEXTS, "measures": ("l2",)}, r"l2"),
    ],
)
def test_bad_settings_are_refused_when_made(tmp_path, kwargs, message) -> None:
    from corrpo.integrations.trl import FingerprintCallback

    trainer = sft_trainer(tmp_path, "bad", max_steps=1)
    with pytest.raises(ConfigError, match=message):
        FingerprintCallback(trainer, **kwargs)


DDP_SCRIPT = """
import json, sys
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from corrpo.integrations.trl import FingerprintCallback

model_dir, out, texts, prompts, train = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:6])
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
args = SFTConfig(output_dir=out, use_cpu=True, ddp_backend="gloo", per_device_train_batch_size=2, max_steps=2,
                 learning_rate=1e-2, report_to="none", seed=0, bf16=False, max_length=32, save_strategy="no")
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": train}), processing_class=tokenizer)
cb = FingerprintCallback(trainer, texts=texts, prompts=prompts, every=1, max_new_tokens=6, temperature=0, n_boot=100)
trainer.add_callback(cb)
trainer.train()
rank = torch.distributed.get_rank()
with open(f"{out}/log-{rank}.json", "w") as f:
    json.dump([e for e in trainer.state.log_history if "fingerprint/n_tokens" in e], f)
"""


def test_under_ddp_each_process_scores_its_share_and_all_log_the_whole(tmp_path) -> None:
    """Two CPU processes (torchrun, gloo): the step-0 statistics every process logs equal one
    process scoring the whole probe set on the same weights (greedy answers: a sampled one
    depends on its batch); only the first writes files."""
    import json
    import os
    import shutil
    import socket
    import subprocess
    import sys

    from corrpo.integrations.trl import FingerprintCallback

    texts = TEXTS + ["one and one make two and the cat sat on the mat"]
    single = sft_trainer(tmp_path, "single", max_steps=1)
    cb = FingerprintCallback(single, texts=texts, prompts=PROMPTS, every=1, max_new_tokens=6, temperature=0, n_boot=100)
    single.add_callback(cb)
    single.train()
    want = {k: v for k, v in single.state.log_history[0].items() if k.startswith("fingerprint/") and k != "fingerprint/seconds"}
    assert want["fingerprint/n_responses"] == 5

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    argv = [json.dumps(x) for x in (texts, PROMPTS, TRAIN)]
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), str(tmp_path / "ddp.py"),
         str(tmp_path / "model"), str(tmp_path / "ddp"), *argv],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        logged = json.loads((tmp_path / "ddp" / f"log-{rank}.json").read_text())
        assert [e["step"] for e in logged] == [0, 1, 2]
        got = {k: v for k, v in logged[0].items() if k.startswith("fingerprint/") and k != "fingerprint/seconds"}
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-9), key
    written = tmp_path / "ddp" / "fingerprint"
    assert sorted(p.name for p in written.iterdir()) == ["history.jsonl", "step-000000.npz", "step-000001.npz", "step-000002.npz"]
    assert len((written / "history.jsonl").read_text().splitlines()) == 3
