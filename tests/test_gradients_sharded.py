"""``token_strengths`` where trainers run the policy: two CPU ranks over gloo score different
sequences (different counts and lengths, so different numbers of forwards and backwards) on
a tiny float32 Llama sharded with FSDP2 (``fully_shard`` on each block and the root), wrapped
in DistributedDataParallel, and (where deepspeed is installed) partitioned by DeepSpeed
ZeRO-3. Every estimator's result, and ``CorrpoReward``'s rewards of a batch whose groups
straddle the ranks (scored by a real corrpo-server), must equal what the parent gets from the
same model unwrapped in one process; a training step after scoring must give the unsharded
model's gradients (scoring left FSDP's state as it found it). FSDP1 and tensor-parallel
models are precise errors."""

from __future__ import annotations

import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WORLD = 2
#: (estimator, measures, k): every estimator, the exact one with each parameter measure.
CASES = (
    ("exact", ("l1_mean", "nuclear_qkvo", "frobenius"), None),
    ("subsample", ("l1_mean", "nuclear_qkvo"), 3),
    ("jvp", ("frobenius", "l1_mean"), 4),
    ("last_block", ("l1_mean", "nuclear_qkvo", "frobenius"), None),
    ("local", ("l1_mean", "nuclear_qkvo", "frobenius"), None),
    ("jvp_cv", ("frobenius",), 4),
    ("logit_grad", ("logit_grad", "head_logit_grad"), None),
)
#: Under FSDP2 mixed precision (bf16 parameters): exact, subsample and last_block (the casts
#: are FSDP's hooks', the same whatever the estimator).
MIXED_CASES = (CASES[0], CASES[1], CASES[3])
RTOL = 1e-5


def load(path: str):
    """The same float32 model in every process (``corrpo.testing.build_tiny_model``)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def rank_rows(rank: int, vocab: int) -> torch.Tensor:
    """Rank 0 scores two rows of 13 tokens, rank 1 one row of 30: with chunks of 4 seeds
    they run 6 and 8 exact chunks."""
    shape = ((2, 13), (1, 30))[rank]
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(100 + rank))


#: One reward batch of three groups of two, spread over the ranks as TRL spreads it: three
#: completions each, so the middle group has one completion on each rank.
PROMPTS = ["the cat sat on"] * 2 + ["two plus three is"] * 2 + ["a dog ran in"] * 2
REWARD_SETTINGS = {"coef": 0.5, "gate": "none", "min_tokens": 2}


def completion_ids(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(200)
    return [rng.integers(4, vocab, int(n)).tolist() for n in rng.integers(3, 9, len(PROMPTS))]


def verifier(prompts, completions, completion_ids, **kwargs):
    return [float(ids[0] % 2) for ids in completion_ids]


def share(rank: int) -> slice:
    return slice(rank * len(PROMPTS) // WORLD, (rank + 1) * len(PROMPTS) // WORLD)


def strengths(model, vocab: int, rank: int, cases=CASES) -> dict[str, np.ndarray]:
    """Every case's measures on ``rank``'s rows."""
    from corrpo.gradients import token_strengths

    out = {}
    for estimator, measures, k in cases:
        got = token_strengths(model, rank_rows(rank, vocab), measures=measures, estimator=estimator, k=k, chunk_size=4, seed=7)
        out[f"{estimator}.positions"] = got.positions
        out[f"{estimator}.entropy_bits"] = got.entropy_bits
        for measure in measures:
            out[f"{estimator}.{measure}"] = got.measure(measure)
    return out


def bf16_parameters(model):
    """The model as FSDP's ``param_dtype=bfloat16`` computes it: parameters in bf16, buffers
    (the rotary frequencies) left in float32."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


def score(model, tokenizer, client, rank: int, mine: slice) -> dict[str, np.ndarray]:
    """``strengths``, and ``CorrpoReward``'s rewards of the reward batch's completions
    ``mine`` (a rank's share; in a world of one, all of them)."""
    from corrpo.integrations.trl import CorrpoReward

    vocab = len(tokenizer)
    out = strengths(model, vocab, rank)
    reward = CorrpoReward(model, tokenizer, client, verifier=verifier, num_generations=2, estimator="exact", **REWARD_SETTINGS)
    completions = completion_ids(vocab)[mine]
    out["reward"] = np.asarray(reward(PROMPTS[mine], tokenizer.batch_decode(completions), completions))
    return out


def train_step(model) -> None:
    """One forward and backward on the same tokens on every rank (so FSDP's averaged
    gradient is each rank's own)."""
    ids = torch.randint(0, 20, (1, 16), generator=torch.Generator().manual_seed(300))
    model(input_ids=ids, labels=ids).loss.backward()


def _rank(rank: int, store: str, path: str, target: str, out: str, zero3: bool) -> None:
    from transformers import AutoTokenizer

    from corrpo.client import RewardClient

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=90))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        with RewardClient(target, timeout=60) as client:
            run = _zero3 if zero3 else _fsdp2_and_ddp
            run(rank, path, lambda model: score(model, tokenizer, client, rank, share(rank)), Path(out))
    finally:
        dist.destroy_process_group()


def _fsdp2_and_ddp(rank: int, path: str, scores, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from torch.nn.parallel import DistributedDataParallel

    from corrpo.errors import ConfigError
    from corrpo.gradients import token_strengths

    model = load(path)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    # Scored before FSDP's first forward, then after a training step, which must give the
    # unsharded model's gradients.
    fresh = scores(model)
    assert all(isinstance(p, DTensor) for p in model.parameters()), "scoring left parameters unsharded"
    train_step(model)
    grads = {name: p.grad.full_tensor().numpy() for name, p in model.named_parameters()}
    model.zero_grad()
    trained = scores(model)
    np.savez(out / f"fsdp2-{rank}.npz", **_prefixed("fresh", fresh), **_prefixed("trained", trained), **_prefixed("grad", grads))
    np.savez(out / f"ddp-{rank}.npz", **scores(DistributedDataParallel(load(path))))
    # FSDP's mixed precision: its hooks cast while scoring as in training.
    mixed, policy = load(path), MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for block in mixed.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(mixed, mp_policy=policy)
    np.savez(out / f"fsdp2-bf16-{rank}.npz", **strengths(mixed, mixed.config.vocab_size, rank, MIXED_CASES))
    with pytest.raises(ConfigError, match=r"FSDP1 \(FullyShardedDataParallel\).*fully_shard"):
        token_strengths(FullyShardedDataParallel(load(path), device_id=torch.device("cpu")), rank_rows(rank, 20))
    split = parallelize_module(load(path), init_device_mesh("cpu", (WORLD,)), {"model.layers.1.mlp.up_proj": ColwiseParallel()})
    with pytest.raises(ConfigError, match=r"layers\.1\.mlp\.up_proj\.weight .* still a DTensor .*tensor or sequence parallelism"):
        token_strengths(split, rank_rows(rank, 20))


def _zero3(rank: int, path: str, scores, out: Path) -> None:
    import deepspeed

    os.environ["LOCAL_RANK"] = str(rank)  # what DeepSpeed reads of the launcher's
    model = load(path)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    assert next(model.parameters()).numel() == 0, "ZeRO-3 did not partition the parameters"
    via_engine = scores(engine)
    # A training step between: DeepSpeed's hooks were put back.
    ids = torch.randint(0, 20, (1, 16), generator=torch.Generator().manual_seed(300))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    np.savez(out / f"zero3-{rank}.npz", **_prefixed("engine", via_engine), **_prefixed("module", scores(model)))


def _prefixed(prefix: str, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{key}": value for key, value in values.items()}


def _part(saved, prefix: str) -> dict[str, np.ndarray]:
    return {key.split("/", 1)[1]: saved[key] for key in saved if key.startswith(f"{prefix}/")}


def launch(tmp_path: Path, model_dir: Path, target: str, zero3: bool = False, limit: float = 240) -> None:
    """Runs ``_rank`` on WORLD spawned processes; fails (killing them) past ``limit`` s."""
    args = (str(tmp_path / "store"), str(model_dir), target, str(tmp_path), zero3)
    context = mp.start_processes(_rank, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + limit
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish in {limit} s (a collective one rank never joined?)")


def expected(model_dir: Path, target: str) -> list[dict[str, np.ndarray]]:
    """Per rank: what the unwrapped model gives in this process (a world of one), the
    reward batch cut to the rank's share."""
    from transformers import AutoTokenizer

    from corrpo.client import RewardClient

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load(str(model_dir))
    with RewardClient(target, timeout=60) as client:
        out = [score(model, tokenizer, client, rank, slice(None)) for rank in range(WORLD)]
    rewards = out[0]["reward"]
    assert len(rewards) == len(PROMPTS)
    assert np.any(rewards != verifier(PROMPTS, None, completion_ids(len(tokenizer)))), "the CorR-PO term changed some reward"
    for rank, want in enumerate(out):
        assert len(want["exact.l1_mean"]) == (24, 29)[rank]
        want["reward"] = rewards[share(rank)]
    return out


def check(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=0, err_msg=f"{what}: {key}")


def test_fsdp2_and_ddp_score_like_the_unsharded_model(tmp_path, tiny_model_dir, server):
    launch(tmp_path, tiny_model_dir, server.target)
    model = load(str(tiny_model_dir))
    train_step(model)
    want_grads = {name: p.grad.numpy() for name, p in model.named_parameters()}
    for rank, want in enumerate(expected(tiny_model_dir, server.target)):
        fsdp2 = np.load(tmp_path / f"fsdp2-{rank}.npz")
        check(_part(fsdp2, "fresh"), want, f"FSDP2 rank {rank}, before training")
        # The step has no optimizer: the weights, so the scores, are unchanged.
        check(_part(fsdp2, "trained"), want, f"FSDP2 rank {rank}, after a step")
        grads = _part(fsdp2, "grad")
        for name, grad in want_grads.items():
            np.testing.assert_allclose(grads[name], grad, rtol=1e-4, atol=1e-6, err_msg=f"FSDP2 rank {rank}: gradient of {name}")
        check(dict(np.load(tmp_path / f"ddp-{rank}.npz")), want, f"DDP rank {rank}")
    bf16 = bf16_parameters(load(str(tiny_model_dir)))
    for rank in range(WORLD):
        want = strengths(bf16, bf16.config.vocab_size, rank, MIXED_CASES)
        check(dict(np.load(tmp_path / f"fsdp2-bf16-{rank}.npz")), want, f"FSDP2 bf16 rank {rank}")


def test_zero3_scores_like_the_unsharded_model(tmp_path, tiny_model_dir, server, monkeypatch):
    pytest.importorskip("deepspeed")
    # DeepSpeed builds its CPU communication op with ninja (from the venv) on first use.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if shutil.which("ninja") is None:
        pytest.skip("deepspeed's CPU op build needs ninja")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    launch(tmp_path, tiny_model_dir, server.target, zero3=True, limit=600)
    for rank, want in enumerate(expected(tiny_model_dir, server.target)):
        got = np.load(tmp_path / f"zero3-{rank}.npz")
        check(_part(got, "engine"), want, f"ZeRO-3 rank {rank}, through the engine")
        check(_part(got, "module"), want, f"ZeRO-3 rank {rank}, the module after a step")
