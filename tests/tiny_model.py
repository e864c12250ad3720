"""A genuinely trained tiny model for the inference and registry tests.

``tiny`` preset (shapes3d at 16 px; labeled floor_hue, wall_hue, object_hue,
shape; unknown = scale + orientation), 200 samples, 4 iterations per stage,
and a small ``evaluate`` section so the evaluation CLI test stays quick.

:func:`train_tiny` trains with ``dsu_models.train.run`` into a folder; given a
folder that already holds the finished run it only reloads it (``run`` skips
finished stages), so test modules can share one run per pytest session through
``tmp_path_factory.getbasetemp()``.
"""
from __future__ import annotations

from pathlib import Path

from dsu_models.inference import bundle_from_run, save_bundle
from dsu_models.config import load_config
from dsu_models.data.configured import load_data
from dsu_models.train import run

TINY_RUN = ["num_samples=200", "all_stages.iterations=4", "all_stages.report_interval=4",
            "all_stages.sample_interval=1000", "all_stages.checkpoint_interval=1000", "device=cpu",
            "evaluate.pairs=48", "evaluate.batch_size=64", "evaluate.oracle_epochs=1",
            "evaluate.oracle_width=8", "evaluate.probe_samples=100"]


def train_tiny(out: Path) -> dict:
    """Train (or reload) and bundle. Returns ``{"results", "train", "test",
    "bundle", "bundle_dir", "config"}``."""
    cfg = load_config("tiny", TINY_RUN)
    results = run(cfg, Path(out) / "run", log=lambda line: None)
    train, val, test = load_data(cfg)
    bundle = bundle_from_run(results, train, test)
    bundle_dir = save_bundle(bundle, Path(out) / "model")
    return {"results": results, "train": train, "test": test, "bundle": bundle,
            "bundle_dir": bundle_dir, "config": cfg}


def shared_tiny(tmp_path_factory) -> dict:
    """:func:`train_tiny` in one folder per pytest session."""
    return train_tiny(tmp_path_factory.getbasetemp() / "tiny-model")
