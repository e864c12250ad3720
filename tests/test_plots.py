"""Pictures (dsu_models.plots, grids.class_sweeps, the stages' ``pictures`` and the
runner's PNGs): shapes and dtypes, sweeps that really show every class, plots
that are not blank and use the class colours, no global state touched."""
from __future__ import annotations

import subprocess
import sys

import matplotlib
import numpy as np
import pytest
import torch

from dsu_models import grids, plots, train
from dsu_models.config import load_config
from dsu_models.data.base import FactorInfo, InMemoryDataset, to_float
from dsu_models.embedder import LabelEmbedder, nearest_class
from tiny import tiny_batch, tiny_config, tiny_factors

SIZE = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def painted(value: int) -> float:
    """The float pixel whose uint8 form is ``value``."""
    return value / 127.5 - 1.0


def band_value(cls: int, k: int) -> int:
    return 20 * (cls + 1) + 3 * k


class FakeModel:
    """DisUnknownModel stand-in. generate() paints factor k's class (read back
    from its code with ``nearest_class``) into rows ``4k .. 4k+3`` as the uint8
    value ``band_value(class, k)``; the unknown code is (mean brightness, 2 x it)."""

    def __init__(self, factors: list[FactorInfo], sizes=(2, 1), unknown: int = 2, embedders=True):
        self.factors = factors
        self.labeled_factors = [f.name for f in factors]
        self._embedders = torch.nn.ModuleList(
            [LabelEmbedder(f.classes, s, "circle" if s >= 2 else "linear") for f, s in zip(factors, sizes)])
        self.embedders = self._embedders if embedders else None
        self.unknown = unknown

    def encode_unknown(self, images):
        x = to_float(images) if images.dtype == torch.uint8 else images
        base = x.mean(dim=(1, 2, 3))[:, None]
        return base * torch.arange(1, self.unknown + 1, dtype=base.dtype)

    def embed_labels(self, labels):
        return [emb(labels[:, k])[0] for k, emb in enumerate(self._embedders)]

    def generate(self, unknown, label_codes):
        b = label_codes[0].shape[0]
        assert unknown.shape == (b, self.unknown)
        image = torch.full((b, 3, SIZE, SIZE), -1.0)
        for k, (emb, code) in enumerate(zip(self._embedders, label_codes)):
            cls = nearest_class(emb, code)
            image[:, :, 4 * k:4 * k + 4] = torch.tensor([painted(band_value(int(c), k)) for c in cls]
                                                        )[:, None, None, None]
        return image


def fake_test_set(n: int = 120) -> InMemoryDataset:
    g = torch.Generator().manual_seed(0)
    factors = [FactorInfo("hue", 6, tuple(f"h{i}" for i in range(6))),
               FactorInfo("shape", 3, ("cube", "ball", "cone")),
               FactorInfo("pos", 25)]
    labels = torch.stack([torch.randint(0, f.classes, (n,), generator=g) for f in factors], 1)
    images = (torch.rand(n, 3, SIZE, SIZE, generator=g) * 60 + labels[:, 2, None, None, None] * 7)
    return InMemoryDataset(images.to(torch.uint8), labels, factors)


def cell(grid: torch.Tensor, row: int, col: int, size: int = SIZE, pad: int = 2) -> torch.Tensor:
    """One cell of a make_grid grid (padding 2)."""
    top, left = pad + row * (size + pad), pad + col * (size + pad)
    return grid[:, top:top + size, left:left + size]


def non_white_fraction(image: torch.Tensor) -> float:
    return float((image < 250).any(0).float().mean())


def has_colour(image: torch.Tensor, rgba, tol: int = 6) -> bool:
    rgb = torch.tensor([round(255 * c) for c in rgba[:3]], dtype=torch.int32)[:, None, None]
    return bool(((image.int() - rgb).abs().max(0).values <= tol).any())


# ---------------------------------------------------------------- grids


def test_class_sweep_rows_show_every_class_in_order():
    factors = [FactorInfo("hue", 6), FactorInfo("shape", 3)]
    model = FakeModel(factors)
    x = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    labels = torch.tensor([[0, 2], [5, 1], [3, 0]])
    u = model.encode_unknown(x)
    sweeps = grids.class_sweeps(x, u, labels, model.embed_labels, model.generate,
                                [(f.name, f.classes) for f in factors])
    assert set(sweeps) == {"sweep_hue", "sweep_shape"}
    for k, f in enumerate(factors):
        grid = sweeps[f"sweep_{f.name}"]
        assert grid.dtype == torch.uint8
        assert grid.shape == (3, 2 + 3 * (SIZE + 2), 2 + (f.classes + 1) * (SIZE + 2))
        for i in range(3):
            assert torch.equal(cell(grid, i, 0), grids.to_uint8(x[i]))  # the content image
            for c in range(f.classes):
                swept = cell(grid, i, c + 1)
                assert (swept[:, 4 * k:4 * k + 4] == band_value(c, k)).all(), (f.name, i, c)
                other = 1 - k  # the other factor keeps image i's own class
                assert (swept[:, 4 * other:4 * other + 4] == band_value(int(labels[i, other]), other)).all()


def test_sweep_classes_subsample_large_factors():
    assert grids.sweep_classes(5).tolist() == [0, 1, 2, 3, 4]
    shown = grids.sweep_classes(1393)
    assert len(shown) == grids.MAX_SWEEP_CLASSES and shown[0] == 0 and shown[-1] == 1392
    assert bool((shown[1:] > shown[:-1]).all())


# ---------------------------------------------------------------- plots


def test_project_2d_known_answer():
    t = torch.linspace(-2, 2, 50, dtype=torch.float64)
    direction = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64) / 3
    points, labels = plots.project_2d(t[:, None] * direction + torch.tensor([5.0, -1.0, 0.5]))
    assert np.allclose(points[:, 0], t.numpy(), atol=1e-9)  # sign fixed: largest loading positive
    assert np.allclose(points[:, 1], 0.0, atol=1e-9)
    assert labels[0].startswith("PC1 (100%")
    one, labels = plots.project_2d(t[:, None])
    assert np.allclose(one[:, 0], t.numpy()) and labels == ("dim 0", "jitter")
    with pytest.raises(ValueError, match="at least one point and one dimension"):
        plots.project_2d(torch.zeros(5, 0))


@pytest.mark.parametrize("classes", [4, 30])  # legend / colorbar
def test_code_scatter_draws_every_class_colour(classes):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % classes
    codes = torch.randn(200, 5, generator=g) + labels[:, None].float()
    factor = FactorInfo("f", classes)
    image = plots.code_scatter(codes, labels, factor)
    assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3
    assert 0.02 < non_white_fraction(image) < 0.9
    colours = plots.class_colors(classes)
    assert all(has_colour(image, colours[c]) for c in (0, classes // 2, classes - 1))


def test_code_scatter_refuses_mismatched_labels():
    with pytest.raises(ValueError, match="labels"):
        plots.code_scatter(torch.zeros(10, 2), torch.zeros(9, dtype=torch.long), FactorInfo("f", 2))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_embedding_plot_shows_each_class(size):
    factor = FactorInfo("f", 5, ("a", "b", "c", "d", "e"))
    emb = LabelEmbedder(5, size, "linear")
    with torch.no_grad():
        emb.mean.add_(torch.randn(emb.mean.shape, generator=torch.Generator().manual_seed(1)))
    mean, std = emb.normalized()
    image = plots.embedding_plot(mean, std, factor)
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert non_white_fraction(image) > 0.02
    colours = plots.class_colors(5)
    assert all(has_colour(image, colours[c]) for c in range(5))
    with_points = plots.embedding_plot(mean, std, factor,
                                       points=(torch.randn(40, size), torch.arange(40) % 5))
    assert with_points.shape == image.shape and not torch.equal(with_points, image)


def test_embedding_plots_skip_empty_codes_and_refuse_them_alone():
    factors = [FactorInfo("a", 3), FactorInfo("b", 4)]
    out = plots.embedding_plots([LabelEmbedder(3, 0), LabelEmbedder(4, 2, "circle")], factors)
    assert list(out) == ["embedding_b"]
    with pytest.raises(ValueError, match="size 0"):
        plots.embedding_plot(torch.zeros(3, 0), torch.zeros(3, 0), factors[0])


def test_caption_keeps_the_grid_below_the_text():
    grid = torch.randint(0, 255, (1, 30, 300), dtype=torch.uint8)
    out = plots.caption(grid, "a factor: " + ", ".join(str(i) for i in range(200)))
    assert out.shape[0] == 1 and out.shape[2] == 300 and out.shape[1] > 30
    assert torch.equal(out[:, -30:], grid)
    assert (out[:, :-30] < 128).any()  # some text was drawn


def test_due():
    assert plots.due(10, 5, False) and not plots.due(11, 5, False)
    assert plots.due(11, 5, True) and not plots.due(10, 0, True)


# ---------------------------------------------------------------- evaluation


def test_evaluation_pictures_from_a_fake_model():
    test = fake_test_set()
    model = FakeModel(test.factors[:2])
    pictures = plots.evaluation_pictures(model, test, n=5, seed=3)
    assert set(pictures) == {"reconstruction", "swap", "sweep_hue", "sweep_shape", "codes_hue",
                             "codes_shape", "codes_pos", "embedding_hue", "embedding_shape"}
    for key, image in pictures.items():
        assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3, key
        assert non_white_fraction(image) > 0.02, key
    assert pictures["reconstruction"].shape == (3, 2 + 2 * (SIZE + 2), 2 + 5 * (SIZE + 2))
    swap = pictures["swap"]
    assert swap.shape == (3, 2 + 6 * (SIZE + 2), 2 + 6 * (SIZE + 2))
    # Column j carries label source j's classes (the top row shows the source).
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(3))
    sources = order[5:10]
    assert torch.equal(cell(swap, 0, 1), test.images[sources[0]])
    for j in range(5):
        for k in range(2):
            assert (cell(swap, 2, j + 1)[:, 4 * k:4 * k + 4]
                    == band_value(int(test.labels[sources[j], k]), k)).all()
    # Sweeps: the caption sits on top; the grid below shows every class in order.
    rows = min(plots.SWEEP_ROWS, 5)
    sweep = pictures["sweep_hue"]
    grid = sweep[:, -(2 + rows * (SIZE + 2)):, :2 + 7 * (SIZE + 2)]
    for c in range(6):
        assert (cell(grid, rows - 1, c + 1)[:, :4] == band_value(c, 0)).all()


def test_evaluation_pictures_without_unknown_or_embedders():
    test = fake_test_set(30)
    pictures = plots.evaluation_pictures(FakeModel(test.factors[:2], unknown=0, embedders=False), test, n=4)
    assert set(pictures) == {"reconstruction", "swap", "sweep_hue", "sweep_shape"}


def test_pictures_leave_global_state_alone():
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy())
    rc = dict(matplotlib.rcParams)
    plots.evaluation_pictures(FakeModel(fake_test_set(40).factors[:2]), fake_test_set(40), n=3)
    assert torch.equal(torch.get_rng_state(), rng[0]) and np.array_equal(np.random.get_state()[1], rng[1])
    assert dict(matplotlib.rcParams) == rc


def test_no_pyplot_is_imported(tmp_path):
    script = (
        "import sys, torch, matplotlib\n"
        "backend = matplotlib.rcParams._get_backend_or_none()\n"
        "from dsu_models import plots\n"
        "from dsu_models.data.base import FactorInfo\n"
        "img = plots.code_scatter(torch.randn(50, 3), torch.arange(50) % 3, FactorInfo('f', 3))\n"
        "assert img.shape[0] == 3\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
        "assert matplotlib.rcParams._get_backend_or_none() == backend, 'a backend was selected'\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- stages and runner


@pytest.mark.parametrize("overrides", [(), ("unknown_size=0",), ("labeled_factors=[]",)])
def test_stage1_pictures_follow_intervals(overrides):
    from dsu_models.stages.stage1 import Stage1
    cfg = tiny_config("stage1.sample_interval=4", "stage1.code_plot_interval=2",
                      "stage1.emb_plot_interval=3", *overrides)
    stage = Stage1(cfg, tiny_factors(cfg), device="cpu")
    data = fake_test_set(20)
    batch = tiny_batch(cfg)
    keys = {}
    for it in (2, 3, 4, 5):
        stage.iteration = it
        keys[it] = set(stage.pictures(batch, data))
    codes = {f"codes_{f.name}" for f in data.factors} if cfg.unknown_size else set()
    embeddings = {f"embedding_{n}" for n in cfg.labeled_factors}
    samples = {"reconstruction", "swap"} if cfg.unknown_size and cfg.labeled_factors else {"reconstruction"}
    assert keys == {2: codes, 3: embeddings, 4: codes | samples, 5: set()}
    assert stage.encoder is None or stage.encoder.training


def test_runner_writes_pictures_at_their_intervals(tmp_path):
    cfg = load_config("tiny", [
        "image_size=8", "architecture.conv_channels=[8]", "architecture.fc_features=16",
        "num_samples=120", "all_stages.batch_size=8", "all_stages.iterations=4",
        "all_stages.report_interval=4", "all_stages.checkpoint_interval=4",
        "all_stages.sample_interval=2", "stage1.code_plot_interval=3", "all_stages.emb_plot_interval=2",
        "labeled_factors=[floor_hue, shape]"])
    out = tmp_path / "run"
    train.run(cfg, out, log=lambda s: None)

    def names(stage):
        return {p.name for p in (out / stage / "samples").glob("*.png")}

    hidden = ["wall_hue", "object_hue", "scale", "orientation"]
    s1 = names("stage1")
    for it in (2, 4):
        assert {f"reconstruction_{it:07d}.png", f"swap_{it:07d}.png",
                f"embedding_floor_hue_{it:07d}.png", f"embedding_shape_{it:07d}.png"} <= s1
    for it in (3, 4):  # every code_plot_interval and at the end
        assert {f"codes_{f}_{it:07d}.png" for f in ["floor_hue", "shape"] + hidden} <= s1
    assert not any("_0000001" in n for n in s1) and "codes_shape_0000002.png" not in s1
    s2 = names("stage2")
    assert {"sweep_floor_hue_0000002.png", "sweep_shape_0000004.png", "embedding_shape_0000004.png",
            "swap_0000004.png"} <= s2
    assert not any(n.startswith("codes_") for n in s2)
    assert {"labels_read_0000004.png", "read_floor_hue_0000004.png",
            "read_shape_0000004.png"} <= names("lenc")
    assert not (out / "classifier" / "samples").exists()
    from PIL import Image
    with Image.open(out / "stage1" / "samples" / "codes_scale_0000004.png") as image:
        assert image.mode == "RGB" and image.width > 100
    assert not list(out.rglob("*.tmp"))


def test_confusion_picture_puts_each_row_s_swaps_on_its_diagonal():
    """A perfect factor lights the diagonal; a factor always read as class 0 lights column 0."""
    factor = FactorInfo("shape", 4, ("cube", "cylinder", "sphere", "pill"))
    perfect = plots.confusion_picture(torch.diag(torch.tensor([5, 6, 7, 8])), factor)
    stuck = plots.confusion_picture(torch.tensor([[9, 0, 0, 0]] * 4), factor)
    assert perfect.dtype == torch.uint8 and perfect.shape[0] == 3
    assert perfect.shape == stuck.shape and not torch.equal(perfect, stuck)


def test_worst_consistency_picture_has_a_row_per_triple():
    from dsu_models.evaluation.consistency import Worst
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=g) for _ in range(4)]
    grid = plots.worst_consistency_picture(Worst(*images, distance=torch.tensor([-0.5, 0.1, 0.2])))
    # 3 rows of 4 images of 8 px with 2 px padding, below a caption strip
    assert grid.shape[0] == 3 and grid.shape[2] >= 4 * 10 and grid.shape[1] > 3 * 10
    with pytest.raises(ValueError, match="no examples"):
        plots.worst_consistency_picture(Worst(*[x[:0] for x in images], distance=torch.zeros(0)))
