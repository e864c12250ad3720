"""Optimised building blocks equal the straightforward formulas of docs/method.md
section 5 (values and gradients), so the speed-ups change no math."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsu_models.nn import plain as formula, reference
from dsu_models.nn.layers import (Chain, SNPReLU, WNConv2d, WNConvTranspose2d, WNLinear,
                                  snprelu)
from tests.tiny import load_benchmark


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
    out, plain = fn(x, b, a), formula.snprelu(x, b, a)
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
    plain = formula.snprelu(conv(x), act.bias, act.slope)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(act(conv(x)), plain, rtol=1e-5, atol=1e-5)
    mean, std = act.output_moments()
    assert mean.shape == std.shape == (4,)


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
        want = formula.weight_norm(layer.weight, unit_dim, layer.scale, gain)
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


@pytest.mark.parametrize("shape,pad", [((2, 3, 8, 8), 0), ((2, 3, 6, 6), 1), ((3, 2, 4, 6), 0),
                                       ((2, 3, 7, 7), 0)])
def test_pool_2x2_equals_avg_pool(shape, pad):
    """The strided-view pooling (even padded sizes) and aten's fallback (odd
    ones) give ``F.avg_pool2d``'s values and gradients."""
    from dsu_models.nn.layers import avg_pool_2x2

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    got = avg_pool_2x2(x, pad)
    want = F.avg_pool2d(x, 2, padding=pad, count_include_pad=True)
    torch.testing.assert_close(got, want)
    fast_path = (shape[-1] + 2 * pad) % 2 == 0
    assert ("_Pool2x2" in type(got.grad_fn).__name__) == fast_path
    w = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad((got * w).sum(), x)[0],
                               torch.autograd.grad((want * w).sum(), x)[0])
    assert torch.autograd.gradcheck(lambda t: avg_pool_2x2(t, pad), (x,))


@pytest.mark.parametrize("cin,cout,kernel,pad", [(5, 3, 6, 2), (4, 1, 6, 2), (3, 2, 10, 4)])
@pytest.mark.parametrize("input_grad", [True, False])
def test_subpixel_transposed_conv_equals_conv_transpose(cin, cout, kernel, pad, input_grad):
    """A generator's final layer (``k = 2p + 2``, stride 2) runs as a conv +
    pixel shuffle on CPU: same values and gradients as ``conv_transpose2d``,
    through the module (weight norm, affine scale, folded extra bias)."""
    torch.manual_seed(0)
    layer = WNConvTranspose2d(cin, cout, kernel, 2, pad, affine=True).double()
    with torch.no_grad():
        layer.scale.uniform_(0.5, 2.0)
        layer.bias.normal_()
    extra = torch.randn(cout, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, cin, 5, 4, dtype=torch.float64, requires_grad=input_grad)
    got = layer(x, extra)
    assert "_SubPixelConvTranspose" in type(got.grad_fn).__name__
    want = F.conv_transpose2d(x, layer.normalised_weight(), layer.bias + extra, 2, pad)
    assert got.shape == want.shape == (2, cout, 10, 8)
    torch.testing.assert_close(got, want)
    w = torch.randn_like(got)
    inputs = [layer.weight, layer.scale, layer.bias, extra] + ([x] if input_grad else [])
    for g1, g2 in zip(torch.autograd.grad((got * w).sum(), inputs),
                      torch.autograd.grad((want * w).sum(), inputs)):
        torch.testing.assert_close(g1, g2)
    if input_grad:
        assert torch.autograd.gradcheck(layer, (x, extra))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_benchmark_baseline_layers_compute_the_same_networks(dtype):
    """The throughput benchmark's straightforward baseline (plain-formula layers)
    and the fast layers give one generator + discriminator the same outputs and
    gradients, so the benchmark compares equal math; the swap is undone after.
    In float32 the fast layers include the C kernels of ``nn/native.py``."""
    from dsu_models.nn import native
    from dsu_models.nn.networks import Discriminator, Generator

    naive = load_benchmark("naive")
    torch.manual_seed(0)
    gen = Generator(3, 16, [8, 16], [2, 1], 32, 1, code_size=5).to(dtype)
    dis = Discriminator(6, 16, [8, 16], [1, 1], 32, 1).to(dtype)
    params = list(gen.parameters()) + list(dis.parameters())
    for p in params:
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    z = torch.randn(4, 10, dtype=dtype)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}

    def run():
        img = gen(z)[0]
        score = dis(torch.cat([img, img.flip(0)], 1))
        return img, score, torch.autograd.grad(score.square().sum() + img.sum(), params, allow_unused=True)

    fast = run()
    with reference.plain_layers():
        slow = run()
    again = run()
    for got, want in zip(fast[:2], slow[:2]):
        torch.testing.assert_close(got, want, **tol)
    for g1, g2 in zip(fast[2], slow[2]):
        assert (g1 is None) == (g2 is None)
        if g1 is not None:
            torch.testing.assert_close(g1, g2, **tol)
    torch.testing.assert_close(again[1], fast[1])
    with naive.without_elementwise_layers():  # the benchmark's bound: activations removed
        assert torch.equal(gen.conv.levels[0].act(z[:, :3]), z[:, :3])
    torch.testing.assert_close(run()[1], fast[1])
    fast_nodes, slow_nodes = _grad_fn_names(again[1]), _grad_fn_names(slow[1])
    nodes = ["_SubPixelConvTranspose", "_Pool2x2", "_SNPReLUFunction"]
    if dtype == torch.float32 and native.library() is not None:
        nodes += ["_Upsample2x", "_ResidualAddFunction"]
    for node in nodes:
        assert node in fast_nodes and node not in slow_nodes


def _grad_fn_names(t):
    """Names of every autograd node behind ``t``."""
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return " ".join(names)


@pytest.mark.parametrize("cin,size,fast", [(3, 8, True), (6, 6, True), (1, 7, False)])
def test_first_layer_input_gradient_equals_conv(cin, size, fast):
    """A 6x6 stride-2 conv with padding 2 (the networks' first layer) takes its
    input gradient as a sub-pixel conv on CPU when the input needs one and its
    size is even; values and all gradients equal ``conv2d``'s."""
    torch.manual_seed(0)
    layer = WNConv2d(cin, 4, 6, 2, 2, affine=True).double()
    with torch.no_grad():
        layer.scale.uniform_(0.5, 2.0)
        layer.bias.normal_()
    x = torch.randn(2, cin, size, size, dtype=torch.float64, requires_grad=True)
    got = layer(x)
    assert ("_Conv2dSubPixelGrad" in type(got.grad_fn).__name__) == fast
    want = F.conv2d(x, layer.normalised_weight(), layer.bias, 2, 2)
    torch.testing.assert_close(got, want)
    w = torch.randn_like(got)
    inputs = [x, layer.weight, layer.scale, layer.bias]
    for g1, g2 in zip(torch.autograd.grad((got * w).sum(), inputs),
                      torch.autograd.grad((want * w).sum(), inputs)):
        torch.testing.assert_close(g1, g2)
    assert torch.autograd.gradcheck(layer, (x,))
    assert "_Conv2dSubPixelGrad" not in type(layer(x.detach()).grad_fn).__name__


def test_whole_training_weighs_stages_by_their_iterations():
    bench = load_benchmark("stage_throughput")
    schedule = {"stage1": (3600, 10, {"bf16": 20.0, "naive": 10.0}),   # 0.5 h vs 1 h
                "classifier": (1800, 10, {"bf16": 10.0, "naive": 10.0})}  # 0.5 h both
    line = bench.whole_training("rgb32", schedule, "bf16")
    assert "stage1 3k, classifier 1k iterations" in line
    assert "ours bf16 1.00 h, naive 1.50 h, ratio 1.50" in line
