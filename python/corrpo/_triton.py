"""The Triton backend of ``corrpo.token_stats`` and ``corrpo.token_stats_from_hidden``.

Input goes to the device (host arrays through a pinned staging buffer), a kernel of
``corrpo_kernels`` runs, and its results come back in one transfer. The kernels only flag
faulty rows; the first one is handed to the native core, so that the error raised (class,
message, row, rollout) is exactly the one the CPU path raises.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np

from ._arrays import check_logits_shape, is_torch, lengths_vector, logits_buffer, real, vector
from .errors import ConfigError, InvalidValueError
from .stats import TokenStats, head_grad_norm, native_stats

# Rows of the LM-head weight per product when a faulty row's logits are recomputed.
_EXPLAIN_ROWS = 8192

# Triton's interpreter patches triton.language while it runs a kernel: one run at a time.
_INTERPRETER = threading.Lock()


def _launching(interpret: bool) -> Any:
    return _INTERPRETER if interpret else nullcontext()


def _modules() -> tuple[Any, Any, bool]:
    """torch, corrpo_kernels, and whether Triton runs its CPU interpreter."""
    try:
        import corrpo_kernels
        import torch
        from triton import knobs
    except ImportError as err:
        raise ConfigError(f"the Triton backend needs torch, triton and corrpo-kernels (pip install corrpo-kernels): {err}") from None
    return torch, corrpo_kernels, knobs.runtime.interpret


def device(torch: Any, where: Any, interpret: bool) -> Any:
    """Where the kernels run: CUDA tensors stay on their device; host input goes to the
    current CUDA device, or stays on the CPU under Triton's interpreter."""
    if where is not None and where.type == "cuda":
        return where
    if interpret:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    raise ConfigError(
        "the Triton backend needs a CUDA device, and none is visible (TRITON_INTERPRET=1 runs the "
        "kernels on the CPU through Triton's interpreter, for tests)"
    )


def describe() -> str:
    """Where host input is reduced: the CUDA device's name, or "interpreter". Raises
    ConfigError when the backend cannot run here."""
    torch, _, interpret = _modules()
    where = device(torch, None, interpret)
    return "interpreter" if where.type == "cpu" else torch.cuda.get_device_name(where)


def _host_to_device(torch: Any, array: np.ndarray, dtype: str, where: Any) -> Any:
    """A host array (float32, or the uint16 bits of float16/bfloat16) as a tensor on `where`."""
    bits = dtype != "float32"
    host = torch.empty(array.shape, dtype=torch.int16 if bits else torch.float32, pin_memory=where.type == "cuda")
    np.copyto(host.numpy(), array.view(np.int16) if bits else array)
    if bits:
        host = host.view(torch.float16 if dtype == "float16" else torch.bfloat16)
    return host.to(where, non_blocking=True)


def _device_logits(torch: Any, logits: Any, where: Any) -> Any:
    if not is_torch(logits):
        array, dtype = logits_buffer(logits)
        return _host_to_device(torch, array, dtype, where)
    tensor = logits.detach()
    check_logits_shape(tuple(tensor.shape))
    if tensor.dtype == torch.float64:
        tensor = tensor.float()
    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"logits must be float32, float16 or bfloat16, got {tensor.dtype}")
    if (tensor.shape[1] > 1 and tensor.stride(1) != 1) or tensor.stride(0) < 0:
        tensor = tensor.contiguous()
    return tensor.to(where)


def _temperature(kernels: Any, value: Any) -> float:
    temperature = real(value, "temperature")
    try:
        kernels.launch.inverse_temperature(temperature)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return temperature


def _norms(hidden_norms: Any, rows: int) -> np.ndarray | None:
    if hidden_norms is None:
        return None
    norms = vector(hidden_norms, np.float32, "hidden_norms", rows)
    bad = np.flatnonzero(~(np.isfinite(norms) & (norms >= 0)))
    if bad.size:
        i = int(bad[0])
        raise InvalidValueError(
            f"hidden_norms[{i}]: {norms[i]} is not a finite non-negative norm", field="hidden_norms", index=i
        )
    return norms


def _collect(
    out: Any,
    ids: np.ndarray,
    temperature: float,
    norms: np.ndarray | None,
    spans: np.ndarray | None,
    row_logits: Callable[[int], Any],
) -> TokenStats:
    """Host results, or the native core's error for the first row the kernel flagged."""
    stats = out.stats.cpu().numpy()
    faults = out.fault.cpu().numpy()
    flagged = np.flatnonzero(faults)
    if flagged.size:
        row = int(flagged[0])
        array, dtype = logits_buffer(row_logits(row))
        native_stats(array, dtype, ids[row : row + 1], temperature, None, spans, first_row=row)
        raise RuntimeError(
            f"corrpo's Triton kernel flagged row {row} ({out.fault_name(row)}), but the native core finds the "
            "row valid; please report this with the row's logits"
        )
    head = None if norms is None else head_grad_norm(stats[3], norms)
    return TokenStats(entropy=stats[0], logprob=stats[1], collision=stats[2], grad_norm=stats[3], head_grad_norm=head)


def token_stats(logits: Any, token_ids: Any, temperature: Any, hidden_norms: Any, lengths: Any) -> TokenStats:
    torch, kernels, interpret = _modules()
    where = device(torch, logits.device if is_torch(logits) else None, interpret)
    z = _device_logits(torch, logits, where)
    rows = z.shape[0]
    ids = vector(token_ids, np.int64, "token_ids", rows)
    norms = _norms(hidden_norms, rows)
    spans = None if lengths is None else lengths_vector(lengths, rows, "logits")
    temperature = _temperature(kernels, temperature)
    with _launching(interpret):
        out = kernels.token_stats(z, torch.from_numpy(ids).to(where), temperature=temperature)
    return _collect(out, ids, temperature, norms, spans, lambda r: z[r : r + 1].cpu())


def token_stats_from_hidden(hidden: Any, weight: Any, token_ids: Any, temperature: Any, lengths: Any) -> TokenStats:
    """`hidden` and `weight`: checked torch tensors of one half or float32 dtype on one device."""
    torch, kernels, interpret = _modules()
    where = device(torch, hidden.device, interpret)
    h, w = hidden.detach().to(where), weight.detach().to(where)
    rows = h.shape[0]
    ids = vector(token_ids, np.int64, "token_ids", rows)
    spans = None if lengths is None else lengths_vector(lengths, rows, "hidden")
    temperature = _temperature(kernels, temperature)
    with _launching(interpret):
        out = kernels.token_stats_from_hidden(h, w, torch.from_numpy(ids).to(where), temperature=temperature)
    norms = torch.linalg.vector_norm(h, dim=1, dtype=torch.float32).cpu().numpy()

    def row_logits(r: int) -> Any:
        h_r = h[r].float()
        parts = [w[i : i + _EXPLAIN_ROWS].float() @ h_r for i in range(0, w.shape[0], _EXPLAIN_ROWS)]
        return torch.cat(parts)[None].cpu()

    return _collect(out, ids, temperature, norms, spans, row_logits)
