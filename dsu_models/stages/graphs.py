"""A training step replayed as one CUDA graph (``Config.cuda_graphs``).

At the image sizes of this method a step is hundreds of small kernels: on a
GPU, launching them from Python takes longer than running them. Captured once
as a CUDA graph, the whole step (forward, backward, loss bookkeeping and
optimizer updates) is one launch.

A graph replays exactly the kernels it recorded, with the constants of the
moment of capture, so a stage captures only when its step no longer changes
from one iteration to the next (``Stage.steady_from``: every learning-rate
ramp and loss-weight ramp finished) and the batch has the captured shape.
Until then, and for any other batch shape, the step runs eagerly. Random
draws stay random: the graph advances the CUDA generator's offset at every
replay. What the capture needs of the step itself, ``Stage`` provides: no
host-device synchronisation (loss values and the non-finite check stay on
the device until a report), no host tensors, optimizers that may be
captured (fused Adam, ``capturable``). A capture that fails falls back to the
eager step for the rest of the stage, with one warning.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

WARMUP_STEPS = 3  # eager steps on a side stream before capture (PyTorch's CUDA-graph notes)


class StepGraph:
    """``run(batch)`` performs one step: eager warm-up steps on a side stream,
    then a capture, then replays. ``body(batch)`` is the stage's step, device
    work only; ``batch``: dict of device tensors."""

    def __init__(self, body: Callable[[dict], None], optimizers: list[torch.optim.Optimizer],
                 name: str):
        self.body, self.optimizers, self.name = body, optimizers, name
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, Tensor] | None = None
        self.warm = 0
        self.failed = False

    def usable(self, batch: dict) -> bool:
        """Whether this batch can go through the graph (or its warm-up)."""
        if self.failed:
            return False
        return self.static is None or all(
            k in batch and batch[k].shape == v.shape and batch[k].dtype == v.dtype
            for k, v in self.static.items())

    def run(self, batch: dict) -> None:
        if self.graph is not None:
            for k, v in self.static.items():
                v.copy_(batch[k], non_blocking=True)
            self.graph.replay()
            return
        if self.warm < WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.body(batch)
            torch.cuda.current_stream().wait_stream(side)
            self.warm += 1
            return
        self._capture(batch)

    def _capture(self, batch: dict) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["capturable"] = True
        self.static = {k: v.clone() for k, v in batch.items()}
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.body(self.static)
        except Exception as exc:  # noqa: BLE001: any capture failure means "run eagerly"
            self.failed, self.static = True, None
            torch.cuda.synchronize()
            warnings.warn(f"{self.name}: the training step could not be captured as a CUDA graph "
                          f"({type(exc).__name__}: {exc}); it runs eagerly (cuda_graphs=false "
                          f"silences this)", stacklevel=3)
            self.body(batch)
            return
        self.graph = graph
        graph.replay()  # the capture recorded this step's work without running it
