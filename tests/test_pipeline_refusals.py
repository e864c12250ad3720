"""What the pipeline's command line refuses before Ray starts, how ``--resume``
takes its config from the run it names, and that a pipeline failing after its
start leaves its MLflow runs FAILED. No Ray here: ``init_ray`` is replaced by a
function that records the call, so a refusal is seen to come first."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from dsu_models.config import ConfigError, load_resolved
from dsu_models.data import prepare
from dsu_models.config import load_config
from pipelines import cli
from pipelines.tracking import runs as tracking

SMALL = ["image_size=8", "all_stages.batch_size=8", "stage1.iterations=7"]


class Stop(Exception):
    """Raised where the pipeline would start its Ray jobs."""


class _OneNode:
    """What the storage check asks of Ray, for a single-node instance."""

    @staticmethod
    def nodes():
        return [{"Alive": True, "NodeID": "0" * 56, "NodeManagerAddress": "127.0.0.1"}]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A local MLflow store and a prepared dataset; Ray never starts."""
    monkeypatch.setenv("DSU_HOME", str(tmp_path / "home"))
    started = []
    monkeypatch.setattr(cli, "init_ray", lambda *a, **k: started.append(a) or _OneNode)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = prepare("shapes3d", tmp_path / "data", num_samples=64, image_size=8)
    return {"uri": uri, "data": str(data), "started": started, "client": MlflowClient(uri)}


def _parent(store, *overrides) -> str:
    """A pipeline run as ``full_main`` starts one (its resolved config logged)."""
    cfg = load_config("tiny", SMALL + [f"data_path={store['data']}", *overrides])
    experiment = tracking.setup(store["uri"], "disunknown")
    return tracking.start_parent(store["client"], experiment, cfg)


def _run(store, *argv) -> int:
    return cli.full_main(["--tracking-uri", store["uri"], *argv])


def _seen_config(monkeypatch):
    """Stop at the data step and keep the config the pipeline would run with."""
    seen = []

    def ensure(cfg, config_arg, overrides):
        seen.append(cfg)
        raise Stop("stopped before the stages")

    monkeypatch.setattr(cli, "ensure_data", ensure)
    return seen


def test_resume_continues_with_the_runs_own_config(store, monkeypatch, capsys):
    parent = _parent(store, "stage1.lr=0.0007")
    seen = _seen_config(monkeypatch)
    assert _run(store, "--resume", parent) == 1           # stopped by the test
    (cfg,) = seen
    assert cfg.stage1.lr == 0.0007 and cfg.stage1.iterations == 7 and cfg.image_size == 8
    assert cfg.data_path == store["data"]


def test_resume_refuses_a_different_config_and_names_the_keys(store, monkeypatch, capsys):
    parent = _parent(store)
    seen = _seen_config(monkeypatch)
    assert _run(store, "--resume", parent, "stage1.lr=0.5", "stage2.iterations=3") == 2
    err = capsys.readouterr().err
    assert "stage1.lr" in err and "stage2.iterations" in err and "--change-config" in err
    assert not store["started"] and not seen
    # the same config given again is no change
    assert _run(store, "--resume", parent, "--config", "tiny", *SMALL, f"data_path={store['data']}") == 1
    assert seen[-1].stage1.iterations == 7
    # asked for: the new values are used
    assert _run(store, "--resume", parent, "--change-config", "stage1.lr=0.5") == 1
    assert seen[-1].stage1.lr == 0.5 and seen[-1].stage1.iterations == 7


def test_resume_of_an_unknown_or_a_stage_run_is_one_line(store, capsys):
    assert _run(store, "--resume", "0123456789abcdef0123456789abcdef") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume 0123456789abcdef") and "no such run" in err
    assert len(err.splitlines()) == 1
    parent = _parent(store)
    child, _ = tracking.stage_run(store["client"], parent, "stage1",
                                  load_config("tiny", SMALL + [f"data_path={store['data']}"]))
    assert _run(store, "--resume", child) == 2
    assert "'stage1' stage run" in capsys.readouterr().err
    assert not store["started"]


@pytest.mark.parametrize("argv, fragment", [
    (["--workers", "0"], "--workers 0: at least 1"),
    (["--workers", "3"], "stage1.batch_size 8 is not divisible by --workers 3"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker 0"),
    (["--max-failures", "-2"], "--max-failures -2"),
    (["device=cuda"], "device: 'cuda': Ray gives workers a GPU only with --gpu"),
    (["--gpu", "device=cpu"], "--gpu with device: 'cpu'"),
    (["--stages", "stage9"], "--stages: ['stage9']"),
])
def test_launch_flags_that_do_not_fit_are_refused_before_ray(store, capsys, monkeypatch, argv, fragment):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _run(store, "--config", "tiny", *SMALL, "--data", store["data"], *argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert not store["started"]


def test_gpu_flag_on_a_machine_without_enough_gpus(store, capsys, monkeypatch):
    import torch
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    workers = torch.cuda.device_count() + 1
    argv = ["--config", "tiny", *SMALL, "all_stages.batch_size=%d" % (8 * workers), "--data", store["data"]]
    assert _run(store, *argv, "--gpu", "--workers", str(workers)) == 2
    assert f"{workers} worker(s) need as many GPUs" in capsys.readouterr().err
    assert not store["started"]


def test_a_stage_that_fails_leaves_its_runs_failed_and_says_how_to_resume(store, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("worker lost\nsecond line of a long remote trace")

    monkeypatch.setitem(cli.RUNNERS, "train", broken)
    assert _run(store, "--config", "tiny", *SMALL, "--data", store["data"], "--stages", "stage1") == 1
    err = capsys.readouterr().err
    assert "error: the pipeline failed: RuntimeError: worker lost" in err and "second line" not in err
    client = store["client"]
    experiment = client.get_experiment_by_name("disunknown")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`dsu.pipeline` = 'true'")
    assert parent.info.status == "FAILED" and f"--resume {parent.info.run_id}" in err
    stage = tracking.child_runs(client, parent.info.run_id)["stage1"]
    assert stage.info.status == "FAILED" and stage.data.tags[tracking.COMPLETE_TAG] == "false"

    # resumed: both runs are RUNNING again while it works, FINISHED at the end
    states = []

    def works(step, cfg, data_dir, run_id, upstream, args, uri):
        states.append((client.get_run(run_id).info.status, client.get_run(parent.info.run_id).info.status))

    monkeypatch.setitem(cli.RUNNERS, "train", works)
    monkeypatch.setattr(cli, "ensure_data", lambda cfg, arg, overrides: (cfg, cfg.data_path))
    assert _run(store, "--resume", parent.info.run_id, "--stages", "stage1") == 0
    assert states == [("RUNNING", "RUNNING")]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert client.get_run(stage.info.run_id).info.status == "FINISHED"


def test_stage_alone_refuses_unknown_upstream_runs(store, capsys):
    argv = ["--config", "tiny", *SMALL, "--data", store["data"], "--tracking-uri", store["uri"],
            "--stage1-run", "feedfacefeedfacefeedfacefeedface"]
    assert cli.stage_main("distill", argv) == 2
    err = capsys.readouterr().err
    assert "--stage1-run feedfacefeedface" in err and "no such run" in err
    assert not store["started"]


def test_config_errors_still_name_the_key(store, capsys):
    with pytest.raises(ConfigError):
        load_config("tiny", ["stage1.lr=fast"])
    assert _run(store, "--config", "tiny", "stage1.lr=fast", "--data", store["data"]) == 2
    assert "stage1.lr" in capsys.readouterr().err


def test_the_default_store_follows_mlflow_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("DSU_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.default_tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.default_tracking_uri() == "http://127.0.0.1:5999"


def test_a_dataset_that_is_not_built_in_needs_its_prepared_folder(store, capsys):
    assert _run(store, "--dataset", "mnist") == 2
    err = capsys.readouterr().err
    assert "pass --data" in err and "prepare_data.py mnist" in err
    assert not store["started"]


def test_a_changed_config_is_recorded_and_a_later_resume_continues_with_it(store, monkeypatch, capsys):
    """--change-config writes the new config to the parent run and to each stage
    run it re-enters (config.yaml replaced, the one before kept, the keys tagged);
    a later plain --resume continues with it."""
    client = store["client"]
    # as full_main starts a pipeline: the storage root pinned in the logged config
    cfg, _ = cli.pin_storage(load_config("tiny", SMALL + [f"data_path={store['data']}", "stage1.lr=0.0007"]), [])
    parent = tracking.start_parent(client, tracking.setup(store["uri"], "disunknown"), cfg)
    stage1, _ = tracking.stage_run(client, parent, "stage1", cfg)  # started, not finished
    trained = []
    monkeypatch.setitem(cli.RUNNERS, "train", lambda step, cfg, *rest: trained.append(cfg.stage1.lr))
    monkeypatch.setattr(cli, "ensure_data", lambda cfg, arg, overrides: (cfg, cfg.data_path))
    assert _run(store, "--resume", parent, "--change-config", "stage1.lr=0.5", "--stages", "stage1") == 0
    assert trained == [0.5]

    for run_id in (parent, stage1):
        tags = client.get_run(run_id).data.tags
        assert tags[tracking.CONFIG_VERSION_TAG] == "2" and tags[tracking.CONFIG_CHANGES_TAG] == "v2: stage1.lr"
        with_now = load_resolved(tracking.download(run_id, "config.yaml", store["uri"], store["data"] + "-dl" + run_id))
        before = load_resolved(tracking.download(run_id, "config_versions/v1.yaml", store["uri"],
                                                 store["data"] + "-dl1" + run_id))
        assert with_now.stage1.lr == 0.5 and before.stage1.lr == 0.0007
        assert client.get_run(run_id).data.params["stage1.lr"] == "0.0007"  # params never change

    seen = _seen_config(monkeypatch)
    assert _run(store, "--resume", parent) == 1  # stopped by the test at the data step
    assert seen[-1].stage1.lr == 0.5
