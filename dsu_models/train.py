"""Single-process runner: the pipeline's steps (``dsu_models.steps``) in order,
on a plain in-memory loader.

    python -m dsu_models.train --config FILE --out DIR [key=value ...]
    disunknown-train --config FILE --out DIR [key=value ...]

``--config`` takes a YAML file or a preset name from ``dsu_models/configs/presets``
(``quick``, ``quality``, ``tiny``). Output directory layout::

    DIR/config.yaml                 resolved config
    DIR/<stage>/checkpoint.pt       latest full state (models, optimizers, iteration, RNG)
    DIR/<stage>/checkpoint.prev.pt  the one before it (resumed from if the latest is unreadable)
    DIR/<stage>/handoff.pt          finished stage's weights + config (what the next stage reads)
    DIR/<stage>/metrics.jsonl       one line per report
    DIR/<stage>/samples/*.png       pictures: reconstruction, swap and class-sweep grids,
                                    code scatter and label-embedding plots (dsu_models.plots)
    DIR/stage1/codes.pt             distilled unknown codes and their statistics
    DIR/model/model.pt              the trained model bundle (+ config.yaml, factors.json),
                                    what ``python -m dsu_models swap --model DIR`` loads

Re-running with the same DIR resumes: finished stages (with ``handoff.pt``)
are skipped, an unfinished one continues from its checkpoint. A config that
differs from the one in DIR is refused. A non-finite loss stops with an error
naming the stage, iteration and term; the last checkpoint stays intact.
The stages run through the one training loop, ``dsu_models.loop``; evaluation is
``python -m dsu_models evaluate --model DIR`` (the Ray pipeline runs it as a step).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dsu_models import distill as distill_mod
from dsu_models.allocator import retain_freed_memory
from dsu_models.batches import BatchSource, labeled_view
from dsu_models.config import Config, ConfigError, config_diff, load_resolved, save_config
from dsu_models.recipe import configured, describe_choices, kept_speed
from dsu_models.data.configured import load_data
from dsu_models.data.base import InMemoryDataset
from dsu_models.data import DataError
from dsu_models.files import CheckpointError, load_torch, save_torch
from dsu_models.grids import save_png
from dsu_models.loop import FileCheckpoints, Sink, run_stage
from dsu_models.plots import scatter_subset
from dsu_models.stages import make_stage
from dsu_models.stages.common import NonFiniteLossError, resolve_device
from dsu_models.steps import PROCESS, Step, check_runner, stage_upstream, steps_for, trained_stages

AFTER_TRAINING = ("evaluate.",)  # config keys a resumed run may change: they do not touch training


def check_out_dir(cfg: Config, out: Path):
    """Write the resolved config, or refuse a DIR that holds a different one."""
    path = out / "config.yaml"
    if path.exists():
        old = load_resolved(path)
        if old != cfg:
            training = [k for k in config_diff(old, cfg) if not k.startswith(AFTER_TRAINING)]
            if training:
                raise ConfigError(f"{out}: holds a run with a different config (keys differ: "
                                  f"{', '.join(training[:8])}); use another --out to start afresh")
            save_config(cfg, path)  # only evaluation settings changed: the training is still valid
    else:
        save_config(cfg, path)


class FolderSink(Sink):
    """The runner's sink: a progress line per report (losses, images/s, ETA),
    ``metrics.jsonl``, checkpoints and PNG pictures in the stage's folder."""

    def __init__(self, stage_dir: Path, checkpoints: FileCheckpoints, log: Callable[[str], None],
                 on_report: Callable[[int, dict], None] | None = None):
        self.stage_dir, self.checkpoints, self.log, self.on_report = stage_dir, checkpoints, log, on_report

    def pictures(self, stage, images):
        for key, image in images.items():
            save_png(image, self.stage_dir / "samples" / f"{key}_{stage.iteration:07d}.png")

    def report(self, stage, losses, images_per_s, checkpoint):
        it, total = stage.iteration, stage.scfg.iterations
        if checkpoint:
            self.checkpoints.save(stage.state_dict())
        mean = {**losses, "images_per_s": images_per_s}
        eta = (total - it) * stage.scfg.batch_size / max(images_per_s, 1e-9)
        self.log(f"[{stage.name}] {it}/{total} | " + " ".join(f"{k} {v:.4g}" for k, v in losses.items())
                 + f" | {images_per_s:.1f} img/s | eta {eta / 60:.1f} min")
        with (self.stage_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"iteration": it, **mean}) + "\n")
        if self.on_report:
            self.on_report(it, mean)


def train_stage(stage, source: BatchSource, stage_dir: Path, plot_batch: dict,
                log: Callable[[str], None] = print,
                on_report: Callable[[int, dict], None] | None = None,
                plot_set: InMemoryDataset | None = None):
    """Run ``stage`` to its end through the loop, resuming from the folder's checkpoint."""
    checkpoints = FileCheckpoints(stage_dir)
    state = checkpoints.load()
    if state is not None:
        stage.load_state_dict(state)
        log(f"[{stage.name}] resuming from iteration {stage.iteration}")
    run_stage(stage, source.batch, FolderSink(stage_dir, checkpoints, log, on_report),
              plot_batch=plot_batch, plot_set=plot_set)


@dataclass
class _Run:
    """What the runner's step functions share: the config, the output folder,
    the data, the callbacks and the finished steps' products (by step name)."""
    cfg: Config
    out: Path
    device: torch.device
    train: InMemoryDataset
    test: InMemoryDataset
    factors: list
    plot_set: InMemoryDataset
    log: Callable[[str], None]
    on_report: Callable[[str, int, dict], None] | None
    watch: Callable[[object], None] | None
    products: dict = field(default_factory=dict)


def _train_step(step: Step, run: _Run):
    """A training stage: reuse its hand-off, or train (resuming) and write it."""
    name, cfg = step.name, run.cfg
    stage_dir = run.out / name
    handoff_path = stage_dir / "handoff.pt"
    if handoff_path.exists():
        run.log(f"[{name}] already finished, reusing {handoff_path}")
        return load_torch(handoff_path)
    stage_dir.mkdir(parents=True, exist_ok=True)
    stage = make_stage(name, cfg, run.factors, stage_upstream(name, run.products), run.device)
    codes = run.products["distill"]["codes"] if stage.reads_codes else {}
    source = BatchSource(cfg, run.train, stage.scfg.batch_size, cfg.seed, codes.get("train"),
                         pinned=run.device.type == "cuda")
    plot_batch = BatchSource(cfg, run.test, min(8, len(run.test)), cfg.seed, codes.get("test")).batch(0)
    torch.manual_seed(cfg.seed + len(run.products))

    def report(it: int, mean: dict):
        if run.on_report:
            run.on_report(name, it, mean)
        if run.watch:
            run.watch(stage)

    try:
        train_stage(stage, source, stage_dir, plot_batch, run.log, report, run.plot_set)
    except NonFiniteLossError:
        run.log(f"[{name}] stopped; the last good checkpoint is {stage_dir / 'checkpoint.pt'}")
        raise
    handoff = stage.handoff()
    save_torch(handoff, handoff_path)
    run.log(f"[{name}] done: {handoff_path}")
    return handoff


def _distill_step(step: Step, run: _Run):
    """Every train/test image's unknown code, written beside stage 1's hand-off."""
    codes_path = run.out / "stage1" / "codes.pt"
    if codes_path.exists():
        return distill_mod.load_codes(codes_path)
    run.log("[distill] encoding every train/test image with E")
    codes = distill_mod.distill_stage1(run.cfg, run.products["stage1"],
                                       {"train": run.train, "test": run.test}, run.device)
    distill_mod.save_codes(codes, codes_path)
    return codes


def _register_step(step: Step, run: _Run):
    """The model bundle in DIR/model, once every training stage has finished."""
    if not all(name in run.products for name in trained_stages(run.cfg)):
        return None
    from dsu_models.bundle import bundle_from_run, save_bundle
    model_dir = save_bundle(bundle_from_run(run.products, run.train, run.test), run.out / "model")
    run.log(f"model: {model_dir} (python -m dsu_models swap --model {run.out} ...)")
    return model_dir


# How this runner runs each kind of step of the table (dsu_models.steps).
RUNNERS = {"train": _train_step, "distill": _distill_step, "register": _register_step}
check_runner(PROCESS, RUNNERS)


def run(cfg: Config, out: Path, log: Callable[[str], None] = print,
        stages: list[str] | None = None,
        on_report: Callable[[str, int, dict], None] | None = None,
        watch: Callable[[object], None] | None = None) -> dict:
    """Run the config's steps in order (``dsu_models.steps``), resuming what DIR
    already holds. ``stages``: only these training stages (the other steps run
    when their inputs are there). Returns ``{step: product}``: a stage's
    hand-off, distill's ``{"codes", "stats"}``, register's model folder.
    ``on_report(stage name, iteration, mean losses)`` and ``watch(stage)`` are
    called after every report (``watch`` gets the running stage, e.g. to
    evaluate its hand-off)."""
    out = Path(out)
    device = resolve_device(cfg.device)  # a missing CUDA is refused before anything is written
    check_runner(PROCESS, RUNNERS)
    steps = steps_for(cfg, PROCESS)
    if stages is not None:
        unknown = [s for s in stages if s not in trained_stages(cfg)]
        if unknown:
            raise ConfigError(f"stages {unknown}: not among this config's stages {trained_stages(cfg)}")
        steps = [s for s in steps if s.kind != "train" or s.name in stages]
    check_out_dir(cfg, out)
    retain_freed_memory()
    torch.manual_seed(cfg.seed)
    train, val, test = load_data(cfg)
    log(f"data: {train.name} train {len(train)}, test {len(test)} images, "
        f"{cfg.image_size} px x {cfg.image_channels} ch; labeled {cfg.labeled_factors}, "
        f"unknown size {cfg.unknown_size}; device {device}")
    if cfg.budget_minutes is not None:
        log(f"recipe: {describe_choices(cfg)}")
    _, factors = labeled_view(cfg, train)
    state = _Run(cfg, out, device, train, test, factors, scatter_subset(test, seed=cfg.seed),
                 log, on_report, watch)
    carried = {s.name for s in steps_for(cfg, PROCESS)}
    for step in steps:
        missing = [up for up in step.upstream if up in carried and up not in state.products]
        if missing:
            if step.kind == "train":
                raise ConfigError(f"stage {step.name} needs {', '.join(missing)} first (run them, "
                                  f"or leave stages unset)")
            continue  # its inputs were not made in this call
        state.products[step.name] = RUNNERS[step.kind](step, state)
    return state.products


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file or preset name (quick, quality, fine, tiny); "
                                         "without it, the default recipe for budget_minutes")
    parser.add_argument("--out", required=True, help="output directory (resumed if it exists)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. stage1.cla1_weight=0.3")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = configured(args.config, kept_speed(args.out, args.overrides), default=True)
        run(cfg, Path(args.out))
    except (ConfigError, DataError, CheckpointError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, NonFiniteLossError) else 2
    print(f"finished: grids under {args.out}/*/samples, weights in {args.out}/*/handoff.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
