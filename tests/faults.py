"""Fault injection for the tests, kept out of the product's code.

The test session's Ray instance (``conftest.ray_session``) runs :func:`install`
in every worker process it starts (Ray's ``worker_process_setup_hook``), and the
test process calls it too. ``install`` wraps each stage class's ``train_step``:
before a step it reads the plan file named by ``$DSU_TEST_FAULTS`` (absent: no
fault) and, when the plan matches the stage and iteration, fails once, either
raising or dying as a killed process does (SIGKILL: no clean-up runs). A marker
file, created atomically, makes the fault fire once per plan even across
restarted workers. Tests write the plan with the ``faults`` fixture.
"""
from __future__ import annotations

import functools
import importlib.abc
import json
import os
import signal
import sys
from pathlib import Path

PLAN_ENV = "DSU_TEST_FAULTS"


class InjectedFault(RuntimeError):
    """The planned failure (tests assert on it)."""


def plan(path: Path, iteration: int, marker: Path, stage: str | None = None, kill: bool = False,
         rank: str = "last", nan: bool = False) -> None:
    """Fail once at ``iteration`` of ``stage`` (any stage when None) on the last
    rank (``rank="last"``) or on any rank (``"any"``); ``nan``: instead of
    failing, that step's images are NaN (a non-finite loss on that rank)."""
    path.write_text(json.dumps({"stage": stage, "iteration": iteration, "marker": str(marker),
                                "kill": kill, "rank": rank, "nan": nan}))


def _rank() -> tuple[int, int]:
    try:
        import ray.train
        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    except Exception:  # not in a Train worker (a Tune trial, the test process)
        return 0, 1


def _maybe_fail(stage) -> bool:
    """Fire the planned fault if it is due; True: poison this step's batch."""
    path = os.environ.get(PLAN_ENV)
    if not path or not os.path.exists(path):
        return False
    p = json.loads(Path(path).read_text())
    if stage.iteration != p["iteration"] or p["stage"] not in (None, stage.name):
        return False
    rank, world = _rank()
    if p["rank"] == "last" and rank != world - 1:
        return False
    try:
        os.close(os.open(p["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    if p.get("nan"):
        return True
    if p["kill"]:
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"test fault: simulated failure of {stage.name} at iteration {stage.iteration}")


STAGE_CLASSES = {"dsu_models.stages.stage1": "Stage1", "dsu_models.stages.classifier": "ClassifierStage",
                 "dsu_models.stages.stage2": "Stage2", "dsu_models.stages.lenc": "LencStage"}


def _wrap(cls) -> None:
    step = cls.train_step
    if getattr(step, "_dsu_faults", False):
        return

    @functools.wraps(step)
    def wrapped(self, batch, _step=step):
        if _maybe_fail(self):
            batch = {**batch, "image": batch["image"] * float("nan")}
        return _step(self, batch)

    wrapped._dsu_faults = True
    cls.train_step = wrapped


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Wraps a stage class when its module is first imported, so that a worker
    which never trains (a torch-free decode task) never imports torch."""

    def find_spec(self, name, path, target=None):
        if name not in STAGE_CLASSES:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                run = spec.loader.exec_module

                def exec_module(module, _run=run):
                    _run(module)
                    _wrap(getattr(module, STAGE_CLASSES[name]))

                spec.loader.exec_module = exec_module
                return spec
        return None


def install() -> None:
    """Wrap every stage class's ``train_step``: now for modules already imported,
    on first import for the others (idempotent)."""
    for name, cls_name in STAGE_CLASSES.items():
        if name in sys.modules:
            _wrap(getattr(sys.modules[name], cls_name))
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
