"""The training stages (docs/method.md sections 7-9), one module each, and
their registry: :data:`STAGE_CLASSES` in training order, keyed by name.

A stage declares itself on its class (``name``, ``upstream``, ``reads_codes``,
``active``; see ``stages.common.Stage``); the step table (``dsu_models.steps``)
and every runner read those declarations, so adding a stage is its module, its
config section (``dsu_models.config``) and one entry here.
"""
from __future__ import annotations

from dsu_models.stages.common import Stage
from dsu_models.stages.stage1 import Stage1
from dsu_models.stages.classifier import ClassifierStage
from dsu_models.stages.stage2 import Stage2
from dsu_models.stages.lenc import LencStage

STAGE_CLASSES: dict[str, type[Stage]] = {cls.name: cls for cls in (Stage1, ClassifierStage, Stage2, LencStage)}


def stage_class(name: str) -> type[Stage]:
    """The stage class called ``name``; a ValueError names the known ones."""
    try:
        return STAGE_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r} (stages: {', '.join(STAGE_CLASSES)})") from None


def make_stage(name: str, cfg, factors, upstream: dict, device) -> Stage:
    """The stage ``name`` built from the config; ``upstream`` holds the hand-offs
    it starts from (``stage1``, ``classifier``, ``stage2``, ``code_stats``)."""
    return stage_class(name).build(cfg, factors, upstream, device)
