# The two commands a newcomer needs:
#   make demo   build corrpo in .venv and score a synthetic group of rollouts
#   make test   build, then run every check: cargo fmt/clippy/test and pytest
# Each installs what it needs itself (a venv under .venv, the native extension).

PYTHON ?= python3
VENV   := .venv
PY     := $(abspath $(VENV)/bin/python)
export PYO3_PYTHON := $(PY)

.PHONY: demo test native lint test-rust test-python bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "maturin>=1.9,<2"

# Rebuilds the Rust extension in place (cargo is incremental, so this is quick when nothing
# changed) and installs the package in editable mode with its runtime dependencies.
native: $(PY)
	$(PY) -m pip install -q --no-build-isolation -e .

# The test and bench extras of pyproject.toml (torch among them: a large first download).
$(VENV)/.test-deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	touch $@

demo: native
	$(PY) examples/score_group.py

lint: $(PY)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --release -- -D warnings

test-rust:
	cargo test -p corrpo-core --release

test-python: native $(VENV)/.test-deps
	$(PY) -m pytest -q

test: lint test-rust test-python

bench: native $(VENV)/.test-deps
	$(PY) bench/bench_token_stats.py

clean:
	rm -rf $(VENV) target python/corrpo/_native*.so
