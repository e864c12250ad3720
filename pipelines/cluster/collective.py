"""Data-parallel collectives for the stages' Ray Train workers (torch.distributed).

A stage iteration runs one backward pass over several losses. Instead of DDP
wrapping (which would hook every backward of every wrapped module),
:func:`allreduce_gradients` averages all gradients in one flat buffer between
the backward pass and the optimizer steps (``Stage.grad_sync``), and
:func:`broadcast_state` gives every rank rank 0's starting weights.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def allreduce_gradients(stage) -> None:
    """Average every trainable parameter's gradient over the workers, in one
    flat all-reduce. Parameters without a gradient this step are skipped (the
    same ones on every rank: all ranks run the same code path)."""
    params = [p for p in stage.trainable_parameters() if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def broadcast_state(stage) -> None:
    """Rank 0's parameters and buffers to every rank (identical start)."""
    for module in stage.models.values():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)
