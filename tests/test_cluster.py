"""The pipeline on a real multi-node Ray cluster whose nodes share no disk
(pipelines/cluster/local_cluster.py): a head with no CPUs and three worker nodes, each in its own
mount namespace where the driver's DSU_HOME, the test's folders and the head's
Ray temp dir are empty; only the storage folder is seen by all (standing for
NFS). MLflow is a real ``mlflow server`` on 127.0.0.1.

- Node-local storage and a file MLflow store are refused up front, naming
  what to pass.
- ``full.py --workers 2 --storage s3://...`` (an S3 service on 127.0.0.1, so
  the nodes share no disk at all) completes while a worker node is SIGKILLed
  in the middle of stage 2: the group restarts on the spare node from the last
  checkpoint, the iteration count continues, the model loads and swaps; the
  built-in dataset, checkpoints and distilled codes went through the bucket,
  nothing under DSU_HOME.
- A trainer-backed sweep runs with the shared folder as its storage.
- A cluster that may add nodes (``DSU_CLUSTER_GROWS``, as ray_cluster.yaml
  sets it) with the head alone: a node-local folder is refused although no
  other node exists yet; a folder under a declared shared mount is proven and
  used, and the pipeline takes a worker node that joins while it runs.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines.cluster.local_cluster import Cluster, namespaces_work

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STAGE2_ITERATIONS = 40
# tiny nets on 8 px images: the cost is Ray's (worker groups, restarts), not the maths
SMALL = ["image_size=8", "architecture.conv_channels=[8]", "architecture.fc_features=16",
         "num_samples=240", "all_stages.batch_size=8", "all_stages.iterations=6",
         "all_stages.report_interval=2", "all_stages.checkpoint_interval=2", "all_stages.sample_interval=6",
         "evaluate.pairs=64", "evaluate.probe_samples=200", "evaluate.oracle_epochs=1",
         "evaluate.oracle_samples=200", "evaluate.oracle_width=8", "evaluate.batch_size=64",
         # tiny models never meet the default champion bar; these runs load the champion
         "evaluate.champion_swap=0", "evaluate.champion_preserve=0", "evaluate.champion_leak=1"]
ARTIFACTS = Path(os.environ.get("DSU_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = namespaces_work()
    if reason:
        print(f"multi-node cluster tests skipped: {reason}")
        pytest.skip(reason)
    c = Cluster(hidden=[tmp_path_factory.getbasetemp()])
    try:
        c.bucket = c.start_s3()
        c.start()
        for name in ("a", "b", "c"):  # two hold the stage's workers, one is the spare
            c.add_node(name, cpus=3)
        c.start_mlflow()
        yield c
    finally:
        c.shutdown()


def pipeline(c: Cluster, *args: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**c.env, "RAY_ADDRESS": c.address, "DSU_HOME": str(c.home), "PYTHONUNBUFFERED": "1",
           **(env_extra or {})}
    env.pop("DSU_STORAGE", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "pipelines/full.py", "--config", "tiny", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_node_local_storage_and_a_file_store_are_refused(cluster):
    proc = pipeline(cluster, "--tracking-uri", cluster.tracking_uri)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"storage {cluster.home} is not shared" in error[0], out[-3000:]
    assert "3 of the cluster's 4 nodes cannot see it" in error[0] and "--storage" in error[0]
    # the probe's marker is gone: the home holds at most the console's log folder
    assert {p.name for p in cluster.home.iterdir()} <= {"logs"}

    proc = pipeline(cluster, "--storage", str(cluster.shared),
                    "--tracking-uri", f"sqlite:///{cluster.scratch / 'local.db'}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert "start `mlflow server" in out and "--tracking-uri http://" in out, out[-3000:]


def _left_in(folder: Path) -> list[str]:
    """Everything under ``folder`` but the pipeline console's log files (logs/)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.relative_to(folder).parts[0] != "logs")


def _s3_listing(c: Cluster, root: str) -> list[str]:
    """Every object under ``root`` (``s3://bucket/...``), as paths below it."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(access_key="test", secret_key="test", region="us-east-1", scheme="http",
                           endpoint_override=c.env["AWS_ENDPOINT_URL"].split("://", 1)[1])
    base = root.split("://", 1)[1]
    found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(i.path[len(base) + 1:] for i in found if i.type == pafs.FileType.File)


def _worker_node(c: Cluster) -> str | None:
    """A live node that holds one of the running Train workers."""
    live = [n for n in c.nodes_running("TrainWorker") if c.nodes[n].poll() is None]
    return live[0] if live else None


def test_pipeline_survives_a_node_killed_in_stage2(cluster):
    from mlflow.tracking import MlflowClient

    from dsu_models.inference import DisUnknownModel

    root = f"{cluster.bucket}/pipeline"
    proc = pipeline(cluster, "--workers", "2", "--cpus-per-worker", "2", "--storage", root,
                    "--tracking-uri", cluster.tracking_uri, *SMALL, f"stage2.iterations={STAGE2_ITERATIONS}",
                    "stage2.checkpoint_interval=10", "stage2.report_interval=5",
                    "stage2.sample_interval=40")
    lines: list[str] = []
    killed: dict = {}

    def read():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"\[stage2\] (\d+)/%d \|" % STAGE2_ITERATIONS, line)
            # soon after the checkpoint at 10, likely before Ray Train has
            # registered it: the group resumes from the storage folder's newest
            if m and int(m.group(1)) >= 15 and "name" not in killed:
                name = _worker_node(cluster)
                if name is not None:
                    killed.update(name=name, at=int(m.group(1)), time=time.monotonic())
                    cluster.kill_node(name)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(30)
    out = "".join(lines)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "cluster-pipeline.log").write_text(out)
    assert proc.returncode == 0, out[-6000:]
    assert "name" in killed, "no stage-2 Train worker was found to kill\n" + out[-3000:]
    resumed = [int(m) for m in re.findall(r"\[stage2\] resuming from iteration (\d+)", out)]
    assert resumed and 10 <= resumed[-1] <= killed["at"], out[-6000:]
    after = [int(m) for m in re.findall(r"\[stage2\] (\d+)/%d \|" % STAGE2_ITERATIONS,
                                        out[out.index("[stage2] resuming"):])]
    assert after and after[0] > resumed[-1] and after[-1] == STAGE2_ITERATIONS
    assert "finished pipeline run" in out

    # nothing on the driver's DSU_HOME (but the console's log) or the shared folder;
    # data and checkpoints in the bucket
    assert _left_in(cluster.home) == []
    assert _left_in(cluster.shared) == []
    stored = _s3_listing(cluster, root)
    manifests = [f for f in stored if re.fullmatch(r"prepared/shapes3d-8px-\w+/manifest\.json", f)]
    assert len(manifests) == 1, stored
    assert any(f.startswith(manifests[0].rsplit("/", 1)[0] + "/train/") for f in stored)
    for stage in ("stage1", "classifier", "stage2", "lenc"):
        assert any(re.match(rf"ray_results/{stage}-\w+/checkpoint_[^/]+/state\.pt$", f) for f in stored), stage
    assert not [f for f in stored if f.startswith("codes/")]  # distilled codes went to MLflow, then away

    client = MlflowClient(cluster.tracking_uri)
    parent = re.search(r"finished pipeline run (\w+)", out).group(1)
    children = {r.data.tags["dsu.stage"]: r for r in client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")}
    for stage, artifact in (("stage1", "handoff.pt"), ("classifier", "handoff.pt"),
                            ("stage2", "handoff.pt"), ("lenc", "handoff.pt"), ("distill", "codes"),
                            ("evaluate", "model")):
        names = [a.path for a in client.list_artifacts(children[stage].info.run_id)]
        assert artifact in names, (stage, names)
    steps = [m.step for m in client.get_metric_history(children["stage2"].info.run_id, "images_per_s")]
    assert max(steps) == STAGE2_ITERATIONS

    model = DisUnknownModel.load("models:/disunknown-shapes3d@champion", device="cpu",
                                 tracking_uri=cluster.tracking_uri)
    images = model.examples["images"][:2]
    swapped = model.swap(images, {"shape": 1})
    assert swapped.shape == (2, 8, 8, 3)
    print(f"node {killed['name']} killed at stage-2 iteration {killed['at']}; resumed from {resumed[-1]}")


@pytest.mark.parametrize("where", ["shared", "s3"])
def test_trainer_backed_sweep_on_the_cluster(cluster, where):
    """--train-workers 1: each of two trials launches the stage's TorchTrainer on
    the worker nodes (Ray Data streaming the prepared data from the storage),
    rank 0 judges every report and Tune receives it; the sweep picks the better
    lr by that objective and writes its best config under the storage: the
    shared folder, or (mirrored from the driver's DSU_HOME) the bucket."""
    from mlflow.tracking import MlflowClient

    from dsu_models.config import load_config
    from pipelines.sweeps.trial import TRIAL_TAG

    name = f"ct-{where}"
    root = str(cluster.shared) if where == "shared" else f"{cluster.bucket}/sweeps"
    space = cluster.scratch / "space.yaml"  # the driver reads it; the nodes need not
    space.write_text("stage: stage1\nspace:\n  stage1.lr: {grid: [0.01, 0.0]}\n")
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "DSU_HOME": str(cluster.home)}
    env.pop("DSU_STORAGE", None)
    proc = subprocess.run(
        [sys.executable, "pipelines/tune.py", "--space", str(space), "--samples", "1", "--name", name,
         "--report-every", "2", "--grace-period", "4", "--train-workers", "1", "--cpus-per-trial", "1",
         "--storage", root, "--tracking-uri", cluster.tracking_uri,
         "--config", "tiny", *SMALL, "stage1.iterations=4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"cluster-sweep-{where}.log").write_text(out)
    assert proc.returncode == 0, out[-4000:]
    assert "[tune]" in out
    if where == "shared":
        folder = cluster.shared / "tune" / name
        stored = [str(p.relative_to(cluster.shared)) for p in cluster.shared.rglob("*") if p.is_file()]
        assert _left_in(cluster.home) == []
    else:
        folder = cluster.home / "tune" / name  # the record, on the driver; mirrored to the bucket
        stored = _s3_listing(cluster, root)
        assert _left_in(cluster.home) == sorted(["tune", f"tune/{name}"] + [
            f"tune/{name}/{f}" for f in ("base_config.yaml", "best_config.yaml", "space.yaml", "sweep.json")])
        for f in ("base_config.yaml", "best_config.yaml", "space.yaml", "sweep.json"):
            assert f"tune/{name}/{f}" in stored, stored
    assert (folder / "best_config.yaml").is_file(), out[-3000:]
    trainers = {f.split("/")[3] for f in stored if f.startswith(f"tune/{name}/trainers/stage1-")
                and re.search(r"/checkpoint_[^/]+/state\.pt$", f)}
    assert len(trainers) == 2, stored  # each trial's Ray Train run checkpointed under the storage
    assert any(re.fullmatch(r"prepared/shapes3d-8px-\w+/manifest\.json", f) for f in stored)

    client = MlflowClient(cluster.tracking_uri)
    exp = client.get_experiment_by_name("disunknown-tune")
    (sweep,) = client.search_runs([exp.experiment_id],
                                  f"tags.`dsu.tune.sweep` = '{name}' and tags.`dsu.tune.path` != ''")
    trials = client.search_runs([exp.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    assert len(trials) == 2 and all(TRIAL_TAG in r.data.tags for r in trials)
    for run in trials:  # rank 0 of each trial's trainer logged the judged reports
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_stage1_objective"))
        assert steps == [2, 4]
        assert "handoff.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    final = {float(r.data.params["sampled.stage1.lr"]): r.data.metrics["val_stage1_objective"] for r in trials}
    assert final[0.01] != final[0.0]  # Tune chose by the objective rank 0 reported
    best = load_config(str(folder / "best_config.yaml"), [])
    assert best.stage1.lr == max(final, key=final.get) and best.stage1.iterations == 4


def test_a_growing_cluster_with_the_head_alone(cluster, tmp_path_factory):
    """An autoscaling cluster before its workers come: the head alone (no CPUs).
    The check cannot ask nodes that do not exist yet, so a path must be under a
    mount the cluster declares shared; the pipeline then waits for a worker node,
    which joins while it runs, and finishes. (MLflow: the other cluster's server.)"""
    c = Cluster(hidden=[tmp_path_factory.getbasetemp()])
    grows = {"DSU_CLUSTER_GROWS": "1", "DSU_SHARED_MOUNTS": str(c.shared)}
    uri = cluster.tracking_uri
    try:
        c.start()
        proc = pipeline(c, *SMALL, "--tracking-uri", uri, env_extra=grows)  # storage: DSU_HOME, node-local
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2, out[-3000:]
        error = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "may add nodes" in error[0] and "DSU_SHARED_MOUNTS" in error[0], out[-3000:]
        assert str(c.shared) in error[0] and "s3://" in error[0]

        proc = pipeline(c, *SMALL, "--tracking-uri", uri, "--storage", str(c.shared / "dsu"),
                        "--stages", "stage1,distill", env_extra=grows)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not any(line.startswith("[prepare] ") for line in lines):  # it started, and waits for CPUs
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(1)
        c.add_node("late", cpus=3)
        proc.wait(timeout=600)
        reader.join(timeout=10)
        assert proc.returncode == 0, "".join(lines)[-3000:]
        assert any(line.startswith("[distill] done") for line in lines)
        assert (c.shared / "dsu" / "prepared").is_dir() and not any(c.home.glob("prepared"))
    finally:
        c.shutdown()
