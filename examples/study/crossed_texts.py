"""Text or weights? The monitor scores each checkpoint on its own answers, so a change in rho
across SFT mixes two things: other texts and other weights. This scores the answers of one
evaluation with the weights of another (teacher-forced, the same estimator and settings as
the monitor) and prints the paper's statistic (unique ids x nuclear_qkvo) and the within view
for every (weights, texts) pair.

    python examples/study/crossed_texts.py runs/study-real/gemma3-270m/sft-seed0 \\
        --weights gemma3-270m runs/study-real/gemma3-270m/sft-seed0/final --steps 0 16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("real_models", Path(__file__).with_name("real_models.py"))
real_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real_models)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="an sft run folder (result.json, fingerprint/)")
    p.add_argument("--weights", nargs=2, required=True, help="the weights of the two steps (package name or HF directory)")
    p.add_argument("--steps", nargs=2, type=int, required=True, help="the two evaluations whose answers are scored")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    from corrpo import traces
    from corrpo.fingerprinting.analysis import correlations
    from corrpo.fingerprinting.generate import Prompt, encode_prompt
    from corrpo.gradients import token_strengths

    torch.set_num_threads(args.threads)
    config = argparse.Namespace(**json.loads((args.run / "result.json").read_text())["config"])
    _, probes, _ = real_models.problem_sets(config)
    answers = {step: np.load(args.run / "fingerprint" / f"step-{step:06d}.npz") for step in args.steps}
    out = {}
    for weights, weights_step in zip(args.weights, args.steps):
        model, tokenizer = real_models.load_policy(weights)
        model.eval()
        for step, cols in answers.items():
            h, s, ids_, resp = [], [], [], []
            for r in np.unique(cols["response"]):
                mine = cols["response"] == r
                prompt = Prompt(int(r), int(r), messages=traces.messages(probes[int(r)], with_answer=False))
                _, prompt_ids = encode_prompt(tokenizer, prompt)
                if len(prompt_ids) != int(cols["position"][mine].min()):
                    raise SystemExit(f"step {step}, response {r}: the prompt rebuilt here is not the one the run scored")
                got = token_strengths(
                    model, torch.tensor(prompt_ids + cols["token_id"][mine].tolist()), cols["position"][mine].tolist(),
                    measures=("nuclear_qkvo",), estimator=config.estimator,
                )  # fmt: skip
                h.append(got.entropy_bits)
                s.append(got.nuclear_qkvo)
                ids_.append(got.token_ids)
                resp.append(np.full(len(got.token_ids), r))
            c = correlations(*(np.concatenate(x) for x in (h, s, ids_, resp)), n_boot=config.n_boot, seed=0, min_tokens=8)["spearman"]
            key = f"weights of step {weights_step}, answers of step {step}"
            out[key] = {v: {"rho": c[v]["rho"], "ci": c[v].get("ci")} for v in ("unique", "within")}
            out[key]["n_ids"] = c["unique"]["n_ids"]
            print(f"{key}: unique {c['unique']['rho']:+.3f} {c['unique'].get('ci')} ({c['unique']['n_ids']} ids), within {c['within']['rho']:+.3f} {c['within'].get('ci')}", flush=True)
    (args.run / "crossed.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
