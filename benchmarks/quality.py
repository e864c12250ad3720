"""Quality bar: does the method disentangle shapes3d on this CPU, and how fast?

    python benchmarks/quality.py [--config quality] [--scale 1.0] [--out DIR] [key=value ...]

Trains every stage with the single-process runner (``dsu_models.train.run``;
the same stage modules the Ray pipeline runs) on the built-in ``shapes3d`` at
32 px with labeled = floor_hue, wall_hue, object_hue, shape and unknown =
scale, orientation (the ``quality`` preset by default), each stage's iterations multiplied
by ``--scale``, then evaluates the final model (``dsu_models.evaluation``) and
prints the figures next to the bar of the evaluation issue:

    mean swap accuracy >= 0.9, mean hidden preservation >= 0.8,
    leakage <= chance + 0.1, within 60 minutes of CPU training.

Training time is the wall time of the stages (distillation included); oracle
training (cached per dataset under ``--cache``) and the evaluation itself are
timed apart. ``--out`` keeps the run: re-running with the same directory
resumes or reuses finished stages (the runner's own rule), so one run can be
evaluated at several budgets by growing ``--scale`` into new directories.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

BAR = {"swap_acc_mean": (">=", 0.9), "preserve_mean": (">=", 0.8), "leak_excess_mean": ("<=", 0.1)}
LABELED = "labeled_factors=[floor_hue, wall_hue, object_hue, shape]"


def scaled_overrides(cfg, scale: float) -> list[str]:
    """Each active stage's iterations times ``scale`` (at least 1), and stage 1's
    schedule with them (the adversary's ramp, the encoder and embedder freezes),
    so a shorter run keeps the schedule's shape."""
    def times(n: int) -> int:
        return max(1, math.ceil(n * scale))

    out = [f"{s}.iterations={times(getattr(cfg, s).iterations)}" for s in cfg.active_stages()]
    if "stage1" in cfg.active_stages():
        s1 = cfg.stage1
        if s1.cla1_ramp is not None:
            out.append(f"stage1.cla1_ramp=[{', '.join(str(times(t)) for t in s1.cla1_ramp)}]")
        out += [f"stage1.{key}={times(getattr(s1, key))}" for key in ("enc_freeze", "emb_freeze")
                if getattr(s1, key)]
    return out


def stage_seconds(cfg, out: Path) -> dict[str, float]:
    """Per stage, training seconds from its metrics log (iterations x batch / images_per_s)."""
    seconds = {}
    for path in sorted(out.glob("*/metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        stage = path.parent.name
        batch = getattr(cfg, stage).batch_size
        total, last = 0.0, 0
        for row in rows:
            rate = row.get("images_per_s")
            if rate and batch:
                total += (row["iteration"] - last) * batch / rate
            last = row["iteration"]
        seconds[stage] = total
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quality", help="preset or YAML (default: quality)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's iterations")
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    parser.add_argument("--cache", default=str(Path.home() / ".disunknown" / "oracles"),
                        help="oracle cache directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(args.threads)

    from dsu_models.evaluation import evaluate, load_or_train_oracles
    from dsu_models.inference import DisUnknownModel
    from dsu_models.factory import build_config, load_data
    from dsu_models.stages.common import resolve_device
    from dsu_models.train import run

    base = build_config(args.config, [LABELED] + args.overrides)
    cfg = build_config(args.config, [LABELED] + args.overrides + scaled_overrides(base, args.scale))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dsu-quality-"))
    print(f"quality: {cfg.dataset} {cfg.image_size} px, device {cfg.device}, precision {cfg.precision}, labeled {cfg.labeled_factors}, hidden "
          f"{cfg.hidden()}; iterations " + ", ".join(f"{s} {getattr(cfg, s).iterations}"
                                                    for s in cfg.active_stages()) + f"; out {out}",
          flush=True)
    started = time.perf_counter()
    results = run(cfg, out)
    train_wall = time.perf_counter() - started

    train, test = load_data(cfg)
    device = resolve_device(cfg.device)  # the evaluation runs where the training ran
    started = time.perf_counter()
    oracles = load_or_train_oracles(train, test, cfg.evaluate, args.cache, device)
    oracle_wall = time.perf_counter() - started
    model = DisUnknownModel.from_handoffs(
        stage1=results["stage1"], stage2=results.get("stage2"), lenc=results.get("lenc"),
        code_stats=results["codes"]["stats"], all_factors=train.factors, device=str(device))
    started = time.perf_counter()
    metrics = evaluate(model, train, test, cfg.evaluate, oracles)
    eval_wall = time.perf_counter() - started

    print(f"\ntraining wall {train_wall / 60:.1f} min (this call; stages reused from --out are not "
          f"counted) | per stage (from reports): "
          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in stage_seconds(cfg, out).items()))
    print(f"oracles {oracle_wall:.0f} s (test accuracy "
          + ", ".join(f"{k} {v:.3f}" for k, v in oracles.test_accuracy.items())
          + f") | evaluation {eval_wall:.0f} s")
    for key in sorted(metrics):
        print(f"  {key:28s} {metrics[key]:.4f}")
    verdicts = []
    for key, (op, bound) in BAR.items():
        value = metrics.get(key, float("nan"))
        ok = value >= bound if op == ">=" else value <= bound
        verdicts.append(ok)
        print(f"bar {key} {op} {bound}: {value:.3f} {'MET' if ok else 'not met'}")
    print(f"summary {metrics.get('summary', float('nan')):.4f}; bar "
          f"{'met' if all(verdicts) else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
