"""The step table (dsu_models/steps.py) is the one definition of the pipeline:
the single-process runner and the Ray pipeline both iterate it, and a stage is
declared once, on its class."""
from __future__ import annotations

import pytest

from dsu_models import config as config_mod
from dsu_models import steps, train
from dsu_models.stages import STAGE_CLASSES, make_stage, stage_class
from dsu_models.steps import PROCESS, RAY, Step, check_runner, stage_upstream, steps_for, trained_stages
from pipelines import cli
from tiny import tiny_config

SMALL = ("num_samples=300", "all_stages.iterations=4", "all_stages.report_interval=2")


def test_every_stage_has_a_config_section_and_a_step():
    assert tuple(STAGE_CLASSES) == config_mod.STAGES
    trained = [s.name for s in steps.STEPS if s.kind == "train"]
    assert trained == list(STAGE_CLASSES)
    for s in steps.STEPS:  # upstream steps come earlier in the table
        assert all(steps.STEP_NAMES.index(up) < steps.STEP_NAMES.index(s.name) for up in s.upstream), s


def test_each_runner_has_a_function_for_every_kind_it_runs():
    check_runner(PROCESS, train.RUNNERS)
    check_runner(RAY, cli.RUNNERS)
    with pytest.raises(NotImplementedError, match="no function for step kind"):
        check_runner(RAY, {k: v for k, v in cli.RUNNERS.items() if k != "evaluate"})


@pytest.mark.parametrize("overrides, trained", [
    ([], ["stage1", "classifier", "stage2", "lenc"]),
    (["labeled_factors=[]"], ["stage1", "stage2"]),
    (["stage2.use_embedding=false"], ["stage1", "classifier", "stage2"]),
])
def test_the_stages_of_a_config_come_from_the_stage_classes(overrides, trained):
    cfg = tiny_config(*overrides)
    assert trained_stages(cfg) == trained
    assert cli.pipeline_stages(cfg) == trained[:1] + ["distill"] + trained[1:] + ["evaluate", "register"]
    assert [s.name for s in steps_for(cfg, PROCESS)] == trained[:1] + ["distill"] + trained[1:] + ["register"]


def test_stage_upstream_maps_distill_to_its_statistics():
    products = {"stage1": {"h": 1}, "classifier": None, "distill": {"stats": {"mean": 0}, "codes": {}}}
    assert stage_upstream("stage2", products) == {"stage1": {"h": 1}, "classifier": None,
                                                  "code_stats": {"mean": 0}}
    assert stage_upstream("stage1", products) == {}
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        stage_class("nope")
    with pytest.raises(ValueError, match="unknown stage"):
        make_stage("nope", tiny_config(), [], {}, "cpu")


def test_a_new_step_is_one_entry_plus_its_function_in_each_runner(monkeypatch, tmp_path):
    """A step added to the table runs in the single-process runner, after its
    upstream, given the products so far; the Ray pipeline lists it in order and
    refuses to start while it has no function for its kind."""
    seen = []

    def inspect(step, run):
        seen.append((step.name, sorted(run.products)))
        return "inspected"

    extra = Step("inspect", "inspect", ("distill",), "a look at the codes")
    table = list(steps.STEPS)
    table.insert(table.index(steps.step("distill")) + 1, extra)
    monkeypatch.setattr(steps, "STEPS", tuple(table))
    monkeypatch.setitem(train.RUNNERS, "inspect", inspect)
    products = train.run(tiny_config(*SMALL), tmp_path / "run", stages=["stage1"], log=lambda line: None)
    assert seen == [("inspect", ["distill", "stage1"])]
    assert products["inspect"] == "inspected" and "register" in products and products["register"] is None

    with pytest.raises(NotImplementedError, match="ray runner has no function for step kind.*inspect"):
        cli.pipeline_stages(tiny_config())
    monkeypatch.setitem(cli.RUNNERS, "inspect", inspect)
    assert cli.pipeline_stages(tiny_config())[:3] == ["stage1", "distill", "inspect"]


def test_the_runner_refuses_a_stage_whose_inputs_it_lacks(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="stage stage2 needs stage1, classifier, distill first"):
        train.run(tiny_config(*SMALL), tmp_path / "run", stages=["stage2"], log=lambda line: None)
    with pytest.raises(config_mod.ConfigError, match=r"stages \['lenc'\]: not among"):
        train.run(tiny_config("labeled_factors=[]"), tmp_path / "run2", stages=["lenc"], log=lambda line: None)
