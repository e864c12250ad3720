"""Is ``content_consistency`` honest? Its rank correlation with the oracles' ``preserve_mean``.

    python benchmarks/consistency_honesty.py [--dataset shapes3d sprites] [--config quick]
        [--scale 0.5] [--out DIR] [key=value ...]

On a built-in dataset every factor has ground truth, so the oracles measure
content preservation (``preserve_mean``: the share of swaps in which each
unknown factor still reads as the content image's). A user's own images have
no such labels; ``content_consistency`` (``dsu_models.evaluation.consistency``)
needs none. This benchmark evaluates, on the validation split, models that
range from good to degenerate and prints both figures side by side with their
Spearman rank correlation, per dataset and pooled:

- ``untrained``: stage 1's networks before their first step;
- ``stage1@N``: G1 drawing from E's code at stage-1 milestones (early and late
  checkpoints of a real run), and ``stage2@N`` / ``final`` along stage 2;
- ``shrunk``: the final model with its unknown code pulled half-way to its mean
  (a model that keeps part of the content);
- ``prototype``: the final generator fed the prior mean for every image
  (ignores the unknown code: draws a prototype of the requested labels);
- ``constant``: an encoder that outputs one image's code for every image;
- ``copy``: returns its content image whatever labels are asked for.

Trains with the single-process runner (``dsu_models.train.run``) on the
config's schedule times ``--scale``; oracles are cached under ``--cache``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsu_models.data.base import to_float

LABELED = {"shapes3d": "labeled_factors=[object_hue, shape, scale, orientation]",
           "sprites": "labeled_factors=[shape, scale]"}


class Wrapped:
    """A duck-typed model that changes one call of ``base`` (see the module docstring)."""

    def __init__(self, base, kind: str, anchor=None):
        self.base, self.kind, self.anchor = base, kind, anchor
        self.labeled_factors, self.device = base.labeled_factors, base.device
        self.label_encoder = None
        shape = base.config.image_channels, base.config.image_size, base.config.image_size
        self.image_shape = shape
        self.unknown_size = int(torch.tensor(shape).prod()) if kind == "copy" else base.unknown_size

    def encode_unknown(self, images):
        if self.kind == "copy":        # the code is the image itself, in [-1, 1]
            x = self.base.images(images)
            return (to_float(x) if x.dtype == torch.uint8 else x.float()).flatten(1)
        u = self.base.encode_unknown(images)
        if self.kind == "prototype":
            return torch.zeros_like(u)
        if self.kind == "constant":
            return self.anchor.expand_as(u).clone()
        return self.anchor + 0.5 * (u - self.anchor)       # shrunk half-way to the mean code

    def embed_labels(self, labels):
        return self.base.embed_labels(labels)

    def generate(self, unknown, label_codes):
        if self.kind == "copy":
            return unknown.reshape(-1, *self.image_shape)
        return self.base.generate(unknown, label_codes)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr
    return float(spearmanr(x, y).statistic)


def models_along_a_run(cfg, out: Path, train, scale_note: str, every: dict[str, int]):
    """Train with the runner; return [(name, model)] at the milestones, plus the final model."""
    from dsu_models.distill import load_codes
    from dsu_models.stages import make_stage
    from dsu_models.files import load_torch
    from dsu_models.inference import DisUnknownModel
    from dsu_models.stages.common import resolve_device
    from dsu_models.batches import labeled_view
    from dsu_models.train import run

    device = str(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    fresh = make_stage("stage1", cfg, labeled_view(cfg, train)[1], {}, resolve_device(cfg.device))
    found = [("untrained", DisUnknownModel.from_handoffs(stage1=fresh.handoff(), all_factors=train.factors,
                                                         device=device))]

    def watch(stage):
        n = every.get(stage.name)
        if not n or stage.iteration % n or (stage.done and stage.name == "stage2"):  # that one is "final"
            return
        if stage.name == "stage1":
            model = DisUnknownModel.from_handoffs(stage1=stage.handoff(), all_factors=train.factors,
                                                  device=device)
        else:
            codes = load_codes(out / "stage1" / "codes.pt")
            model = DisUnknownModel.from_handoffs(stage1=load_torch(out / "stage1" / "handoff.pt"),
                                                  stage2=stage.handoff(), code_stats=codes["stats"],
                                                  all_factors=train.factors, device=device)
        found.append((f"{stage.name}@{stage.iteration}", model))

    started = time.perf_counter()
    results = run(cfg, out, log=lambda line: None, watch=watch)
    print(f"  trained in {(time.perf_counter() - started) / 60:.1f} min ({scale_note})", flush=True)
    final = DisUnknownModel.from_handoffs(stage1=results["stage1"], stage2=results.get("stage2"),
                                          lenc=results.get("lenc"), code_stats=results["distill"]["stats"],
                                          all_factors=train.factors, device=device)
    found.append(("final", final))
    return found, final


def degenerate(final, val) -> list[tuple[str, object]]:
    mean = final.encode_unknown(val.images[:512]).mean(0, keepdim=True)
    one = final.encode_unknown(val.images[:1])
    return [("shrunk", Wrapped(final, "shrunk", mean)), ("prototype", Wrapped(final, "prototype")),
            ("constant", Wrapped(final, "constant", one)), ("copy", Wrapped(final, "copy"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", nargs="+", choices=sorted(LABELED), default=["shapes3d", "sprites"])
    parser.add_argument("--config", default="quick", help="preset or YAML (default: quick)")
    parser.add_argument("--scale", type=float, default=0.5, help="multiply every stage's iterations")
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    parser.add_argument("--cache", default=str(Path.home() / ".disunknown" / "oracles"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import scaled_overrides

    from dsu_models.evaluation import evaluate, load_or_train_oracles
    from dsu_models.config import load_config
    from dsu_models.data.configured import load_data

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dsu-honesty-"))
    pooled: list[tuple[float, float, float]] = []
    for dataset in args.dataset:
        # the probe on the copy model's 3,072-dimension "code" would dominate the run; leakage is not
        # what this benchmark measures
        chosen = [f"dataset={dataset}", LABELED[dataset], "evaluate.probe_samples=2000"] + args.overrides
        base = load_config(args.config, chosen)
        cfg = load_config(args.config, chosen + scaled_overrides(base, args.scale))
        train, val, test = load_data(cfg)
        print(f"{dataset}: labeled {cfg.labeled_factors}, hidden {cfg.hidden()}; stage 1 "
              f"{cfg.stage1.iterations} its, stage 2 {cfg.stage2.iterations}; judged on val "
              f"({len(val)} images)", flush=True)
        oracles = load_or_train_oracles(train, test, cfg.evaluate, args.cache, log=lambda line: None)
        s1, s2 = cfg.stage1, cfg.stage2
        every = {"stage1": max(s1.report_interval, s1.iterations // 4 // s1.report_interval * s1.report_interval),
                 "stage2": max(s2.report_interval, s2.iterations // 2 // s2.report_interval * s2.report_interval)}
        models, final = models_along_a_run(cfg, root / dataset, train, f"scale {args.scale}", every)
        models += degenerate(final, val)
        rows = []
        print(f"  {'model':14s} {'preserve_mean':>13s} {'content_consistency':>19s} {'code_consistency':>16s} "
              f"{'swap_acc_mean':>13s} {'summary':>8s}")
        for name, model in models:
            m = evaluate(model, train, val, cfg.evaluate, oracles, log=None)
            rows.append((m["preserve_mean"], m["content_consistency"], m["code_consistency"]))
            print(f"  {name:14s} {m['preserve_mean']:13.3f} {m['content_consistency']:19.3f} "
                  f"{m['code_consistency']:16.3f} {m.get('swap_acc_mean', float('nan')):13.3f} "
                  f"{m['summary']:8.3f}", flush=True)
        pooled += rows
        p, c, k = zip(*rows)
        print(f"  {dataset}: Spearman(preserve_mean, content_consistency) {spearman(p, c):.3f}, "
              f"(preserve_mean, code_consistency) {spearman(p, k):.3f} over {len(rows)} models", flush=True)
    if len(args.dataset) > 1:
        p, c, k = zip(*pooled)
        print(f"pooled: Spearman(preserve_mean, content_consistency) {spearman(p, c):.3f}, "
              f"(preserve_mean, code_consistency) {spearman(p, k):.3f} over {len(pooled)} models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
