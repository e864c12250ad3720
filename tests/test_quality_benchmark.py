"""``benchmarks/quality.py --scale``: iterations and stage 1's schedule scale together."""
from __future__ import annotations

from dsu_models.factory import build_config
from tests.tiny import load_benchmark

quality = load_benchmark("quality")


def test_scale_shrinks_iterations_and_stage1_schedule_together():
    base = build_config("quality", [quality.LABELED['shapes3d'], "stage1.enc_freeze=400"])
    scaled = build_config("quality", [quality.LABELED['shapes3d'], "stage1.enc_freeze=400"]
                          + quality.scaled_overrides(base, 0.25))
    assert scaled.stage1.iterations == base.stage1.iterations // 4
    assert scaled.stage2.iterations == base.stage2.iterations // 4
    assert scaled.stage1.cla1_ramp == [t // 4 for t in base.stage1.cla1_ramp]
    assert scaled.stage1.enc_freeze == 100
    assert scaled.stage1.emb_freeze == base.stage1.emb_freeze == 0   # 0 stays off
    # the adversary still ramps in before the shorter stage 1 ends
    assert scaled.stage1.cla1_ramp[1] < scaled.stage1.iterations


def test_scale_one_changes_nothing():
    base = build_config("quality", [quality.LABELED['shapes3d']])
    again = build_config("quality", [quality.LABELED['shapes3d']] + quality.scaled_overrides(base, 1.0))
    assert again.to_dict() == base.to_dict()


def test_bars_judge_each_line():
    good = {"swap_acc_mean": 0.97, "swap_acc_shape": 0.95, "swap_acc_scale": 0.99,
            "preserve_mean": 0.93, "leak_excess_mean": 0.02}
    assert quality.bar_met(good, "fine") and quality.bar_met(good, "basic")
    one_weak = dict(good, swap_acc_shape=0.89)   # the mean still passes; one factor does not
    assert not quality.bar_met(one_weak, "fine") and quality.bar_met(one_weak, "basic")
    leaky = dict(good, leak_excess_mean=0.07)
    assert not quality.bar_met(leaky, "fine") and quality.bar_met(leaky, "basic")
    assert not quality.bar_met({}, "basic")      # missing figures never pass
