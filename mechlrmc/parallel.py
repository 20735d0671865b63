"""A recorded model as it is trained: wrapped (DDP, DataParallel, `torch.compile`), sharded (FSDP2's
`fully_shard`) or on one of several processes (`torch.distributed`).

- `unwrap`: the user's own module under any number of wrappers, so checkpoints carry its own
  parameter names (no `module.` or `_orig_mod.` prefixes) and an evaluation runs its plain forward,
  which under DDP broadcasts nothing (a forward of the DDP wrapper on one rank alone would wait for
  the others' buffers).
- `is_sharded`: parameters that are DTensor shards (`fully_shard`); their forward gathers the
  shards, a collective every rank must join, and so does gathering the full weights.
- `full_state_dict`: the whole state dict on rank 0 (a collective on every rank for a sharded
  model; the local one otherwise).
- `gather_rng`: every rank's CPU RNG state on every rank (the resume state keeps each rank's own).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank() -> int:
    """This process's rank (0 outside `torch.distributed`)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are DTensor shards (FSDP2's `fully_shard`)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict: gathered to rank 0 on CPU for a sharded model (every rank must call;
    the other ranks get {}), else the module's own."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_rng() -> list[torch.Tensor]:
    """Every rank's `torch.get_rng_state()`, rank by rank (a collective; one element outside
    `torch.distributed`)."""
    state = torch.get_rng_state()
    if world_size() == 1:
        return [state]
    states = [torch.empty_like(state) for _ in range(world_size())]
    if dist.get_backend() == "nccl":  # NCCL gathers CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device())
        cuda_states = [s.to(device) for s in states]
        dist.all_gather(cuda_states, state.to(device))
        return [s.cpu() for s in cuda_states]
    dist.all_gather(states, state)
    return states
