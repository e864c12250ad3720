"""The one switch that runs every network on the reference path of ``plain.py``
(the formulas, differentiated by autograd) instead of the fast path of
``layers.py``, with the same parameters; and plain Adam in place of the fused one.
``tests/test_perf_equivalence.py`` checks the fast path against it and
``benchmarks/stage_throughput.py`` times it as the baseline.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dsu_models.nn import layers, networks
from dsu_models.nn.plain import avg_pool_2x2, residual_add, snprelu, upsample_2x, weight_norm


@contextmanager
def swapped(replacements):
    """Within the block each ``(owner, name, fn)`` has ``owner.name = fn``; the
    originals are put back after it (also on an error)."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    try:
        for owner, name, fn in replacements:
            setattr(owner, name, fn)
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _reference_layers() -> list:
    def linear(self, x, extra_bias=None):
        return F.linear(x, weight_norm(self.weight, 0, self.scale, 1.0),
                        layers._with_extra(self.bias, extra_bias))

    def conv(self, x, extra_bias=None):
        return F.conv2d(x, weight_norm(self.weight, 0, self.scale, 1.0),
                        layers._with_extra(self.bias, extra_bias), self.stride, self.padding)

    def conv_transpose(self, x, extra_bias=None):
        return F.conv_transpose2d(x, weight_norm(self.weight, 1, self.scale, self.gain),
                                  layers._with_extra(self.bias, extra_bias), self.stride, self.padding)

    return [(layers.WNLinear, "forward", linear), (layers.WNConv2d, "forward", conv),
            (layers.WNConvTranspose2d, "forward", conv_transpose),
            (layers.SNPReLU, "forward", lambda self, x: snprelu(x, self.bias, self.slope)),
            (layers.ResidualAdd, "forward",
             lambda self, shortcut, residual: residual_add(shortcut, residual, self.alpha, self.beta)),
            (layers.Chain, "forward", nn.Sequential.forward),      # no bias folding
            (networks, "avg_pool_2x2", avg_pool_2x2), (networks, "upsample_2x", upsample_2x),
            (networks, "layer_act", lambda layer, act, x: act(layer(x)))]


def plain_layers():
    """Context manager: within it every network runs the reference path (the
    formulas above, autograd for the gradients) with its own parameters; outside
    it, the fast path of ``layers.py``. The one switch between the two."""
    return swapped(_reference_layers())


def plain_optimizers(stage) -> None:
    """Replace the stage's (fused) Adam optimizers by ``torch.optim.Adam`` with its
    defaults (on CPU, a loop over the parameters), same groups and settings."""
    for key, opt in stage.optimizers.items():
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")}
                  for g in opt.param_groups]
        stage.optimizers[key] = torch.optim.Adam(groups)
