#!/usr/bin/env bash
# `make gpu-check` on the device tool's machine (docs/benchmarks.md, "When a GPU is lent"): a
# bare machine without network whose python3 (3.12) has torch, triton and transformers but
# not corrpo's other needs. Installs the wheels that `make gpu-check-bundle` put into
# .gpu-check/ (carried with the call) into /tmp/site, imports corrpo, corrpo-server and
# corrpo-kernels from the working tree (with the carried native extension
# python/corrpo/_native.abi3.so), and runs bench/gpu_check.py with this script's arguments.
#   usage: bash bench/gpu_check.sh [--out DIR] [--budget S]   (PYTHON picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -f python/corrpo/_native.abi3.so ] || ! ls .gpu-check/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: needs .gpu-check/*.whl and python/corrpo/_native.abi3.so: run 'make gpu-check-bundle'" \
        "and carry both paths" >&2
    exit 2
fi
"$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .gpu-check/*.whl
export PYTHONPATH="/tmp/site:$PWD/python:$PWD/server:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" bench/gpu_check.py "$@"
