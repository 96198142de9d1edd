"""The measure on data-parallel and sharded policies: what ``token_strengths`` does before it
touches a model's weights.

- ``DistributedDataParallel`` (and ``DataParallel``) hold the whole model on each rank:
  ``unwrap`` takes their ``.module``, whose forward involves no collective (DDP's own
  forward may broadcast buffers, which would tie ranks together).
- FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each rank's shard of every parameter
  as a DTensor and all-gathers a module's parameters in its forward hook, one module at a
  time, and reshards them after. The measure's per-token backward passes reach every
  block, and each rank scores its own sequences, so ranks run different numbers of
  forwards and backwards: gathering per module, as FSDP does, would need the ranks'
  collectives to line up. ``whole_parameters`` instead all-gathers every FSDP2 module once
  (``FSDPModule.unshard``: a collective, so every rank must enter it, in the same order),
  and scores with no collective at all after that.
  **Cost: the whole model's parameters (in FSDP's ``param_dtype``) on each rank while
  scoring**, on top of its shard; no gradients are kept (the parameters are frozen while
  scoring). Resharded on exit.
- DeepSpeed ZeRO-3 partitions every parameter and gathers them in hooks on every submodule,
  whose prefetching follows a trace of the forwards: the same problem. ``whole_parameters``
  gathers them all once (``deepspeed.zero.GatheredParameters``, a collective) and takes
  DeepSpeed's forward hooks off the modules while scoring (as TRL does to generate under
  ZeRO-3), then puts them back and repartitions. Same cost: the whole model on each rank.
  (The ``DeepSpeedEngine`` wrapper itself is unwrapped like DDP.)
- FSDP1 (``FullyShardedDataParallel``) gathers inside each wrapped submodule's own forward,
  so it cannot be scored rank by rank: it is a clear error. So is a parameter still a
  DTensor once gathered (tensor or sequence parallelism).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..errors import ConfigError


def unwrap(model: nn.Module) -> nn.Module:
    """``model`` without its data-parallel wrappers; an FSDP1-wrapped model is an error."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    # DeepSpeedEngine is matched by name: deepspeed need not be installed.
    while isinstance(model, (DistributedDataParallel, DataParallel)) or type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ConfigError(
            "the model is wrapped in FSDP1 (FullyShardedDataParallel), which gathers parameters inside each "
            "wrapped module's forward, so ranks cannot score different sequences; shard it with FSDP2 "
            "(torch.distributed.fsdp.fully_shard; accelerate: fsdp_version 2) or score an unsharded copy",
            field="model",
        )
    return model


@contextmanager
def whole_parameters(model: nn.Module) -> Iterator[None]:
    """Every parameter of ``model`` whole on this rank for the duration (see the module's
    docstring for what it costs); a model neither FSDP2-sharded nor ZeRO-3-partitioned is
    left as it is."""
    from torch.distributed.tensor import DTensor

    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3's partitioned parameters
    with (_zero3_gathered if zero3 else _fsdp2_gathered)(model):
        split = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
        if split:
            raise ConfigError(
                f"{split[0]} (and {len(split) - 1} more parameters) is still a DTensor after gathering: tensor or "
                "sequence parallelism is not supported; corrpo scores whole parameters (FSDP2, ZeRO-3, DDP)",
                field="model",
            )
        yield


@contextmanager
def _fsdp2_gathered(model: nn.Module) -> Iterator[None]:
    """FSDP2's parameters, gathered.

    FSDP2's forward hooks stay on the modules (they apply its mixed-precision casts), but
    each of its states is put in the state FSDP gives a forward that recomputes activations
    during backward: its hooks then cast and do nothing else (no gather, no reshard, no
    backward hooks, no record of the forward), so FSDP's bookkeeping of training steps is
    untouched by scoring, however many forwards a rank runs. States are restored, and the
    parameters this gathered resharded, on exit. (These states and groups are FSDP2's
    private attributes, read as torch 2.15 has them: FSDP2 has no public switch for this.)"""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        yield
        return
    states = list({id(s): s for s in (m._get_fsdp_state() for m in sharded)}.values())
    before = [state._training_state for state in states]
    # Groups already whole (the root's, between a training forward and its backward) stay so.
    gathered = [g for s in states for g in s._fsdp_param_groups if not g.is_unsharded]
    for module in sharded:
        module.unshard()
    try:
        for state in states:
            state._training_state = TrainingState.PRE_BACKWARD
        yield
    finally:
        for state, was in zip(states, before):
            state._training_state = was
        for group in gathered:
            group.reshard()


@contextmanager
def _zero3_gathered(model: nn.Module) -> Iterator[None]:
    import deepspeed
    import torch.nn.functional as F
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        # DeepSpeed's hooks (fetch, release, prefetch by trace, backward bookkeeping) would
        # repartition the gathered parameters after each module and issue collectives.
        saved = []
        for module in model.modules():
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                before = list(hooks.items())
                for key, hook in before:
                    if (getattr(hook, "__module__", None) or "").startswith("deepspeed."):
                        del hooks[key]
                saved.append((hooks, before))
        # ZeRO-3 replaces F.linear process-wide by a memory-saving autograd.Function with no
        # forward-mode rule (the jvp estimator needs one); the plain F.linear is the same map.
        linear = F.linear
        F.linear = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", linear)
        try:
            yield
        finally:
            F.linear = linear
            for hooks, before in saved:
                added = [(key, hook) for key, hook in hooks.items() if key not in dict(before)]
                hooks.clear()
                hooks.update(before)
                hooks.update(added)
