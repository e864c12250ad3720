"""The Ray pipeline end to end (slow tier): two workers, a worker failure,
resume, a real MLflow server, ``ray job submit``, refusal before Ray starts."""
from __future__ import annotations

import os
import shutil
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from dsu_models.nn import builders
from dsu_models.config import config_from_dict
from pipelines.tracking import runs as tracking
from pipelines.cli import full_main
from servers import free_port, wait_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "tiny", "image_size=8", "architecture.conv_channels=[8]",
        "architecture.fc_features=16", "num_samples=240", "all_stages.iterations=6",
        "all_stages.report_interval=2", "all_stages.checkpoint_interval=2",
        "all_stages.sample_interval=6", "all_stages.batch_size=8",
        "evaluate.oracle_epochs=1", "evaluate.oracle_samples=200", "evaluate.pairs=32",
        "evaluate.probe_samples=200", "evaluate.batch_size=64",
        # a 6-iteration model never meets the default champion bar (tests/test_registry.py
        # checks that it is refused); these runs exercise the alias itself
        "evaluate.champion_swap=0", "evaluate.champion_preserve=0", "evaluate.champion_leak=1"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DSU_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _parent_ids(client: MlflowClient) -> list[str]:
    exp = client.get_experiment_by_name("disunknown")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`dsu.pipeline` = 'true'")
    return [r.info.run_id for r in runs]


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, key)})


def test_pipeline_two_workers_failure_and_resume(ray_session, home, tmp_path, capsys, faults_plan):
    # the last rank's worker process is killed (SIGKILL) once, at iteration 3
    marker = faults_plan(3, stage="stage1", kill=True)
    stale = set(Path(tempfile.gettempdir()).glob("dsu-stage1-*"))
    assert full_main(TINY + ["--workers", "2", "--cpus-per-worker", "0.5", "--stages", "stage1"]) == 0
    assert marker.exists(), "the planned fault did not fire"
    client = MlflowClient(tracking.default_tracking_uri())
    (parent,) = _parent_ids(client)
    stage1 = tracking.child_runs(client, parent)["stage1"]
    # the killed worker's work directory was removed by the attempt that replaced it
    left = set(Path(tempfile.gettempdir()).glob("dsu-stage1-*")) - stale
    assert not left, left
    # Restarted from the checkpoint at iteration 2: the count continued to 6.
    assert _steps(client, stage1.info.run_id, "total") == [2, 4, 6]
    # rank 0's progress lines reach the console once each, through the driver's
    # console (Ray Train's patched print both logged and echoed: lines came out twice)
    out = capsys.readouterr().out
    assert out.count("[stage1] 4/6 | ") == 1, out

    # The "interrupted" pipeline (only stage 1 ran) resumes: stage 1 is skipped.
    assert full_main(TINY + ["--workers", "2", "--cpus-per-worker", "0.5", "--resume", parent]) == 0
    out = capsys.readouterr().out
    assert f"[stage1] complete in run {stage1.info.run_id}; skipped" in out
    children = tracking.child_runs(client, parent)
    assert set(children) == {"stage1", "distill", "classifier", "stage2", "lenc", "evaluate", "register"}
    produced = {"distill": {"codes", "stats.pt"}, "evaluate": {"model", "pictures"}, "register": set()}
    for name, run in children.items():
        assert run.data.tags[tracking.COMPLETE_TAG] == "true", name
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config.yaml" in files, name
        assert produced.get(name, {"handoff.pt"}) <= files, (name, files)
        assert run.data.params["stage1.cla1_weight"] == "0.5"
    assert client.get_metric_history(children["stage2"].info.run_id, "rec")
    assert any(a.path.startswith("images") for a in client.list_artifacts(children["stage2"].info.run_id))

    # The final weights load and generate images of the right shape.
    handoff = torch.load(tracking.download(children["stage2"].info.run_id, "handoff.pt",
                                           tracking.default_tracking_uri(), tmp_path / "dl"),
                         weights_only=True)
    cfg = config_from_dict(handoff["config"])
    generator = builders.build_generator(cfg)
    generator.load_state_dict(handoff["weights"]["generator"])
    size = builders.generator_code_size(cfg)
    images, _ = generator(torch.cat([torch.randn(3, size), torch.zeros(3, size)], 1))
    assert images.shape == (3, cfg.image_channels, 8, 8)
    assert handoff["upstream_runs"]["stage1"] == stage1.info.run_id

    # evaluate logged the metric set; register made it the champion of the registry
    metrics = children["evaluate"].data.metrics
    for split in ("val", "test"):        # chosen on val, reported on test: both, under distinct names
        for key in ("swap_acc_mean", "preserve_mean", "content_consistency", "leak_excess_mean",
                    "recon_psnr", "frechet", "summary"):
            assert f"{split}_{key}" in metrics, (split, key)
        assert 0.0 <= metrics[f"{split}_swap_acc_mean"] <= 1.0
    pictures = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "pictures")}
    assert {"pictures/confusion_shape.png", "pictures/consistency_worst.png"} <= pictures, pictures
    version = client.get_model_version_by_alias("disunknown-shapes3d", "champion")
    from dsu_models.inference import DisUnknownModel
    model = DisUnknownModel.load("models:/disunknown-shapes3d@champion",
                                 tracking_uri=tracking.default_tracking_uri(), device="cpu")
    assert model.labeled_factors == cfg.labeled_factors
    swapped = model.swap(np.zeros((2, 8, 8, 3), np.uint8), {"shape": 1})
    assert swapped.shape == (2, 8, 8, 3) and swapped.dtype == np.uint8
    assert version.run_id in {children["register"].info.run_id, children["evaluate"].info.run_id}


def test_a_non_finite_loss_on_one_worker_fails_the_stage_once(ray_session, home, capsys, faults_plan):
    """NaN images on the last of two workers at iteration 3: both ranks stop in
    that iteration (their averaged losses are non-finite) and the stage fails
    once with that error, not retried from its checkpoint."""
    marker = faults_plan(3, stage="stage1", nan=True)
    assert full_main(TINY + ["--workers", "2", "--cpus-per-worker", "0.5", "--stages", "stage1"]) == 1
    assert marker.exists(), "the planned fault did not fire"
    captured = capsys.readouterr()
    error = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "NonFiniteLossError" in error[0] and "at iteration 3" in error[0], captured.err
    assert "resuming from iteration" not in captured.out


def test_killed_pipeline_resumes_the_unfinished_stage_from_its_checkpoint(ray_session, home, tmp_path,
                                                                         faults_plan):
    """A stage that dies with no retries left stops the pipeline; ``--resume``
    continues that stage from its last checkpoint instead of restarting it."""
    faults_plan(3, stage="stage1")
    # half a CPU per worker: the failed run's placement group may linger a moment,
    # and Ray Data must still find a CPU for decoding
    half = ["--cpus-per-worker", "0.5"]
    assert full_main(TINY + half + ["--stages", "stage1", "--max-failures", "0"]) == 1
    client = MlflowClient(tracking.default_tracking_uri())
    (parent,) = _parent_ids(client)
    run = tracking.child_runs(client, parent)["stage1"]
    assert run.data.tags[tracking.COMPLETE_TAG] == "false"
    assert run.info.status == "FAILED" and client.get_run(parent).info.status == "FAILED"
    assert len(client.get_metric_history(run.info.run_id, "total")) == 1  # step 2 only

    assert full_main(TINY + half + ["--stages", "stage1", "--resume", parent]) == 0
    run = tracking.child_runs(client, parent)["stage1"]
    assert run.data.tags[tracking.COMPLETE_TAG] == "true"
    history = client.get_metric_history(run.info.run_id, "total")
    # continued at iteration 2: steps 4 and 6 were added, step 2 was not redone
    assert sorted(m.step for m in history) == [2, 4, 6]


def test_bad_config_or_missing_data_fails_before_ray(tmp_path):
    """The script itself, as users call it (more refusals, in-process:
    tests/test_pipeline_refusals.py)."""
    env = dict(os.environ, DSU_HOME=str(tmp_path / "home"))
    env.pop("RAY_ADDRESS", None)
    cases = [(["stage1.cla1_mode=bogus", "--dataset", "mnist"], "stage1.cla1_mode: 'bogus'"),
             (["--data", str(tmp_path / "nowhere")], "nowhere")]
    for args, fragment in cases:
        done = subprocess.run([sys.executable, "pipelines/full.py", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert fragment in done.stderr
        assert "Started a local Ray instance" not in done.stdout + done.stderr
        assert not (tmp_path / "home" / "mlflow.db").exists()


# the lines the project prints on the pipeline's console (pipelines/console.py)
OWN = re.compile(r"^(\[(console|prepare|cluster|resume|stage1|distill|classifier|stage2|lenc|evaluate|register)\] "
                 r"|pipeline run |finished pipeline run |MLflow UI: |oracles (for|cached) |WARNING: oracle for )")


PASSWORD = "pa55-Word-never-logged-7781"


def _login_server(tmp_path) -> tuple[subprocess.Popen, str]:
    """``mlflow server --app-name basic-auth`` on 127.0.0.1 with user ``admin``."""
    ini = tmp_path / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\n"
                   f"admin_password = {PASSWORD}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    env = dict(os.environ, MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY="test-only-key")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    wait_for(f"{uri}/health", seconds=120, process=server)
    return server, uri


def test_the_console_and_a_tracking_server_with_a_login(tmp_path):
    """The script as a user runs it, on a fresh Ray of its own, against an MLflow
    server with a login. A missing or wrong login fails in one line before Ray
    starts. With the login: at least 90% of the console's lines are the
    project's, every stage reports its ETA and the pipeline's, Ray's and MLflow's
    messages are in the log file it names, the workers log through the server
    (stage 1 and stage 2 with validation curves) and the model is registered,
    and the password is in no param, tag, artifact or log line."""
    server, uri = _login_server(tmp_path)
    env = dict(os.environ, DSU_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    try:
        for login, fragment in (({}, "asks for a login (HTTP 401)"),
                                ({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong"},
                                 "refused the login of user 'admin' (HTTP 401)")):
            done = subprocess.run([sys.executable, "pipelines/full.py", *TINY, "--tracking-uri", uri],
                                  cwd=REPO, env={**env, **login}, capture_output=True, text=True, timeout=300)
            assert done.returncode == 2, done.stdout + done.stderr
            err = done.stderr.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"error: --tracking-uri {uri}: ") and fragment in err[0], err
            assert "Started a local Ray instance" not in done.stdout + done.stderr

        env.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD)
        done = subprocess.run([sys.executable, "pipelines/full.py", *TINY, "--tracking-uri", uri,
                               "evaluate.curve_interval=3"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        lines = (done.stdout + done.stderr).splitlines()
        assert done.returncode == 0, "\n".join(lines[-40:])
        foreign = [line for line in lines if not OWN.match(line)]
        assert len(foreign) <= 0.1 * len(lines), foreign
        for stage in ("stage1", "classifier", "stage2", "lenc"):
            progress = [line for line in lines if line.startswith(f"[{stage}] 6/6 | ")]
            assert len(progress) == 1 and " img/s | eta " in progress[0] and " | pipeline ~" in progress[0], lines
        assert any(line.startswith("[evaluate] 4/4") for line in lines)  # plain lines off a terminal
        (log,) = (tmp_path / "home" / "logs").glob("pipeline-*.log")
        assert f"[console] Ray's and MLflow's messages: {log}" in done.stdout
        assert "Started a local Ray instance" in log.read_text()
        assert any(line.startswith("[register] disunknown-shapes3d version 1") for line in lines), lines

        # the password: nowhere in the runs (params, tags, artifacts), the console or the log
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD)
        try:
            client = MlflowClient(uri)
            (parent,) = _parent_ids(client)
            runs = [client.get_run(parent)] + list(tracking.child_runs(client, parent).values())
            children = tracking.child_runs(client, parent)
            assert client.get_metric_history(children["stage1"].info.run_id, "rec")
            # validation curves, evaluated beside the training workers: at the first report past
            # each multiple of 3 (reports at 2, 4, 6) and at the end
            assert _steps(client, children["stage1"].info.run_id, "val_stage1_objective") == [4, 6]
            assert _steps(client, children["stage2"].info.run_id, "val_swap_acc_mean") == [4, 6]
            assert any(line.startswith("[stage2] val at 4: swap_acc_mean ") for line in lines), lines
            # the hand-offs went up through the server into its artifact store, none written locally
            assert "handoff.pt" in {a.path for a in client.list_artifacts(children["stage1"].info.run_id)}
            assert list((tmp_path / "server-artifacts").rglob("handoff.pt"))
            assert not (tmp_path / "home" / "artifacts").exists()
            for run in runs:
                assert PASSWORD not in str(run.data.params) + str(run.data.tags)
        finally:
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(key, None)
        stored = [p for p in (tmp_path / "server-artifacts").rglob("*") if p.is_file()]
        assert stored and not [p for p in stored if PASSWORD.encode() in p.read_bytes()]
        assert PASSWORD not in done.stdout + done.stderr + log.read_text()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_ray_job_submit_against_a_local_head(home, tmp_path):
    """`ray start --head` on 127.0.0.1 (stopped afterwards), then `ray job submit`.

    The session's own local Ray instance is shut down first: with two local
    instances on one machine the new head's job agent never comes up ("No
    available agent"). This is the last test of the session that uses Ray."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    temp_dir = tempfile.mkdtemp(prefix="dsu-head-", dir="/tmp")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"http://127.0.0.1:{dash}"
        wait_for(f"{address}/api/version", seconds=120)
        runtime_env = '{"env_vars": {"DSU_HOME": "%s"}}' % home
        for _ in range(30):  # the dashboard answers before its job agent is up
            done = subprocess.run(
                ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO),
                 "--runtime-env-json", runtime_env, "--",
                 "python", "pipelines/full.py", *TINY, "--stages", "stage1"],
                env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in done.stdout + done.stderr:
                break
            time.sleep(2)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "finished pipeline run" in done.stdout
        client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        (parent,) = _parent_ids(client)
        assert tracking.child_runs(client, parent)["stage1"].data.tags[tracking.COMPLETE_TAG] == "true"
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_local_pipeline_trains_on_every_core_and_keeps_a_cpu_for_decoding():
    """The local Ray the pipeline starts has one logical CPU more than the
    cores; one worker then trains with a thread per core, and one logical CPU
    stays free for Ray Data's decoding tasks (none free: the job starves)."""
    from ray._private.utils import get_num_cpus

    from pipelines.cluster.ray_init import pipeline_cpus
    from pipelines.cluster.placement import default_cpus_per_worker

    cores, total = get_num_cpus(), pipeline_cpus()
    assert default_cpus_per_worker([total], 1) == cores
    for workers in (1, 2, 4):
        per = default_cpus_per_worker([total], workers)
        assert per == max(0.5, cores / workers) and total - workers * per >= 1, (workers, per)
    assert default_cpus_per_worker([total], 2, use_gpu=True) == 1


@pytest.mark.parametrize("nodes, workers, share", [
    ([3], 1, 2), ([3], 2, 1), ([9], 2, 4),
    ([8, 8, 8], 1, 8),      # one worker takes a whole node; the others keep CPUs for decoding
    ([8, 8, 8], 3, 7),      # a whole cluster's share (23 / 3) fits no node
    ([8, 8, 8], 4, 4),      # two on each of two nodes, the third decodes
    ([4, 2], 2, 2),
    ([2], 4, 0.5),          # nothing fits: the smallest share, as before
])
def test_worker_cpus_fit_the_cluster_nodes(nodes, workers, share):
    from pipelines.cluster.placement import default_cpus_per_worker
    assert default_cpus_per_worker(nodes, workers) == share
