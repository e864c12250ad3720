"""``benchmarks/quality.py --scale``: iterations and stage 1's schedule scale together."""
from __future__ import annotations

from dsu_models.config import load_config
from tests.tiny import load_benchmark

quality = load_benchmark("quality")


def test_scale_shrinks_iterations_and_stage1_schedule_together():
    chosen = [quality.LABELED['shapes3d'], "stage1.enc_freeze=400", "stage1.ubatch_ramp=[2000, 3000]"]
    base = load_config("quality", chosen)
    scaled = load_config("quality", chosen + quality.scaled_overrides(base, 0.25))
    assert scaled.stage1.iterations == base.stage1.iterations // 4
    assert scaled.stage2.iterations == base.stage2.iterations // 4
    assert scaled.stage1.cla1_ramp == [t // 4 for t in base.stage1.cla1_ramp]
    assert scaled.stage1.ubatch_ramp == [500, 750]
    assert scaled.stage1.enc_freeze == 100
    assert scaled.stage1.emb_freeze == base.stage1.emb_freeze == 0   # 0 stays off
    # the adversary still ramps in before the shorter stage 1 ends
    assert scaled.stage1.cla1_ramp[1] < scaled.stage1.iterations


def test_scale_one_changes_nothing():
    base = load_config("quality", [quality.LABELED['shapes3d']])
    again = load_config("quality", [quality.LABELED['shapes3d']] + quality.scaled_overrides(base, 1.0))
    assert again.to_dict() == base.to_dict()


def test_fine_preset_is_the_measured_run():
    """The ``fine`` preset is the run that met the fine bar on sprites (docs/benchmarks.md,
    "The fine bar on sprites") up to its first stage-2 milestone: the ``quality`` preset
    on sprites three times over, with the code-only adversary, the later batch-loss
    ramp and a 12-dimension unknown code."""
    chosen = ["dataset=sprites", quality.LABELED["sprites"], "unknown_size=12",
              "stage1.ubatch_ramp=[2000, 3000]", "stage1.cla1_mode=code",
              "stage2.iterations=2000", "lenc.iterations=200"]
    base = load_config("quality", chosen)
    # stopped at the first stage-2 milestone, where both runs met the bar
    measured = load_config("quality", chosen + quality.scaled_overrides(base, 3)
                            + ["stage2.iterations=2000"])
    fine = load_config("fine", [])
    assert fine.to_dict() == measured.to_dict()
    assert fine.stage1.cla1_mode == "code" and fine.stage1.ubatch_ramp == [6000, 9000]
    # one setting away from the method's adversary
    assert load_config("fine", ["stage1.cla1_mode=compound"]).stage1.cla1_mode == "compound"


def test_bars_judge_each_line():
    good = {"swap_acc_mean": 0.97, "swap_acc_shape": 0.95, "swap_acc_scale": 0.99,
            "preserve_mean": 0.93, "leak_excess_mean": 0.02}
    assert quality.bar_met(good, "fine") and quality.bar_met(good, "basic")
    one_weak = dict(good, swap_acc_shape=0.89)   # the mean still passes; one factor does not
    assert not quality.bar_met(one_weak, "fine") and quality.bar_met(one_weak, "basic")
    leaky = dict(good, leak_excess_mean=0.07)
    assert not quality.bar_met(leaky, "fine") and quality.bar_met(leaky, "basic")
    assert not quality.bar_met({}, "basic")      # missing figures never pass


def test_default_run_keeps_the_room_unknown_and_ramps_its_adversary_in_time():
    """The ``quick`` preset (the embedded default's labels): the object labeled,
    the room's colours unknown, and the adversary at full weight before stage 1
    ends (docs/benchmarks.md, "Time to quality")."""
    cfg = load_config("quick", [])
    assert cfg.labeled_factors == ["object_hue", "shape", "scale", "orientation"]
    assert cfg.hidden() == ["floor_hue", "wall_hue"]
    start, full = cfg.stage1.cla1_ramp
    assert 0 < start < full < cfg.stage1.iterations


def test_milestones_and_final_figures_reach_mlflow_as_curves(tmp_path, monkeypatch):
    """``--eval-every 10 --stage1-every 10 --tracking-uri``: a real tiny training,
    evaluated at stage-2 iterations 10 and 20 and along stage 1; MLflow holds each
    figure as a curve over those steps."""
    import torch
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("DSU_HOME", str(tmp_path))   # a local store keeps its artifacts there

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    small_eval = ["device=cpu", "evaluate.pairs=48", "evaluate.batch_size=64",
                  "evaluate.oracle_epochs=1", "evaluate.oracle_width=8", "evaluate.probe_samples=100"]
    assert quality.main(["--config", "tiny", "--eval-every", "10", "--stage1-every", "10",
                         "--out", str(tmp_path / "run"),
                         "--cache", str(tmp_path / "oracles"), "--tracking-uri", uri,
                         "--threads", str(torch.get_num_threads()), *small_eval]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quality").experiment_id])
    swap = client.get_metric_history(run.info.run_id, "val_swap_acc_shape")
    assert [m.step for m in sorted(swap, key=lambda m: (m.step, m.timestamp))][:2] == [10, 20]
    # the stage-1 model along stage 1, under its own names, at iterations 10 and 20
    stage1 = client.get_metric_history(run.info.run_id, "val_stage1_preserve_mean")
    assert sorted(m.step for m in stage1) == [10, 20]
    assert all(0 <= m.value <= 1 for m in stage1)
    minutes = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "training_minutes"),
                                       key=lambda m: m.step)]
    assert len(minutes) == 2 and 0 < minutes[0] < minutes[1]
    assert run.data.params["labeled_factors"] == str(["floor_hue", "wall_hue", "object_hue", "shape"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train_wall_min"] > 0 and 0 <= run.data.metrics["test_summary"] <= 1
    # milestones choose on val; the final figures are reported on test: distinct names
    assert "summary" not in run.data.metrics and "val_summary" in run.data.metrics


def test_milestones_off_the_report_grid_are_refused(tmp_path, capsys):
    """The runner hands a stage over only at its reports: an interval between them
    would silently skip milestones, so it is refused before any work starts."""
    import pytest

    with pytest.raises(SystemExit):
        quality.main(["--config", "tiny", "--stage1-every", "15", "--out", str(tmp_path / "run"),
                      "--cache", str(tmp_path / "oracles")])
    err = capsys.readouterr().err
    assert "--stage1-every 15" in err and "stage1.report_interval (10)" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "oracles").exists()
