"""Encoders, generator, discriminator and classifiers (docs/method.md section 5).

Every layer is weight-normalised and every activation is an ``SNPReLU``
(``layers.py``). Images are square, ``(B, C, S, S)`` with even ``S``.

Spatial bookkeeping (``plan_levels``): level ``i`` halves the size; before a
non-final level whose input size ``% 4 == 2`` one extra pixel of zero padding
goes on each side so the halved size stays even. The extra padding is folded
into the stride-2 convolution's padding (and the shortcut pool's padding); the
generator undoes it through its transposed convolutions' padding (and crops its
upsampled shortcut), so encoder and generator agree on every size.

Choices where docs/method.md is silent:

- The ``conv_layers[i] - 1`` extra 3x3 residual blocks (identity shortcut)
  start as the identity (residue ratio 0), like the FC residual blocks, so
  extra depth does not change the function at initialisation.
- The generator counts its own depth from its input: the up block that mirrors
  down level ``i`` of ``L`` gets residue ratio ``1/(L - i + 1)`` (the first up
  block 1/2, then 1/3, ...), as the trunk's level ``i`` gets ``1/(i+1)``.
- The activation after the generator's FC to the top feature map is per
  feature (``C_top*T*T`` PReLU parameters, i.e. also per position), not per
  channel: at a 4x4 top map that costs little and lets each position have its
  own bias and slope.
- The down shortcut pools first and then applies the 1x1 conv (4x fewer pixels);
  the up shortcut applies the 1x1 conv first and then upsamples, as specified.
- Output heads (encoder mean/pre-std, generator noise std, discriminator,
  classifiers) are affine ``WNLinear`` layers (learned per-output scale, init 1),
  computed in float32 under mixed precision (``dsu_models/precision.py``);
  the encoder's mean and pre-std heads are one layer split afterwards, as are a
  classifier's per-factor heads (weight normalisation is per output unit, so
  this is identical to separate layers).
- A code part of size 0 is allowed and yields ``(B, 0)`` mean and std tensors.
- Generator without conv levels: the whole MLP (output linear layer to
  ``C*S*S``, affine, + tanh) belongs to ``fc``; ``conv`` is an empty identity, so
  ``gen_conv_adv`` has nothing to act on and the adversarial loss reaches the
  whole generator through ``gen_fc_adv``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsu_models.nn.layers import (Chain, ResidualAdd, SNPReLU, WNConv2d, WNConvTranspose2d,
                                  WNLinear, avg_pool_2x2, layer_act, upsample_2x)

_CHANNELS_BY_LEVELS = {
    0: [], 1: [16], 2: [16, 32], 3: [32, 64, 128], 4: [32, 64, 128, 256],
    5: [32, 64, 128, 256, 512], 6: [32, 64, 128, 256, 384, 512],
    7: [16, 32, 64, 128, 256, 384, 512], 8: [8, 16, 32, 64, 128, 256, 384, 512],
}
_FC_FEATURES_BY_LEVELS = {0: 64, 1: 128, 2: 256, 3: 512, 4: 512, 5: 512, 6: 512,
                          7: 768, 8: 1024}
_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)  # softplus(x) = 1


def count_levels(image_size: int) -> int:
    """Number of down levels the default architecture uses for ``image_size``."""
    size, levels = image_size, 0
    while size >= 12:
        size = (size + 2) // 4 * 2
        levels += 1
    if size >= 6:
        levels += 1
    return levels


def default_architecture(image_size: int) -> dict:
    """Default ``dict(conv_channels=[...], fc_features=int)`` for square images of
    side ``image_size`` (docs/method.md section 5)."""
    levels = count_levels(image_size)
    if levels not in _CHANNELS_BY_LEVELS:
        raise ValueError(f"image size {image_size} needs {levels} levels; "
                         f"the default table covers at most {max(_CHANNELS_BY_LEVELS)}")
    return dict(conv_channels=list(_CHANNELS_BY_LEVELS[levels]),
                fc_features=_FC_FEATURES_BY_LEVELS[levels])


@dataclass(frozen=True)
class Level:
    """One down level: input size, extra padding per side, output size."""
    in_size: int
    pad: int
    out_size: int


def plan_levels(image_size: int, num_levels: int) -> list[Level]:
    """Sizes and extra paddings of ``num_levels`` down levels from ``image_size``."""
    if image_size % 2 or image_size < 2:
        raise ValueError(f"image size must be even and positive, got {image_size}")
    plan, size = [], image_size
    for i in range(num_levels):
        if size < 2:
            raise ValueError(f"image size {image_size} is too small for {num_levels} levels")
        pad = 1 if i < num_levels - 1 and size % 4 == 2 else 0
        plan.append(Level(size, pad, (size + 2 * pad) // 2))
        size = plan[-1].out_size
    return plan


def _check_lists(conv_channels: list[int], conv_layers: list[int]) -> None:
    if len(conv_channels) != len(conv_layers):
        raise ValueError(f"conv_channels {conv_channels} and conv_layers {conv_layers} "
                         "must have one entry per level")
    if any(n < 1 for n in conv_layers):
        raise ValueError(f"conv_layers entries must be >= 1, got {conv_layers}")


# ---------------------------------------------------------------- blocks


class ConvBlock(nn.Module):
    """3x3 stride-1 residual block, identity shortcut: ``(B, C, H, W) -> same``."""

    def __init__(self, channels: int, ratio: float):
        super().__init__()
        self.conv = WNConv2d(channels, channels, 3, 1, 1)
        self.act = SNPReLU(channels)
        self.add = ResidualAdd(channels, ratio)

    def forward(self, x: Tensor) -> Tensor:
        return self.add(x, layer_act(self.conv, self.act, x))


class FCBlock(nn.Module):
    """Fully connected residual block ``(B, F) -> (B, F)``; starts as the identity
    (residue ratio 0: alpha = 1, beta = 0)."""

    def __init__(self, features: int):
        super().__init__()
        self.linear = WNLinear(features, features)
        self.act = SNPReLU(features)
        self.add = ResidualAdd(features, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.add(x, layer_act(self.linear, self.act, x))


class DownBlock(nn.Module):
    """Residual stride-2 level: 4x4 conv + act vs. 2x2 avg pool (+1x1 conv).
    ``(B, C_in, S, S) -> (B, C_out, (S + 2*pad)/2, ...)``."""

    def __init__(self, in_ch: int, out_ch: int, pad: int, ratio: float):
        super().__init__()
        self.pad = pad
        self.conv = WNConv2d(in_ch, out_ch, 4, 2, 1 + pad)
        self.act = SNPReLU(out_ch)
        self.project = WNConv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.add = ResidualAdd(out_ch, ratio)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = avg_pool_2x2(x, self.pad)
        if self.project is not None:
            shortcut = self.project(shortcut)
        return self.add(shortcut, layer_act(self.conv, self.act, x))


class UpBlock(nn.Module):
    """Mirror of ``DownBlock``: 4x4 stride-2 transposed conv + act vs. (1x1 conv +)
    nearest 2x upsampling, both cropped by ``crop`` per side.
    ``(B, C_in, T, T) -> (B, C_out, 2T - 2*crop, ...)``."""

    def __init__(self, in_ch: int, out_ch: int, crop: int, ratio: float):
        super().__init__()
        self.crop = crop
        self.conv = WNConvTranspose2d(in_ch, out_ch, 4, 2, 1 + crop)
        self.act = SNPReLU(out_ch)
        self.project = WNConv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.add = ResidualAdd(out_ch, ratio)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.project is None else self.project(x)
        shortcut = upsample_2x(shortcut, self.crop)
        return self.add(shortcut, layer_act(self.conv, self.act, x))


def _fc_stack(in_features: int, features: int, layers: int) -> Chain:
    """``WNLinear(in, features) + act`` followed by ``layers`` FC residual blocks."""
    return Chain(WNLinear(in_features, features), SNPReLU(features),
                         *[FCBlock(features) for _ in range(layers)])


# ---------------------------------------------------------------- trunk


class Trunk(nn.Module):
    """Down levels -> flatten -> FC to ``fc_features`` + act -> FC residual blocks.

    ``forward(x: (B, image_channels, S, S)) -> (B, fc_features)``. With
    ``conv_channels == []`` it is an MLP on the flattened image.
    """

    def __init__(self, image_channels: int, image_size: int, conv_channels: list[int],
                 conv_layers: list[int], fc_features: int, fc_layers: int):
        super().__init__()
        _check_lists(conv_channels, conv_layers)
        plan = plan_levels(image_size, len(conv_channels))
        levels: list[nn.Module] = []
        in_ch = image_channels
        for i, (level, out_ch, n) in enumerate(zip(plan, conv_channels, conv_layers)):
            if i == 0:
                levels += [WNConv2d(in_ch, out_ch, 6, 2, 2 + level.pad), SNPReLU(out_ch)]
            else:
                levels.append(DownBlock(in_ch, out_ch, level.pad, 1.0 / (i + 1)))
            levels += [ConvBlock(out_ch, 0.0) for _ in range(n - 1)]
            in_ch = out_ch
        self.conv = Chain(*levels)
        top_size = plan[-1].out_size if plan else image_size
        self.fc = _fc_stack(in_ch * top_size * top_size, fc_features, fc_layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).flatten(1))


# ---------------------------------------------------------------- encoder


class Encoder(nn.Module):
    """Image -> one diagonal Gaussian per code part.

    ``forward(x: (B, C, S, S) in [-1, 1]) -> [(mean, std), ...]``, one pair of
    ``(B, code_sizes[k])`` tensors per part; ``std = softplus(pre_std)``.
    ``zero_init``: means start at 0 and stds at 1 (the heads' affine scales start
    at 0 and the pre-std bias at ``log(e - 1)``).
    """

    def __init__(self, image_channels: int, image_size: int, conv_channels: list[int],
                 conv_layers: list[int], fc_features: int, fc_layers: int,
                 code_sizes: list[int], zero_init: bool = False):
        super().__init__()
        self.code_sizes = [int(m) for m in code_sizes]
        self.trunk = Trunk(image_channels, image_size, conv_channels, conv_layers,
                           fc_features, fc_layers)
        total = sum(self.code_sizes)
        # Rows [0, total) are the means, [total, 2*total) the pre-stds.
        self.heads = WNLinear(fc_features, 2 * total, affine=True, full_precision=True)
        if zero_init:
            with torch.no_grad():
                self.heads.scale.zero_()
                self.heads.bias[total:] = _SOFTPLUS_INV_ONE

    def forward(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        total = sum(self.code_sizes)
        mean, pre_std = self.heads(self.trunk(x)).split([total, total], dim=1)
        std = F.softplus(pre_std)
        return list(zip(mean.split(self.code_sizes, dim=1), std.split(self.code_sizes, dim=1)))


# ---------------------------------------------------------------- generator


class GeneratorFC(nn.Module):
    """FC part of the generator: ``z: (B, 2*code_size) -> (top, noise_std: (B,))``.

    ``top`` is the activated top feature map ``top_shape = (C_top, T, T)``;
    without conv levels (``has_conv`` false) it is already the image
    ``(B, C, S, S)`` in [-1, 1].
    """

    def __init__(self, code_size: int, fc_features: int, fc_layers: int,
                 top_shape: tuple[int, int, int], has_conv: bool):
        super().__init__()
        self.top_shape = top_shape
        self.body = _fc_stack(2 * code_size, fc_features, fc_layers)
        self.std_head = WNLinear(fc_features, 1, affine=True, full_precision=True)
        top_features = math.prod(top_shape)
        if has_conv:
            self.top = Chain(WNLinear(fc_features, top_features), SNPReLU(top_features))
        else:
            self.top = nn.Sequential(WNLinear(fc_features, top_features, affine=True), nn.Tanh())

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(z)
        noise_std = F.softplus(self.std_head(h)).squeeze(1)
        return self.top(h).view(-1, *self.top_shape), noise_std


class GeneratorConv(nn.Module):
    """Conv part of the generator: top feature map -> image ``(B, C, S, S)`` in
    [-1, 1]. Without conv levels it is the identity (and has no parameters)."""

    def __init__(self, image_channels: int, image_size: int, conv_channels: list[int],
                 conv_layers: list[int]):
        super().__init__()
        plan = plan_levels(image_size, len(conv_channels))
        num_levels = len(plan)
        levels: list[nn.Module] = []
        for i in reversed(range(num_levels)):
            ch = conv_channels[i]
            levels += [ConvBlock(ch, 0.0) for _ in range(conv_layers[i] - 1)]
            if i > 0:
                levels.append(UpBlock(ch, conv_channels[i - 1], plan[i].pad,
                                      1.0 / (num_levels - i + 1)))
            else:
                levels += [WNConvTranspose2d(ch, image_channels, 6, 2, 2 + plan[0].pad,
                                             affine=True), nn.Tanh()]
        self.levels = Chain(*levels)

    def forward(self, top: Tensor) -> Tensor:
        return self.levels(top)


class Generator(nn.Module):
    """Codes -> image, mirroring the encoder.

    ``z: (B, 2*code_size) = concat(codes..., 1 - masks...)`` (built by the caller).
    ``forward(z) -> (image (B, C, S, S) in [-1, 1], noise_std (B,))``.
    Parameter groups: ``self.fc`` (input FC, FC blocks, noise-std head, FC to the
    top feature map + its activation) and ``self.conv`` (up levels and output
    layer); they partition the parameters (``conv`` is empty without conv levels). ``forward_fc`` / ``forward_conv`` run them apart so
    a stage can route gradients (e.g. detach the top features for the conv part).
    """

    def __init__(self, image_channels: int, image_size: int, conv_channels: list[int],
                 conv_layers: list[int], fc_features: int, fc_layers: int, code_size: int):
        super().__init__()
        _check_lists(conv_channels, conv_layers)
        plan = plan_levels(image_size, len(conv_channels))
        if plan:
            top_shape = (conv_channels[-1], plan[-1].out_size, plan[-1].out_size)
        else:
            top_shape = (image_channels, image_size, image_size)
        self.code_size = code_size
        self.fc = GeneratorFC(code_size, fc_features, fc_layers, top_shape, bool(plan))
        self.conv = GeneratorConv(image_channels, image_size, conv_channels, conv_layers)

    def forward_fc(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.fc(z)

    def forward_conv(self, top: Tensor) -> Tensor:
        return self.conv(top)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        top, noise_std = self.fc(z)
        return self.conv(top), noise_std


# ---------------------------------------------------------------- discriminator / classifiers


class Discriminator(nn.Module):
    """Trunk + one output. ``features(x) -> (B, fc_features)``, ``head(f) -> (B,)``,
    ``forward(x) = head(features(x))``. Stage 2 passes image pairs concatenated on
    channels (``image_channels = 2*C``)."""

    def __init__(self, image_channels: int, image_size: int, conv_channels: list[int],
                 conv_layers: list[int], fc_features: int, fc_layers: int):
        super().__init__()
        self.trunk = Trunk(image_channels, image_size, conv_channels, conv_layers,
                           fc_features, fc_layers)
        self.out = WNLinear(fc_features, 1, affine=True, full_precision=True)

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def head(self, f: Tensor) -> Tensor:
        return self.out(f).squeeze(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _SplitHeads(nn.Module):
    """One affine ``WNLinear`` whose outputs are split into per-factor logits."""

    def __init__(self, in_features: int, class_counts: list[int], extra_fake: bool):
        super().__init__()
        self.sizes = [int(n) + int(extra_fake) for n in class_counts]
        self.linear = WNLinear(in_features, sum(self.sizes), affine=True, full_precision=True)

    def forward(self, f: Tensor) -> list[Tensor]:
        return list(self.linear(f).split(self.sizes, dim=1))


class ImageClassifier(nn.Module):
    """Trunk + one head per labeled factor with ``n_k`` logits (``n_k + 1`` with
    ``extra_fake``; the last column is "fake").
    ``forward(x: (B, C, S, S)) -> [logits (B, n_k[+1]), ...]``."""

    def __init__(self, image_channels: int, image_size: int, conv_channels: list[int],
                 conv_layers: list[int], fc_features: int, fc_layers: int,
                 class_counts: list[int], extra_fake: bool = False):
        super().__init__()
        self.trunk = Trunk(image_channels, image_size, conv_channels, conv_layers,
                           fc_features, fc_layers)
        self.heads = _SplitHeads(fc_features, class_counts, extra_fake)

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def head(self, f: Tensor) -> list[Tensor]:
        return self.heads(f)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.head(self.features(x))


class CodeClassifier(nn.Module):
    """MLP on ``concat(u, 1 - mask)``: ``forward(u: (B, m), mask: (B, m) or None)
    -> [logits (B, n_k), ...]``. ``mask`` is 1 where a dim was kept; ``None``
    means nothing was dropped."""

    def __init__(self, code_size: int, class_counts: list[int], layers: int, features: int):
        super().__init__()
        self.body = _fc_stack(2 * code_size, features, layers)
        self.heads = _SplitHeads(features, class_counts, False)

    def forward(self, u: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        dropped = torch.zeros_like(u) if mask is None else 1.0 - mask.to(u.dtype)
        return self.heads(self.body(torch.cat([u, dropped], dim=1)))


_STAGE1_MODES = ("image", "code", "compound")


class Stage1Classifier(nn.Module):
    """The stage-1 classifier C in mode ``image``, ``code`` or ``compound``.

    ``forward(x: (B, C, S, S) | None, u: (B, m) | None, mask: (B, m) | None)
    -> [log-probs (B, n_k), ...]``: log-softmax of the image logits, the code
    logits, or their sum. Inputs a mode does not use may be ``None``; the caller
    detaches what must not receive C's gradient.
    """

    def __init__(self, mode: str, image_classifier: ImageClassifier | None = None,
                 code_classifier: CodeClassifier | None = None):
        super().__init__()
        if mode not in _STAGE1_MODES:
            raise ValueError(f"stage-1 classifier mode must be one of {_STAGE1_MODES}, got {mode!r}")
        if mode != "code" and image_classifier is None:
            raise ValueError(f"mode {mode!r} needs an image classifier")
        if mode != "image" and code_classifier is None:
            raise ValueError(f"mode {mode!r} needs a code classifier")
        self.mode = mode
        self.image = image_classifier if mode != "code" else None
        self.code = code_classifier if mode != "image" else None

    def forward(self, x: Tensor | None, u: Tensor | None = None,
                mask: Tensor | None = None) -> list[Tensor]:
        if self.mode == "image":
            logits = self.image(x)
        elif self.mode == "code":
            logits = self.code(u, mask)
        else:
            logits = [a + b for a, b in zip(self.image(x), self.code(u, mask))]
        return [F.log_softmax(z, dim=1) for z in logits]


class CompoundClassifier(Stage1Classifier):
    """``Stage1Classifier`` in ``compound`` mode: log_softmax(image + code logits)."""

    def __init__(self, image_classifier: ImageClassifier, code_classifier: CodeClassifier):
        super().__init__("compound", image_classifier, code_classifier)
