"""``benchmarks/quality.py --scale``: iterations and stage 1's schedule scale together."""
from __future__ import annotations

from dsu_models.factory import build_config
from tests.tiny import load_benchmark

quality = load_benchmark("quality")


def test_scale_shrinks_iterations_and_stage1_schedule_together():
    base = build_config("quality", [quality.LABELED, "stage1.enc_freeze=400"])
    scaled = build_config("quality", [quality.LABELED, "stage1.enc_freeze=400"]
                          + quality.scaled_overrides(base, 0.25))
    assert scaled.stage1.iterations == base.stage1.iterations // 4
    assert scaled.stage2.iterations == base.stage2.iterations // 4
    assert scaled.stage1.cla1_ramp == [t // 4 for t in base.stage1.cla1_ramp]
    assert scaled.stage1.enc_freeze == 100
    assert scaled.stage1.emb_freeze == base.stage1.emb_freeze == 0   # 0 stays off
    # the adversary still ramps in before the shorter stage 1 ends
    assert scaled.stage1.cla1_ramp[1] < scaled.stage1.iterations


def test_scale_one_changes_nothing():
    base = build_config("quality", [quality.LABELED])
    again = build_config("quality", [quality.LABELED] + quality.scaled_overrides(base, 1.0))
    assert again.to_dict() == base.to_dict()
