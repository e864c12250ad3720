"""Numeric precision and device settings of a training step (``Config.precision``,
``channels_last``, ``cudnn_benchmark``; docs/usage.md, "On a GPU").

- ``fp32`` (default): everything in float32 (the method as specified).
- ``bf16``: the convolutions and linear layers run under ``torch.autocast`` in
  bfloat16; bfloat16 has float32's exponent range, so no loss scaling is needed.
- ``fp16``: the same in float16, with a dynamic loss scale (:class:`LossScale`),
  because float16 gradients underflow.

fp32 is the default because it measured fastest: on an H200 at the method's
batch sizes (64 at 32 px, 32 at 64 px) a step is hundreds of small kernels
whose cost is their number, not their arithmetic, and autocast adds cast
kernels; bf16 ran at 0.95-1.05x of fp32 (docs/benchmarks.md, "On a GPU"). Its
losses and swaps track fp32's, so it is there for larger networks and batches.
On a CPU bfloat16 is slower than float32 and the CPU kernels of
``nn/native.py`` are float32 only.

What stays in float32 under autocast, because the method needs it there: the
weight normalisation (``torch._weight_norm`` is not an autocast op, so norms are
taken of the float32 weights before the layer casts them), the SNPReLU's
analytic moments and every per-channel sum of its backward (``nn/layers.py``),
the residual coefficients' renormalisation, and every output head (encoder
codes, generator noise std, discriminator and classifier logits; ``WNLinear(...,
full_precision=True)``), so codes, KL terms, log-probabilities and the loss
values are float32. Parameters and the optimizer state are float32 always.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype ``precision`` means (None: float32, no autocast)."""
    return _DTYPES.get(precision)


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or a no-op for float32.

    ``cache=False`` while a CUDA graph is captured: autocast's cache of cast
    weights must not outlive the capture (PyTorch's CUDA-graph notes)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def configure_backends(device: torch.device, cudnn_benchmark: bool) -> None:
    """cuDNN's autotuner picks the fastest convolution algorithm per shape once
    (shapes are fixed in training). Process-wide; only CUDA reads it."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)


class LossScale:
    """Dynamic loss scaling for ``fp16``, kept on the device: no host sync.

    The objective is multiplied by ``scale`` before the backward pass; after it,
    :meth:`unscale` divides the gradients back and reports on the device whether
    any is non-finite (then the optimizer steps are skipped, see
    ``stages/common.Stage``), and :meth:`update` halves the scale after such a
    step and doubles it after ``growth_interval`` clean ones (the policy of
    ``torch.amp.GradScaler``, whose kernels it calls; a class of our own because
    the stages combine its flag with their own non-finite-loss flag and keep
    the scale in their checkpoints)."""

    def __init__(self, device: torch.device, init: float = 2.0 ** 16, growth_interval: int = 2000):
        self.scale = torch.full((), init, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_interval = growth_interval

    def unscale(self, parameters: list[Tensor]) -> Tensor:
        """Divide every gradient by the scale in place; returns ``found_inf``
        (0-d float32, 1.0 when some gradient is inf or NaN)."""
        found_inf = torch.zeros((), dtype=torch.float32, device=self.scale.device)
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in parameters:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        inv = self.scale.double().reciprocal().float()
        for grads in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
        return found_inf

    def update(self, found_inf: Tensor) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, 2.0, 0.5,
                                 self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.scale.detach().cpu(), "growth_tracker": self.growth_tracker.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])
