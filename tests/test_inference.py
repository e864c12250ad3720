"""DisUnknownModel, bundles and the ``python -m dsu_models`` CLI on a genuinely
trained tiny model (tests/tiny_model.py), plus the degenerate model shapes built
straight from untrained stage hand-offs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dsu_models import codes
from dsu_models.__main__ import main
from dsu_models.data.base import to_float
from dsu_models.inference import (DisUnknownModel, ModelLoadError, make_bundle,
                                  to_hwc_uint8)
from dsu_models.stages.classifier import ClassifierStage
from dsu_models.stages.lenc import LencStage
from dsu_models.stages.stage1 import Stage1
from dsu_models.stages.stage2 import Stage2
from dsu_models.steps import trained_stages
from tiny import tiny_config, tiny_factors
from tiny_model import shared_tiny

REPO = Path(__file__).resolve().parents[1]
FACTORS = ["floor_hue", "wall_hue", "object_hue", "shape"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def model(tiny):
    return DisUnknownModel.load(tiny["bundle_dir"], device="cpu")


@pytest.fixture(scope="module")
def images(tiny):
    return tiny["test"].images[:6]          # uint8 (6, 3, 16, 16)


# ------------------------------------------------------------------ bundles


def test_bundle_files_round_trip_and_weights_only(tiny, model):
    d = tiny["bundle_dir"]
    raw = torch.load(d / "model.pt", weights_only=True)
    assert raw["format"] == "disunknown-model" and raw["generator_stage"] == "stage2"
    table = json.loads((d / "factors.json").read_text())
    assert table["labeled_factors"] == FACTORS
    shape = next(f for f in table["factors"] if f["name"] == "shape")
    assert shape["class_names"] == ["cube", "sphere", "cone", "pill"]
    assert {f["name"] for f in table["all_factors"]} == set(FACTORS) | {"scale", "orientation"}
    assert "unknown_size: 4" in (d / "config.yaml").read_text()

    results = tiny["results"]
    expect = {"encoder": results["stage1"]["weights"]["encoder"],
              "generator": results["stage2"]["weights"]["generator"],
              "embedders": results["stage2"]["weights"]["embedders"],
              "label_encoder": results["lenc"]["weights"]["label_encoder"]}
    for name, state in expect.items():
        got = getattr(model, name).state_dict()
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], state[k]) for k in state), name
    # stage 1's generator differs from the final one: the bundle took G2, not G1
    g1 = results["stage1"]["weights"]["generator"]
    assert any(not torch.equal(g1[k], expect["generator"][k]) for k in g1)
    assert model.factors[3].class_names == ("cube", "sphere", "cone", "pill")
    assert model.factors[0].frequencies == tiny["train"].factors[0].frequencies
    assert torch.equal(model.code_stats["mean"], results["distill"]["stats"]["mean"])


def test_encode_unknown_reproduces_distilled_codes(tiny, model, images):
    mu = model.encode_unknown(images)
    assert mu.shape == (6, 4) and mu.dtype == torch.float32
    torch.testing.assert_close(mu, tiny["results"]["distill"]["codes"]["test"]["mu"][:6], atol=1e-5, rtol=0)


def test_from_handoffs_equals_loaded_bundle(tiny, model, images):
    r = tiny["results"]
    direct = DisUnknownModel.from_handoffs(r["stage1"], r["stage2"], r["lenc"], r["distill"]["stats"],
                                           device="cpu")
    y = torch.tensor([[1, 2, 3, 0]] * 6)
    assert torch.equal(direct.swap_labels(images, y), model.swap_labels(images, y))
    assert direct.factors[3].class_names == ()  # no data given: ids only
    assert direct.class_id("shape", "2") == 2


def test_resaved_model_gives_identical_outputs(model, images, tmp_path):
    again = DisUnknownModel.load(model.save(tmp_path / "copy") / "model.pt", device="cpu")
    y = torch.tensor([[0, 1, 2, 3]] * 6)
    assert np.array_equal(again.swap(images, {"shape": 2}), model.swap(images, {"shape": 2}))
    assert torch.equal(again.swap_labels(images, y), model.swap_labels(images, y))


def test_make_bundle_refuses_inconsistent_handoffs(tiny):
    r = tiny["results"]
    with pytest.raises(ValueError, match="lenc hand-off needs the stage2"):
        make_bundle(r["stage1"], None, r["lenc"])
    with pytest.raises(ValueError, match="is a 'stage2' hand-off"):
        make_bundle(r["stage2"])
    other = dict(r["stage2"], config=dict(r["stage2"]["config"], seed=123))
    with pytest.raises(ValueError, match="different configs.*seed"):
        make_bundle(r["stage1"], other)
    arch = dict(r["stage2"]["config"], architecture=dict(r["stage2"]["config"]["architecture"],
                                                          fc_features=999))
    with pytest.raises(ValueError, match="different configs.*architecture.fc_features"):
        make_bundle(r["stage1"], dict(r["stage2"], config=arch))


def test_make_bundle_accepts_a_stage2_rerun_with_other_loss_weights(tiny):
    """A stage 2 swept or re-run on one stage 1 differs in stage-2 keys only: the
    bundle takes it, and records the newest stage's settings."""
    r = tiny["results"]
    cfg2 = dict(r["stage2"]["config"], stage2=dict(r["stage2"]["config"]["stage2"], dis_weight=3.5))
    bundle = make_bundle(r["stage1"], dict(r["stage2"], config=cfg2))
    assert bundle["config"]["stage2"]["dis_weight"] == 3.5


# ------------------------------------------------------------------ shapes and inputs


def test_shapes_dtypes_and_ranges(model, images):
    y = torch.tensor([[0, 1, 2, 3], [9, 9, 9, 0]])
    label_codes = model.embed_labels(y)
    assert [c.shape for c in label_codes] == [(2, 2), (2, 2), (2, 2), (2, 4)]
    out = model.generate(model.encode_unknown(images[:2]), label_codes)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.min() >= -1 and out.max() <= 1
    read = model.encode_labels(images)
    assert read.shape == (6, 4) and read.dtype == torch.int64
    assert all(0 <= int(read[:, k].min()) and int(read[:, k].max()) < n
               for k, n in enumerate([10, 10, 10, 4]))
    swapped = model.swap(images, {"shape": "cone"})
    assert swapped.shape == (6, 16, 16, 3) and swapped.dtype == np.uint8


def test_every_accepted_input_type_gives_the_same_codes(model, images):
    ref = model.encode_unknown(images)
    hwc = images.permute(0, 2, 3, 1).numpy()
    variants = {
        "float tensor": to_float(images),
        "numpy batch": hwc,
        "numpy list": [a for a in hwc],
        "PIL list": [Image.fromarray(a) for a in hwc],
        "PIL RGBA": [Image.fromarray(a).convert("RGBA") for a in hwc],
    }
    for name, value in variants.items():
        torch.testing.assert_close(model.encode_unknown(value), ref, msg=name)
    torch.testing.assert_close(model.encode_unknown(images[0]), ref[:1])          # CHW tensor
    torch.testing.assert_close(model.encode_unknown(hwc[0]), ref[:1])             # HWC array
    big = np.repeat(np.repeat(hwc, 2, axis=1), 2, axis=2)                        # 32 px: resized
    assert model.encode_unknown(big).shape == (6, 4)
    gray = Image.fromarray(hwc[0]).convert("L")                                   # converted to RGB
    assert model.encode_unknown(gray).shape == (1, 4)


@pytest.mark.parametrize("value, message", [
    (torch.zeros(2, 1, 16, 16, dtype=torch.uint8), "3-channel"),
    (torch.zeros(2, 16, 16, 3, dtype=torch.uint8), "channels-last"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "16x16 images.*not resized"),
    (torch.full((1, 3, 16, 16), 200.0), r"in \[-1, 1\]"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.int32), "uint8"),
    (np.zeros((16, 16, 3), np.float32), "must be uint8"),
    (np.zeros((16, 16, 2), np.uint8), r"3-channel images \(H, W, 3\)"),
    (np.zeros((2, 16, 12, 3), np.uint8), "square"),
    ("cat.png", "unsupported type str"),
    ([], "empty"),
])
def test_bad_images_raise_clear_errors(model, value, message):
    with pytest.raises(ValueError, match=message):
        model.encode_unknown(value)


# ------------------------------------------------------------------ swaps and labels


def test_class_names_and_ids_give_the_same_swap(model, images):
    by_name = model.swap(images, {"shape": "cube", "object_hue": "0.3"})
    by_id = model.swap(images, {"shape": 0, "object_hue": 3})
    by_id_text = model.swap(images, {"shape": "0", "object_hue": np.int64(3)})
    assert np.array_equal(by_name, by_id) and np.array_equal(by_name, by_id_text)


def test_errors_list_the_valid_factors_and_classes(model, images):
    with pytest.raises(ValueError, match="unknown factor 'hue'.*floor_hue, wall_hue, object_hue, shape"):
        model.swap(images, {"hue": 1})
    with pytest.raises(ValueError, match="'scale' is not labeled: it is part of the unknown"):
        model.swap(images, {"scale": 1})
    with pytest.raises(ValueError, match="no class 'torus'.*0..3.*cube, sphere, cone, pill"):
        model.swap(images, {"shape": "torus"})
    with pytest.raises(ValueError, match="no class 10"):
        model.swap(images, {"object_hue": 10})
    with pytest.raises(ValueError, match="no class True"):
        model.swap(images, {"shape": True})
    with pytest.raises(ValueError, match="3 values for 6 images"):
        model.swap(images, {"shape": [0, 1, 2]})
    with pytest.raises(ValueError, match="'shape' has class 4; valid 0..3"):
        model.embed_labels(torch.tensor([[0, 0, 0, 4]]))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        model.embed_labels(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown code must be"):
        model.generate(torch.zeros(2, 5), model.embed_labels(torch.zeros(2, 4, dtype=torch.int64)))


def test_swap_changes_images_when_labels_change_and_is_deterministic(model, images):
    a = model.swap(images, {"object_hue": 0, "wall_hue": 0})
    b = model.swap(images, {"object_hue": 5, "wall_hue": 5})
    assert np.array_equal(a, model.swap(images, {"object_hue": 0, "wall_hue": 0}))
    assert np.abs(a.astype(int) - b).mean() > 1.0
    # and the unknown matters too: same labels, different content images differ
    c = model.swap(images, {n: 1 for n in FACTORS})
    assert np.abs(c[0].astype(int) - c[1:]).max() > 0


def test_unset_factors_keep_the_labels_s_reads(model, images):
    read = model.encode_labels(images)
    target = read.clone()
    target[:, 3] = 1
    expect = to_hwc_uint8(model.generate(model.encode_unknown(images), model.embed_labels(target)))
    assert np.array_equal(model.swap(images, {"shape": "sphere"}), expect)
    own = torch.tensor([[k % 10, 1, 2, k % 4] for k in range(6)])
    assert np.array_equal(model.swap(images, {}, content_labels=own),
                          to_hwc_uint8(model.swap_labels(images, own)))
    per_image = model.swap(images, {"shape": [0, 1, 2, 3, 0, 1]}, content_labels=own)
    for i in (0, 3):
        one = model.swap(images[i], {"shape": [0, 1, 2, 3, 0, 1][i]}, content_labels=own[i:i + 1])
        assert np.array_equal(per_image[i:i + 1], one)


def test_one_content_image_broadcasts_over_label_rows(model, images):
    rows = torch.tensor([[0, 0, h, 0] for h in range(10)])
    sweep = model.swap_labels(images[0], rows)
    assert sweep.shape == (10, 3, 16, 16)
    torch.testing.assert_close(sweep[3:4], model.swap_labels(images[:1], rows[3:4]))


class _OracleS(nn.Module):
    """Stands in for S: returns the B2 means of known labels, so a correct
    nearest-class read must give exactly those labels back."""

    def __init__(self, embedders: nn.ModuleList, labels: torch.Tensor):
        super().__init__()
        self.embedders, self.labels = embedders, labels

    def forward(self, x):
        return [(emb(self.labels[:, k])[0], torch.ones(1)) for k, emb in enumerate(self.embedders)]


def test_encode_labels_reads_classes_by_nearest_embedding(tiny, images):
    m = DisUnknownModel(tiny["bundle"], device="cpu")
    truth = tiny["test"].labels[:6][:, [0, 1, 2, 4]]       # floor_hue, wall_hue, object_hue, shape
    m.label_encoder = _OracleS(m.embedders, truth)
    assert torch.equal(m.encode_labels(images), truth)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny, model, images):
    gpu = DisUnknownModel(tiny["bundle"], device="cuda")
    y = torch.tensor([[0, 1, 2, 3]] * 6)
    out = gpu.swap_labels(images, y)
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, model.swap_labels(images, y), atol=1e-3, rtol=0)


# ------------------------------------------------------------------ degenerate models


def _handoffs(*overrides: str) -> dict:
    """Untrained hand-offs of every active stage for a tiny config."""
    cfg = tiny_config("device=cpu", *overrides)
    factors = tiny_factors(cfg)
    m = cfg.unknown_size
    stats = codes.code_statistics(torch.randn(64, m), torch.ones(64, m))
    out = {"stage1": Stage1(cfg, factors).handoff(), "code_stats": stats, "cfg": cfg}
    classifier = ClassifierStage(cfg, factors).handoff() if cfg.labeled_factors else None
    out["stage2"] = Stage2(cfg, factors, {"stage1": out["stage1"], "classifier": classifier,
                                          "code_stats": stats}).handoff()
    if "lenc" in trained_stages(cfg):
        out["lenc"] = LencStage(cfg, factors, {"stage2": out["stage2"], "code_stats": stats}).handoff()
    return out


def _x(cfg, n=3):
    return torch.randint(0, 256, (n, cfg.image_channels, cfg.image_size, cfg.image_size), dtype=torch.uint8)


def test_model_without_labeled_factors():
    h = _handoffs("labeled_factors=[]")
    m = DisUnknownModel.from_handoffs(h["stage1"], h["stage2"], code_stats=h["code_stats"], device="cpu")
    x = _x(h["cfg"])
    assert m.label_encoder is None and len(m.embedders) == 0
    assert m.swap(x, {}).shape == (3, 8, 8, 3)
    assert m.encode_labels(x).shape == (3, 0) and m.embed_labels(torch.zeros(3, 0)) == []
    assert torch.equal(m.reconstruct(x), m.generate(m.encode_unknown(x), []))
    with pytest.raises(ValueError, match="'shape' is not labeled.*labeled factors: \\(none\\)"):
        m.swap(x, {"shape": 1})


def test_model_without_unknown():
    h = _handoffs("labeled_factors=[floor_hue, wall_hue, object_hue, scale, shape, orientation]")
    m = DisUnknownModel.from_handoffs(h["stage1"], h["stage2"], h["lenc"], h["code_stats"], device="cpu")
    x = _x(h["cfg"])
    assert m.encoder is None and m.unknown_size == 0
    assert m.encode_unknown(x).shape == (3, 0)
    y = torch.tensor([[1, 2, 3, 4, 1, 5]] * 3)
    torch.testing.assert_close(m.swap_labels(x, y), m.generate(None, m.embed_labels(y)))
    assert m.swap(x, {"scale": "7"}).shape == (3, 8, 8, 3)


def test_model_without_label_embeddings():
    h = _handoffs("stage2.use_embedding=false")
    assert "lenc" not in h
    m = DisUnknownModel.from_handoffs(h["stage1"], h["stage2"], device="cpu")
    x = _x(h["cfg"])
    assert m.embedders is None and m.label_encoder is not None
    assert [c.shape for c in m.read_label_codes(x)] == [(3, 2), (3, 4)]
    assert np.array_equal(m.swap(x, {}), to_hwc_uint8(m.reconstruct(x)))
    with pytest.raises(ValueError, match="no label embedders.*cannot be set"):
        m.swap(x, {"shape": 1})
    with pytest.raises(ValueError, match="no label embedders"):
        m.embed_labels(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="no label embedders"):
        m.encode_labels(x)


def test_stage1_model_uses_g1_and_needs_every_label():
    h = _handoffs()
    m = DisUnknownModel.from_handoffs(h["stage1"], device="cpu")
    x = _x(h["cfg"])
    assert m.generator_stage == "stage1" and m.label_encoder is None
    g1 = h["stage1"]["weights"]["generator"]
    assert all(torch.equal(m.generator.state_dict()[k], g1[k]) for k in g1)
    with pytest.raises(ValueError, match=r"factors \['shape'\] are not set.*no labeled encoder S"):
        m.swap(x, {"floor_hue": 1})
    full = m.swap(x, {"floor_hue": 1, "shape": 2})
    assert np.array_equal(full, m.swap(x, {"floor_hue": 1}, content_labels=torch.tensor([[0, 2]] * 3)))


# ------------------------------------------------------------------ loading errors


def test_load_errors_name_the_uri(tmp_path):
    with pytest.raises(ModelLoadError, match="no/such/dir: no such file or directory.*models:/NAME@ALIAS"):
        DisUnknownModel.load(str(tmp_path / "no/such/dir"))
    with pytest.raises(ModelLoadError, match="no model.pt in"):
        DisUnknownModel.load(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a readable model bundle"):
        DisUnknownModel.load(tmp_path)
    torch.save({"weights": {}}, tmp_path / "model.pt")
    with pytest.raises(ModelLoadError, match="not a DisUnknown model bundle"):
        DisUnknownModel.load(tmp_path / "model.pt")


# ------------------------------------------------------------------ CLI


def _png(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture(scope="module")
def pngs(images, tmp_path_factory):
    d = tmp_path_factory.mktemp("pngs")
    return [_png(d / f"in{i}.png", a) for i, a in enumerate(images[:3].permute(0, 2, 3, 1).numpy())]


def test_cli_swap_one_image_writes_the_swap(tiny, model, images, pngs, tmp_path, capsys):
    out = tmp_path / "out.png"
    rc = main(["swap", "--model", str(tiny["bundle_dir"]), "--device", "cpu", "--content", pngs[0],
               "--set", "object_hue=3", "--set", "shape=cube", "--out", str(out)])
    assert rc == 0 and "the swapped image" in capsys.readouterr().out
    expect = model.swap(images[:1], {"object_hue": 3, "shape": "cube"})[0]
    assert np.array_equal(np.asarray(Image.open(out)), expect)


def test_cli_swap_several_images_writes_a_two_row_grid(tiny, model, images, pngs, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(["swap", "--model", str(tiny["bundle_dir"] / "model.pt"), "--device", "cpu",
               "--content", *pngs, "--set", "shape=2", "--out", str(out)])
    assert rc == 0 and "top row the 3 content images" in capsys.readouterr().out
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 18 + 2, 3 * 18 + 2, 3)        # 16 px cells, 2 px padding
    swapped = model.swap(images[:3], {"shape": 2})
    assert np.array_equal(grid[2:18, 2:18], images[0].permute(1, 2, 0).numpy())
    assert np.array_equal(grid[20:36, 38:54], swapped[2])


def test_cli_encode_prints_and_writes_codes_with_class_names(tiny, model, images, pngs, tmp_path, capsys):
    out = tmp_path / "codes.json"
    rc = main(["encode", "--model", str(tiny["bundle_dir"]), "--device", "cpu", "--images", *pngs[:2],
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["labeled_factors"] == FACTORS and len(doc["images"]) == 2
    read = model.encode_labels(images[:2])
    shape = doc["images"][1]["labels"]["shape"]
    assert shape == {"id": int(read[1, 3]), "name": ["cube", "sphere", "cone", "pill"][int(read[1, 3])]}
    np.testing.assert_allclose(doc["images"][0]["unknown_mean"], model.encode_unknown(images[:1])[0],
                               atol=1e-4)
    assert f"shape={shape['name']} ({shape['id']})" in printed and "unknown:" in printed


@pytest.mark.parametrize("args, message", [
    (["--set", "hue=1"], "error: unknown factor 'hue'; labeled factors: floor_hue"),
    (["--set", "shape=torus"], "error: factor 'shape': no class 'torus'"),
    (["--set", "shape"], "error: --set 'shape': expected factor=value"),
])
def test_cli_bad_settings_fail_with_one_line(tiny, pngs, tmp_path, capsys, args, message):
    rc = main(["swap", "--model", str(tiny["bundle_dir"]), "--device", "cpu", "--content", pngs[0],
               "--out", str(tmp_path / "o.png"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(message) and err.count("\n") == 1


@pytest.mark.parametrize("device, message", [
    ("bogus", "'bogus' is not one of auto, cpu, cuda, cuda:N"),
    ("cuda:x", "'cuda:x' is not one of auto, cpu, cuda, cuda:N"),
])
def test_cli_bad_device_is_refused_by_the_parser(tiny, pngs, tmp_path, capsys, device, message):
    with pytest.raises(SystemExit) as stop:
        main(["swap", "--model", str(tiny["bundle_dir"]), "--device", device, "--content", pngs[0],
              "--out", str(tmp_path / "o.png")])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_cli_samples_give_content_images_to_swap(tiny, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["samples", "--model", str(tiny["bundle_dir"]), "--device", "cpu", "--out", str(out),
                 "--count", "3"]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 3 and files[0].name.startswith("000_") and "shape=" in files[0].name
    assert main(["swap", "--model", str(tiny["bundle_dir"]), "--device", "cpu", "--content", str(files[0]),
                 "--set", "shape=1", "--out", str(tmp_path / "o.png")]) == 0
    assert (tmp_path / "o.png").exists()
    assert main(["samples", "--model", str(tiny["bundle_dir"]), "--out", str(out), "--count", "0"]) == 2
    assert "--count 0" in capsys.readouterr().err


def test_cli_missing_image_fails_with_one_line(tiny, tmp_path, capsys):
    rc = main(["encode", "--model", str(tiny["bundle_dir"]), "--images", str(tmp_path / "nope.png")])
    assert rc == 2 and "nope.png: no such image file" in capsys.readouterr().err


@pytest.mark.parametrize("name, fmt", [("out.jpg", "JPEG"), ("out.JPEG", "JPEG"), ("out.webp", "WEBP"),
                                       ("out.png", "PNG")])
def test_cli_swap_writes_the_format_its_out_extension_names(tiny, pngs, tmp_path, capsys, name, fmt):
    out = tmp_path / name
    assert main(["swap", "--model", str(tiny["bundle_dir"]), "--device", "cpu", "--content", pngs[0],
                 "--out", str(out)]) == 0
    with Image.open(out) as written:
        assert written.format == fmt and written.size == (16, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]      # no temporary left


@pytest.mark.parametrize("name", ["out.bmp", "out"])
def test_cli_swap_refuses_an_out_extension_it_cannot_write(tmp_path, capsys, name):
    """Before any work: the model is not even looked for."""
    rc = main(["swap", "--model", str(tmp_path / "not-loaded"), "--content", str(tmp_path / "a.png"),
               "--out", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: {tmp_path / name}: cannot write")
    assert ".png, .jpg, .jpeg, .webp" in err and not (tmp_path / name).exists()


def _photo(path, w, h, mode="RGB"):
    a = np.full((h, w, len(mode)), 90, np.uint8)
    a[..., -1] = 255 if mode == "RGBA" else 90
    if mode == "RGBA":
        a[0, 0, 3] = 0
    Image.fromarray(a, mode).save(path)
    return str(path)


@pytest.mark.parametrize("command", ["swap", "encode"])
def test_cli_non_square_image_is_refused_naming_size_and_flags(tiny, tmp_path, capsys, command):
    photo = _photo(tmp_path / "wide.png", 24, 16)
    given = ["--content", photo, "--out", str(tmp_path / "o.png")] if command == "swap" else ["--images", photo]
    rc = main([command, "--model", str(tiny["bundle_dir"]), "--device", "cpu", *given])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {photo} is 24x16, not square: pass --square crop")
    assert "--square pad" in err


@pytest.mark.parametrize("how", ["crop", "pad"])
def test_cli_square_crop_or_pad_reads_a_non_square_image(tiny, model, tmp_path, capsys, how):
    """--square crop/pad give what the model makes of the cropped / padded image;
    a transparent pixel is composited onto white, with one note."""
    from dsu_models.data.codec import flatten_alpha, square_image

    photo = _photo(tmp_path / "wide.png", 24, 16, "RGBA")
    out = tmp_path / "o.png"
    assert main(["swap", "--model", str(tiny["bundle_dir"]), "--device", "cpu", "--content", photo,
                 "--square", how, "--set", "shape=1", "--out", str(out)]) == 0
    assert "note: 1 image(s) had transparent pixels; composited onto white" in capsys.readouterr().err
    with Image.open(photo) as im:
        expected = square_image(flatten_alpha(im)[0], how)
    assert expected.size == ({"crop": 16, "pad": 24}[how],) * 2
    assert np.array_equal(np.asarray(Image.open(out)), model.swap([expected], {"shape": 1})[0])


def test_cli_subprocess_bad_uri_exits_nonzero_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "dsu_models", "encode", "--model",
                           str(tmp_path / "missing"), "--images", "a.png"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: ") and "missing: no such file" in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0


def _evaluation_ready() -> bool:
    try:
        from dsu_models import evaluation
    except ImportError:
        return False
    return all(hasattr(evaluation, n) for n in ("evaluate", "load_or_train_oracles"))


@pytest.mark.skipif(not _evaluation_ready(),
                    reason="dsu_models.evaluation (evaluate, load_or_train_oracles) is not written yet")
def test_cli_evaluate_prints_and_writes_metrics(tiny, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    rc = main(["evaluate", "--model", str(tiny["bundle_dir"]), "--device", "cpu", "--pairs", "64",
               "--oracle-cache", str(tmp_path / "oracles"), "--out", str(out)])
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert "summary" in metrics and np.isfinite(metrics["summary"])
    assert all(f"swap_acc_{n}" in metrics for n in FACTORS)
    assert "summary" in capsys.readouterr().out
