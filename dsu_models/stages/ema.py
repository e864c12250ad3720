"""An exponential moving average of networks' weights (``stage2.ema_decay``).

GAN generators are read from an average of their recent weights rather than
the last iterate, which oscillates with the adversary (Karras et al.'s
progressive GANs and StyleGAN, Yazici et al. 2019, "The unusual effectiveness
of averaging in GAN training"). Stage 2 keeps such an average of G2 and of
its label side (B2 or S) and hands it on, so evaluation, the labeled encoder's
training and inference all see the averaged generator; the training itself is
unchanged. Not in docs/method.md: ``ema_decay: 0`` (the default) is the method.

The update is device work only (no host sync, captured in the step's CUDA
graph): ``avg <- avg + (1 - d) (w - avg)`` with ``d = min(decay, (1 + n) /
(10 + n))`` after the n-th update, so early on, when the average would still be
mostly the starting weights, it follows the weights closely.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class WeightAverage:
    """``copies[name]``: a frozen copy of ``modules[name]`` holding the average;
    :meth:`update` after every optimizer step. Buffers are copied, not averaged."""

    def __init__(self, modules: dict[str, nn.Module], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}")
        self.sources = modules
        self.copies = {name: copy.deepcopy(m).requires_grad_(False) for name, m in modules.items()}
        self.decay = decay
        device = next(iter(modules.values())).parameters().__next__().device
        self.updates = torch.zeros((), dtype=torch.float32, device=device)

    def _pairs(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        avg, src, avg_buf, src_buf = [], [], [], []
        for name, module in self.sources.items():
            avg += list(self.copies[name].parameters())
            src += [p.detach() for p in module.parameters()]
            avg_buf += list(self.copies[name].buffers())
            src_buf += list(module.buffers())
        return avg, src, avg_buf, src_buf

    @torch.no_grad()
    def update(self) -> None:
        self.updates.add_(1.0)
        decay = torch.clamp((1.0 + self.updates) / (10.0 + self.updates), max=self.decay)
        avg, src, avg_buf, src_buf = self._pairs()
        torch._foreach_lerp_(avg, src, 1.0 - decay)
        for a, s in zip(avg_buf, src_buf):
            a.copy_(s)
