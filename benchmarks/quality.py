"""Quality bars: does the method disentangle a built-in dataset on this CPU, and how fast?

    python benchmarks/quality.py [--dataset shapes3d|sprites] [--config quality] [--scale 1.0]
        [--eval-every N] [--stage1-every N] [--out DIR] [key=value ...]

Trains every stage with the single-process runner (``dsu_models.train.run``;
the same stage modules the Ray pipeline runs) on a built-in dataset at 32 px
(the ``quality`` preset's schedule by default), each stage's iterations
multiplied by ``--scale``, then evaluates the final model
(``dsu_models.evaluation``) on the test split and prints the figures next to
two bars:

- ``basic`` (the evaluation issue's): mean swap accuracy >= .9, mean hidden
  preservation >= .8, leakage <= chance + .1;
- ``fine`` (the time-to-quality issue's): mean swap accuracy >= .95 and every
  labeled factor's >= .90, mean preservation >= .90, leakage <= chance + .05;
  both within 60 minutes of CPU training.

``--dataset``: ``shapes3d`` (labeled floor_hue, wall_hue, object_hue, shape;
unknown scale, orientation) or ``sprites`` (labeled shape, scale; unknown
orientation, x, y: labels that are small geometric details); without it, the
config's own dataset and labels (the ``quality`` preset's: shapes3d as above;
``--config quick``: the object labeled, the room unknown;
``--config fine``: sprites, with the schedule that meets the fine bar there;
``--config recipe``: the default recipe, ``dsu_models/recipe.py``, for
``budget_minutes`` (30 unless an override gives it) on shapes3d's default
labels, the object's).

``--eval-every N`` also evaluates the model every N stage-2 iterations (stage
1's encoder with stage 2's generator so far; oracles trained once, up front,
and cached) on the validation split, and prints time to quality: the training
wall minutes (stages 1 and 2 so far, distillation and the classifier included,
evaluations not) at which each bar was first met on val (the milestones choose
when a bar is met, so they never read test). ``--stage1-every N`` evaluates the stage-1
model (G1 drawing from E's code and B1's labels) every N stage-1 iterations:
whether G1 draws each factor yet (``benchmarks/code_probe.py`` says whether
E's code carries it; these milestones are not the final model's and do not
count towards time to quality). Both intervals must be multiples of their stage's
``report_interval`` (the runner hands a stage over at its reports).

``--tracking-uri URI`` (``--experiment``, default ``quality``) also records
the run in MLflow: the resolved config, every milestone's validation figures as
``val_<metric>`` with the stage-2 iteration as their step (so MLflow draws swap
accuracy per factor against iterations) and ``training_minutes`` beside them
(stage-1 milestones as ``val_stage1_<metric>`` and ``stage1_training_minutes``,
with the stage-1 iteration as their step), then the final test figures as ``test_<metric>``, the wall times
and the minutes to each bar.

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

from dsu_models.config import STAGE1_RAMP_KEYS
from dsu_models.evaluation.metrics import on_split
from dsu_models.steps import trained_stages

BARS = {
    "basic": {"swap_acc_mean": (">=", 0.9), "preserve_mean": (">=", 0.8),
              "leak_excess_mean": ("<=", 0.1)},
    "fine": {"swap_acc_mean": (">=", 0.95), "swap_acc_min": (">=", 0.90),
             "preserve_mean": (">=", 0.90), "leak_excess_mean": ("<=", 0.05)},
}
LABELED = {"shapes3d": "labeled_factors=[floor_hue, wall_hue, object_hue, shape]",
           "sprites": "labeled_factors=[shape, scale]"}


def bar_checks(metrics: dict, bar: str) -> list[tuple[str, str, float, float, bool]]:
    """``(key, op, bound, value, met)`` for each line of ``bar``; ``swap_acc_min``
    is the lowest labeled factor's swap accuracy."""
    values = dict(metrics)
    per_factor = [v for k, v in metrics.items() if k.startswith("swap_acc_") and k != "swap_acc_mean"]
    values["swap_acc_min"] = min(per_factor, default=float("nan"))
    out = []
    for key, (op, bound) in BARS[bar].items():
        value = values.get(key, float("nan"))
        met = value >= bound if op == ">=" else value <= bound
        out.append((key, op, bound, value, met))
    return out


def bar_met(metrics: dict, bar: str) -> bool:
    return all(check[-1] for check in bar_checks(metrics, bar))


def scaled_overrides(cfg, scale: float) -> list[str]:
    """Each active stage's iterations times ``scale`` (at least 1), and stage 1's
    schedule with them (the adversary's and the batch loss's ramps, the encoder
    and embedder freezes),
    so a shorter run keeps the schedule's shape."""
    def times(n: int) -> int:
        return max(1, math.ceil(n * scale))

    out = [f"{s}.iterations={times(getattr(cfg, s).iterations)}" for s in trained_stages(cfg)]
    if "stage1" in trained_stages(cfg):
        s1 = cfg.stage1
        for key in STAGE1_RAMP_KEYS:
            if getattr(s1, key) is not None:
                out.append(f"stage1.{key}=[{', '.join(str(times(t)) for t in getattr(s1, key))}]")
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


class _Milestones:
    """Evaluations along the run, judged by the oracles: every ``every["stage2"]``
    stage-2 iterations (``--eval-every``) the stage's hand-off so far with stage
    1's (these milestones give the time to quality); every ``every["stage1"]``
    stage-1 iterations (``--stage1-every``) the stage-1 model alone, G1 drawing
    from E's code and B1's embeddings (what G1 draws so far; E's code may carry
    more, see ``benchmarks/code_probe.py``). The evaluations' own time is kept
    off the training clock."""

    def __init__(self, every: dict[str, int], out: Path, train, val, ecfg, oracles, device, started: float,
                 record=None):
        self.every, self.out, self.train, self.val, self.record = every, out, train, val, record
        self.ecfg, self.oracles, self.device, self.started = ecfg, oracles, device, started
        self.spent = 0.0      # seconds of evaluation, not training
        self.rows: list[tuple[int, float, dict]] = []

    def training_minutes(self) -> float:
        return (time.perf_counter() - self.started - self.spent) / 60

    def __call__(self, stage) -> None:
        every = self.every.get(stage.name)
        if not every or (stage.iteration % every and not stage.done):
            return
        from dsu_models.distill import load_codes
        from dsu_models.evaluation import evaluate
        from dsu_models.files import load_torch
        from dsu_models.inference import DisUnknownModel

        began = time.perf_counter()
        minutes = self.training_minutes()
        if stage.name == "stage1":   # the stage-1 model: G1 drawing from E's code and B1's labels
            model = DisUnknownModel.from_handoffs(stage1=stage.handoff(), all_factors=self.train.factors,
                                                  device=str(self.device))
        else:
            codes = load_codes(self.out / "stage1" / "codes.pt")
            model = DisUnknownModel.from_handoffs(
                stage1=load_torch(self.out / "stage1" / "handoff.pt"), stage2=stage.handoff(),
                code_stats=codes["stats"], all_factors=self.train.factors, device=str(self.device))
        metrics = evaluate(model, self.train, self.val, self.ecfg, self.oracles, log=lambda line: None)
        if stage.name == "stage2":
            self.rows.append((stage.iteration, minutes, metrics))
        if self.record:
            stage1 = "stage1_" if stage.name == "stage1" else ""
            self.record(on_split("val", metrics, prefix=stage1)
                        | {f"{stage1}training_minutes": minutes}, stage.iteration)
        swaps = " ".join(f"{k[9:]} {v:.3f}" for k, v in metrics.items()
                         if k.startswith("swap_acc_") and k != "swap_acc_mean")
        kept = " ".join(f"{k[9:]} {v:.3f}" for k, v in metrics.items()
                        if k.startswith("preserve_") and k not in ("preserve_mean", "preserve_score"))
        print(f"[milestone] {stage.name} {stage.iteration}: {minutes:.1f} min of training | val: swap "
              f"{metrics.get('swap_acc_mean', float('nan')):.3f} ({swaps}) | preservation "
              f"{metrics.get('preserve_mean', float('nan')):.3f} ({kept}) | leak excess "
              f"{metrics.get('leak_excess_mean', float('nan')):.3f} | basic "
              f"{'met' if bar_met(metrics, 'basic') else 'no'}, fine "
              f"{'met' if bar_met(metrics, 'fine') else 'no'}", flush=True)
        self.spent += time.perf_counter() - began

    def time_to_quality(self) -> dict[str, tuple[int, float] | None]:
        """Per bar, the first milestone (iteration, training minutes) that met it."""
        return {bar: next(((it, minutes) for it, minutes, m in self.rows if bar_met(m, bar)), None)
                for bar in BARS}


class _Recorder:
    """The run in MLflow (``--tracking-uri``), through the pipeline's own tracking
    helpers: the config as params and a file, then ``record(metrics, step)``."""

    def __init__(self, tracking_uri: str, experiment: str, cfg):
        from mlflow.tracking import MlflowClient
        from pipelines.tracking import runs as tracking

        self.tracking, self.client = tracking, MlflowClient(tracking_uri)
        experiment_id = tracking.setup(tracking_uri, experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=f"quality-{cfg.dataset}").info.run_id
        tracking.log_config(self.client, self.run_id, cfg)

    def __call__(self, metrics: dict, step: int):
        self.tracking.log_metrics(self.client, self.run_id, metrics, step)

    def finish(self):
        self.client.set_terminated(self.run_id, "FINISHED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(LABELED),
                        help="built-in dataset and its labeled factors (default: the config's own)")
    parser.add_argument("--config", default="quality",
                        help="preset or YAML (default: quality), or `recipe`: the default recipe "
                             "(dsu_models/recipe.py) for budget_minutes (default 30; an override)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's iterations")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also evaluate every N stage-2 iterations (time to quality)")
    parser.add_argument("--stage1-every", type=int, default=0,
                        help="also evaluate the stage-1 model every N stage-1 iterations")
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    parser.add_argument("--cache", default=str(Path.home() / ".disunknown" / "oracles"),
                        help="oracle cache directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tracking-uri", help="also record the run in this MLflow store")
    parser.add_argument("--experiment", default="quality", help="MLflow experiment (with --tracking-uri)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(args.threads)

    from dsu_models.evaluation import evaluate, load_or_train_oracles
    from dsu_models.inference import DisUnknownModel
    from dsu_models.config import load_config
    from dsu_models.data.configured import load_data
    from dsu_models.recipe import configured, kept_speed
    from dsu_models.stages.common import resolve_device
    from dsu_models.train import run

    chosen = ([f"dataset={args.dataset}", LABELED[args.dataset]] if args.dataset else []) + args.overrides
    if args.config == "recipe":
        if args.scale != 1.0:
            parser.error("--scale: the recipe sets the schedule from budget_minutes; pass budget_minutes=N")
        cfg = configured(None, kept_speed(args.out, chosen), default=True)
    else:
        base = load_config(args.config, chosen)
        cfg = load_config(args.config, chosen + scaled_overrides(base, args.scale))
    every = {"stage1": args.stage1_every, "stage2": args.eval_every}
    for stage, n in every.items():   # the runner hands the stage over at its reports only
        interval = getattr(cfg, stage).report_interval
        if n < 0 or n % interval:
            option = "--stage1-every" if stage == "stage1" else "--eval-every"
            parser.error(f"{option} {n}: must be a multiple of {stage}.report_interval ({interval}); "
                         "milestones are taken at the stage's reports")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dsu-quality-"))
    print(f"quality: {cfg.dataset} {cfg.image_size} px, device {cfg.device}, precision {cfg.precision}, "
          f"labeled {cfg.labeled_factors}, hidden "
          f"{cfg.hidden()}; iterations " + ", ".join(f"{s} {getattr(cfg, s).iterations}"
                                                    for s in trained_stages(cfg)) + f"; out {out}",
          flush=True)
    train, val, test = load_data(cfg)
    device = resolve_device(cfg.device)  # the evaluation runs where the training ran
    started = time.perf_counter()
    oracles = load_or_train_oracles(train, test, cfg.evaluate, args.cache, device)
    oracle_wall = time.perf_counter() - started

    record = _Recorder(args.tracking_uri, args.experiment, cfg) if args.tracking_uri else None
    started = time.perf_counter()
    milestones = (_Milestones(every, out, train, val, cfg.evaluate, oracles, device, started, record)
                  if any(every.values()) else None)
    results = run(cfg, out, watch=milestones)
    train_wall = time.perf_counter() - started - (milestones.spent if milestones else 0.0)

    model = DisUnknownModel.from_handoffs(
        stage1=results["stage1"], stage2=results.get("stage2"), lenc=results.get("lenc"),
        code_stats=results["distill"]["stats"], all_factors=train.factors, device=str(device))
    started = time.perf_counter()
    metrics = evaluate(model, train, test, cfg.evaluate, oracles)
    eval_wall = time.perf_counter() - started

    print(f"\ntraining wall {train_wall / 60:.1f} min (this call; stages reused from --out are not "
          f"counted; evaluations along the run are not either) | per stage (from reports): "
          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in stage_seconds(cfg, out).items()))
    print(f"oracles {oracle_wall:.0f} s (test accuracy "
          + ", ".join(f"{k} {v:.3f}" for k, v in oracles.test_accuracy.items())
          + f") | evaluation {eval_wall:.0f} s | final figures on the test split ({len(test)} images):")
    for key in sorted(metrics):
        print(f"  {key:28s} {metrics[key]:.4f}")
    for bar in BARS:
        for key, op, bound, value, met in bar_checks(metrics, bar):
            print(f"bar {bar} {key} {op} {bound}: {value:.3f} {'MET' if met else 'not met'}")
    if milestones:
        for bar, first in milestones.time_to_quality().items():
            print(f"time to quality ({bar} bar, on val): "
                  + (f"{first[1]:.1f} min of training (stage 2 iteration {first[0]})" if first
                     else "not met within the run"))
    if record:
        final = on_split("test", metrics) | dict(
            train_wall_min=train_wall / 60, oracle_wall_s=oracle_wall, eval_wall_s=eval_wall)
        if milestones:
            final.update({f"time_to_{bar}_min": first[1]
                          for bar, first in milestones.time_to_quality().items() if first})
        record(final, cfg.stage2.iterations if "stage2" in trained_stages(cfg) else 0)
        record.finish()
    print(f"test summary {metrics.get('summary', float('nan')):.4f}; basic bar "
          f"{'met' if bar_met(metrics, 'basic') else 'not met'}; fine bar "
          f"{'met' if bar_met(metrics, 'fine') else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
