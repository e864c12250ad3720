"""pipelines.tracking.registry against a SQLite MLflow store in a temp folder: the pyfunc
model is logged and registered, the alias moves only to better models, and the
champion loads through DisUnknownModel.load, mlflow.pyfunc and the CLI."""
from __future__ import annotations

import os

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dsu_models.__main__ import main
from dsu_models.inference import DisUnknownModel, ModelLoadError, to_hwc_uint8
from pipelines.tracking.registry import SUMMARY_TAG, beats, log_and_register
from tiny_model import shared_tiny

NAME = "disunknown-shapes3d"
CHAMPION = f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with one run and three registrations: summaries 0.5, 0.3, 0.7."""
    d = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    assert uri.startswith("sqlite:////")
    client = MlflowClient(uri)
    experiment = client.create_experiment("registry-test", artifact_location=(d / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    return {"uri": uri, "client": client, "run_id": run_id, "dir": d, "registrations": []}


@pytest.fixture(scope="module")
def registered(tiny, store):
    was_set = mlflow.tracking.is_tracking_uri_set()
    for client, summary in ((store["client"], 0.5), (store["uri"], 0.3), (store["client"], 0.7)):
        store["registrations"].append(
            log_and_register(client, store["run_id"], tiny["bundle_dir"], "shapes3d", summary))
    store["tracking_was_set"] = (was_set, mlflow.tracking.is_tracking_uri_set())
    return store


def test_alias_moves_only_to_a_better_summary(registered):
    first, worse, better = registered["registrations"]
    client = registered["client"]
    assert [r.version for r in (first, worse, better)] == ["1", "2", "3"]
    assert first.promoted and first.previous_version is None
    assert not worse.promoted and worse.previous_version == "1" and worse.previous_summary == 0.5
    assert better.promoted and better.previous_version == "1" and better.previous_summary == 0.5
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    tags = client.get_model_version(NAME, "2").tags
    assert float(tags[SUMMARY_TAG]) == 0.3 and tags["dsu.dataset"] == "shapes3d"
    assert tags["dsu.run_id"] == registered["run_id"]
    assert client.get_model_version(NAME, "2").run_id == registered["run_id"]
    # the console line says where the alias went and the URI to load by
    assert first.describe("champion") == (f"{NAME} version 1 (summary 0.500) is now @champion; "
                                          f"load it as models:/{NAME}@champion")
    assert worse.describe("champion") == (f"{NAME} version 2 (summary 0.300) registered; @champion "
                                          f"stays on version 1 (summary 0.500); load this one as "
                                          f"models:/{NAME}/2")
    assert better.describe("best") == (f"{NAME} version 3 (summary 0.700) is now @best, replacing "
                                       f"version 1 (summary 0.500); load it as models:/{NAME}@best")


def test_registration_leaves_the_run_and_mlflow_settings_alone(registered):
    run = registered["client"].get_run(registered["run_id"])
    assert run.info.status == "RUNNING"              # it was RUNNING before
    before, after = registered["tracking_was_set"]
    assert before == after
    assert mlflow.active_run() is None


@pytest.mark.parametrize("summary, has_holder, holder_summary, expect", [
    (0.1, False, None, True),                 # no holder: any finite score
    (0.6, True, 0.5, True),
    (0.5, True, 0.5, False),                  # ties keep the holder
    (0.4, True, 0.5, False),
    (0.1, True, None, True),                  # holder without a recorded score
    (0.1, True, float("nan"), True),
    (float("nan"), False, None, False),       # a NaN score never takes the alias
    (float("inf"), True, 0.5, False),
])
def test_promotion_rule(summary, has_holder, holder_summary, expect):
    assert beats(summary, has_holder, holder_summary) is expect


def test_champion_loads_with_disunknown_model(tiny, registered):
    local = DisUnknownModel.load(tiny["bundle_dir"], device="cpu")
    x = tiny["test"].images[:4]
    y = torch.tensor([[1, 2, 3, 0]] * 4)
    logged = registered["registrations"][0].model_uri
    assert logged.startswith("models:/m-")
    for uri in (CHAMPION, f"models:/{NAME}/2", logged):
        remote = DisUnknownModel.load(uri, device="cpu", tracking_uri=registered["uri"])
        assert torch.equal(remote.swap_labels(x, y), local.swap_labels(x, y)), uri
        assert remote.factors[3].class_names == ("cube", "sphere", "cone", "pill")


def test_runs_uri_loads_a_bundle_logged_as_run_artifacts(tiny, registered):
    client = registered["client"]
    client.log_artifacts(registered["run_id"], str(tiny["bundle_dir"]), "bundle")
    model = DisUnknownModel.load(f"runs:/{registered['run_id']}/bundle", device="cpu",
                                 tracking_uri=registered["uri"])
    assert model.labeled_factors == ["floor_hue", "wall_hue", "object_hue", "shape"]


def test_bad_registry_uris_raise_one_clear_error(registered):
    with pytest.raises(ModelLoadError, match="models:/disunknown-nope@champion: could not download"):
        DisUnknownModel.load("models:/disunknown-nope@champion", tracking_uri=registered["uri"])
    with pytest.raises(ModelLoadError, match=f"models:/{NAME}@nobody"):
        DisUnknownModel.load(f"models:/{NAME}@nobody", tracking_uri=registered["uri"])


def test_pyfunc_predict_swaps_labels(tiny, registered):
    was_set, old = mlflow.tracking.is_tracking_uri_set(), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registered["uri"])
    try:
        pyfunc = mlflow.pyfunc.load_model(CHAMPION)
    finally:
        mlflow.set_tracking_uri(old if was_set else None)
    inputs = pyfunc.metadata.get_input_schema().inputs
    assert [(s.name, s.type, s.shape) for s in inputs] == [
        ("images", np.dtype(np.uint8), (-1, 16, 16, 3)), ("labels", np.dtype(np.int64), (-1, 4))]

    local = DisUnknownModel.load(tiny["bundle_dir"], device="cpu")
    x = tiny["test"].images[:4]
    hwc = x.permute(0, 2, 3, 1).numpy()
    labels = np.array([[1, 2, 3, 0], [0, 0, 0, 1], [9, 9, 9, 3], [-1, -1, 5, -1]], dtype=np.int64)
    out = pyfunc.predict({"images": hwc, "labels": labels})
    assert out.shape == (4, 16, 16, 3) and out.dtype == np.uint8
    assert np.array_equal(out, to_hwc_uint8(local.swap_labels(x, torch.from_numpy(labels))))
    assert np.array_equal(out[3:], local.swap(x[3:], {"object_hue": 5}))   # -1: S's reading
    with pytest.raises(MlflowException, match="dtype"):
        pyfunc.predict({"images": hwc.astype(np.float32), "labels": labels})


def test_cli_reads_the_champion_from_the_store(tiny, registered, tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "in.png"
    Image.fromarray(tiny["test"].images[0].permute(1, 2, 0).numpy()).save(png)
    rc = main(["encode", "--model", CHAMPION, "--tracking-uri", registered["uri"], "--device", "cpu",
               "--images", str(png)])
    assert rc == 0 and "shape=" in capsys.readouterr().out
    rc = main(["encode", "--model", "models:/disunknown-nope/7", "--tracking-uri", registered["uri"],
               "--images", str(png)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: models:/disunknown-nope/7: could not download")
    assert err.count("\n") == 1


# a sitecustomize that hides this repository's editable install, so the process
# it runs in can import dsu_models only from what the logged model carries
_HIDE_EDITABLE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable___disunknown")]
sys.path[:] = [p for p in sys.path if p and not p.rstrip("/").endswith(%r)]
"""


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_models_own_code(tiny, registered, tmp_path):
    """``mlflow models serve`` on the champion, in processes where this repository is
    not importable: /invocations gives DisUnknownModel's images."""
    import json
    import os
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from servers import free_port, stop, wait_for

    repo = Path(__file__).resolve().parents[1]
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(_HIDE_EDITABLE % repo.name)
    env = {**os.environ, "PYTHONPATH": str(hide), "MLFLOW_TRACKING_URI": registered["uri"]}
    probe = subprocess.run([sys.executable, "-c", "import dsu_models"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'dsu_models'" in probe.stderr

    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", CHAMPION, "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", 180, server)
        x = tiny["test"].images[:3]
        labels = [[1, 2, 3, 0], [0, 0, 0, 1], [-1, -1, 5, -1]]
        body = json.dumps({"inputs": {"images": x.permute(0, 2, 3, 1).tolist(),
                                      "labels": labels}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            served = np.asarray(json.load(reply)["predictions"], dtype=np.uint8)
    finally:
        stop(server)
        log = server.stdout.read().decode(errors="replace")
    local = DisUnknownModel.load(tiny["bundle_dir"], device="cpu")
    expect = to_hwc_uint8(local.swap_labels(x, torch.tensor(labels)))
    assert served.shape == (3, 16, 16, 3), log[-2000:]
    assert np.array_equal(served, expect)
    # the scoring process imported dsu_models from the model's own copy
    assert str(repo) not in log


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DSU_FRESH_ENV") != "1",
                    reason="builds a fresh uv environment with torch (minutes, gigabytes): "
                           "DSU_FRESH_ENV=1 runs it")
def test_fresh_environment_predicts_the_same_images(tiny, registered, tmp_path, monkeypatch):
    """``mlflow.models.predict(env_manager="uv")``: the logged model's own
    requirements and code, installed into a new environment, give
    DisUnknownModel's images."""
    import json

    monkeypatch.setenv("UV_PYTHON_DOWNLOADS", "never")  # the interpreter this session runs
    x = tiny["test"].images[:3]
    labels = [[1, 2, 3, 0], [0, 0, 0, 1], [-1, -1, 5, -1]]
    (tmp_path / "input.json").write_text(json.dumps(
        {"inputs": {"images": x.permute(0, 2, 3, 1).tolist(), "labels": labels}}))
    version = registered["registrations"][0].version
    was_set, old = mlflow.tracking.is_tracking_uri_set(), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registered["uri"])
    try:
        mlflow.models.predict(model_uri=f"models:/{NAME}/{version}", input_path=str(tmp_path / "input.json"),
                              content_type="json", output_path=str(tmp_path / "out.json"), env_manager="uv")
    finally:
        mlflow.set_tracking_uri(old if was_set else None)
    served = np.asarray(json.loads((tmp_path / "out.json").read_text())["predictions"], dtype=np.uint8)
    local = DisUnknownModel.load(tiny["bundle_dir"], device="cpu")
    assert np.array_equal(served, to_hwc_uint8(local.swap_labels(x, torch.tensor(labels))))


def test_a_version_that_misses_the_bar_is_registered_without_the_alias(tiny, registered):
    """The champion earns its alias: a better summary is not enough when the version misses
    the champion bar on val; it stays registered and the step says why in one line."""
    client = registered["client"]
    holder = str(client.get_model_version_by_alias(NAME, "champion").version)
    r = log_and_register(client, registered["run_id"], tiny["bundle_dir"], "shapes3d", 0.99,
                         bar_failures=["swap_acc_mean 0.120, needs >= 0.9"])
    assert not r.promoted and str(client.get_model_version_by_alias(NAME, "champion").version) == holder
    assert client.get_model_version(NAME, r.version).tags[SUMMARY_TAG] == "0.99"
    assert r.describe("champion") == (
        f"{NAME} version {r.version} (summary 0.990) registered without @champion: it misses the champion "
        f"bar on val (swap_acc_mean 0.120, needs >= 0.9); load it as models:/{NAME}/{r.version}")
    assert "\n" not in r.describe("champion")


def test_a_registry_error_fails_the_step_instead_of_moving_the_alias(tiny, registered, monkeypatch):
    client = MlflowClient(registered["uri"])
    holder = str(client.get_model_version_by_alias(NAME, "champion").version)

    def broken(name, alias):
        raise MlflowException("the registry is down", error_code="INTERNAL_ERROR")

    monkeypatch.setattr(client, "get_model_version_by_alias", broken)
    with pytest.raises(MlflowException, match="the registry is down"):
        log_and_register(client, registered["run_id"], tiny["bundle_dir"], "shapes3d", 0.999)
    assert str(registered["client"].get_model_version_by_alias(NAME, "champion").version) == holder
