"""Tiny configs and batches for fast CPU tests of the stages."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from dsu_models.config import Config, load_config
from dsu_models.data.base import FactorInfo

TINY = [
    "image_size=8", "architecture.conv_channels=[8]", "architecture.fc_features=16",
    "architecture.enc_gen_fc_layers=1", "stage1.code_cla1_features=16", "stage1.code_cla1_layers=1",
    "all_stages.batch_size=8", "all_stages.lr_ramp=2", "all_stages.iterations=20",
    "labeled_factors=[floor_hue, shape]",
]


def tiny_config(*overrides: str) -> Config:
    """shapes3d at 8 px with one conv level; labeled floor_hue and shape, the rest unknown."""
    return load_config(overrides=TINY + list(overrides))


def tiny_factors(cfg: Config) -> list[FactorInfo]:
    """Labeled factor infos with non-uniform frequencies."""
    out = []
    for name, spec in cfg.labeled():
        f = torch.arange(1, spec.classes + 1, dtype=torch.float64)
        out.append(FactorInfo(name, spec.classes, (), tuple((f / f.sum()).tolist())))
    return out


def tiny_batch(cfg: Config, batch: int = 8, seed: int = 0) -> dict:
    """Images that depend on the labels (so losses can fall) plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randint(0, spec.classes, (batch,), generator=g)
                          for _, spec in cfg.labeled()], dim=1) if cfg.labeled_factors \
        else torch.zeros(batch, 0, dtype=torch.int64)
    s = cfg.image_size
    base = torch.rand(batch, cfg.image_channels, s, s, generator=g) * 0.4 - 0.2
    for k in range(labels.shape[1]):
        base[:, :, k % s, :] += labels[:, k, None, None].float() / 10.0 - 0.3
    return {"image": base.clamp(-1, 1), "labels": labels}


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (benchmarks are scripts, not a package)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # as when it runs as a script: its siblings (naive.py) import by name
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def tiny_stages(cfg: Config, device="cpu") -> dict:
    """All four stages of ``cfg`` on ``device``, each from its fresh upstream
    stages' hand-offs, and stage 2's code statistics of random codes."""
    from dsu_models import codes
    from dsu_models.stages.classifier import ClassifierStage
    from dsu_models.stages.lenc import LencStage
    from dsu_models.stages.stage1 import Stage1
    from dsu_models.stages.stage2 import Stage2

    factors = tiny_factors(cfg)
    m = cfg.unknown_size
    g = torch.Generator().manual_seed(1)
    stats = codes.code_statistics(torch.randn(64, m, generator=g) * 0.8,
                                  torch.rand(64, m, generator=g) * 0.5 + 0.1)
    s1 = Stage1(cfg, factors, device)
    cla = ClassifierStage(cfg, factors, device)
    s2 = Stage2(cfg, factors, {"stage1": s1.handoff(), "classifier": cla.handoff(), "code_stats": stats},
                device)
    lenc = LencStage(cfg, factors, {"stage2": s2.handoff(), "code_stats": stats}, device)
    return {"stage1": s1, "classifier": cla, "stage2": s2, "lenc": lenc}


def tiny_stage_batch(cfg: Config, stage: str, batch: int = 8, seed: int = 0) -> dict:
    """:func:`tiny_batch`, with unknown codes for stage 2."""
    out = tiny_batch(cfg, batch, seed)
    if stage == "stage2":
        g = torch.Generator().manual_seed(seed + 100)
        out["mu"] = torch.randn(batch, cfg.unknown_size, generator=g)
        out["sigma"] = torch.rand(batch, cfg.unknown_size, generator=g) * 0.3 + 0.05
    return out
