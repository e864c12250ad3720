"""The one training loop: a stage from its current iteration to its last.

    batches in -> ``stage.train_step`` -> pictures when the stage says they are
    due -> every ``report_every`` / ``checkpoint_every`` iterations a report of
    the mean losses since the last one (``stage.take_losses``), with a
    checkpoint when one is due.

The single-process runner (``dsu_models.train``), the Ray Train worker
(``pipelines/jobs/worker.py``) and the Tune trial (``pipelines/sweeps/trial.py``)
all run a stage through :func:`run_stage`; what differs between them is where
reports, pictures and checkpoints go, which each says with a :class:`Sink`.

A non-finite loss raises ``NonFiniteLossError`` (see ``dsu_models.stages.common``):
on a CPU from the stage's step, so the loop stops at once; on a GPU, where
the step does not wait for the device, the bad step is skipped on the device
and the error comes from the next report, before its checkpoint. Either way
the last checkpoint is the last good state.
Resuming is loading a saved ``stage.state_dict()`` before calling
:func:`run_stage`; :class:`FileCheckpoints` does that for a folder on disk.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import Tensor

from dsu_models.files import CheckpointError, load_torch, save_torch


class Sink:
    """Where a running stage's output goes. Every method may be left as is."""

    def pictures(self, stage, images: dict[str, Tensor]) -> None:
        """``images``: uint8 (C, H, W) grids that became due after ``stage.iteration``."""

    def report(self, stage, losses: dict[str, float], images_per_s: float, checkpoint: bool) -> None:
        """The mean of each reported loss since the last report, at ``stage.iteration``;
        ``checkpoint``: save ``stage.state_dict()`` now."""


@dataclass
class Cadence:
    """How often the loop reports and checkpoints (in iterations). The last
    iteration always does both."""
    report_every: int
    checkpoint_every: int

    @classmethod
    def of(cls, stage) -> "Cadence":
        """The stage config's ``report_interval`` and ``checkpoint_interval``."""
        return cls(stage.scfg.report_interval, stage.scfg.checkpoint_interval)


class _Clock:
    """The images/s clock since the last report."""

    def __init__(self, iteration: int, images_per_step: int):
        self.images_per_step = images_per_step
        self.since, self.since_it = time.perf_counter(), iteration

    def take(self, iteration: int) -> float:
        now = time.perf_counter()
        rate = (iteration - self.since_it) * self.images_per_step / max(now - self.since, 1e-9)
        self.since, self.since_it = now, iteration
        return rate


def run_stage(stage, next_batch: Callable[[int], dict], sink: Sink, cadence: Cadence | None = None,
              plot_batch: dict | None = None, plot_set=None) -> None:
    """Train ``stage`` until ``stage.done``.

    next_batch: ``iteration -> batch`` (dict of tensors, see ``dsu_models.stages.common``).
    plot_batch / plot_set: what ``stage.pictures`` draws from (a fixed test batch;
    a labeled set for code scatter plots); no pictures without ``plot_batch``.
    Images/s count the stage's configured (global) batch per iteration."""
    cadence = cadence or Cadence.of(stage)
    clock = _Clock(stage.iteration, stage.scfg.batch_size)
    draws = plot_batch is not None and hasattr(stage, "pictures")
    while not stage.done:
        stage.train_step(next_batch(stage.iteration))
        it = stage.iteration
        if draws:
            images = stage.pictures(plot_batch, plot_set)
            if images:
                sink.pictures(stage, images)
        save = it % cadence.checkpoint_every == 0 or stage.done
        if save or it % cadence.report_every == 0:
            # the loss sums live on the device: reading them is the one sync of
            # the report, and a deferred non-finite loss raises here, before
            # the checkpoint
            losses = stage.take_losses()
            sink.report(stage, losses, clock.take(it), save)


class FileCheckpoints:
    """A stage's checkpoints in one folder: ``checkpoint.pt`` and the one before
    it, ``checkpoint.prev.pt``. A new checkpoint is written under a temporary
    name, read back, and only then takes ``checkpoint.pt``'s place (the old one
    becomes ``checkpoint.prev.pt``), so a crash at any point leaves a readable
    checkpoint. Resuming falls back to the previous one, with a warning that names
    the file, when the latest cannot be read."""

    LATEST, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.latest, self.previous = self.directory / self.LATEST, self.directory / self.PREVIOUS

    def save(self, state: dict) -> Path:
        staged = self.directory / "checkpoint.new.pt"
        try:
            save_torch(state, staged)
            load_torch(staged)  # read back: a file that does not load never replaces a good one
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        if self.latest.exists():
            self.latest.replace(self.previous)
        staged.replace(self.latest)
        return self.latest

    def load(self) -> dict | None:
        """The latest readable state, or None when there is none yet."""
        for path in (self.latest, self.previous):
            if not path.exists():
                continue
            try:
                return load_torch(path)
            except CheckpointError as exc:
                if path == self.previous or not self.previous.exists():
                    raise
                warnings.warn(f"{exc}; resuming from the previous checkpoint {self.previous}",
                              stacklevel=2)
        return None
