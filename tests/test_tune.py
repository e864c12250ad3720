"""Ray Tune sweeps (pipelines/tune.py): search-space checks before Ray, a stage-1
sweep with ASHA, MLflow nesting, the best config, resume after a failed trial,
and a stage-2 sweep that reuses a finished stage 1 through MLflow runs."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from dsu_models.config import ConfigError, read_yaml
from dsu_models.config import load_config
from pipelines.tracking import runs as tracking
from pipelines.sweeps import reused_stages
from pipelines.sweeps.driver import main
from pipelines.sweeps.report import STOPPED_TAG, without_defaults
from pipelines.sweeps.space import config_field, load_space
from pipelines.sweeps.trial import RESUMED_TAG, TRIAL_TAG

REPO = Path(__file__).resolve().parents[1]
# tiny preset at 8 px; a small evaluation so each report costs about a second
TINY = ["--config", "tiny", "image_size=8", "architecture.conv_channels=[8]", "num_samples=240",
        "all_stages.batch_size=8", "evaluate.pairs=64", "evaluate.probe_samples=200",
        "evaluate.oracle_epochs=1", "evaluate.oracle_samples=200", "evaluate.oracle_width=8"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """DSU_HOME (MLflow store, sweep folders, oracle cache) in tmp_path, removed afterwards."""
    home = tmp_path / "home"
    monkeypatch.setenv("DSU_HOME", str(home))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def _space(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _sweep_runs(client: MlflowClient, experiment: str = "disunknown-tune"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.`dsu.tune.path` != ''")


def _trial_runs(client: MlflowClient, sweep_id: str) -> dict:
    exp = client.get_run(sweep_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{sweep_id}'")
    return {r.data.tags[TRIAL_TAG]: r for r in runs}


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


# ----------------------------------------------------------------- spaces and CLI checks (fast)


@pytest.mark.parametrize("name", ["stage1.yaml", "stage2.yaml"])
def test_shipped_spaces_match_the_config(name):
    space = load_space(REPO / "tune_spaces" / name)
    assert space.stage == name.split(".")[0]
    for key in space.keys:
        config_field(key)  # raises on a key the Config does not have
    space.validate(lambda overrides: load_config("tiny", overrides))
    assert set(space.param_space()) == set(space.keys)


def test_config_field_names_bad_keys():
    assert config_field("stage1.cla1_weight") is float
    assert config_field("factors.shape.size") == int | None
    assert config_field("all_stages.lr") is float
    for bad, part in [("stage1.cla1_wieght", "cla1_wieght"), ("stage3.lr", "stage3"),
                      ("seed.x", "value"), ("stage1", "section"), ("all_stages.nope", "nope")]:
        with pytest.raises(ConfigError, match=part):
            config_field(bad)


@pytest.mark.parametrize("text, message", [
    ("stage: stage1\nspace:\n  stage1.cla1_wieght: {loguniform: [0.1, 1.0]}\n", "cla1_wieght"),
    ("stage: stage1\nspace:\n  stage1.cla1_weight: {lognormal: [0.1, 1.0]}\n", "unknown sampler"),
    ("stage: stage1\nspace:\n  stage1.cla1_weight: {loguniform: [0.0, 1.0]}\n", "low > 0"),
    ("stage: stage1\nspace:\n  stage1.cla1_weight: {uniform: [2.0, 1.0]}\n", "low < high"),
    ("stage: stage1\nspace:\n  stage2.dis_weight: {uniform: [0.1, 1.0]}\n", "not part of stage 1"),
    ("stage: stage2\nspace:\n  stage1.cla1_weight: {uniform: [0.1, 1.0]}\n", "only stage2"),
    ("stage: stage1\nspace:\n  stage1.iterations: {randint: [10, 20]}\n", "iteration budget"),
    ("stage: stage4\nspace:\n  stage1.lr: {uniform: [0.1, 1.0]}\n", "stage4"),
    ("stage: stage1\nspaces: {}\n", "spaces"),
])
def test_bad_space_files_are_refused(tmp_path, text, message):
    path = _space(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_space(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("entry, message", [
    ("stage1.cla1_adv_mode: {choice: [nlu, lll]}", "'lll' is not one of"),
    ("stage1.report_interval: {uniform: [1, 5]}", "expected an integer"),  # samples floats
    ("stage1.batch_size: {randint: [1, 8]}", "at least 2"),
])
def test_values_that_fail_resolution_are_refused(tmp_path, entry, message):
    space = load_space(_space(tmp_path, f"stage: stage1\nspace:\n  {entry}\n"))
    with pytest.raises(ConfigError, match=message):
        space.validate(lambda overrides: load_config("tiny", overrides))


def test_typo_refused_before_any_ray_work(home, tmp_path, monkeypatch, capsys):
    import pipelines.sweeps.driver as tune_cli

    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray was started for a bad space")

    monkeypatch.setattr(tune_cli, "init_ray", no_ray)
    path = _space(tmp_path, "stage: stage1\nspace:\n  stage1.cla1_wieght: {loguniform: [0.1, 1.0]}\n")
    assert main(["--space", str(path), "--samples", "2"] + TINY) == 2
    err = capsys.readouterr().err
    assert "cla1_wieght" in err and str(path) in err
    # a key both swept and overridden is refused as well
    path = _space(tmp_path, "stage: stage1\nspace:\n  stage1.lr: {uniform: [0.001, 0.01]}\n", "b.yaml")
    assert main(["--space", str(path)] + TINY + ["stage1.lr=0.1"]) == 2
    assert "both swept" in capsys.readouterr().err
    assert not (home / "tune").exists() and not (home / "mlflow.db").exists()


def test_without_defaults_keeps_only_choices():
    defaults = {"dataset": "d", "image_size": 32, "stage1": {"lr": 1.0, "iterations": 5}}
    raw = {"dataset": "d", "image_size": 8, "stage1": {"lr": 1.0, "iterations": 9}, "seed": 0}
    assert without_defaults(raw, defaults) == {"image_size": 8, "stage1": {"iterations": 9}, "seed": 0}


def test_relative_sqlite_store_is_made_absolute(tmp_path, monkeypatch):
    from pipelines.sweeps.driver import absolute_uri
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///sub/m.db") == f"sqlite:///{tmp_path.resolve()}/sub/m.db"
    assert absolute_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


# ----------------------------------------------------------------- stage-1 sweep (slow)


@pytest.mark.slow
def test_stage1_sweep_asha_mlflow_best_config_and_resume(ray_session, home, tmp_path, capsys,
                                                         faults_plan):
    """Four trials on 2 CPUs: lr 0 (nothing learns) against lr 0.01, twice.

    ASHA (grace 20 iterations, factor 2, budget 40): a lr-0 trial reaching the
    rung at 20 after both a good and a bad result are recorded is below the
    median and stopped; stage1_objective there is ~0.03 for lr 0 and > 0.1 for
    lr 0.01. One trial fails once at iteration 30 (after its checkpoint at 20);
    the resumed sweep continues only that one, from iteration 20."""
    space = _space(tmp_path, "stage: stage1\nspace:\n  stage1.lr: {grid: [0.01, 0.0]}\n")
    marker = faults_plan(30, rank="any")
    argv = (["--space", str(space), "--samples", "2", "--report-every", "20", "--grace-period", "20",
             "--reduction-factor", "2", "--cpus-per-trial", "1", "--name", "s1"]
            + TINY + ["stage1.iterations=40"])
    assert main(argv) == 1  # one trial failed: the sweep is unfinished
    first = capsys.readouterr().out
    assert marker.exists(), "the planned fault did not fire"

    client = MlflowClient(tracking.default_tracking_uri())
    (sweep,) = _sweep_runs(client)
    sweep_id = sweep.info.run_id
    assert sweep.data.tags["dsu.tune.sweep"] == "s1" and sweep.info.status == "FAILED"
    trials = _trial_runs(client, sweep_id)
    assert len(trials) == 4
    history = {t: _steps(client, r.info.run_id, "val_stage1_objective") for t, r in trials.items()}
    failed = [t for t in trials if f"trial {t} failed" in first]
    assert len(failed) == 1 and history[failed[0]] == [20]
    done_before = {t: h for t, h in history.items() if t not in failed}

    # Resume by the sweep's MLflow run id: only the failed trial runs, from its checkpoint.
    assert main(["--resume", sweep_id]) == 0
    out = capsys.readouterr().out
    reported = {line.split()[2] for line in out.splitlines() if line.startswith("[tune] trial ")
                and " iteration " in line}
    assert reported == set(failed)
    trials = _trial_runs(client, sweep_id)
    assert trials[failed[0]].data.tags[RESUMED_TAG] == "20"
    assert _steps(client, trials[failed[0]].info.run_id, "val_stage1_objective") == [20, 40]
    for t, steps in done_before.items():  # finished trials were not redone
        assert _steps(client, trials[t].info.run_id, "val_stage1_objective") == steps
        assert RESUMED_TAG not in trials[t].data.tags

    # ASHA: some lr-0 trial stopped at the first rung; every lr-0.01 trial ran to the end.
    rows = {r.data.tags[TRIAL_TAG]: (float(r.data.params["sampled.stage1.lr"]),
                                    _steps(client, r.info.run_id, "val_stage1_objective")[-1],
                                    r.data.tags.get(STOPPED_TAG)) for r in trials.values()}
    assert any(lr == 0.0 and last == 20 and stopped == "true" for lr, last, stopped in rows.values())
    assert all(last == 40 and stopped == "false" for lr, last, stopped in rows.values() if lr > 0)
    assert "stopped early by ASHA" in first

    # Each trial: a nested run with the sampled value, the resolved config, metrics and grids.
    for run in trials.values():
        assert run.data.params["image_size"] == "8" and "stage1.cla1_weight" in run.data.params
        assert run.data.params["stage1.lr"] == run.data.params["sampled.stage1.lr"]
        # a loss term has one name in every runner (the pipeline's stage runs log "rec" too)
        assert {"rec", "val_recon_mse", "val_stage1_objective"} <= set(run.data.metrics)
        assert run.info.status == "FINISHED"
        images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        assert any("stage1_reconstruction" in p for p in images)

    # The best trial learned; its config file loads and reproduces it.
    sweep = client.get_run(sweep_id)
    best = sweep.data.tags["dsu.tune.best_trial"]
    assert rows[best][0] == 0.01 and sweep.info.status == "FINISHED"
    assert sweep.data.params["best.stage1.lr"] == "0.01"
    assert sweep.data.metrics["best_val_stage1_objective"] > 0.1
    best_file = home / "tune" / "s1" / "best_config.yaml"
    cfg = load_config(str(best_file), [])
    assert cfg.stage1.lr == 0.01 and cfg.image_size == 8 and cfg.stage1.iterations == 40
    assert cfg == load_config("tiny", TINY[2:] + ["stage1.iterations=40", "stage1.lr=0.01"])
    raw = read_yaml(best_file, "best config")
    assert "factors" not in raw  # user-level: the dataset defaults are not copied in
    assert "best_config.yaml" in [a.path for a in client.list_artifacts(sweep_id)]
    assert "[tune] sweep s1: 4 trials" in out and "finished" in out


# ----------------------------------------------------------------- stage 2 (slow)


def _pipeline_runs_from(runner_dir: Path, cfg, client: MlflowClient) -> str:
    """MLflow runs shaped like the Ray pipeline's (stage1, distill, classifier under
    one parent), made from a single-process runner's outputs."""
    from dsu_models import distill as distill_mod
    experiment = tracking.setup(tracking.default_tracking_uri(), "disunknown")
    parent = tracking.start_parent(client, experiment, cfg)
    for stage in ("stage1", "classifier"):
        run_id, _ = tracking.stage_run(client, parent, stage, cfg)
        client.log_artifact(run_id, str(runner_dir / stage / "handoff.pt"))
        tracking.mark_complete(client, run_id)
    run_id, _ = tracking.stage_run(client, parent, "distill", cfg)
    distilled = distill_mod.load_codes(runner_dir / "stage1" / "codes.pt")
    out = runner_dir / "mlflow-distill"
    for split, codes in distilled["codes"].items():
        m = codes["mu"].shape[1]

        def column(t):
            return pa.FixedSizeListArray.from_arrays(pa.array(t.numpy().ravel()), m)

        (out / "codes" / split).mkdir(parents=True)
        pq.write_table(pa.table({"id": pa.array(codes["ids"].numpy()), "mu": column(codes["mu"]),
                                 "sigma": column(codes["sigma"])}), out / "codes" / split / "part.parquet")
    torch.save(distilled["stats"], out / "stats.pt")
    client.log_artifacts(run_id, str(out / "codes"), artifact_path="codes")
    client.log_artifact(run_id, str(out / "stats.pt"))
    tracking.mark_complete(client, run_id)
    return parent


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # one-epoch oracles on 240 images are weak
def test_stage2_sweep_reuses_stage1_from_mlflow(ray_session, home, tmp_path, capsys):
    from dsu_models.train import run as run_runner

    overrides = TINY[2:] + ["stage1.iterations=20", "classifier.iterations=10", "stage2.iterations=4"]
    cfg = load_config("tiny", overrides)
    runner_dir = tmp_path / "runner"
    run_runner(cfg, runner_dir, log=lambda _m: None, stages=["stage1", "classifier"])
    client = MlflowClient(tracking.default_tracking_uri())
    parent = _pipeline_runs_from(runner_dir, cfg, client)

    # Both sources give the same hand-offs and codes.
    runs = reused_stages.pipeline_runs(client, parent, {})
    a = reused_stages.from_mlflow(runs, tracking.default_tracking_uri(), tmp_path / "dl")
    b = reused_stages.from_runner(runner_dir)
    for split in ("train", "test"):
        for key in ("ids", "mu", "sigma"):
            assert torch.equal(a["codes"][split][key], b["codes"][split][key])
    assert a["stage1"]["iteration"] == b["stage1"]["iteration"] == 20

    # A config that differs from stage 1's is refused before Ray.
    space = _space(tmp_path, "stage: stage2\nspace:\n"
                             "  stage2.dis_weight: {loguniform: [0.5, 2.0]}\n"
                             "  stage2.unknown_mode: {choice: [dis, mse]}\n")
    assert main(["--space", str(space), "--pipeline-run", parent] + TINY + ["stage1.lr=0.5"]) == 2
    assert "stage1.lr" in capsys.readouterr().err

    # Without --config the sweep takes stage 1's config; two trials (the grace period is
    # the whole budget: no early stop), oracles trained once, before the trials.
    assert main(["--space", str(space), "--samples", "2", "--pipeline-run", parent,
                 "--report-every", "2", "--grace-period", "4", "--name", "s2"]) == 0
    out = capsys.readouterr().out
    assert out.count("[oracles]") >= 1 and "oracles cached" in out
    (sweep,) = _sweep_runs(client)
    trials = _trial_runs(client, sweep.info.run_id)
    assert len(trials) == 2
    (oracle_file,) = (home / "oracles").glob("oracle-*.pt")
    # written by the driver before any trial started, never rewritten by a trial
    assert oracle_file.stat().st_mtime * 1000 < min(r.info.start_time for r in trials.values())
    for run in trials.values():
        assert _steps(client, run.info.run_id, "val_summary") == [2, 4]
        assert run.data.params["sampled.stage2.unknown_mode"] in ("dis", "mse")
        assert 0 < run.data.metrics["val_summary"] <= 1
    best = load_config(str(home / "tune" / "s2" / "best_config.yaml"), [])
    assert best.stage1 == cfg.stage1 and 0.5 <= best.stage2.dis_weight <= 2.0
    assert math.isfinite(sweep.data.metrics["best_val_summary"])
    assert json.loads((home / "tune" / "s2" / "sweep.json").read_text())["upstream"]["runs"] == runs
