"""The Triton backend of ``corrpo.token_stats`` and ``corrpo.token_stats_from_hidden``.

Input goes to the device once (host arrays through a pinned staging buffer), a kernel of
``corrpo_kernels`` runs, and its results come back in one transfer. The kernels only flag
faulty rows; the first one is handed to the native backend (``_cpu``), so that the error
raised (class, message, row, rollout) is exactly the one the CPU path raises.

Like ``_cpu``, this module sits below the dispatchers (``stats.py``, ``from_hidden.py``):
it takes their checked ids, settings and rollout lengths, and returns the columns of
``TokenStats`` as a tuple.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np

from ._arrays import check_logits_shape, is_torch, logits_buffer
from ._cpu import Columns, head_grad_norm
from ._cpu import token_stats as native_token_stats
from .errors import ConfigError, InvalidValueError

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


class Logits(NamedTuple):
    """Logits staged for the kernels: the tensor on their device, and the host buffer it was
    copied from (None for torch input), from which a flagged row is read without a transfer."""

    tensor: Any
    host: tuple[np.ndarray, str] | None

    @property
    def rows(self) -> int:
        return self.tensor.shape[0]

    def row(self, r: int) -> tuple[np.ndarray, str]:
        """Row `r` as a buffer of the native core."""
        if self.host is None:
            return logits_buffer(self.tensor[r : r + 1].cpu())
        array, dtype = self.host
        return array[r : r + 1], dtype


def stage_logits(logits: Any) -> Logits:
    """`logits` (any input ``token_stats`` takes) on the kernels' device, checked for shape
    and dtype. Raises ConfigError first when the backend cannot run here."""
    torch, _, interpret = _modules()
    where = device(torch, logits.device if is_torch(logits) else None, interpret)
    if not is_torch(logits):
        host = logits_buffer(logits)
        return Logits(_host_to_device(torch, *host, where), host)
    tensor = logits.detach()
    check_logits_shape(tuple(tensor.shape))
    if tensor.dtype == torch.float64:
        tensor = tensor.float()
    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"logits must be float32, float16 or bfloat16, got {tensor.dtype}")
    if (tensor.shape[1] > 1 and tensor.stride(1) != 1) or tensor.stride(0) < 0:
        tensor = tensor.contiguous()
    return Logits(tensor.to(where), None)


def _host_to_device(torch: Any, array: np.ndarray, dtype: str, where: Any) -> Any:
    """A host array (float32, or the uint16 bits of float16/bfloat16) as a tensor on `where`."""
    bits = dtype != "float32"
    host = torch.empty(array.shape, dtype=torch.int16 if bits else torch.float32, pin_memory=where.type == "cuda")
    np.copyto(host.numpy(), array.view(np.int16) if bits else array)
    if bits:
        host = host.view(torch.float16 if dtype == "float16" else torch.bfloat16)
    return host.to(where, non_blocking=True)


def stage_hidden(hidden: Any, weight: Any) -> tuple[Any, Any]:
    """Checked torch hidden states and LM-head weight on the kernels' device. Raises
    ConfigError when the backend cannot run here."""
    torch, _, interpret = _modules()
    where = device(torch, hidden.device, interpret)
    return hidden.to(where), weight.to(where)


def _check_settings(kernels: Any, temperature: float, norms: np.ndarray | None) -> None:
    """What the native core checks before it reads a row, with its messages; the kernels
    never see the norms and take 1/temperature as a float32."""
    if norms is not None:
        bad = np.flatnonzero(~(np.isfinite(norms) & (norms >= 0)))
        if bad.size:
            i = int(bad[0])
            raise InvalidValueError(
                f"hidden_norms[{i}]: {norms[i]} is not a finite non-negative norm", field="hidden_norms", index=i
            )
    try:
        kernels.launch.inverse_temperature(temperature)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _collect(
    out: Any,
    ids: np.ndarray,
    temperature: float,
    norms: np.ndarray | None,
    spans: np.ndarray | None,
    row_logits: Callable[[int], tuple[np.ndarray, str]],
) -> Columns:
    """Host results, or the native core's error for the first row the kernel flagged."""
    stats = out.stats.cpu().numpy()
    flagged = np.flatnonzero(out.fault.cpu().numpy())
    if flagged.size:
        row = int(flagged[0])
        array, dtype = row_logits(row)
        native_token_stats(array, dtype, ids[row : row + 1], temperature, None, spans, first_row=row)
        raise RuntimeError(
            f"corrpo's Triton kernel flagged row {row} ({out.fault_name(row)}), but the native core finds the "
            "row valid; please report this with the row's logits"
        )
    head = None if norms is None else head_grad_norm(stats[3], norms)
    return stats[0], stats[1], stats[2], stats[3], head


def token_stats(
    logits: Logits, ids: np.ndarray, temperature: float, norms: np.ndarray | None, spans: np.ndarray | None
) -> Columns:
    """The statistics of staged logits; ids, norms and spans checked against its rows."""
    torch, kernels, interpret = _modules()
    _check_settings(kernels, temperature, norms)
    z = logits.tensor
    with _launching(interpret):
        out = kernels.token_stats(z, torch.from_numpy(ids).to(z.device), temperature=temperature)
    return _collect(out, ids, temperature, norms, spans, logits.row)


def token_stats_from_hidden(h: Any, w: Any, ids: np.ndarray, temperature: float, spans: np.ndarray | None) -> Columns:
    """`h` and `w`: from ``stage_hidden``, of one half or float32 dtype."""
    torch, kernels, interpret = _modules()
    _check_settings(kernels, temperature, None)
    with _launching(interpret):
        out = kernels.token_stats_from_hidden(h, w, torch.from_numpy(ids).to(h.device), temperature=temperature)
    norms = torch.linalg.vector_norm(h, dim=1, dtype=torch.float32).cpu().numpy()

    def row_logits(r: int) -> tuple[np.ndarray, str]:
        h_r = h[r].float()
        parts = [w[i : i + _EXPLAIN_ROWS].float() @ h_r for i in range(0, w.shape[0], _EXPLAIN_ROWS)]
        return torch.cat(parts)[None].cpu().numpy(), "float32"

    return _collect(out, ids, temperature, norms, spans, row_logits)
