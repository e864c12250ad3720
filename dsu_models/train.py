"""Single-process runner: all stages in order on a plain in-memory loader.

    python -m dsu_models.train --config FILE --out DIR [key=value ...]

``--config`` takes a YAML file or a preset name from ``dsu_models/configs/presets``
(``quick``, ``quality``, ``tiny``). Output directory layout::

    DIR/config.yaml                 resolved config
    DIR/<stage>/checkpoint.pt       latest full state (models, optimizers, iteration, RNG)
    DIR/<stage>/handoff.pt          finished stage's weights + config (what the next stage reads)
    DIR/<stage>/metrics.jsonl       one line per report
    DIR/<stage>/samples/*.png       pictures: reconstruction, swap and class-sweep grids,
                                    code scatter and label-embedding plots (dsu_models.plots)
    DIR/stage1/codes.pt             distilled unknown codes and their statistics

Re-running with the same DIR resumes: finished stages (with ``handoff.pt``)
are skipped, an unfinished one continues from its checkpoint. A config that
differs from the one in DIR is refused. A non-finite loss stops with an error
naming the stage, iteration and term; the last checkpoint stays intact.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from dsu_models import distill as distill_mod
from dsu_models.batches import BatchSource, labeled_view
from dsu_models.config import (CONFIG_DIR, Config, ConfigError, layered_dict, load_resolved, resolve,
                               save_config, read_yaml)
from dsu_models.data.base import InMemoryDataset
from dsu_models.data.sources.builtin import BUILTIN
from dsu_models.grids import save_png
from dsu_models.models import build_encoder
from dsu_models.plots import scatter_subset
from dsu_models.stages.common import NonFiniteLossError, resolve_device

PRESET_DIR = CONFIG_DIR / "presets"
AFTER_TRAINING = ("evaluate.",)  # config keys a resumed run may change: they do not touch training


# ------------------------------------------------------------------ config and data


def config_path(name: str | None) -> Path | None:
    """A YAML path, or a preset name (``quick``) resolved under configs/presets."""
    if name is None:
        return None
    if Path(name).exists() or name.endswith((".yaml", ".yml")):
        return Path(name)
    preset = PRESET_DIR / f"{name}.yaml"
    if preset.exists():
        return preset
    known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"--config {name!r}: no such file and no such preset (presets: {known})")


def build_config(config: str | None, overrides: list[str]) -> Config:
    """Layer, validate and resolve; a prepared dataset's manifest supplies its factor table."""
    path = config_path(config)
    raw = layered_dict(read_yaml(path, "config file") if path else {}, overrides)
    data_factors = None
    if raw.get("data_path"):
        from dsu_models.data import read_manifest
        manifest = read_manifest(raw["data_path"])
        data_factors = {f["name"]: int(f["classes"]) for f in manifest["factors"]}
    return resolve(raw, data_factors)


def load_data(cfg: Config) -> tuple[InMemoryDataset, InMemoryDataset]:
    """(train, test) for the config: a prepared directory or a built-in dataset."""
    if cfg.data_path:
        from dsu_models.data import read_split
        train = read_split(cfg.data_path, "train", image_size=cfg.image_size)
        test = read_split(cfg.data_path, "test", image_size=cfg.image_size)
    elif cfg.dataset in BUILTIN:
        from dsu_models.data import load_builtin
        train, test = load_builtin(cfg.dataset, image_size=cfg.image_size,
                                   num_samples=cfg.num_samples, seed=cfg.seed,
                                   test_portion=cfg.test_portion)
    else:
        raise ConfigError(f"dataset {cfg.dataset!r}: set data_path to a prepared dataset "
                          f"(python pipelines/prepare_data.py {cfg.dataset} --out DIR)")
    for split in (train, test):
        if split.channels != cfg.image_channels or split.image_size != cfg.image_size:
            raise ConfigError(f"image_size/image_channels: config says {cfg.image_size} px x "
                              f"{cfg.image_channels} ch, {split.name} has {split.image_size} px x "
                              f"{split.channels} ch")
    return train.with_measured_frequencies(), test


# ------------------------------------------------------------------ files


def atomic_save(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def check_out_dir(cfg: Config, out: Path):
    """Write the resolved config, or refuse a DIR that holds a different one."""
    path = out / "config.yaml"
    if path.exists():
        old = load_resolved(path)
        if old != cfg:
            flat_old, flat_new = _flat(old.to_dict()), _flat(cfg.to_dict())
            diff = sorted(k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k))
            training = [k for k in diff if not k.startswith(AFTER_TRAINING)]
            if training:
                raise ConfigError(f"{out}: holds a run with a different config (keys differ: "
                                  f"{', '.join(training[:8])}); use another --out to start afresh")
            save_config(cfg, path)  # only evaluation settings changed: the training is still valid
    else:
        save_config(cfg, path)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


# ------------------------------------------------------------------ progress


class Progress:
    """Prints one line per report: iteration, losses, images/s, ETA."""

    def __init__(self, stage: str, total: int, batch_size: int, start: int,
                 log: Callable[[str], None]):
        self.stage, self.total, self.batch_size, self.log = stage, total, batch_size, log
        self.last_time, self.last_it = time.perf_counter(), start

    def report(self, iteration: int, metrics: dict[str, float]) -> float:
        now = time.perf_counter()
        rate = (iteration - self.last_it) * self.batch_size / max(now - self.last_time, 1e-9)
        eta = (self.total - iteration) * self.batch_size / max(rate, 1e-9)
        self.last_time, self.last_it = now, iteration
        losses = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self.log(f"[{self.stage}] {iteration}/{self.total} | {losses} | {rate:.1f} img/s | "
                 f"eta {eta / 60:.1f} min")
        return rate


# ------------------------------------------------------------------ stages


def make_stage(name: str, cfg: Config, factors, upstream: dict, device):
    if name == "stage1":
        from dsu_models.stages.stage1 import Stage1
        return Stage1(cfg, factors, device)
    if name == "classifier":
        from dsu_models.stages.classifier import ClassifierStage
        return ClassifierStage(cfg, factors, device)
    if name == "stage2":
        from dsu_models.stages.stage2 import Stage2
        return Stage2(cfg, factors, upstream, device)
    if name == "lenc":
        from dsu_models.stages.lenc import LencStage
        return LencStage(cfg, factors, upstream, device)
    raise ValueError(f"unknown stage {name!r}")


def train_stage(stage, source: BatchSource, stage_dir: Path, plot_batch: dict,
                log: Callable[[str], None] = print,
                on_report: Callable[[int, dict], None] | None = None,
                plot_set: InMemoryDataset | None = None):
    """Run ``stage`` from its current iteration to the end, with reports,
    pictures and checkpoints. Resumes from ``stage_dir/checkpoint.pt``.

    Pictures: whatever ``stage.pictures(plot_batch, plot_set)`` says is due
    after an iteration (stages decide by their intervals; see
    ``dsu_models.plots``), saved as ``samples/<key>_<iteration>.png``.
    ``plot_set``: a fixed set of test images with every factor's labels for the
    code scatter plots."""
    s = stage.scfg
    ckpt = stage_dir / "checkpoint.pt"
    if ckpt.exists():
        stage.load_state_dict(load(ckpt))
        log(f"[{stage.name}] resuming from iteration {stage.iteration}")
    progress = Progress(stage.name, s.iterations, s.batch_size, stage.iteration, log)
    metrics_file = stage_dir / "metrics.jsonl"
    sums: dict[str, float] = {}
    count = 0
    while not stage.done:
        metrics = stage.train_step(source.batch(stage.iteration))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        it = stage.iteration
        if it % s.checkpoint_interval == 0 or stage.done:
            atomic_save(stage.state_dict(), ckpt)
        if it % s.report_interval == 0 or stage.done:
            mean = {k: v / count for k, v in sums.items()}
            mean["images_per_s"] = progress.report(it, mean)
            with metrics_file.open("a") as f:
                f.write(json.dumps({"iteration": it, **mean}) + "\n")
            if on_report:
                on_report(it, mean)
            sums, count = {}, 0
        if hasattr(stage, "pictures"):
            for key, image in stage.pictures(plot_batch, plot_set).items():
                save_png(image, stage_dir / "samples" / f"{key}_{it:07d}.png")


def distill_codes(cfg: Config, handoff: dict, train: InMemoryDataset, test: InMemoryDataset,
                  device) -> dict:
    """Encode every train/test sample with stage 1's E (METHOD.md section 7 end)."""
    encoder = None
    if cfg.unknown_size:
        encoder = build_encoder(cfg, [cfg.unknown_size], cfg.stage1.zero_init)
        encoder.load_state_dict(handoff["weights"]["encoder"])
        encoder.to(device)
    return distill_mod.distill(encoder, {"train": train, "test": test},
                               batch_size=4 * cfg.stage1.batch_size, device=device)


def run(cfg: Config, out: Path, log: Callable[[str], None] = print,
        stages: list[str] | None = None,
        on_report: Callable[[str, int, dict], None] | None = None) -> dict:
    """Run every active stage in order, resuming what DIR already holds.
    Returns ``{stage: handoff}`` plus ``"codes"``."""
    out = Path(out)
    check_out_dir(cfg, out)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    train, test = load_data(cfg)
    log(f"data: {train.name} train {len(train)}, test {len(test)} images, "
        f"{cfg.image_size} px x {cfg.image_channels} ch; labeled {cfg.labeled_factors}, "
        f"unknown size {cfg.unknown_size}; device {device}")
    _, factors = labeled_view(cfg, train)
    plot_batch = BatchSource(cfg, test, min(8, len(test)), cfg.seed).batch(0)
    plot_set = scatter_subset(test, seed=cfg.seed)
    results: dict = {}
    for name in stages or cfg.active_stages():
        stage_dir = out / name
        handoff_path = stage_dir / "handoff.pt"
        if handoff_path.exists():
            log(f"[{name}] already finished, reusing {handoff_path}")
            results[name] = load(handoff_path)
        else:
            stage_dir.mkdir(parents=True, exist_ok=True)
            upstream = {"stage1": results.get("stage1"), "classifier": results.get("classifier"),
                        "stage2": results.get("stage2"),
                        "code_stats": results["codes"]["stats"] if "codes" in results else None}
            stage = make_stage(name, cfg, factors, upstream, device)
            codes = results["codes"]["codes"]["train"] if name == "stage2" else None
            source = BatchSource(cfg, train, getattr(cfg, name).batch_size, cfg.seed, codes)
            if name == "stage2":
                plot_codes = results["codes"]["codes"]["test"]
                plot_batch2 = BatchSource(cfg, test, min(8, len(test)), cfg.seed, plot_codes).batch(0)
            torch.manual_seed(cfg.seed + len(results))
            try:
                report = (lambda it, m, _n=name: on_report(_n, it, m)) if on_report else None
                train_stage(stage, source, stage_dir,
                            plot_batch2 if name == "stage2" else plot_batch, log, report, plot_set)
            except NonFiniteLossError:
                log(f"[{name}] stopped; the last good checkpoint is {stage_dir / 'checkpoint.pt'}")
                raise
            results[name] = stage.handoff()
            atomic_save(results[name], handoff_path)
            log(f"[{name}] done: {handoff_path}")
        if name == "stage1":
            codes_path = stage_dir / "codes.pt"
            if codes_path.exists():
                results["codes"] = distill_mod.load_codes(codes_path)
            else:
                log("[distill] encoding every train/test image with E")
                results["codes"] = distill_codes(cfg, results["stage1"], train, test, device)
                distill_mod.save_codes(results["codes"], codes_path)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file or preset name (quick, quality, tiny)")
    parser.add_argument("--out", required=True, help="output directory (resumed if it exists)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. stage1.cla1_weight=0.3")
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args.config, args.overrides)
        run(cfg, Path(args.out))
    except (ConfigError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    print(f"finished: grids under {args.out}/*/samples, weights in {args.out}/*/handoff.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
