"""Tests for dsu_models.nn (docs/method.md section 5): layer invariants, shapes, init."""
import math

import pytest
import torch

from dsu_models.nn import (CodeClassifier, CompoundClassifier, Discriminator, Encoder,
                           Generator, ImageClassifier, ResidualAdd, SNPReLU,
                           Stage1Classifier, WNConv2d, WNConvTranspose2d, WNLinear,
                           default_architecture, plan_levels, random_offset,
                           sample_offsets)


def _tiny_arch(size: int) -> dict:
    """Default level count for ``size`` but tiny channel widths, for speed."""
    levels = len(default_architecture(size)["conv_channels"])
    return dict(conv_channels=[4 * (i + 1) for i in range(levels)], conv_layers=[1] * levels,
                fc_features=16)


@pytest.mark.parametrize("slope", [0.0, 0.25, 0.5, -0.3])
@pytest.mark.parametrize("bias", [-1.0, 0.0, 0.7])
def test_snprelu_normalises_standard_normal(slope, bias):
    torch.manual_seed(0)
    act = SNPReLU(2)
    with torch.no_grad():
        act.slope.fill_(slope)
        act.bias.fill_(bias)
    y = act(torch.randn(100_000, 2, 1, 1))
    assert y.mean().abs().item() < 0.02
    assert abs(y.std().item() - 1.0) < 0.02


def test_snprelu_2d_input_and_gradients():
    act = SNPReLU(3)
    y = act(torch.randn(8, 3))
    y.square().sum().backward()
    assert y.shape == (8, 3)
    assert act.bias.grad is not None and act.slope.grad is not None


@pytest.mark.parametrize("make,shape", [
    (lambda: WNLinear(5, 3, affine=True), (4, 5)),
    (lambda: WNConv2d(2, 3, 3, 1, 1, affine=True), (2, 2, 6, 6)),
    (lambda: WNConvTranspose2d(2, 3, 4, 2, 1, affine=True), (2, 2, 5, 5)),
])
def test_weight_norm_is_invariant_to_weight_scale(make, shape):
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        layer.bias.normal_()
        layer.scale.uniform_(0.5, 2.0)
    x = torch.randn(shape)
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(7.3)
    torch.testing.assert_close(layer(x), before)


def test_conv_transpose_normalises_per_output_channel():
    layer = WNConvTranspose2d(3, 5, 4, 2, 1)
    w = layer.normalised_weight()
    norms = torch.linalg.vector_norm(w, dim=(0, 2, 3))
    torch.testing.assert_close(norms, torch.full((5,), 2.0))


def test_residual_add_is_normalised():
    add = ResidualAdd(4, 0.3)
    alpha, beta = add.coefficients()
    torch.testing.assert_close(alpha, torch.full((4,), math.sqrt(0.7)))
    with torch.no_grad():
        add.alpha.copy_(torch.tensor([3.0, -0.1, 5.0, 0.2]))
        add.beta.copy_(torch.tensor([4.0, 2.0, -1.0, 0.0]))
    alpha, beta = add.coefficients()
    torch.testing.assert_close(alpha ** 2 + beta ** 2, torch.ones(4))
    s, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    expected = alpha.view(4, 1, 1) * s + beta.view(4, 1, 1) * r
    torch.testing.assert_close(add(s, r), expected)


@pytest.mark.parametrize("size,channels,fc", [
    (28, [32, 64, 128], 512), (32, [32, 64, 128], 512), (64, [32, 64, 128, 256], 512),
    (8, [16], 128), (16, [16, 32], 256), (4, [], 64),
])
def test_default_architecture(size, channels, fc):
    assert default_architecture(size) == dict(conv_channels=channels, fc_features=fc)


def test_plan_keeps_nonfinal_sizes_even():
    plan = plan_levels(28, 3)
    assert [(lv.in_size, lv.pad, lv.out_size) for lv in plan] == [(28, 0, 14), (14, 1, 8),
                                                                  (8, 0, 4)]


@pytest.mark.parametrize("size", [4, 8, 16, 28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_encoder_generator_round_trip(size, channels):
    arch = _tiny_arch(size)
    code_sizes = [3, 2]
    enc = Encoder(channels, size, fc_layers=1, code_sizes=code_sizes, zero_init=False, **arch)
    gen = Generator(channels, size, fc_layers=1, code_size=sum(code_sizes), **arch)
    x = torch.rand(2, channels, size, size) * 2 - 1
    codes = enc(x)
    assert [(m.shape, s.shape) for m, s in codes] == [((2, 3), (2, 3)), ((2, 2), (2, 2))]
    assert all((s > 0).all() for _, s in codes)
    u = torch.cat([m for m, _ in codes], dim=1)
    image, noise_std = gen(torch.cat([u, torch.zeros_like(u)], dim=1))
    assert image.shape == x.shape
    assert noise_std.shape == (2,) and (noise_std > 0).all()
    assert image.abs().max() <= 1


def test_odd_size_padding_round_trip():
    arch = dict(conv_channels=[4, 6, 8], conv_layers=[2, 1, 2], fc_features=8)
    enc = Encoder(1, 30, fc_layers=0, code_sizes=[2], **arch)
    gen = Generator(1, 30, fc_layers=0, code_size=2, **arch)
    mean, _ = enc(torch.zeros(2, 1, 30, 30))[0]
    image, _ = gen(torch.cat([mean, torch.ones_like(mean)], dim=1))
    assert image.shape == (2, 1, 30, 30)


def test_zero_init_encoder_and_empty_code_part():
    enc = Encoder(1, 8, [4], [1], 8, 1, code_sizes=[3, 0, 2], zero_init=True)
    out = enc(torch.randn(5, 1, 8, 8))
    assert [m.shape[1] for m, _ in out] == [3, 0, 2]
    for mean, std in out:
        torch.testing.assert_close(mean, torch.zeros_like(mean))
        torch.testing.assert_close(std, torch.ones_like(std))


def test_generator_fc_and_conv_partition_parameters():
    for size in (16, 4):  # conv levels, and none (MLP: everything is in fc)
        gen = Generator(1, size, fc_layers=1, code_size=3, **_tiny_arch(size))
        fc = {id(p) for p in gen.fc.parameters()}
        conv = {id(p) for p in gen.conv.parameters()}
        assert fc and bool(conv) == (size == 16) and not fc & conv
        assert fc | conv == {id(p) for p in gen.parameters()}
        z = torch.randn(2, 6)
        top, std = gen.forward_fc(z)
        image, std2 = gen(z)
        torch.testing.assert_close(gen.forward_conv(top), image)
        torch.testing.assert_close(std, std2)


def test_discriminator_and_classifiers_shapes():
    arch = _tiny_arch(16)
    dis = Discriminator(2, 16, fc_layers=0, **arch)
    x = torch.randn(3, 2, 16, 16)
    assert dis(x).shape == (3,)
    torch.testing.assert_close(dis.head(dis.features(x)), dis(x))
    img = ImageClassifier(1, 16, fc_layers=0, class_counts=[4, 2], extra_fake=True, **arch)
    assert [t.shape for t in img(x[:, :1])] == [(3, 5), (3, 3)]
    img = ImageClassifier(1, 16, fc_layers=0, class_counts=[4, 2], **arch)
    code = CodeClassifier(5, [4, 2], layers=2, features=8)
    u, mask = torch.randn(3, 5), (torch.rand(3, 5) > 0.5).float()
    assert [t.shape for t in code(u, mask)] == [(3, 4), (3, 2)]
    compound = CompoundClassifier(img, code)(x[:, :1], u, mask)
    expected = [torch.log_softmax(a + b, 1) for a, b in zip(img(x[:, :1]), code(u, mask))]
    for got, want in zip(compound, expected):
        torch.testing.assert_close(got, want)
    for mode in ("image", "code"):
        logp = Stage1Classifier(mode, img, code)(x[:, :1], u, mask)
        assert [t.shape for t in logp] == [(3, 4), (3, 2)]
        torch.testing.assert_close(logp[0].exp().sum(1), torch.ones(3))


def _coordinate_images(batch: int, size: int) -> torch.Tensor:
    """Channel 0 holds row + 1, channel 1 column + 1 (0 marks padding after a shift)."""
    idx = torch.arange(1, size + 1, dtype=torch.float32)
    rows = idx.view(size, 1).expand(size, size)
    cols = idx.view(1, size).expand(size, size)
    return torch.stack([rows, cols]).expand(batch, 2, size, size).contiguous()


def test_random_offset_pairs_and_range():
    batch, size = 64, 16
    s = size // 4
    x = _coordinate_images(batch, size)
    gen = torch.Generator().manual_seed(0)
    a, b = random_offset(x, x, generator=gen)
    assert a.shape == x.shape
    torch.testing.assert_close(a, b)
    single = random_offset(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(single, a)
    # Crop offset o in the padded image means pixel (i, j) shows source (i+o-s, j+o-s).
    for ch in range(2):
        source = a[:, ch]
        nonzero = source > 0
        grid = torch.arange(size).view(1, size, 1) if ch == 0 else torch.arange(size).view(1, 1, size)
        offset = source - 1 - grid + s  # crop offset wherever the source is inside
        per_sample = torch.where(nonzero, offset, torch.nan).flatten(1).nanmean(1)
        assert torch.equal(torch.where(nonzero, offset, per_sample.view(-1, 1, 1)),
                           per_sample.view(-1, 1, 1).expand_as(offset))
        assert per_sample.min() >= 0 and per_sample.max() <= 2 * s - 2
    dy, dx = sample_offsets(10_000, size, size, generator=torch.Generator().manual_seed(1))
    assert dy.min() == 0 and dy.max() == 2 * s - 2 and dx.max() == 2 * s - 2


def test_random_offset_is_differentiable():
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    random_offset(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
