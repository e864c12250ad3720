"""The Ray Serve application against a real Serve instance on 127.0.0.1, serving
a tiny trained model registered in a SQLite MLflow store: every endpoint's
happy path equals DisUnknownModel on the same input, every bad request gets a
4xx with its message, a model that cannot be loaded fails the start, and the
explorer page works in headless Chromium. Beside the champion the service may
be asked for a challenger (registered version 2, perturbed weights) and a bundle
folder named at start (perturbed again), keeping one chosen model per replica."""
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

from dsu_models.inference import DisUnknownModel, save_bundle, to_hwc_uint8
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


CHAMPION = "models:/disunknown-shapes3d@champion"
CHALLENGER = "models:/disunknown-shapes3d@challenger"


def _perturbed(bundle_dir: Path, out: Path, seed: int) -> Path:
    """The tiny model with noise on its generator's weights, as another bundle."""
    bundle = DisUnknownModel.load(bundle_dir, device="cpu").bundle
    g = torch.Generator().manual_seed(seed)
    generator = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point()
                 and v.numel() > 1 else v for k, v in bundle["weights"]["generator"].items()}
    return save_bundle({**bundle, "weights": {**bundle["weights"], "generator": generator}}, out)


@pytest.fixture(scope="module")
def service(tiny, ray_module, tmp_path_factory):
    """The champion of a fresh store, served with a 50 ms batch window (so that a
    burst of requests shares forward passes). Requests may also choose the
    challenger (version 2), any other registry URI, a third bundle folder and an
    empty folder (both named at start); a replica keeps one chosen model."""
    from ray import serve

    d = tmp_path_factory.mktemp("serve-store")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("serve-test", artifact_location=(d / "artifacts").as_uri())
    log_and_register(client, client.create_run(experiment).info.run_id, tiny["bundle_dir"], "shapes3d", 0.42)
    challenger = _perturbed(tiny["bundle_dir"], d / "challenger", seed=1)
    log_and_register(client, client.create_run(experiment).info.run_id, challenger, "shapes3d", 0.40,
                     alias="challenger")
    third, broken = _perturbed(tiny["bundle_dir"], d / "third", seed=2), d / "empty"
    broken.mkdir()
    port = free_port()
    start({"model": CHAMPION, "tracking_uri": uri, "device": "cpu",
           "num_cpus": 0.5, "threads": 1, "batch_wait_timeout_s": 0.05, "max_batch_size": 16,
           "limits": {"max_body_bytes": 200_000}, "models": [str(third), str(broken)], "max_models": 1},
          port=port)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "model": DisUnknownModel.load(tiny["bundle_dir"], device="cpu"),
               "test": tiny["test"], "port": port, "store": uri,
               "models": {CHAMPION: DisUnknownModel.load(tiny["bundle_dir"], device="cpu"),
                          CHALLENGER: DisUnknownModel.load(challenger, device="cpu"),
                          str(third): DisUnknownModel.load(third, device="cpu")},
               "third": str(third), "broken": str(broken), "bundle_dir": str(tiny["bundle_dir"])}
    finally:
        serve.shutdown()


def _post(url: str, body, content_type: str = "application/json", timeout: float = 60, model: str | None = None):
    data = json.dumps(body).encode() if content_type == "application/json" and not isinstance(body, bytes) else body
    headers = {"Content-Type": content_type, **({"serve_multiplexed_model_id": model} if model else {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return reply.status, reply.headers.get("content-type"), reply.read()


def _refusal(url: str, body, content_type: str = "application/json", model: str | None = None) -> tuple[int, str]:
    with pytest.raises(urllib.error.HTTPError) as caught:
        _post(url, body, content_type, model=model)
    return caught.value.code, json.loads(caught.value.read())["error"]


def _png(image_chw: torch.Tensor) -> bytes:
    return encode_png(image_chw.permute(1, 2, 0).numpy())


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _get_json(url: str, model: str | None = None) -> dict:
    headers = {"serve_multiplexed_model_id": model} if model else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as reply:
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


def _swap_one(service, model: str | None, i: int) -> np.ndarray:
    """Test image ``i`` with shape ``i % 4``, through the service, by ``model`` (None: no header)."""
    png = _png(service["test"].images[i])
    return np.asarray(Image.open(io.BytesIO(_post(service["url"] + f"/swap?shape={i % 4}", png, "image/png",
                                                  model=model)[2])))


def _expected(service, model: str, i: int) -> np.ndarray:
    return service["models"][model].swap(service["test"].images[i:i + 1], {"shape": i % 4})[0]


def test_two_models_interleaved_each_answer_with_their_own_weights(service):
    choices = [None, CHALLENGER, CHAMPION, CHALLENGER] * 3   # None: no header, the default
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda i: _swap_one(service, choices[i], i), range(len(choices))))
    for i, model in enumerate(choices):
        assert np.array_equal(got[i], _expected(service, model or CHAMPION, i)), (i, model)
    assert not np.array_equal(_expected(service, CHAMPION, 1), _expected(service, CHALLENGER, 1))

    info = _get_json(service["url"] + "/info", model=CHALLENGER)
    assert (info["model"], info["version"], info["alias"]) == (CHALLENGER, "2", "challenger")
    assert info["summary"] == pytest.approx(0.40)
    models = info["models"]
    assert models["default"] == CHAMPION and models["allow_registry"] and models["max_models"] == 1
    assert models["listed"] == [service["third"], service["broken"]] and models["loaded"] == [CHALLENGER]
    assert _get_json(service["url"] + "/info")["version"] == "1"
    # the hyphenated header (what proxies that drop underscores pass on) chooses too
    request = urllib.request.Request(service["url"] + "/swap?shape=1", data=_png(service["test"].images[1]),
                                     headers={"Content-Type": "image/png", "serve-multiplexed-model-id": CHALLENGER})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(reply.read()))), _expected(service, CHALLENGER, 1))


def test_a_third_model_evicts_the_least_recently_used(service):
    third = service["third"]
    for other in (CHAMPION, CHALLENGER):   # else the test could not tell who answered
        assert not np.array_equal(_expected(service, third, 3), _expected(service, other, 3)), other
    assert np.array_equal(_swap_one(service, CHALLENGER, 2), _expected(service, CHALLENGER, 2))
    before = _get_json(service["url"] + "/info")["models"]
    assert before["loaded"] == [CHALLENGER]
    assert np.array_equal(_swap_one(service, third, 3), _expected(service, third, 3))
    after = _get_json(service["url"] + "/info")["models"]
    assert after["loaded"] == [third]
    assert (after["loads"] - before["loads"], after["evictions"] - before["evictions"]) == (1, 1)
    assert np.array_equal(_swap_one(service, None, 5), _expected(service, CHAMPION, 5))   # the default stays
    assert np.array_equal(_swap_one(service, CHALLENGER, 6), _expected(service, CHALLENGER, 6))   # reloaded
    again = _get_json(service["url"] + "/info")["models"]
    assert again["loaded"] == [CHALLENGER] and again["loads"] - after["loads"] == 1


@pytest.mark.parametrize("model, status, message", [
    ("/etc/passwd", 400, "'/etc/passwd' is not one this service may load; choose models:/NAME@ALIAS"),
    ("BUNDLE", 400, "is not one this service may load"),   # a real bundle folder, not named at start
    ("runs:/0123abcd/model", 400, "is not one this service may load"),
    ("models:/../etc@x", 400, "is not one this service may load"),
    ("models:/disunknown-nope@champion", 404, "'models:/disunknown-nope@champion' could not be loaded"),
    ("models:/disunknown-shapes3d/9", 404, "could not be loaded"),
    ("BROKEN", 404, "could not be loaded: " ),   # named at start, holds no model.pt
])
def test_bad_model_ids_are_refused_with_one_line(service, model, status, message):
    model = {"BUNDLE": service["bundle_dir"], "BROKEN": service["broken"]}.get(model, model)
    code, error = _refusal(service["url"] + "/swap", {"examples": [0]}, model=model)
    assert (code, message in error, "\n" in error) == (status, True, False), error
    for other in (None, CHALLENGER):   # the others still answer
        assert np.array_equal(_swap_one(service, other, 7), _expected(service, other or CHAMPION, 7))


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
    with pytest.raises(ValueError, match=r"max_models=0: a positive integer"):
        build({"model": "x", "max_models": "0"})
    with pytest.raises(ValueError, match=r"allow_registry='maybe': true or false"):
        build({"model": "x", "allow_registry": "maybe"})
    args = app_args(parse_args(["--model", "models:/m@a", "--extra-model", "models:/m/2", "--max-models", "2",
                                "--listed-models-only", "--tracking-uri", "sqlite:///x"]))
    assert (args["models"], args["max_models"], args["allow_registry"]) == (["models:/m/2"], 2, False)


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


def _assert_shows_own_swap(driver, model: DisUnknownModel):
    """The page shows ``model``'s swap of its first example, every factor kept."""
    from selenium.webdriver.common.by import By

    got = driver.find_element(By.CSS_SELECTOR, "img.result").get_attribute("src")
    assert np.array_equal(_decode(got.split(",", 1)[1]), model.swap(model.examples["images"][:1], {})[0])


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
        _wait_swaps(driver, wait, 4)

        # another model: typed as a registry URI, then one named at start from the menu
        driver.find_element(By.ID, "model-uri").send_keys(CHALLENGER)
        driver.find_element(By.ID, "model-use").click()
        _wait_swaps(driver, wait, 5)
        assert "disunknown-shapes3d version 2" in driver.find_element(By.ID, "model").text
        _assert_shows_own_swap(driver, service["models"][CHALLENGER])
        Select(driver.find_element(By.ID, "model-choice")).select_by_value(service["third"])
        _wait_swaps(driver, wait, 6)
        _assert_shows_own_swap(driver, service["models"][service["third"]])
        assert Select(driver.find_element(By.ID, "model-choice")).first_selected_option.text == service["third"]
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
