"""docs/extending.md's dataset recipe, followed for real: a tiny procedural
source file dropped on the sources package's path registers itself, is
prepared to disk and drawn in memory, and its dataset defaults resolve to a
config.

What the recipe asks, and what each step checks here:

- one module file (written to a temporary folder added to the package's
  ``__path__`` here, where the recipe adds dsu_models/data/sources/NAME.py)
  declaring ``NAME``, ``FACTORS``, ``DEFAULT_IMAGE_SIZE``, ``CHANNELS``,
  ``OPTIONS`` and ``plan(options) -> SourcePlan``, and for a built-in dataset
  ``IN_MEMORY`` and ``DEFAULT_SAMPLES``; the package's discovery registers it,
  after which ``make_plan``, ``dsu_models.data.prepare`` and ``load_builtin``
  need nothing else;
- a dataset defaults file with only what a user tunes (written to a temporary
  DATASET_DIR here, where the recipe adds
  dsu_models/configs/datasets/NAME.yaml); ``load_config`` fills the rest from
  the module, and refuses a file that restates it.
"""
from __future__ import annotations

import sys
import textwrap

import pytest
import yaml

import dsu_models.data.sources as sources_package
from dsu_models import config as C
from dsu_models.data import load_builtin, prepare, read_split
from dsu_models.data.errors import DataError
from dsu_models.data.sources import SOURCES, make_plan
from dsu_models.data.sources.builtin import sample_count

NAME = "bars"
SIZE = 8
MODULE = '''
"""``bars``: a white vertical bar ``width + 1`` pixels wide whose left edge is at column ``x``."""
import numpy as np

from ..base import FactorInfo
from . import _procedural as P

NAME = "bars"
FACTORS = [("width", 3), ("x", 6)]     # 18 grid points
DEFAULT_IMAGE_SIZE = 8
CHANNELS = 1
OPTIONS = {"num_samples": None}
IN_MEMORY = True
DEFAULT_SAMPLES = 12


def render(labels, size):
    """labels: (n, 2) class indices -> (n, size, size, 1) uint8."""
    cols = np.arange(size)[None, :]
    left, width = labels[:, 1:2], labels[:, 0:1] + 1
    rows = ((cols >= left) & (cols < left + width)).astype(np.uint8) * 255
    return np.repeat(rows[:, None, :], size, axis=1)[..., None]


def plan(opts):
    infos = [FactorInfo(n, c, tuple(str(i) for i in range(c))) for n, c in FACTORS]
    return P.grid_plan(NAME, FACTORS, infos, CHANNELS, DEFAULT_IMAGE_SIZE, 1, render, opts)
'''
TUNED = {"dataset": NAME, "factors": {"width": {"size": 2}, "x": {"size": 2, "init": "linear"}}}


@pytest.fixture
def bars(monkeypatch, tmp_path):
    """The module file and the dataset YAML, each where the package and the config look."""
    folder = tmp_path / "sources"
    folder.mkdir()
    (folder / f"{NAME}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.setattr(sources_package, "__path__", [*sources_package.__path__, str(folder)])
    for name, module in sources_package._discover().items():   # what importing the package does
        monkeypatch.setitem(SOURCES, name, module)
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    (datasets / f"{NAME}.yaml").write_text(yaml.safe_dump(TUNED))
    monkeypatch.setattr(C, "DATASET_DIR", datasets)
    yield tmp_path
    sys.modules.pop(f"{sources_package.__name__}.{NAME}", None)   # the import left it there
    if hasattr(sources_package, NAME):
        delattr(sources_package, NAME)


def test_a_declared_source_prepares_reads_back_and_configures(bars):
    m = SOURCES[NAME]
    assert m.__name__ == f"{sources_package.__name__}.{NAME}"   # found by discovery, not patched in
    with pytest.raises(DataError, match="unknown option"):   # the common option check applies
        make_plan(NAME, {"colour": 1})

    out = prepare(NAME, bars / "prepared", test_portion=0.25, val_portion=0.25, seed=0)
    splits = {s: read_split(out, s) for s in ("train", "val", "test")}
    assert sum(len(d) for d in splits.values()) == 18   # preparing: the whole grid
    assert all(len(d) for d in splits.values()), {s: len(d) for s, d in splits.items()}
    for d in splits.values():
        assert d.images.shape[1:] == (1, SIZE, SIZE)
        assert [f.name for f in d.factors] == ["width", "x"]
        # the pixels carry the labels: the bar's left edge and width
        lit = d.images[:, 0, 0].numpy() > 0
        assert (lit.argmax(1) == d.labels[:, 1].numpy()).all()
        assert (lit.sum(1) == d.labels[:, 0].numpy() + 1).all()

    # built in: drawn in memory, DEFAULT_SAMPLES of the grid when the config says null
    assert sample_count(NAME, None) == 12
    assert sum(len(d) for d in load_builtin(NAME, test_portion=0.25, val_portion=0.25)) == 12

    cfg = C.load_config(overrides=[f"dataset={NAME}"])   # no data needed: the module declares it
    assert cfg.dataset == NAME and cfg.image_size == SIZE and cfg.image_channels == 1
    assert {k: (f.classes, f.size, f.init) for k, f in cfg.factors.items()} == {
        "width": (3, 2, "zero"), "x": (6, 2, "linear")}
    data_factors = {f.name: f.classes for f in splits["train"].factors}
    assert C.load_config(overrides=[f"dataset={NAME}"], data_factors=data_factors) == cfg


def test_a_dataset_yaml_may_not_restate_the_source(bars):
    restated = {**TUNED, "image_size": SIZE, "factors": {**TUNED["factors"], "x": {"classes": 6}}}
    (C.DATASET_DIR / f"{NAME}.yaml").write_text(yaml.safe_dump(restated))
    with pytest.raises(C.ConfigError, match=r"image_size, factors\.x\.classes restate what data source 'bars'"):
        C.load_config(overrides=[f"dataset={NAME}"])
