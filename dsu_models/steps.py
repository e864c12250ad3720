"""The pipeline's steps, defined once: the single-process runner
(``dsu_models.train``) and the Ray pipeline (``pipelines.cli``) both iterate
:data:`STEPS`.

A step has a name, the steps whose outputs it reads (``upstream``), what it
produces, its ``kind`` (how it runs: each runner keeps one function per kind)
and the runners that carry it (``runners``). A training step is declared by
its stage class (``dsu_models.stages``: ``name``, ``upstream``, ``active``);
the others are written out below. Adding a step is one entry here plus its
function in each runner it names; a runner refuses a table holding a step of a
kind it has no function for (:func:`check_runner`), so no step is dropped
silently.

Order: stage1 -> distill -> classifier -> stage2 -> lenc -> evaluate -> register
(docs/pipeline.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from dsu_models.config import Config

PROCESS, RAY = "process", "ray"  # the two runners


@dataclass(frozen=True)
class Step:
    """One step of the pipeline; see the module docstring."""
    name: str
    kind: str  # "train", "distill", "evaluate", "register"
    upstream: tuple[str, ...]
    produces: str
    runners: tuple[str, ...] = (PROCESS, RAY)
    active: Callable[[Config], bool] = field(default=lambda cfg: True, compare=False)


def _training_step(name: str, produces: str) -> Step:
    from dsu_models.stages import stage_class
    cls = stage_class(name)
    return Step(name, "train", cls.upstream, produces, active=cls.active)


def _table() -> tuple[Step, ...]:
    return (
        _training_step("stage1", "E, G1 and B1 (handoff.pt)"),
        Step("distill", "distill", ("stage1",),
             "every image's unknown code (mu, sigma) and the train codes' statistics"),
        _training_step("classifier", "the image classifier R (handoff.pt)"),
        _training_step("stage2", "G2, B2 and the labeled encoder (handoff.pt)"),
        _training_step("lenc", "the labeled encoder S (handoff.pt)"),
        # the single-process runner leaves evaluation to `python -m dsu_models evaluate`
        Step("evaluate", "evaluate", ("stage1", "distill", "stage2", "lenc"),
             "val_* and test_* metrics and their pictures", runners=(RAY,)),
        # the single-process runner's model is a folder (DIR/model); Ray's is a registered version
        Step("register", "register", ("evaluate",),
             "the model bundle: a folder, or a registered version that may take the alias"),
    )


STEPS: tuple[Step, ...] = _table()
STEP_NAMES = tuple(step.name for step in STEPS)


def step(name: str) -> Step:
    for s in STEPS:
        if s.name == name:
            return s
    raise ValueError(f"unknown step {name!r} (steps: {', '.join(STEP_NAMES)})")


def steps_for(cfg: Config, runner: str) -> list[Step]:
    """The steps ``runner`` runs for ``cfg``, in order."""
    return [s for s in STEPS if runner in s.runners and s.active(cfg)]


def trained_stages(cfg: Config) -> list[str]:
    """The training stages ``cfg`` has, in order (docs/method.md section 2)."""
    return [s.name for s in STEPS if s.kind == "train" and s.active(cfg)]


def check_runner(runner: str, kinds) -> None:
    """A runner's functions must cover every kind of step it is named in."""
    missing = sorted({s.kind for s in STEPS if runner in s.runners} - set(kinds))
    if missing:
        raise NotImplementedError(f"the {runner} runner has no function for step kind(s) "
                                  f"{', '.join(missing)} (dsu_models.steps.STEPS)")


def stage_upstream(stage: str, products: dict) -> dict:
    """What the training stage ``stage`` is built from, out of the finished
    steps' ``products`` (``{step: product}``; distill's product is
    ``{"codes", "stats"}``): ``{upstream step: hand-off}`` and ``code_stats``."""
    from dsu_models.stages import stage_class
    upstream = {}
    for name in stage_class(stage).upstream:
        product = products.get(name)
        if name == "distill":  # the stages read its statistics as code_stats
            upstream["code_stats"] = product["stats"] if product is not None else None
        else:
            upstream[name] = product
    return upstream
