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


def allreduce_gradients(stage, losses: torch.Tensor) -> torch.Tensor:
    """Average every trainable parameter's gradient and the iteration's loss
    values over the workers, in one flat all-reduce; returns the mean losses
    (non-finite wherever any worker's is). Parameters without a gradient this
    step are skipped (the same ones on every rank: all ranks run the same code
    path)."""
    params = [p for p in stage.trainable_parameters() if p.grad is not None]
    grads = [p.grad.reshape(-1) for p in params]
    flat = torch.cat([*grads, losses.reshape(-1).to(grads[0].dtype if grads else losses.dtype)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
    return flat[offset:].to(losses)


def sum_over_workers(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the workers, differentiable: its backward sums the
    incoming gradients over the workers too, which with the averaged parameter
    gradients gives the gradient of a loss of global-batch statistics (as
    SyncBatchNorm does)."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def broadcast_state(stage) -> None:
    """Rank 0's parameters and buffers to every rank (identical start)."""
    for module in stage.models.values():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)
