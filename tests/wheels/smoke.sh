#!/usr/bin/env bash
# Installs what `make wheels` built into a fresh venv whose PATH has no cargo or rustc, and runs
# smoke.py there. corrpo, corrpo-server and corrpo-kernels come from the folder only (--no-index);
# their dependencies (numpy, grpcio, ...) from PyPI.
#   usage: tests/wheels/smoke.sh [DIST]   (default dist; PYTHON picks the interpreter)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dist=$(cd "${1:-dist}" && pwd)
python=$(command -v "${PYTHON:-python3}")
work=$(mktemp -d "${TMPDIR:-/tmp}/corrpo-wheels-XXXXXX")
trap 'rm -rf "$work"' EXIT

"$python" -m venv "$work/venv"
# The venv and the system's own directories only: a developer's PATH holds ~/.cargo/bin.
export PATH="$work/venv/bin:/usr/local/bin:/usr/bin:/bin"
unset PYTHONPATH VIRTUAL_ENV CARGO_HOME RUSTUP_HOME
for tool in cargo rustc; do
    if command -v "$tool" >/dev/null; then
        echo "smoke.sh: $tool is on PATH ($(command -v "$tool")): the test must run without Rust" >&2
        exit 1
    fi
done
pip() { "$work/venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# Only wheels, so that a missing or unusable (wrong platform tag) wheel fails here rather
# than falling back to building the sdist.
wheels() { pip install --no-index --find-links "$dist" --only-binary :all: --no-deps "$@"; }
wheels corrpo corrpo-server
# Their dependencies from PyPI; what is installed already satisfies corrpo and corrpo-server.
pip install --only-binary :all: "corrpo[grpc,bf16]" corrpo-server
# corrpo-kernels installs, but without torch and triton (gigabytes; the kernels want a GPU).
wheels --no-warn-conflicts corrpo-kernels
cd "$work"  # so that nothing imports from the checkout
OMP_NUM_THREADS=1 RAYON_NUM_THREADS=1 "$work/venv/bin/python" "$here/smoke.py"
