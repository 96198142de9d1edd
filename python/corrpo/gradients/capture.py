"""Forward hooks that record what the measures need, and the model state they need.

While a ``Capture`` is open the model's parameters are frozen (restored on exit): the
measures differentiate with respect to module *outputs* and rebuild parameter gradients
per seed, so autograd never accumulates a ``.grad`` and never spends work on one. The
input embeddings are made to require grad instead, so a graph exists even then.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .architecture import Architecture, ArchitectureError, is_conv1d
from .handlers import Call, GenericHandler, Handler, LinearHandler


def _detach(value: object) -> object:
    return value.detach() if isinstance(value, torch.Tensor) else value


class Capture:
    """Hooks on every module of the chosen blocks that owns parameters, on the LM head's
    input, and on the input embeddings."""

    def __init__(self, model: nn.Module, arch: Architecture, blocks: list[int]) -> None:
        self.model = model
        self.arch = arch
        self.handlers: list[Handler] = []
        parts: dict[str, list] = {}  # module path in a block -> the q/k/v/o row sets it holds
        for part in arch.layout.parts:
            parts.setdefault(part.module, []).append(part.rows)
        for b in blocks:
            for name, module in arch.blocks[b].named_modules():
                if not any(True for _ in module.parameters(recurse=False)):
                    continue
                linear = isinstance(module, nn.Linear) or is_conv1d(module)
                kind = LinearHandler if linear else GenericHandler
                self.handlers.append(kind(module=module, block=b, parts=parts.get(name, [])))
        self.blocks = blocks
        # Each chosen block's input hidden states (in the graph), for the exact measure's
        # block-by-block backward on long prefixes.
        self.block_inputs: dict[int, torch.Tensor] = {}
        self.head_input: torch.Tensor | None = None
        # The autocast dtype the LM head ran under in the last forward (None: none; kept
        # across ``reset``): trainers wrap the forward in torch.autocast (accelerate's mixed
        # precision), and the seed checks must recompute the head as the model did.
        self.head_autocast: torch.dtype | None = None
        self.recording = True
        self._hooks: list = []
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        forward = getattr(model, "forward", None)
        self.keeps_logits = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters

    def __enter__(self) -> Capture:
        self._frozen = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._frozen:
            p.requires_grad_(False)
        for handler in self.handlers:
            self._hooks.append(handler.module.register_forward_hook(self._recorder(handler), with_kwargs=True))
        for b in self.blocks:
            self._hooks.append(self.arch.blocks[b].register_forward_pre_hook(self._block_hook(b), with_kwargs=True))
        self._hooks.append(self.arch.head.register_forward_pre_hook(self._head_hook))
        embed = self.model.get_input_embeddings()
        self._hooks.append(embed.register_forward_hook(self._embed_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self.reset()

    def reset(self) -> None:
        for handler in self.handlers:
            handler.calls.clear()
        self.head_input = None
        self.block_inputs.clear()

    def _recorder(self, handler: Handler):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            if not self.recording:
                return
            if not isinstance(output, torch.Tensor):
                raise ArchitectureError(f"{type(module).__name__} returns {type(output).__name__}, not a tensor")
            handler.calls.append(
                Call(tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}, output)
            )

        return hook

    def _block_hook(self, b: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.recording:
                hidden = args[0] if args else kwargs.get("hidden_states")
                if isinstance(hidden, torch.Tensor):
                    self.block_inputs[b] = hidden

        return hook

    def _head_hook(self, module: nn.Module, args: tuple) -> None:
        if self.recording:
            self.head_input = args[0]
            device = args[0].device.type
            on = torch.is_autocast_enabled(device)
            self.head_autocast = torch.get_autocast_dtype(device) if on else None

    def _embed_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.recording and torch.is_grad_enabled() and not output.requires_grad:
            output.requires_grad_()
        return output

    def outputs(self) -> list[torch.Tensor]:
        return [call.output for handler in self.handlers for call in handler.calls]

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of ``ids`` [1, P]; returns the LM head's input at the rows ``keep``
        [1, m, d] in the graph, and the model's logits there [m, V]. Models that take
        ``logits_to_keep`` apply their head to those rows only."""
        self.reset()
        kwargs = {"use_cache": False}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = keep
        logits = self.model(input_ids=ids, **kwargs).logits
        h = self.head_input
        if h is None:
            raise ArchitectureError(f"{type(self.model).__name__}: its LM head was not called in the forward")
        if h.shape[1] != len(keep):
            h, logits = h[:, keep], logits[:, keep]
        return h, logits[0]
