"""Images/s of each stage's ``train_step`` on the current device.

    python benchmarks/stage_throughput.py [--steps N] [--configs mnist,rgb32,shapes64] [--no-naive]

Configs (default architecture and batch size for the image size):
  mnist    28 px, 1 channel, 1 labeled factor of 10 classes, unknown 64 (batch 64)
  rgb32    32 px RGB, 3 labeled factors of 4 classes, unknown 7 (batch 64)
  shapes64 64 px RGB, 5 labeled factors (3D Shapes without orientation), unknown 2 (batch 32)

For stage 1 and stage 2 it also times a straightforward implementation of the
same networks and math (``benchmarks/naive.py``) in the same run and prints
the ratio. Synthetic batches: timing does not depend on pixel values.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive import naive_stage1_step, naive_stage2_step  # noqa: E402

from dsu_models import codes  # noqa: E402
from dsu_models.config import layered_dict, resolve  # noqa: E402
from dsu_models.data.base import FactorInfo  # noqa: E402
from dsu_models.stages.classifier import ClassifierStage  # noqa: E402
from dsu_models.stages.common import resolve_device  # noqa: E402
from dsu_models.stages.lenc import LencStage  # noqa: E402
from dsu_models.stages.stage1 import Stage1  # noqa: E402
from dsu_models.stages.stage2 import Stage2  # noqa: E402

CONFIGS = {
    "mnist": (["dataset=mnist"], None),
    "rgb32": (["dataset=image_folder", "image_size=32", "image_channels=3", "unknown_size=7",
               "unknown_dropout=[0.5]"], {"a": 4, "b": 4, "c": 4}),
    "shapes64": (["dataset=3dshapes",
                  "labeled_factors=[floor_hue, wall_hue, object_hue, scale, shape]"], None),
}


def build(name: str, device: str):
    overrides, data_factors = CONFIGS[name]
    cfg = resolve(layered_dict({}, overrides + [f"device={device}"]), data_factors)
    factors = [FactorInfo(n, spec.classes, (), tuple([1.0 / spec.classes] * spec.classes))
               for n, spec in cfg.labeled()]
    return cfg, factors


def batch_for(cfg, batch_size: int, with_codes: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    s = cfg.image_size
    out = {"image": torch.rand(batch_size, cfg.image_channels, s, s, generator=g) * 2 - 1,
           "labels": torch.stack([torch.randint(0, spec.classes, (batch_size,), generator=g)
                                  for _, spec in cfg.labeled()], 1)}
    if with_codes:
        out["mu"] = torch.randn(batch_size, cfg.unknown_size, generator=g)
        out["sigma"] = torch.rand(batch_size, cfg.unknown_size, generator=g) * 0.5 + 0.1
    return out


def timed(step, batch: dict, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return steps * batch["image"].shape[0] / (time.perf_counter() - start)


def stages_for(cfg, factors, device):
    s1 = Stage1(cfg, factors, device)
    cla = ClassifierStage(cfg, factors, device)
    stats = codes.code_statistics(torch.randn(512, cfg.unknown_size), torch.rand(512, cfg.unknown_size) + 0.1)
    s2 = Stage2(cfg, factors, {"stage1": s1.handoff(), "classifier": cla.handoff(), "code_stats": stats},
                device)
    lenc = LencStage(cfg, factors, {"stage2": s2.handoff(), "code_stats": stats}, device)
    return {"stage1": s1, "classifier": cla, "stage2": s2, "lenc": lenc}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--configs", default="mnist,rgb32,shapes64")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-naive", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'config':9} {'stage':10} {'batch':>5} {'img/s':>9} {'naive':>9} {'ratio':>6}")
    for name in args.configs.split(","):
        torch.manual_seed(0)
        cfg, factors = build(name, str(device))
        stages = stages_for(cfg, factors, device)
        naive = {"stage1": naive_stage1_step, "stage2": naive_stage2_step}
        for stage_name, stage in stages.items():
            bs = getattr(cfg, stage_name).batch_size
            batch = batch_for(cfg, bs, stage_name == "stage2")
            rate = timed(stage.train_step, batch, args.steps)
            line = f"{name:9} {stage_name:10} {bs:5d} {rate:9.1f}"
            if stage_name in naive and not args.no_naive:
                fresh = stages_for(cfg, factors, device)[stage_name]
                base = timed(lambda b, st=fresh, f=naive[stage_name]: f(st, b), batch, args.steps)
                line += f" {base:9.1f} {rate / base:6.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
