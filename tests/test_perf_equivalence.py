"""Optimised building blocks equal the straightforward formulas of METHOD.md
section 5 (values and gradients), so the speed-ups change no math."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsu_models.nn.layers import (Chain, SNPReLU, WNConv2d, WNConvTranspose2d, WNLinear,
                                  snprelu)


def _plain_snprelu(x, b, a):
    """The straightforward formula, differentiated by autograd."""
    cdf = 0.5 * (1.0 + torch.erf(b / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * b * b) / math.sqrt(2.0 * math.pi)
    pos_mean = b * cdf + pdf
    pos_sq = (b * b + 1.0) * cdf + b * pdf
    mean = pos_mean + a * (b - pos_mean)
    var = pos_sq + a * a * (b * b + 1.0 - pos_sq) - mean * mean
    std = var.clamp_min(1e-8).sqrt()
    view = [1, -1] + [1] * (x.dim() - 2)
    return (F.prelu(x + b.view(view), a) - mean.view(view)) / std.view(view)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 5, 6)])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_snprelu_gradcheck(shape, frozen):
    """``frozen``: the activation's own parameters need no gradient (a frozen
    network that gradients only pass through), the path that skips the
    per-channel coefficients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    b = (torch.randn(shape[1], generator=g, dtype=torch.float64) * 0.7).requires_grad_(not frozen)
    a = (torch.rand(shape[1], generator=g, dtype=torch.float64) * 1.4 - 0.2).requires_grad_(not frozen)

    def fn(x, b, a):
        view = [1, -1] + [1] * (x.dim() - 2)
        return snprelu(x + b.view(view), b, a)

    assert torch.autograd.gradcheck(fn, (x, b, a))
    out, plain = fn(x, b, a), _plain_snprelu(x, b, a)
    torch.testing.assert_close(out, plain)
    w = torch.randn_like(out)
    inputs = (x,) if frozen else (x, b, a)
    grads = torch.autograd.grad((out * w).sum(), inputs)
    plain_grads = torch.autograd.grad((plain * w).sum(), inputs)
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want)


def test_snprelu_module_and_shifted_path_agree():
    torch.manual_seed(0)
    act = SNPReLU(4)
    with torch.no_grad():
        act.bias.normal_()
        act.slope.uniform_(0.0, 1.0)
    conv = WNConv2d(3, 4, 3, 1, 1)
    x = torch.randn(2, 3, 6, 6)
    fused = Chain(conv, act)(x)
    plain = _plain_snprelu(conv(x), act.bias, act.slope)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(act(conv(x)), plain, rtol=1e-5, atol=1e-5)
    mean, std = act.output_moments()
    assert mean.shape == std.shape == (4,)


def _plain_wn(weight, unit_dim, scale, gain):
    dims = tuple(d for d in range(weight.dim()) if d != unit_dim)
    norm = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
    shape = [1] * weight.dim()
    shape[unit_dim] = -1
    factor = gain / norm
    if scale is not None:
        factor = factor * scale.view(shape)
    return weight * factor


@pytest.mark.parametrize("affine", [False, True])
def test_weight_norm_matches_formula(affine):
    torch.manual_seed(0)
    layers = [(WNLinear(5, 7, affine), 0, 1.0), (WNConv2d(3, 4, 3, affine=affine), 0, 1.0),
              (WNConvTranspose2d(3, 4, 4, 2, 1, affine=affine), 1, 2.0)]
    for layer, unit_dim, gain in layers:
        layer.double()
        if affine:
            with torch.no_grad():
                layer.scale.uniform_(0.5, 2.0)
        got = layer.normalised_weight()
        want = _plain_wn(layer.weight, unit_dim, layer.scale, gain)
        torch.testing.assert_close(got, want)
        w = torch.randn_like(got)
        params = [layer.weight] + ([layer.scale] if affine else [])
        for g1, g2 in zip(torch.autograd.grad((got * w).sum(), params),
                          torch.autograd.grad((want * w).sum(), params)):
            torch.testing.assert_close(g1, g2)


def test_chain_folding_equals_plain_sequential():
    """Folding each activation's shift into the previous layer's bias changes
    neither the values nor the gradients of a whole network."""
    from torch import nn

    from dsu_models.nn.networks import Generator

    torch.manual_seed(0)
    gen = Generator(3, 16, [8, 16], [2, 1], 32, 1, code_size=5).double()
    for p in gen.parameters():
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    z = torch.randn(4, 10, dtype=torch.float64)

    def plain_forward(z):
        h = nn.Sequential.forward(gen.fc.body, z)
        top = nn.Sequential.forward(gen.fc.top, h).view(-1, *gen.fc.top_shape)
        return nn.Sequential.forward(gen.conv.levels, top)

    w = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    params = list(gen.parameters())
    fused = gen(z)[0]
    plain = plain_forward(z)
    torch.testing.assert_close(fused, plain)
    for g1, g2 in zip(torch.autograd.grad((fused * w).sum(), params, allow_unused=True),
                      torch.autograd.grad((plain * w).sum(), params, allow_unused=True)):
        if g1 is None or g2 is None:
            assert g1 is None and g2 is None
        else:
            torch.testing.assert_close(g1, g2)
