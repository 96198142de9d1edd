"""Builds a CPU-only stand-in for ``sgl_kernel`` from the installed wheel's own Python files,
for running SGLang's engine on a machine without a GPU (tests and the example only).

Why: SGLang imports ``sgl_kernel`` even with ``--device cpu`` (its KV-cache module does, for
``copy_all_layer_kv_cache_cpu``), and the PyPI wheel of sglang-kernel ships only CUDA
libraries, whose loading fails without ``libcuda.so.1``; SGLang's CPU build of the kernels
is not on PyPI (and targets AVX-512/AMX Xeons). The stand-in is the same package without
its compiled libraries: every op it would have loaded raises NotImplementedError when
called. On the tiny Llama with ``--attention-backend torch_native --sampling-backend
pytorch`` no op is called: the model runs on torch's own CPU operators. Never use it on a
GPU (the tests and the example only put it on PYTHONPATH when no CUDA device is visible).

    python tests/sglang_engine/stub_sgl_kernel.py DEST      # then PYTHONPATH=DEST
"""

from __future__ import annotations

import shutil
import sys
from importlib.util import find_spec
from pathlib import Path

# The two statements of sgl_kernel/__init__.py (sglang-kernel 0.4.10) that load the CUDA
# libraries, and what replaces them.
REPLACE = {
    "common_ops = _load_architecture_specific_ops()": "common_ops = None  # CPU stub: no compiled ops",
    "        _preload_cuda_library()": "        pass  # CPU stub: no CUDA library",
}

MISSING = '''

def __getattr__(name):
    """CPU stub: an op of the compiled library, which this stand-in does not have."""
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not available in the CPU stub of sgl_kernel")

    return missing
'''


def build(dest: Path) -> Path:
    spec = find_spec("sgl_kernel")
    if spec is None or spec.origin is None:
        sys.exit("sgl_kernel is not installed in this interpreter's environment (pip install sglang)")
    source = Path(spec.origin).parent
    target = dest / "sgl_kernel"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("sm90", "sm100", "*.so", "__pycache__"))
    init = target / "__init__.py"
    text = init.read_text()
    for old, new in REPLACE.items():
        if text.count(old) != 1:
            sys.exit(f"{source}/__init__.py no longer holds {old.strip()!r} once: update {__file__} for this sglang-kernel")
        text = text.replace(old, new)
    init.write_text(text + MISSING)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DEST")
    print(f"CPU stub of sgl_kernel: {build(Path(sys.argv[1]))}")
