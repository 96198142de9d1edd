"""``corrpo fingerprint``: argument parsing only; the work is ``corrpo.fingerprinting.run``
and ``corrpo.fingerprinting.compare``."""

from __future__ import annotations

import argparse
from typing import Any

OBJECTIVES = ("logit", "logprob")
MEASURES = ("l1_mean", "nuclear_qkvo", "frobenius", "logit_grad", "head_logit_grad")
ESTIMATORS = ("exact", "subsample", "jvp", "last_block", "local", "jvp_cv", "logit_grad")

DESCRIPTION = """\
The entropy-gradient fingerprint of a model on its own responses (SPEC 3, 4): for every
scored response token, its entropy H and the gradient strength of the target logit (or
log-prob) with respect to the weights, then rho(H, strength) pooled, within responses and
over unique token ids, with 95% bootstrap CIs over responses.

  corrpo fingerprint --model DIR|FILE.gguf|smollm2 --prompts prompts.jsonl --generate 2 --out runs/fp
  corrpo fingerprint --model ... --responses runs/fp/responses.jsonl --random-init --out runs/fp-random
  corrpo fingerprint --compare runs/fp runs/fp-random --out runs/fp-compare

Writes responses.jsonl, tokens.csv, summary.json, scatter.png, per_block.png, proxies.png
(or compare.png and compare.md)."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fingerprint",
        help="entropy vs parameter-gradient strength of a model on its own responses",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    configure(p)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("what to score")
    src.add_argument("--model", help="a Hugging Face model directory (a corrpo-train run's sft/ or checkpoint/ too), a .gguf file, or an installed model package: smollm2, gemma3-270m")
    src.add_argument("--prompts", metavar="FILE.jsonl", help='prompts to answer, one JSON object a line: {"prompt": ..., "id"?: ...} or {"messages": [...]}')
    src.add_argument("--generate", type=int, default=1, metavar="N", help="responses per prompt (default 1)")
    src.add_argument("--responses", metavar="FILE.jsonl", help="score these responses instead of generating (a responses.jsonl: prompt/response text or prompt_ids/response_ids)")
    src.add_argument("--compare", nargs="+", metavar="DIR", help="compare the summaries of these output directories instead of scoring")
    src.add_argument("--out", required=True, metavar="DIR", help="output directory")
    src.add_argument("--label", help="name of this run in plots and comparisons (default: the model's name)")
    m = p.add_argument_group("the measure")
    m.add_argument("--objective", default="logit", help="seed of each backward: logit (the paper's, default) or logprob")
    m.add_argument("--measures", nargs="+", metavar="M", help=f"any of {', '.join(MEASURES)} (default: the estimator's)")
    m.add_argument("--estimator", default="exact", help=f"one of {', '.join(ESTIMATORS)} (default exact)")
    m.add_argument("--k", type=int, help="tokens per response (subsample) or random directions (jvp, jvp_cv)")
    m.add_argument("--positions-stride", type=int, default=1, metavar="S", help="score every S-th response token (default 1: all)")
    m.add_argument("--chunk-size", type=int, help="seeds per batched backward (default: sized to about 1 GiB)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily; > 0 samples from softmax(z / T)")
    g.add_argument("--no-chat-template", dest="chat_template", action="store_false", help="use the prompt text as it is, even when the tokenizer has a chat template")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    r.add_argument("--dtype", default="float32", help="float32 (default), float64, bfloat16 or float16")
    r.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default; on a busy shared machine 1 can be faster)")
    r.add_argument("--seed", type=int, default=0, help="sampling, subsampling, random init and the bootstrap (default 0)")
    r.add_argument("--random-init", action="store_true", help="the same architecture with freshly initialised (seeded) weights: the control")
    r.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="bootstrap resamples over responses (default 1000)")
    r.add_argument("--min-tokens", type=int, default=8, help="fewest scored tokens for a within-response rho (default 8)")
    r.add_argument("--per-block-columns", action="store_true", help="also write each block's term to tokens.csv")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import compare, run as run_fingerprint

    if args.compare:
        extra = [f for f in ("model", "prompts", "responses") if getattr(args, f)]
        if extra:
            parser.error(f"--compare takes run directories only, not --{extra[0]}")
        compare(args.compare, args.out)
        return 0
    if not args.model:
        parser.error("--model is required (or --compare DIR ...)")
    if bool(args.prompts) == bool(args.responses):
        parser.error("give one of --prompts (to generate) or --responses (to score them)")
    run_fingerprint(
        args.model,
        args.out,
        prompts=args.prompts,
        responses=args.responses,
        generate=args.generate,
        objective=args.objective,
        measures=args.measures,
        estimator=args.estimator,
        k=args.k,
        positions_stride=args.positions_stride,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        random_init=args.random_init,
        chat_template=args.chat_template,
        bootstrap=args.bootstrap,
        min_tokens=args.min_tokens,
        per_block_columns=args.per_block_columns,
        chunk_size=args.chunk_size,
        label=args.label,
        progress=args.progress,
    )
    return 0
