"""The default recipe (dsu_models/recipe.py): a schedule from a time budget and
this machine's measured speed, under whatever the user sets."""
from __future__ import annotations

import pytest

from dsu_models import recipe
from dsu_models.config import (ConfigError, DEFAULT_BUDGET_MINUTES, load_config, load_resolved,
                               save_config)

SPRITES = ["dataset=sprites", "labeled_factors=[shape, scale]"]


def test_schedule_shares_the_budget_by_each_stage_s_step_cost():
    layer = recipe.schedule(30, 0.1, ["stage1", "classifier", "stage2", "lenc"])
    seconds = {s: layer[s]["iterations"] * 0.1 * recipe.STEP_COST[s] for s in layer}
    assert sum(seconds.values()) == pytest.approx(30 * 60, rel=0.01)
    for stage, share in recipe.SHARES.items():
        assert seconds[stage] / (30 * 60) == pytest.approx(share, rel=0.01)
    n1 = layer["stage1"]["iterations"]
    assert layer["stage1"]["cla1_ramp"] == [int(0.3125 * n1), int(0.625 * n1)]
    assert layer["stage1"]["ubatch_ramp"] == [int(0.25 * n1), int(0.375 * n1)]
    longer = recipe.schedule(60, 0.1, ["stage1", "classifier", "stage2", "lenc"])
    assert all(longer[s]["iterations"] in (2 * layer[s]["iterations"], 2 * layer[s]["iterations"] + 1)
               for s in layer)


def test_a_stage_that_is_off_gives_its_share_to_stage1_and_no_stage_is_too_short():
    alone = recipe.schedule(10, 0.1, ["stage1"])
    assert alone.keys() == {"stage1"} and alone["stage1"]["iterations"] == 6000
    tiny = recipe.schedule(0.01, 1.0, ["stage1", "classifier"])
    assert tiny["stage1"]["iterations"] == tiny["classifier"]["iterations"] == recipe.MIN_ITERATIONS


def test_the_recipe_is_a_layer_under_the_user_s_settings(tmp_path):
    cfg = load_config(None, SPRITES + ["budget_minutes=20", "step_seconds=0.05"])
    want = recipe.schedule(20, 0.05, ["stage1", "classifier", "stage2", "lenc"])
    assert cfg.stage1.iterations == want["stage1"]["iterations"] and cfg.stage2.iterations == want["stage2"]["iterations"]
    assert (cfg.unknown_size, cfg.stage1.cla1_mode, cfg.stage1.cla1_target) == \
        (recipe.UNKNOWN_SIZE, "code", recipe.LEAK_TARGET)
    # the label readers never see shifted images; D still does
    assert not cfg.classifier.random_offset and not cfg.stage2.cla2_offset and cfg.stage2.random_offset
    mine = tmp_path / "mine.yaml"
    mine.write_text("dataset: sprites\nlabeled_factors: [shape, x]\nbudget_minutes: 20\nstep_seconds: 0.05\n"
                    "unknown_size: 5\nstage2: {iterations: 77}\n")
    cfg = load_config(mine, ["stage1.cla1_ramp=[10, 20]"])
    assert (cfg.unknown_size, cfg.stage2.iterations, cfg.stage1.cla1_ramp) == (5, 77, [10, 20])
    assert cfg.stage1.iterations == want["stage1"]["iterations"]


def test_no_config_named_gets_the_recipe_a_preset_keeps_its_schedule():
    cfg = load_config(None, SPRITES + ["step_seconds=0.05"], default_recipe=True)
    assert cfg.budget_minutes == DEFAULT_BUDGET_MINUTES
    stages = ["stage1", "classifier", "stage2", "lenc"]
    assert cfg.stage1.iterations == recipe.schedule(DEFAULT_BUDGET_MINUTES, 0.05, stages)["stage1"]["iterations"]
    quality = load_config("quality", [], default_recipe=True)
    assert quality.budget_minutes is None and quality.stage1.iterations == 8000
    assert load_config(None, SPRITES).budget_minutes is None    # library callers opt in


def test_the_resolved_config_keeps_the_measured_speed_and_reloads_unchanged(tmp_path):
    tiny = ["image_size=8", "architecture.conv_channels=[8]", "architecture.fc_features=16",
            "architecture.enc_gen_fc_layers=1", "stage1.code_cla1_features=16", "stage1.code_cla1_layers=1",
            "all_stages.batch_size=8", "budget_minutes=1"]
    cfg = load_config(None, SPRITES + tiny)
    assert 0 < cfg.step_seconds < 5
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_resolved(path) == cfg
    again = load_config(None, SPRITES + tiny + [f"step_seconds={cfg.step_seconds}"])
    assert again == cfg


@pytest.mark.parametrize("bad, key", [("budget_minutes=0", "budget_minutes"),
                                      ("budget_minutes=-5", "budget_minutes"),
                                      ("step_seconds=0", "step_seconds"),
                                      ("stage1.cla1_target=1.5", "stage1.cla1_target")])
def test_bad_recipe_values_are_refused_naming_the_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, SPRITES + ["budget_minutes=10", "step_seconds=0.05", bad])
