"""Weight-normalised layers, the self-normalising PReLU, the residual add and the
random-offset augmentation (docs/method.md section 5).

Every layer here is built so that unit-variance, independent inputs give roughly
unit-variance outputs at initialisation; the networks in ``networks.py`` stack
them without any other normalisation.

Choices where docs/method.md is silent:

- Raw weights start Gaussian with each output unit's vector rescaled to unit
  norm, so an Adam step of size ``lr`` is a relative change of about
  ``lr * sqrt(fan_in)``, as for a plainly parametrised layer (a larger raw norm
  would silently slow learning). Biases start at 0, affine scales at 1.
- The weight norm has no epsilon: a raw weight vector of norm exactly 0 never
  occurs after random initialisation, and an epsilon would break the exact
  invariance to rescaling the raw weight.
- ``random_offset`` returns a single tensor when given one tensor and a tuple
  when given several (see its docstring for the shift convention).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native, plain

_Pair = int | tuple[int, int]


def _pair(v: _Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _raw_weight(shape: tuple[int, ...], dims: tuple[int, ...]) -> nn.Parameter:
    """Gaussian raw weight with every output unit's vector (over ``dims``) at unit norm."""
    weight = torch.randn(shape)
    return nn.Parameter(weight / torch.linalg.vector_norm(weight, dim=dims, keepdim=True))


def _normalised(weight: Tensor, scale: Tensor | None, gain: float, unit_dim: int) -> Tensor:
    """``weight`` with every output unit's vector (all dims but ``unit_dim``) at
    norm ``gain * scale``.

    ``torch._weight_norm`` computes ``v * (g / ||v||)`` in one fused kernel (and a
    fused backward) for ``unit_dim`` 0, about 3x faster on CPU than the same
    formula as separate norm/div/mul ops; for other dims it falls back to that
    formula. ``g`` is ``gain * scale`` (or the constant ``gain``).
    """
    shape = [1] * weight.dim()
    shape[unit_dim] = weight.shape[unit_dim]
    if scale is None:
        g = weight.new_full(shape, gain)
    else:
        g = scale.view(shape) if gain == 1.0 else scale.view(shape) * gain
    return torch._weight_norm(weight, g, unit_dim)


def _with_extra(bias: Tensor, extra: Tensor | None) -> Tensor:
    return bias if extra is None else bias + extra


class WNLinear(nn.Module):
    """Weight-normalised linear layer: ``x: (B, in_f) -> (B, out_f)``.

    Each output unit's weight row is divided by its L2 norm at every forward,
    times a learned per-output ``scale`` (init 1) when ``affine``.
    ``full_precision``: computed in float32 even inside an autocast region (the
    networks' output heads: codes, noise std and logits stay float32; see
    ``dsu_models/precision.py``); a head is small, so this costs nothing.
    """

    def __init__(self, in_f: int, out_f: int, affine: bool = False, full_precision: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_f, out_f
        self.full_precision = full_precision
        self.weight = _raw_weight((out_f, in_f), (1,))
        self.bias = nn.Parameter(torch.zeros(out_f))
        self.scale = nn.Parameter(torch.ones(out_f)) if affine else None

    def normalised_weight(self) -> Tensor:
        return _normalised(self.weight, self.scale, 1.0, 0)

    def forward(self, x: Tensor, extra_bias: Tensor | None = None) -> Tensor:
        """``extra_bias``: ``(out_f,)`` added to the bias (a following activation's
        input shift, folded in to save a pass over the output)."""
        if self.full_precision and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.float(), self.normalised_weight(), _with_extra(self.bias, extra_bias))
        return F.linear(x, self.normalised_weight(), _with_extra(self.bias, extra_bias))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, affine={self.scale is not None}"


class WNConv2d(nn.Module):
    """Weight-normalised 2-d convolution: ``x: (B, in_ch, H, W) -> (B, out_ch, H', W')``.

    Each output channel's ``(in_ch, kh, kw)`` kernel has unit L2 norm (times the
    learned ``scale`` when ``affine``).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: _Pair, stride: _Pair = 1,
                 padding: _Pair = 0, affine: bool = False):
        super().__init__()
        kh, kw = _pair(kernel)
        self.stride, self.padding = _pair(stride), _pair(padding)
        self.weight = _raw_weight((out_ch, in_ch, kh, kw), (1, 2, 3))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.scale = nn.Parameter(torch.ones(out_ch)) if affine else None

    def normalised_weight(self) -> Tensor:
        return _normalised(self.weight, self.scale, 1.0, 0)

    def forward(self, x: Tensor, extra_bias: Tensor | None = None) -> Tensor:
        """``extra_bias``: ``(out_ch,)`` added to the bias (see ``WNLinear``)."""
        weight, bias = self.normalised_weight(), _with_extra(self.bias, extra_bias)
        if (x.requires_grad and _fast_cpu_path(x) and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0
                and _subpixel_applies(weight.shape[2:], self.stride, self.padding)):
            return _Conv2dSubPixelGrad.apply(x, weight, bias, self.padding[0])
        return F.conv2d(x, weight, bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        out_ch, in_ch, kh, kw = self.weight.shape
        return (f"{in_ch}, {out_ch}, kernel=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}, affine={self.scale is not None}")


class WNConvTranspose2d(nn.Module):
    """Weight-normalised transposed convolution:
    ``x: (B, in_ch, H, W) -> (B, out_ch, (H-1)*s - 2*p + k, ...)``.

    The weight is stored as ``(in_ch, out_ch, kh, kw)``; it is normalised per
    OUTPUT channel (over ``in_ch, kh, kw``) and multiplied by
    ``sqrt(stride_h * stride_w)``, because with stride ``s`` each output pixel sees
    only about ``1/(s_h*s_w)`` of a channel's kernel taps.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: _Pair, stride: _Pair,
                 padding: _Pair = 0, affine: bool = False):
        super().__init__()
        kh, kw = _pair(kernel)
        self.stride, self.padding = _pair(stride), _pair(padding)
        self.gain = math.sqrt(self.stride[0] * self.stride[1])
        self.weight = _raw_weight((in_ch, out_ch, kh, kw), (0, 2, 3))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.scale = nn.Parameter(torch.ones(out_ch)) if affine else None

    def normalised_weight(self) -> Tensor:
        return _normalised(self.weight, self.scale, self.gain, 1)

    def forward(self, x: Tensor, extra_bias: Tensor | None = None) -> Tensor:
        """``extra_bias``: ``(out_ch,)`` added to the bias (see ``WNLinear``)."""
        weight, bias = self.normalised_weight(), _with_extra(self.bias, extra_bias)
        if _fast_cpu_path(x) and _subpixel_applies(weight.shape[2:], self.stride, self.padding):
            return _SubPixelConvTranspose.apply(x, weight, bias, self.padding[0])
        return F.conv_transpose2d(x, weight, bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        in_ch, out_ch, kh, kw = self.weight.shape
        return (f"{in_ch}, {out_ch}, kernel=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}, affine={self.scale is not None}")


def _fast_cpu_path(x: Tensor) -> bool:
    """The one condition under which the layers below swap aten's kernels for
    their own (sub-pixel convs, strided pooling, the C kernels of ``native.py``):
    ``x`` on the CPU, outside ``torch.compile`` (CUDA and the compiler keep aten's,
    which are fast there). Every choice is the same function computed another
    way; ``reference.plain_layers()`` switches the networks to the formulas instead.
    Not under autocast: the hand-written backward passes take the dtype of
    their saved inputs (a ``bf16`` run on a CPU takes aten's)."""
    return (x.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu"))


def _subpixel_applies(kernel: tuple[int, ...], stride: tuple[int, int],
                      padding: tuple[int, int]) -> bool:
    """Whether a transposed conv is one ordinary conv + pixel shuffle with no
    wasted taps: stride 2 and a square kernel ``k = 2p + 2`` for an even padding
    ``p`` (the generators' final 6x6 layer, ``p = 2``)."""
    k, p = kernel[0], padding[0]
    return (stride == (2, 2) and kernel[1] == k and padding[1] == p and p % 2 == 0
            and k == 2 * p + 2)


def _subpixel_transposed(x: Tensor, w: Tensor, b: Tensor | None, p: int) -> Tensor:
    """``conv_transpose2d(x, w, b, stride=2, padding=p)`` for ``w: (in, out, k, k)``
    with ``k = 2p + 2``, as a conv + pixel shuffle (see ``_SubPixelConvTranspose``)."""
    cin, cout, k, _ = w.shape
    K = k // 2
    wc = (w.reshape(cin, cout, K, 2, K, 2).flip(2, 4)
          .permute(1, 3, 5, 0, 2, 4).reshape(cout * 4, cin, K, K))
    bias = None if b is None else b.repeat_interleave(4)
    return F.pixel_shuffle(F.conv2d(x, wc, bias, padding=p // 2), 2)


class _Conv2dSubPixelGrad(torch.autograd.Function):
    """``conv2d(x, w, b, stride=2, padding=p)`` for ``k = 2p + 2`` and an even
    input size (the networks' first layer, 6x6 with padding 2), whose input
    gradient, a transposed conv of the same shape as a generator's final layer,
    is computed as the sub-pixel conv of ``_SubPixelConvTranspose``: on CPU, with
    3 or 6 input channels, in 0.4-0.65 of the time of oneDNN's (batch 64-192,
    32 px). The forward and the weight and bias gradients are aten's."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, p: int) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.padding = p
        return F.conv2d(x, w, b, 2, p)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        p = ctx.padding
        grad = grad.contiguous()
        grad_x = _subpixel_transposed(grad, w, None, p) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, w, [w.shape[0]], [2, 2], [p, p], [1, 1], False, [0, 0], 1,
                [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return grad_x, grad_w, grad_b, None


class _SubPixelConvTranspose(torch.autograd.Function):
    """``conv_transpose2d(x, w, b, stride=2, padding=p)`` for ``k = 2p + 2``,
    computed forward as an ordinary ``(k/2)``-square conv with 4 output channels
    per output channel (one per output pixel phase) and ``pixel_shuffle``.

    With ``K = k/2``, output pixel ``2j + r`` (``r`` in {0, 1}) takes input rows
    ``j - p/2 .. j + p/2`` through kernel rows ``2(K - 1 - u) + r`` for window row
    ``u``, the same window for both phases; so the conv weight for phase
    ``(ry, rx)`` is the transposed weight's every other row and column, flipped.
    Same products and sums as the transposed conv. On CPU, for a layer with few
    output channels (the image layer), oneDNN's transposed conv runs at about a
    third of an ordinary conv's speed; this forward takes 40% of its time
    (128 images, 32 to 3 channels, 16 to 32 px: 4.7 vs 12.5 ms). The backward
    is the transposed conv's own (``aten::convolution_backward``), which is not
    slow.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, p: int) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.padding = p
        return _subpixel_transposed(x, w, b, p)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        p = ctx.padding
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad.contiguous(), x, w, [w.shape[1]], [2, 2], [p, p], [1, 1], True, [0, 0], 1,
            list(ctx.needs_input_grad[:3]))
        return grad_x, grad_w, grad_b, None


def _window_sum(x: Tensor, pad: int, scale: float) -> Tensor:
    """``scale`` times the sum of each 2x2 window of ``x`` zero-padded by ``pad``
    (an even padded size), as four strided views added: on CPU about 8x faster
    than aten's average pool for NCHW tensors."""
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    batch, channels, height, width = padded.shape
    v = padded.reshape(batch, channels, height // 2, 2, width // 2, 2)
    rows = v[:, :, :, 0] + v[:, :, :, 1]
    out = rows[..., 0] + rows[..., 1]
    return out.mul_(scale) if scale != 1.0 else out


class _Pool2x2(torch.autograd.Function):
    """``avg_pool2d(x, 2, padding=pad, count_include_pad=True)`` for an even
    padded size: the forward is ``_window_sum``; the backward spreads a quarter
    of each gradient over its window, with the C kernel of ``nn/native.py``
    (one pass) or else as a depthwise transposed conv (about 2x faster than
    aten's pooling backward on CPU). Tested equal in test_perf_equivalence."""

    @staticmethod
    def forward(ctx, x: Tensor, pad: int) -> Tensor:
        ctx.pad, ctx.size = pad, x.shape[-2:]
        return _window_sum(x, pad, 0.25)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pad = ctx.pad
        if native.applies(grad):
            return native.spread2x2(grad, *ctx.size, pad, 0.25), None
        c = grad.shape[1]
        quarter = grad.new_full((c, 1, 2, 2), 0.25)
        grad_x = F.conv_transpose2d(grad, quarter, stride=2, groups=c)
        if pad:
            grad_x = grad_x[:, :, pad:-pad, pad:-pad]
        return grad_x, None


def avg_pool_2x2(x: Tensor, pad: int = 0) -> Tensor:
    """``F.avg_pool2d(x, 2, padding=pad, count_include_pad=True)`` for
    ``x: (B, C, H, W)``: through ``_Pool2x2`` on CPU when ``H + 2 pad`` and
    ``W + 2 pad`` are even, aten's kernel otherwise (and under ``torch.compile``)."""
    if _fast_cpu_path(x) and (x.shape[-2] + 2 * pad) % 2 == 0 and (x.shape[-1] + 2 * pad) % 2 == 0:
        return _Pool2x2.apply(x, pad)
    return F.avg_pool2d(x, 2, padding=pad, count_include_pad=True)


class _Upsample2x(torch.autograd.Function):
    """Nearest 2x upsampling cropped by ``crop`` per side, in one pass with the C
    kernel of ``nn/native.py``; its backward is ``_window_sum`` of the gradient
    zero-padded back by ``crop``. On CPU aten's nearest upsampling and its
    backward take several times as long for these small maps."""

    @staticmethod
    def forward(ctx, x: Tensor, crop: int) -> Tensor:
        ctx.crop = crop
        return native.spread2x2(x, 2 * x.shape[-2] - 2 * crop, 2 * x.shape[-1] - 2 * crop, crop, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _window_sum(grad, ctx.crop, 1.0), None


def upsample_2x(x: Tensor, crop: int = 0) -> Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")`` cropped by ``crop``
    per side: ``(B, C, H, W) -> (B, C, 2H - 2 crop, 2W - 2 crop)``."""
    if _fast_cpu_path(x) and native.applies(x):
        return _Upsample2x.apply(x, crop)
    return plain.upsample_2x(x, crop)


def _channel_view(v: Tensor, ndim: int) -> Tensor:
    """``v: (C,)`` shaped to broadcast against a ``(B, C, ...)`` tensor of ``ndim`` dims."""
    return v.view(-1, *([1] * (ndim - 2)))


_VAR_FLOOR = plain.VAR_FLOOR
_moment_terms = plain.prelu_moments  # the moments are written once, in the reference path


def _reduce_dims(t: Tensor) -> tuple[int, ...]:
    return (0,) + tuple(range(2, t.dim()))


class _SNPReLUFunction(torch.autograd.Function):
    """``(prelu(t; a) - mean(b, a)) / std(b, a)`` with a hand-written backward.

    ``t = x + b`` is the already shifted input (the caller adds ``b``, often by
    folding it into the previous layer's bias), so the gradient returned for
    ``b`` is only the part through the moments; the direct part reaches ``b``
    through ``t``. Compared with autograd over ``prelu`` + the ~20 small ops of
    the moments, this makes 2 passes over the big tensor forward and ~6
    backward, and the per-channel work runs without building a graph.

    Derivatives (``P1 = E[t+]``, ``N1 = E[t-]``, ``Phi = ndtr(b)``):
    ``dP1/db = Phi``, ``dE[t+^2]/db = 2 P1``, ``dN1/db = 1 - Phi``,
    ``dE[t-^2]/db = 2 N1``; hence ``dm/db = Phi + a (1 - Phi)``, ``dm/da = N1``,
    ``dvar/db = 2 P1 + 2 a^2 N1 - 2 m dm/db``, ``dvar/da = 2 a E[t-^2] - 2 m N1``.
    With the per-channel sums ``Sg = sum(g)``, ``So = sum(g * out)`` and
    ``Sn = sum(g * t-)`` and ``k = -inv_std^2 / 2`` (0 where the variance is
    floored): ``grad_b = -inv_std dm/db Sg + k dvar/db So`` and
    ``grad_a = inv_std Sn - inv_std N1 Sg + k dvar/da So``. The forward pass,
    which has the moments at hand, stores these five coefficients per channel
    when ``b`` or ``a`` needs a gradient, so the backward pass only adds the
    sums. Checked against autograd of the plain formula by ``gradcheck`` in
    ``tests/test_perf_equivalence.py``.
    """

    @staticmethod
    def forward(ctx, t: Tensor, b: Tensor, a: Tensor) -> Tensor:
        ctx.native = _fast_cpu_path(t) and native.applies(t, b, a)
        if ctx.native:  # the same math in one fused pass each way (nn/native.py)
            ctx.save_for_backward(t, b, a)
            return native.snprelu_forward(t, b, a)
        # the moments and the coefficients below are float32 (b, a are); the
        # big tensor keeps its own dtype (bfloat16 under autocast)
        m = _moment_terms(b, a)
        inv_std = 1.0 / m["std"]
        n, dt = t.dim(), t.dtype
        out = F.prelu(t, a.to(dt))
        torch.addcmul(_channel_view((-m["mean"] * inv_std).to(dt), n), out,
                      _channel_view(inv_std.to(dt), n), out=out)
        coef = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dm_db = m["cdf"] + a * (1.0 - m["cdf"])
            dvar_db = 2.0 * (m["pos_mean"] + a * a * m["neg_mean"] - m["mean"] * dm_db)
            dvar_da = 2.0 * (a * m["neg_sq"] - m["mean"] * m["neg_mean"])
            k = (-0.5 * inv_std * inv_std) * (m["var"] >= _VAR_FLOOR)
            coef = torch.stack([-inv_std * dm_db, k * dvar_db, inv_std, -inv_std * m["neg_mean"],
                                k * dvar_da])
        ctx.save_for_backward(t, out, a, inv_std, coef)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.native:
            t, b, a = ctx.saved_tensors
            grad_t, grad_b, grad_a = native.snprelu_backward(grad, t, b, a, ctx.needs_input_grad[0])
            return grad_t, grad_b if ctx.needs_input_grad[1] else None, \
                grad_a if ctx.needs_input_grad[2] else None
        t, out, a, inv_std, coef = ctx.saved_tensors
        n, dims, dt = t.dim(), _reduce_dims(t), t.dtype
        # grad where t > 0, else 0 (ReLU's backward kernel). On CPU this and the
        # broadcast multiplies below take a third of the time of aten's prelu
        # backward kernel, which computes the same two tensors (2.0 vs 6.2 ms at
        # 192x32x16x16; test_perf_equivalence checks the values).
        grad_pos = torch.ops.aten.threshold_backward(grad, t, 0.0)
        grad_t = None
        if ctx.needs_input_grad[0]:
            # inv_std * (grad where t > 0, a * grad elsewhere)
            grad_t = torch.addcmul(grad * _channel_view((a * inv_std).to(dt), n), grad_pos,
                                   _channel_view(((1.0 - a) * inv_std).to(dt), n))
        if coef is None:
            return grad_t, None, None
        f32 = torch.promote_types(dt, torch.float32)  # per-channel sums: float32 at least
        sum_g = grad.sum(dims, dtype=f32)
        sum_g_out = (grad * out).sum(dims, dtype=f32)          # = sum(g * (y - mean)) * inv_std
        sum_g_neg = ((grad - grad_pos) * t).sum(dims, dtype=f32)  # sum(g * min(t, 0)): d prelu / d a
        grad_b = coef[0] * sum_g + coef[1] * sum_g_out
        grad_a = coef[2] * sum_g_neg + coef[3] * sum_g + coef[4] * sum_g_out
        return grad_t, grad_b, grad_a


def snprelu(t: Tensor, bias: Tensor, slope: Tensor) -> Tensor:
    """Self-normalising PReLU of an input that already includes the shift:
    ``t = x + bias`` (``(B, C)`` or ``(B, C, H, W)``) -> ``(prelu(t; slope) - mean) / std``.

    Eager: the hand-written ``_SNPReLUFunction``. Under ``torch.compile`` the plain
    formula, which the compiler fuses and differentiates itself."""
    if torch.compiler.is_compiling():
        m = _moment_terms(bias, slope)
        n, dt = t.dim(), t.dtype
        return ((F.prelu(t, slope.to(dt)) - _channel_view(m["mean"].to(dt), n))
                / _channel_view(m["std"].to(dt), n))
    return _SNPReLUFunction.apply(t, bias, slope)


class SNPReLU(nn.Module):
    """Self-normalising PReLU: ``(prelu(x + b; a) - mean) / std`` per channel.

    ``b`` (``self.bias``, init 0) and ``a`` (``self.slope``, init 0.25) are learned
    per channel; ``mean`` and ``std`` are the analytic moments of
    ``prelu(z + b; a)`` for ``z ~ N(0, 1)`` (see ``output_moments``), so
    standard-normal input gives zero-mean, unit-variance output.
    Input ``(B, C)`` or ``(B, C, H, W)``; the channel dim is 1.
    ``forward_shifted(t)`` takes ``t = x + b`` already shifted (a preceding
    layer folds ``b`` into its bias: one pass over the big tensor fewer).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.slope = nn.Parameter(torch.full((channels,), 0.25))

    def output_moments(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(mean, std)`` of ``prelu(z + b; a)``, ``z ~ N(0, 1)``
        (:func:`plain.prelu_moments`)."""
        m = _moment_terms(self.bias, self.slope)
        return m["mean"], m["std"]

    def forward(self, x: Tensor) -> Tensor:
        return snprelu(x + _channel_view(self.bias.to(x.dtype), x.dim()), self.bias, self.slope)

    def forward_shifted(self, t: Tensor) -> Tensor:
        """``t = x + self.bias`` (the caller added the bias) -> the activation of ``x``."""
        return snprelu(t, self.bias, self.slope)

    def extra_repr(self) -> str:
        return f"{self.bias.numel()}"


def layer_act(layer: nn.Module, act: SNPReLU, x: Tensor) -> Tensor:
    """``act(layer(x))`` for a weight-normalised ``layer``, with the activation's
    shift folded into the layer's bias (one pass over the output fewer)."""
    return act.forward_shifted(layer(x, act.bias))


class Chain(nn.Sequential):
    """``nn.Sequential`` (same indices, same ``state_dict`` keys) that runs each
    weight-normalised layer directly followed by an ``SNPReLU`` as ``layer_act``."""

    def forward(self, x: Tensor) -> Tensor:
        mods = list(self)
        i = 0
        while i < len(mods):
            mod = mods[i]
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if isinstance(nxt, SNPReLU) and isinstance(mod, (WNLinear, WNConv2d, WNConvTranspose2d)):
                x = layer_act(mod, nxt, x)
                i += 2
            else:
                x = mod(x)
                i += 1
        return x


class _ResidualAddFunction(torch.autograd.Function):
    """``shortcut * alpha + residual * beta`` per channel (``alpha, beta: (C,)``,
    already renormalised) in one pass each way with the C kernels of
    ``nn/native.py``: the backward reads the gradient (and, when the
    coefficients learn, both inputs) once and writes both input gradients,
    where autograd over ``mul`` + ``addcmul`` makes about six passes."""

    @staticmethod
    def forward(ctx, shortcut: Tensor, residual: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        coef = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        ctx.save_for_backward(shortcut if coef else None, residual if coef else None, alpha, beta)
        return native.residual_forward(shortcut, residual, alpha, beta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        shortcut, residual, alpha, beta = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_sc, d_res, d_al, d_be = native.residual_backward(
            grad, shortcut, residual, alpha, beta, (need[0], need[1], need[2] or need[3]))
        return d_sc, d_res, d_al if need[2] else None, d_be if need[3] else None


class ResidualAdd(nn.Module):
    """``alpha * shortcut + beta * residual`` with per-channel learned ``(alpha, beta)``
    renormalised to ``alpha^2 + beta^2 = 1`` at every forward, so two
    unit-variance uncorrelated inputs give a unit-variance output.

    Initialised from the residue ratio ``r``: ``alpha = sqrt(1-r), beta = sqrt(r)``.
    Inputs ``(B, C)`` or ``(B, C, H, W)``.
    """

    def __init__(self, channels: int, ratio: float):
        super().__init__()
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"residue ratio must lie in [0, 1], got {ratio}")
        self.alpha = nn.Parameter(torch.full((channels,), math.sqrt(1.0 - ratio)))
        self.beta = nn.Parameter(torch.full((channels,), math.sqrt(ratio)))

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """The renormalised per-channel ``(alpha, beta)``, each ``(C,)``."""
        norm = torch.sqrt(self.alpha * self.alpha + self.beta * self.beta).clamp_min(1e-12)
        return self.alpha / norm, self.beta / norm

    def forward(self, shortcut: Tensor, residual: Tensor) -> Tensor:
        alpha, beta = self.coefficients()
        if (_fast_cpu_path(shortcut) and shortcut.shape == residual.shape
                and native.applies(shortcut, residual, alpha)):
            return _ResidualAddFunction.apply(shortcut, residual, alpha, beta)
        n, dt = shortcut.dim(), torch.result_type(shortcut, residual)
        return torch.addcmul(shortcut * _channel_view(alpha.to(dt), n), residual,
                             _channel_view(beta.to(dt), n))

    def extra_repr(self) -> str:
        return f"{self.alpha.numel()}"


def sample_offsets(batch: int, size_h: int, size_w: int, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random crop offsets ``(dy, dx)``, each ``(B,)`` int64, for ``random_offset``.

    With ``s = size // 4`` (per axis) each offset is the sum of two uniform
    integers in ``[0, s)``, so it lies in ``[0, 2s - 2]`` (0 when ``s == 0``).
    Drawn on ``generator``'s device when one is given, then moved to ``device``.
    """
    draw_device = generator.device if generator is not None else device
    offsets = []
    for s in (size_h // 4, size_w // 4):
        if s == 0:
            offsets.append(torch.zeros(batch, dtype=torch.long, device=device))
            continue
        two = torch.randint(0, s, (2, batch), generator=generator, device=draw_device)
        offsets.append(two.sum(0).to(device))
    return offsets[0], offsets[1]


def shift_images(images: tuple[Tensor, ...], dy: Tensor, dx: Tensor) -> tuple[Tensor, ...]:
    """Zero-pad by ``s = size // 4`` per axis and crop a window at ``(dy, dx)`` per sample.

    ``out[b, c, i, j] = padded[b, c, i + dy[b], j + dx[b]]
    = image[b, c, i + dy[b] - s_h, j + dx[b] - s_w]`` (0 outside the image): the
    content moves by ``s - offset`` pixels towards larger indices.
    One gather per tensor on the flattened padded image; no per-sample loop.
    """
    height, width = images[0].shape[-2:]
    s_h, s_w = height // 4, width // 4
    device = images[0].device
    padded_w = width + 2 * s_w
    rows = torch.arange(height, device=device) + dy.view(-1, 1)  # (B, H)
    cols = torch.arange(width, device=device) + dx.view(-1, 1)  # (B, W)
    index = (rows.unsqueeze(2) * padded_w + cols.unsqueeze(1)).view(-1, 1, height * width)
    out = []
    for image in images:
        if image.shape[-2:] != (height, width) or image.shape[0] != dy.shape[0]:
            raise ValueError("random_offset: paired images need the same batch and spatial size, "
                             f"got {tuple(image.shape)} and {tuple(images[0].shape)}")
        batch, channels = image.shape[:2]
        padded = F.pad(image, (s_w, s_w, s_h, s_h)).flatten(2)
        shifted = padded.gather(2, index.expand(batch, channels, height * width))
        out.append(shifted.view(batch, channels, height, width))
    return tuple(out)


def random_offset(*images: Tensor, generator: torch.Generator | None = None
                  ) -> Tensor | tuple[Tensor, ...]:
    """Random-offset augmentation for the discriminator and classifiers (docs/method.md 5).

    images: one or more ``(B, C_i, H, W)`` tensors with the same ``B``, ``H``, ``W``;
    sample ``b`` of every tensor gets the SAME shift (paired inputs stay aligned).
    Each image is zero-padded by ``s = size // 4``, and the crop window starts at
    ``(dy, dx)`` in the padded image, each the sum of two uniform integers in
    ``[0, s)`` (see ``sample_offsets`` / ``shift_images``). Differentiable.
    Returns the single shifted tensor if one tensor was passed, else a tuple in
    the input order. ``generator`` makes the shifts reproducible.
    """
    if not images:
        raise ValueError("random_offset needs at least one image tensor")
    first = images[0]
    dy, dx = sample_offsets(first.shape[0], first.shape[-2], first.shape[-1],
                            first.device, generator)
    out = shift_images(images, dy, dx)
    return out[0] if len(out) == 1 else out
