#!/usr/bin/env bash
# The SGLang venv of `make test-integrations` (tests/test_integrations_sglang_engine.py and
# examples/integrations/sglang_rollouts.py): .venv-sglang with sglang pinned, corrpo (native extension
# built for this venv), corrpo-kernels and corrpo-server from the working tree, editable.
# Idempotent: a second run checks the pins and rebuilds only what changed.
#
# Without a GPU it also builds a CPU stub of sgl_kernel (stub_sgl_kernel.py says why); the
# tests put it on the engine's PYTHONPATH only when no CUDA device is visible.
#
#   bash tests/sglang_engine/setup.sh      (PYTHON: the interpreter to build the venv from)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-sglang
PY="$PWD/$VENV/bin/python"
SGLANG=0.5.23

[ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
[ -x "$VENV/bin/uv" ] || "$PY" -m pip install -q --disable-pip-version-check uv

# uv's cache sits inside the venv (removed with it) and is hard-linked into site-packages,
# so torch and the CUDA libraries are on disk once. CI may point UV_CACHE_DIR elsewhere.
export UV_CACHE_DIR="${UV_CACHE_DIR:-$PWD/$VENV/.uv-cache}"
export UV_LINK_MODE="${UV_LINK_MODE:-hardlink}"
# The native extension is built against this venv's interpreter (abi3, so the .so it puts
# into python/corrpo also serves .venv).
export PYO3_PYTHON="$PY"
"$VENV/bin/uv" pip install --python "$PY" -q \
    "sglang==$SGLANG" -e '.[grpc,test]' -e ./server -e ./kernels

if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    "$PY" tests/sglang_engine/stub_sgl_kernel.py "$VENV/sgl-kernel-cpu-stub"
fi
