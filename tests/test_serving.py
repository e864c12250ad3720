"""The Ray Serve application against a real Serve instance on 127.0.0.1, serving
a tiny trained model registered in a SQLite MLflow store: every endpoint's
happy path equals DisUnknownModel on the same input, every bad request gets a
4xx with its message, a model that cannot be loaded fails the start, and the
explorer page works in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from dsu_models.inference import DisUnknownModel, to_hwc_uint8
from pipelines.serve import app_args, parse_args, start
from pipelines.serving.app import build
from dsu_models.data.codec import encode_png
from pipelines.tracking.registry import log_and_register
from servers import free_port
from tiny_model import shared_tiny

pytestmark = pytest.mark.slow
ARTIFACTS = Path(os.environ.get("DSU_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def service(tiny, ray_module, tmp_path_factory):
    """The champion of a fresh store, served with a 50 ms batch window (so that a
    burst of requests shares forward passes)."""
    from ray import serve

    d = tmp_path_factory.mktemp("serve-store")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("serve-test", artifact_location=(d / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    log_and_register(client, run_id, tiny["bundle_dir"], "shapes3d", 0.42)
    port = free_port()
    start({"model": "models:/disunknown-shapes3d@champion", "tracking_uri": uri, "device": "cpu",
           "num_cpus": 0.5, "threads": 1, "batch_wait_timeout_s": 0.05, "max_batch_size": 16,
           "limits": {"max_body_bytes": 200_000}}, port=port)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "model": DisUnknownModel.load(tiny["bundle_dir"], device="cpu"),
               "test": tiny["test"], "port": port, "store": uri}
    finally:
        serve.shutdown()


def _post(url: str, body, content_type: str = "application/json", timeout: float = 60):
    data = json.dumps(body).encode() if content_type == "application/json" and not isinstance(body, bytes) else body
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return reply.status, reply.headers.get("content-type"), reply.read()


def _refusal(url: str, body, content_type: str = "application/json") -> tuple[int, str]:
    with pytest.raises(urllib.error.HTTPError) as caught:
        _post(url, body, content_type)
    return caught.value.code, json.loads(caught.value.read())["error"]


def _png(image_chw: torch.Tensor) -> bytes:
    return encode_png(image_chw.permute(1, 2, 0).numpy())


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.load(reply)


def test_info_describes_the_registered_model(service):
    info = _get_json(service["url"] + "/info")
    assert info["name"] == "disunknown-shapes3d" and info["version"] == "1" and info["alias"] == "champion"
    assert info["summary"] == pytest.approx(0.42)
    assert [f["name"] for f in info["factors"]] == ["floor_hue", "wall_hue", "object_hue", "shape"]
    assert info["factors"][3]["class_names"] == ["cube", "sphere", "cone", "pill"]
    assert info["unknown_factors"] == ["scale", "orientation"]
    assert info["image_size"] == 16 and info["channels"] == 3 and len(info["examples"]) == 16
    with urllib.request.urlopen(service["url"] + "/examples/3.png", timeout=30) as reply:
        served = np.asarray(Image.open(io.BytesIO(reply.read())))
    assert np.array_equal(served, service["model"].examples["images"][3].permute(1, 2, 0).numpy())


def test_swap_equals_the_library(service):
    model, x = service["model"], service["test"].images[:3]
    payload = {"images": [base64.b64encode(_png(im)).decode() for im in x[:2]], "examples": [5],
               "set": {"shape": "sphere", "object_hue": 2}}
    status, _, body = _post(service["url"] + "/swap", payload)
    reply = json.loads(body)
    content = torch.cat([x[:2], model.examples["images"][5:6]])
    expect = model.swap(content, {"shape": "sphere", "object_hue": 2})
    assert status == 200 and (reply["rows"], reply["cols"]) == (3, 1)
    assert np.array_equal(np.stack([_decode(b) for b in reply["images"]]), expect)

    # one raw PNG in, one PNG out, settings in the query string
    status, kind, body = _post(service["url"] + "/swap?shape=cone&floor_hue=0.3", _png(x[0]), "image/png")
    assert status == 200 and kind == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(body))),
                          model.swap(x[:1], {"shape": "cone", "floor_hue": "0.3"})[0])


def test_sweep_gives_one_image_per_class(service):
    model, x = service["model"], service["test"].images[:2]
    payload = {"images": [base64.b64encode(_png(im)).decode() for im in x], "sweep": "shape",
               "set": {"wall_hue": 1}}
    reply = json.loads(_post(service["url"] + "/swap", payload)[2])
    assert (reply["rows"], reply["cols"]) == (2, 4) and len(reply["images"]) == 8
    got = np.stack([_decode(b) for b in reply["images"]])
    for c in range(4):
        assert np.array_equal(got[c::4], model.swap(x, {"shape": c, "wall_hue": 1})), c


def test_encode_and_generate_equal_the_library(service):
    model, x = service["model"], service["test"].images[:4]
    payload = {"images": [base64.b64encode(_png(im)).decode() for im in x]}
    reply = json.loads(_post(service["url"] + "/encode", payload)[2])
    assert torch.allclose(torch.tensor(reply["unknown"]), model.encode_unknown(x), atol=1e-5)
    assert reply["labels"] == model.encode_labels(x).tolist()
    assert reply["classes"][0]["shape"] in ("cube", "sphere", "cone", "pill")

    labels = {"floor_hue": 0, "wall_hue": "0.5", "object_hue": [1, 2, 3, 4], "shape": "pill"}
    reply2 = json.loads(_post(service["url"] + "/generate", {"unknown": reply["unknown"], "set": labels})[2])
    y = model.label_matrix(labels, 4)
    expect = to_hwc_uint8(model.generate(torch.tensor(reply["unknown"]), model.embed_labels(y)))
    assert np.array_equal(np.stack([_decode(b) for b in reply2["images"]]), expect)


def test_concurrent_callers_share_forward_passes(service):
    model, x = service["model"], service["test"].images[:8]
    before = _get_json(service["url"] + "/info")["served"]

    def call(i):
        payload = {"images": [base64.b64encode(_png(x[i])).decode()], "set": {"shape": i % 4}}
        return _decode(json.loads(_post(service["url"] + "/swap", payload)[2])["images"][0])

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(call, range(8)))
    after = _get_json(service["url"] + "/info")["served"]
    for i in range(8):
        assert np.array_equal(got[i], model.swap(x[i:i + 1], {"shape": i % 4})[0]), i
    assert after["requests"] - before["requests"] == 8
    assert after["forward_passes"] - before["forward_passes"] < 8


def _big_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("path, body, content_type, status, message", [
    ("/swap", {"examples": [0], "set": {"nope": 1}}, "application/json", 400, "unknown factor 'nope'"),
    ("/swap", {"examples": [0], "set": {"scale": 1}}, "application/json", 400, "'scale' is not labeled"),
    ("/swap", {"examples": [0], "set": {"shape": 9}}, "application/json", 400, "no class 9; valid class ids 0..3"),
    ("/swap", {"examples": [0], "set": {"shape": "star"}}, "application/json", 400, "no class 'star'"),
    ("/swap", {"images": ["aGVsbG8gd29ybGQ="]}, "application/json", 400, "images[0]: not an image"),
    ("/swap", {"images": ["%%%"]}, "application/json", 400, "images[0]: not valid base64"),
    ("/swap", {"examples": [16]}, "application/json", 400, "examples[0] = 16; this model has 16"),
    ("/swap", {"examples": [0], "colour": 1}, "application/json", 400, "unknown field(s) ['colour']"),
    ("/swap", {"examples": [0], "sweep": "shape", "set": {"shape": 1}}, "application/json", 400,
     "both swept and set"),
    ("/swap", {}, "application/json", 400, "give 'images'"),
    ("/swap", b"{not json", "application/json", 400, "not valid JSON"),
    ("/swap", b"GIF89a-ish", "image/png", 400, "image: not an image"),
    ("/swap", "PNG32", "image/png", 400, "image is 32x32 pixels; this model takes 16x16"),
    ("/swap", "BIG", "image/png", 413, "the limit is 200000"),
    ("/swap", b"shape=cube", "text/plain", 415, "send application/json or an image"),
    ("/swap?shape=oval", "PNG16", "image/png", 400, "no class 'oval'"),
    ("/encode", {"images": []}, "application/json", 400, "give 'images'"),
    ("/generate", {"unknown": [[0.0] * 4], "set": {"shape": 1}}, "application/json", 400,
     "set every labeled factor; missing ['floor_hue', 'wall_hue', 'object_hue']"),
    ("/generate", {"unknown": [[0.0]], "set": {}}, "application/json", 400, "unknown[0] must be"),
])
def test_bad_requests_get_a_4xx_with_one_line(service, path, body, content_type, status, message):
    if body == "PNG32":
        body = _png(torch.zeros(3, 32, 32, dtype=torch.uint8))
    elif body == "PNG16":
        body = _png(service["test"].images[0])
    elif body == "BIG":
        body = _big_png()
    code, error = _refusal(service["url"] + path, body, content_type)
    assert (code, message in error, "\n" in error) == (status, True, False), error


def test_unknown_routes_and_methods_are_4xx(service):
    for url, method in ((service["url"] + "/nothing", "GET"), (service["url"] + "/swap", "GET"),
                        (service["url"] + "/examples/99.png", "GET")):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30)
        assert 400 <= caught.value.code < 500


def test_a_model_that_cannot_load_fails_the_start(service):
    with pytest.raises(RuntimeError, match=r"^models:/disunknown-nope@champion: could not download"):
        start({"model": "models:/disunknown-nope@champion", "tracking_uri": service["store"],
               "num_cpus": 0.25}, port=service["port"], name="broken", route_prefix="/broken")
    from ray import serve
    assert "broken" not in serve.status().applications


def test_command_line_and_builder_refuse_what_does_not_fit():
    with pytest.raises(ValueError, match="--replicas or --autoscale"):
        app_args(parse_args(["--replicas", "2", "--autoscale", "1:3"]))
    with pytest.raises(ValueError, match="MIN:MAX"):
        app_args(parse_args(["--autoscale", "3:1"]))
    args = app_args(parse_args(["--model", "models:/m@a", "--autoscale", "1:3", "--tracking-uri", "sqlite:///x"]))
    assert args["autoscaling"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8.0}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['replica'\]"):
        build({"model": "x", "replica": 2})
    with pytest.raises(ValueError, match="'replicas' or 'autoscaling'"):
        build({"model": "x", "replicas": 2, "autoscaling": {"max_replicas": 2}})


def _wait_swaps(driver, wait, count: int):
    """Wait until the page has shown ``count`` swap results; on timeout say what it shows."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By

    try:
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-swaps") == str(count))
    except TimeoutException:
        texts = {i: driver.find_element(By.ID, i).text for i in ("model", "status", "error")}
        swaps = driver.find_element(By.TAG_NAME, "body").get_attribute("data-swaps")
        raise AssertionError(f"the page did not show swap {count} (shows {swaps}): {texts}") from None


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not (_chromium() and shutil.which("chromedriver")) and os.environ.get("CI") != "true",
                    reason="needs chromium and chromedriver (tests/install_browser.sh installs them)")
def test_explorer_page_in_headless_chromium(service):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(service["url"] + "/")
        _wait_swaps(driver, wait, 1)
        header = driver.find_element(By.ID, "model").text
        assert "disunknown-shapes3d version 1" in header and "0.420" in header
        selects = driver.find_elements(By.CSS_SELECTOR, "select.factor")
        assert [s.get_attribute("id") for s in selects] == [
            "factor-floor_hue", "factor-wall_hue", "factor-object_hue", "factor-shape"]
        shape = Select(driver.find_element(By.ID, "factor-shape"))
        assert [o.text for o in shape.options] == ["keep", "cube", "sphere", "cone", "pill"]
        first = driver.find_element(By.CSS_SELECTOR, "img.result").get_attribute("src")

        shape.select_by_visible_text("cone")
        _wait_swaps(driver, wait, 2)
        Select(driver.find_element(By.ID, "factor-object_hue")).select_by_index(3)
        _wait_swaps(driver, wait, 3)
        second = driver.find_element(By.CSS_SELECTOR, "img.result").get_attribute("src")
        assert second != first
        expect = service["model"].swap(service["model"].examples["images"][:1],
                                       {"shape": "cone", "object_hue": 2})[0]
        assert np.array_equal(_decode(second.split(",", 1)[1]), expect)

        Select(driver.find_element(By.ID, "sweep")).select_by_visible_text("shape")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.result")) == 4)
        assert [c.text for c in driver.find_elements(By.TAG_NAME, "figcaption")] == [
            "cube", "sphere", "cone", "pill"]
        assert driver.find_element(By.ID, "error").text == ""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "explorer.png"))
        assert (ARTIFACTS / "explorer.png").stat().st_size > 1000
    finally:
        driver.quit()


def test_the_shipped_serve_config_builds_the_application():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(
        yaml.safe_load((Path(__file__).resolve().parents[1] / "serve_config.yaml").read_text()))
    (application,) = config.applications
    assert config.http_options.host == "127.0.0.1"
    assert application.import_path == "pipelines.serving.app:build"
    built = build(application.args)
    assert type(built).__name__ == "Application"
    assert application.args["autoscaling"]["max_replicas"] >= application.args["autoscaling"]["min_replicas"]
