"""Compiles every Triton kernel for NVIDIA GPUs with Triton's real compiler, down to a cubin
(ptxas ships with triton), without a GPU, and reports each one's registers and spills
(cuobjdump ships with triton too). The interpreter runs the kernels as Python and accepts
code the compiler rejects (non-constexpr globals, mixed types), so the tests run this too,
in a process without TRITON_INTERPRET.

    python tests/compile_kernels.py 80 90
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from corrpo_kernels import from_hidden, from_logits

TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOATS = tuple(TORCH)


def signature(kernel, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Types of the kernel's arguments as the launchers pass them."""
    def kind(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name in pointers:
            return pointers[name]
        return "fp32" if name == "inv_tau" else "i32"

    return {name: kind(name) for name in kernel.arg_names}


def variants(dtype: str):
    out = {"stats_ptr": "*fp32", "fault_ptr": "*i8", "ids_ptr": "*i64", "part_ptr": "*fp32"}
    for vocab in (1000, 151_936):
        yield (f"token_stats[{dtype}, V={vocab}]", from_logits._token_stats_kernel,
               {**out, "logits_ptr": f"*{dtype}"}, {}, from_logits.default_config(vocab))
    fused = {"PRECISION": "ieee" if dtype == "fp32" else "tf32", "WIDEN": False}
    yield (f"fused partial[{dtype}]", from_hidden._partial_kernel,
           {**out, "h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}"}, fused, from_hidden.default_config(TORCH[dtype]))
    yield ("fused merge", from_hidden._merge_kernel, out, {}, {"BLOCK_T": from_hidden.MERGE_ROWS, "num_warps": 4})


def split(config: dict) -> tuple[dict, dict]:
    """A launch config as (constexpr arguments, compiler options)."""
    options = {k: v for k, v in config.items() if k.startswith("num_")}
    return {k: v for k, v in config.items() if k not in options}, options


def resources(cubin: bytes) -> dict[str, int]:
    """REG, STACK (spilled bytes), SHARED... of a cubin, as cuobjdump reports them."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    line = next(line for line in report.stdout.splitlines() if "REG:" in line)
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


def main(archs: list[int]) -> None:
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for dtype in FLOATS:
            for name, kernel, pointers, fixed, config in variants(dtype):
                meta, options = split(config)
                constexprs = {**fixed, **meta}
                source = ASTSource(kernel, signature(kernel, pointers, constexprs), constexprs=constexprs)
                compiled = triton.compile(source, target=target, options=options)
                use = resources(compiled.asm["cubin"])
                print(f"sm_{arch} {name}: compiled, {use['REG']} registers, {use['STACK']} bytes spilled")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90])
