"""The default recipe (dsu_models/recipe.py): a schedule from a time budget and
this machine's measured speed, under whatever the user sets."""
from __future__ import annotations

import pytest

from dsu_models import recipe
from dsu_models.config import ConfigError, DEFAULT_BUDGET_MINUTES, load_config, load_resolved, save_config
from dsu_models.recipe import configured

SPRITES = ["dataset=sprites", "labeled_factors=[shape, scale]"]
STAGES = ["stage1", "classifier", "stage2", "lenc"]
STEP = {"stage1": 0.1, "classifier": 0.02, "stage2": 0.4, "lenc": 0.1}
GIVEN = "step_seconds={stage1: 0.1, classifier: 0.02, stage2: 0.4, lenc: 0.1}"


def test_schedule_shares_the_budget_by_each_stage_s_step_cost():
    layer = recipe.schedule(30, STEP, STAGES)
    seconds = {s: layer[s]["iterations"] * STEP[s] * recipe.OVERHEAD for s in layer}
    assert sum(seconds.values()) == pytest.approx(30 * 60, rel=0.01)
    for stage, share in recipe.SHARES.items():
        assert seconds[stage] / (30 * 60) == pytest.approx(share, rel=0.01)
    n1 = layer["stage1"]["iterations"]
    assert layer["stage1"]["cla1_ramp"] == [int(0.3125 * n1), int(0.625 * n1)]
    assert layer["stage1"]["ubatch_ramp"] == layer["stage1"]["ucode_ramp"] == [int(0.25 * n1), int(0.375 * n1)]
    longer = recipe.schedule(60, STEP, STAGES)
    assert all(longer[s]["iterations"] in (2 * layer[s]["iterations"], 2 * layer[s]["iterations"] + 1)
               for s in layer)


def test_a_stage_that_is_off_gives_its_share_to_stage1_and_no_stage_is_too_short():
    alone = recipe.schedule(10, STEP, ["stage1"])
    assert alone.keys() == {"stage1"} and alone["stage1"]["iterations"] == int(6000 / recipe.OVERHEAD)
    tiny = recipe.schedule(0.01, {"stage1": 1.0, "classifier": 1.0}, ["stage1", "classifier"])
    assert tiny["stage1"]["iterations"] == tiny["classifier"]["iterations"] == recipe.MIN_ITERATIONS


def test_saves_come_a_tenth_of_a_stage_apart_and_never_closer_than_the_time_floor():
    floor = recipe.MIN_SECONDS_BETWEEN_SAVES
    # a long stage: a tenth of it, rounded down to a round number
    assert recipe.save_interval(15000, 0.075) == 1000
    # a short stage: a tenth (20 iterations, 7 s) is under the floor; the first
    # round number past it
    every = recipe.save_interval(354, 0.33)
    assert every == 100 and every * 0.33 >= floor and 50 * 0.33 < floor
    # a stage shorter than the floor saves only at its end
    assert recipe.save_interval(190, 0.084) > 190
    readme_job = {"stage1": 0.08, "classifier": 0.03, "stage2": 0.33, "lenc": 0.084}
    layer = recipe.schedule(10, readme_job, STAGES)
    for stage, spec in layer.items():
        assert spec["checkpoint_interval"] == spec["sample_interval"]
        assert spec["checkpoint_interval"] * readme_job[stage] >= floor or spec["checkpoint_interval"] > spec["iterations"]
    assert layer["lenc"]["checkpoint_interval"] > layer["lenc"]["iterations"]
    assert layer["stage1"]["iterations"] // layer["stage1"]["checkpoint_interval"] >= 5


def test_the_recipe_is_a_layer_under_the_user_s_settings(tmp_path):
    cfg = configured(None, SPRITES + ["budget_minutes=20", GIVEN])
    want = recipe.schedule(20, STEP, STAGES)
    assert cfg.stage1.iterations == want["stage1"]["iterations"] and cfg.stage2.iterations == want["stage2"]["iterations"]
    # the adversary at the method's weight: no live-leakage multiplier
    assert (cfg.unknown_size, cfg.stage1.cla1_mode, cfg.stage1.cla1_adv_mode, cfg.stage1.cla1_target) == \
        (recipe.UNKNOWN_SIZE, "code", "prior", None)
    # the label readers never see shifted images; D still does
    assert not cfg.classifier.random_offset and not cfg.stage2.cla2_offset and cfg.stage2.random_offset
    # S (lenc) learns at the classifier's rate, three times the method's (a short stage)
    assert cfg.lenc.lr == cfg.classifier.lr == 3.0e-4 and configured(None, SPRITES).lenc.lr == 1.0e-4
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"dataset: sprites\nlabeled_factors: [shape, x]\nbudget_minutes: 20\n{GIVEN.replace('=', ': ')}\n"
                    "unknown_size: 5\nstage2: {iterations: 77}\n")
    cfg = configured(mine, ["stage1.cla1_ramp=[10, 20]", "stage1.cla1_target=0.05"])
    assert (cfg.unknown_size, cfg.stage2.iterations, cfg.stage1.cla1_ramp, cfg.stage1.cla1_target) == \
        (5, 77, [10, 20], 0.05)
    assert "live-leakage target 0.05" in recipe.describe_choices(cfg)
    assert cfg.stage1.iterations == want["stage1"]["iterations"]


def test_no_config_named_gets_the_recipe_a_preset_keeps_its_schedule():
    cfg = configured(None, SPRITES + [GIVEN], default=True)
    assert cfg.budget_minutes == DEFAULT_BUDGET_MINUTES
    assert cfg.stage1.iterations == recipe.schedule(DEFAULT_BUDGET_MINUTES, STEP, STAGES)["stage1"]["iterations"]
    quality = configured("quality", [], default=True)
    assert quality.budget_minutes is None and quality.stage1.iterations == 8000
    assert configured(None, SPRITES).budget_minutes is None    # only entry points default to it
    with pytest.raises(ConfigError, match="dsu_models.recipe.configured"):
        load_config(None, SPRITES + ["budget_minutes=5"])   # the plain loader does not time stages


def test_the_resolved_config_keeps_the_measured_speed_and_reloads_unchanged(tmp_path):
    tiny = ["image_size=8", "architecture.conv_channels=[8]", "architecture.fc_features=16",
            "architecture.enc_gen_fc_layers=1", "stage1.code_cla1_features=16", "stage1.code_cla1_layers=1",
            "all_stages.batch_size=8", "budget_minutes=1"]
    cfg = configured(None, SPRITES + tiny)
    assert cfg.step_seconds.keys() == set(STAGES) and all(0 < v < 5 for v in cfg.step_seconds.values())
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_resolved(path) == cfg
    assert configured(None, SPRITES + tiny + [recipe.speed_override(cfg.step_seconds)]) == cfg
    # the same command again on the run's folder: its speed is kept, nothing rescheduled
    assert configured(None, recipe.kept_speed(tmp_path, SPRITES + tiny)) == cfg


@pytest.mark.parametrize("bad, key", [("budget_minutes=0", "budget_minutes"),
                                      ("budget_minutes=-5", "budget_minutes"),
                                      ("step_seconds={stage1: 0, classifier: 1, stage2: 1, lenc: 1}",
                                       "step_seconds.stage1"),
                                      ("step_seconds={stage1: 1, classifier: 1, stage2: 1, lenc: 1, stage3: 1}",
                                       "step_seconds.stage3"),
                                      ("stage1.cla1_target=1.5", "stage1.cla1_target")])
def test_bad_recipe_values_are_refused_naming_the_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        configured(None, SPRITES + ["budget_minutes=10", GIVEN, bad])


def test_the_pipeline_measures_once_and_pins_the_speed_for_the_config_it_reloads(tmp_path, monkeypatch):
    """``full.py`` with no --config: the recipe's budget and measured speed join
    the overrides, so the config re-read against the prepared data is the same."""
    import argparse

    from pipelines import cli

    monkeypatch.setenv("DSU_HOME", str(tmp_path))
    measured = []
    real = recipe.measure_step_seconds
    monkeypatch.setattr(recipe, "measure_step_seconds", lambda cfg: measured.append(1) or real(cfg))
    parser = argparse.ArgumentParser()
    cli.add_common(parser)
    args = parser.parse_args(SPRITES + ["image_size=8", "architecture.conv_channels=[8]",
                                        "architecture.fc_features=16", "all_stages.batch_size=8",
                                        "budget_minutes=2"])
    cfg, overrides = cli._prologue(args, None)
    assert cfg.budget_minutes == 2 and measured == [1]
    assert configured(None, overrides) == cfg and measured == [1]


def test_a_speed_given_for_some_stages_only_is_refused():
    with pytest.raises(ConfigError, match="step_seconds: no value for classifier"):
        configured(None, SPRITES + ["budget_minutes=10", "step_seconds={stage1: 1}"])


def test_each_stage_is_timed_at_its_own_batch_size(monkeypatch):
    """A stage whose batch differs from stage 1's is timed at its own: its
    schedule would otherwise be planned for steps of another size."""
    sizes = {}

    def timed(stage, batch, device):
        sizes[stage.name] = batch["image"].shape[0]
        return 0.01

    monkeypatch.setattr(recipe, "_timed_steps", timed)
    cfg = load_config(None, SPRITES + ["image_size=8", "architecture.conv_channels=[8]",
                                       "architecture.fc_features=16", "all_stages.batch_size=4",
                                       "stage2.batch_size=6", "lenc.batch_size=3"])
    assert recipe.measure_step_seconds(cfg) == dict.fromkeys(STAGES, 0.01)
    assert sizes == {"stage1": 4, "classifier": 4, "stage2": 6, "lenc": 3}
