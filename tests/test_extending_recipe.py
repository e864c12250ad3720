"""docs/extending.md's dataset recipe, followed for real: a tiny procedural
source declared here (not in dsu_models/data/sources/) gets registered, is
prepared to disk, reads back, and its dataset defaults resolve to a config.

What the recipe asks of a source module, and what each step checks here:

- ``NAME``, ``FACTORS``, ``DEFAULT_IMAGE_SIZE``, ``CHANNELS``, ``OPTIONS`` and
  ``plan(options) -> SourcePlan`` (dsu_models/data/sources/__init__.py);
- an entry in ``SOURCES`` (patched in here, where the recipe edits the module
  tuple), after which ``make_plan`` and ``dsu_models.data.prepare`` need
  nothing else;
- a dataset defaults file (written to a temporary DATASET_DIR here, where the
  recipe adds dsu_models/configs/datasets/NAME.yaml) that ``load_config``
  resolves against the factor table the prepared data carries.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import yaml

from dsu_models import config as C
from dsu_models.data import prepare, read_split
from dsu_models.data.base import FactorInfo
from dsu_models.data.errors import DataError
from dsu_models.data.sources import SOURCES, make_plan
from dsu_models.data.sources import _procedural as P

NAME = "bars"
FACTORS = [("width", 3), ("x", 6)]     # 18 grid points
SIZE = 8


def render(labels: np.ndarray, size: int) -> np.ndarray:
    """labels: (n, 2) class indices -> (n, size, size, 1) uint8: a white vertical
    bar ``width + 1`` pixels wide whose left edge is at column ``x``."""
    cols = np.arange(size)[None, :]
    left, width = labels[:, 1:2], labels[:, 0:1] + 1
    rows = ((cols >= left) & (cols < left + width)).astype(np.uint8) * 255
    return np.repeat(rows[:, None, :], size, axis=1)[..., None]


def plan(opts: dict):
    infos = [FactorInfo(n, c, tuple(str(i) for i in range(c))) for n, c in FACTORS]
    return P.grid_plan(NAME, FACTORS, infos, 1, SIZE, 1, render, opts)


def source_module() -> types.ModuleType:
    """What this source's module file under dsu_models/data/sources/ would hold."""
    m = types.ModuleType(NAME)
    m.NAME, m.FACTORS, m.DEFAULT_IMAGE_SIZE, m.CHANNELS = NAME, FACTORS, SIZE, 1
    m.OPTIONS = {"num_samples": None}
    m.plan = plan
    return m


@pytest.fixture
def bars(monkeypatch, tmp_path):
    monkeypatch.setitem(SOURCES, NAME, source_module())
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    (datasets / f"{NAME}.yaml").write_text(yaml.safe_dump({
        "dataset": NAME, "image_size": SIZE, "image_channels": 1,
        "factors": {"width": {"classes": 3, "size": 2}, "x": {"classes": 6, "size": 2, "init": "linear"}}}))
    monkeypatch.setattr(C, "DATASET_DIR", datasets)
    return tmp_path


def test_a_declared_source_prepares_reads_back_and_configures(bars):
    m = SOURCES[NAME]
    for attr in ("FACTORS", "DEFAULT_IMAGE_SIZE", "CHANNELS", "OPTIONS", "plan"):  # as test_data_sources
        assert hasattr(m, attr), attr
    with pytest.raises(DataError, match="unknown option"):   # the common option check applies
        make_plan(NAME, {"colour": 1})

    out = prepare(NAME, bars / "prepared", test_portion=0.25, val_portion=0.25, seed=0)
    splits = {s: read_split(out, s) for s in ("train", "val", "test")}
    assert sum(len(d) for d in splits.values()) == 18
    assert all(len(d) for d in splits.values()), {s: len(d) for s, d in splits.items()}
    for d in splits.values():
        assert d.images.shape[1:] == (1, SIZE, SIZE)
        assert [f.name for f in d.factors] == ["width", "x"]
        # the pixels carry the labels: the bar's left edge and width
        lit = d.images[:, 0, 0].numpy() > 0
        assert (lit.argmax(1) == d.labels[:, 1].numpy()).all()
        assert (lit.sum(1) == d.labels[:, 0].numpy() + 1).all()

    data_factors = {f.name: f.classes for f in splits["train"].factors}
    cfg = C.load_config(overrides=[f"dataset={NAME}"], data_factors=data_factors)
    assert cfg.dataset == NAME and cfg.image_size == SIZE
    assert {k: f.classes for k, f in cfg.factors.items()} == data_factors
