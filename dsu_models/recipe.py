"""The default recipe: every stage's schedule from a time budget and the data
(docs/method.md, "Beyond the method": "The default recipe").

The presets (``configs/presets``) are schedules measured by hand on one
dataset each. The recipe is what a run gets when it names none: given
``budget_minutes`` it sets what the presets set, from what a user has on any
data:

- **Each stage's length** from the budget and this machine's speed: a few
  steps of each stage of this very config (architecture, image size,
  channels, batch, device) are timed here (:func:`measure_step_seconds`,
  seconds on a CPU) unless ``step_seconds`` is given, and each stage gets its
  share of the budget (:data:`SHARES`).
- **Stage 1's schedule in proportion to its length**: the unknown code's two
  losses (its batch loss and its KL code loss) ramp in together over a
  quarter to three eighths of it, after the generator has learnt to draw
  detail with a sharp code; the adversary over five sixteenths to five
  eighths (:data:`STAGE1_RAMPS`).
- **The adversary** reads the unknown code alone (``cla1_mode: code``) and
  pushes C's prediction towards the class frequencies (``cla1_adv_mode:
  prior``, ``losses.adversarial_prior``) rather than away from the true
  label, at the method's weight: what it leaves in the code, the leakage
  probe does not read. Its weight does not follow C's accuracy (the live
  leakage stays logged; ``stage1.cla1_target`` stays an option): on sprites C
  reads shape from the code however hard E is pushed, and chasing it cost the
  hidden factors.
- **The unknown code's size**: :data:`UNKNOWN_SIZE` dimensions, whatever the
  data's hidden factors are (an image folder has none to count).
- **Checkpoints and pictures** about every tenth of a stage, never closer than
  :data:`MIN_SECONDS_BETWEEN_SAVES` of its training (:func:`save_interval`).
- **The classifier's strength**: its share of the budget at the stage-1
  learning rate.
- **S's learning rate** (``lenc.lr``) at 3e-4, the classifier's: at the
  method's 1e-4 S has not learnt to read the labels when its short share of
  the budget ends.
- **No shifted images for the label readers**: ``random_offset`` stays on for
  stage 2's discriminator D, but the classifier stage and stage 2's R read the
  images as they are (``classifier.random_offset: false``,
  ``stage2.cla2_offset: false``): a shift moves a labeled position while its
  label stays, and the recipe cannot know which labels are positions. Stage
  1's C reads the code only, so nothing is shifted there.

Everything the user's file or overrides set wins over the recipe (the
recipe is a layer under them, ``config.layered_dict``), and the resolved
config records the measured ``step_seconds``, so a resumed run gets the same
schedule. Never read: labels of the factors the user did not label.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from dsu_models.config import STAGES, ConfigError, load_config, load_resolved

# Share of the budget per stage (distillation and the hand-offs come out of
# stage 1's share): from the fine-bar runs on sprites and shapes3d, where
# stage 1 took about seven tenths of the training time (docs/benchmarks.md).
SHARES = {"stage1": 0.70, "classifier": 0.05, "stage2": 0.22, "lenc": 0.03}
# What a training step costs beyond the timed step (data loading, reports,
# pictures, checkpoints, distillation): a 30-minute schedule on shapes3d took
# 33.8 minutes (docs/benchmarks.md, "The default recipe").
OVERHEAD = 1.13
# Stage 1's ramps as fractions of its iterations: [start, full].
STAGE1_RAMPS = {"ubatch_ramp": (0.25, 0.375), "ucode_ramp": (0.25, 0.375), "cla1_ramp": (0.3125, 0.625)}
UNKNOWN_SIZE = 12
# No stage shorter than this, whatever the budget (a schedule needs room for its ramps).
MIN_ITERATIONS = 50
# Checkpoints and picture sets come about every tenth of a stage, but no more
# often than once per this many seconds of its training: in the pipeline each
# costs seconds (the state uploaded to the run's storage, the pictures to
# MLflow), and a tenth of a 20-second stage is two seconds (docs/method.md,
# "The default recipe": the README job's classifier and lenc stages).
MIN_SECONDS_BETWEEN_SAVES = 30
TIMED_STEPS, WARMUP_STEPS = 12, 4


def configured(config=None, overrides=(), data_factors=None, default: bool = False):
    """``config.load_config`` with the default recipe: a run that sets
    ``budget_minutes`` (or, with ``default``, names no config) gets it as a
    layer under its own keys."""
    return load_config(config, overrides, data_factors, default_recipe=default, recipe=layer)


def layer(base) -> dict:
    """The recipe's raw config layer. ``base(trial_layer)``: the config resolved
    with a trial layer under the user's keys (its budget, speed, data, stages)."""
    from dsu_models.steps import trained_stages   # the step table imports the stages (torch)

    chosen = structure()
    cfg = base(chosen)
    if cfg.budget_minutes <= 0:
        raise ConfigError(f"budget_minutes: {cfg.budget_minutes} (must be positive, or null for "
                          f"the config's own schedule)")
    stages = trained_stages(cfg)
    if cfg.step_seconds is not None:
        _check_step_seconds(cfg.step_seconds, stages)
    step = cfg.step_seconds or {s: float(f"{v:.4g}") for s, v in measure_step_seconds(cfg).items()}
    out = {**chosen, **{k: {**chosen.get(k, {}), **v} for k, v in schedule(cfg.budget_minutes, step, stages).items()}}
    out["step_seconds"] = step
    return out


def _check_step_seconds(given: dict, stages: list[str]):
    for stage in stages:
        if stage not in given:
            raise ConfigError(f"step_seconds: no value for {stage} (give every trained stage's, "
                              f"{', '.join(stages)}, or null to measure them)")
    for stage, value in given.items():
        if stage not in STAGES:
            raise ConfigError(f"step_seconds.{stage}: not a stage ({', '.join(STAGES)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"step_seconds.{stage}: {value!r} (must be a positive number of seconds)")


def structure() -> dict:
    """The recipe's choices that do not depend on the budget (a raw config layer)."""
    return {
        "unknown_size": UNKNOWN_SIZE,
        "stage1": {"lr": 3.0e-4, "ucode_weight": 0.001, "cla1_mode": "code", "cla1_adv_mode": "prior"},
        # the networks that learn labels from images see them unshifted: a shift
        # moves a labeled position (sprites' x) while its label stays
        "classifier": {"lr": 3.0e-4, "random_offset": False},
        "stage2": {"lr": 1.0e-4, "cla2_offset": False},
        # S learns to read B2's codes in its 3% of the budget only at a higher rate
        "lenc": {"lr": 3.0e-4},
    }


def schedule(budget_minutes: float, step_seconds: dict[str, float], stages: list[str]) -> dict:
    """Each stage's iterations and stage 1's ramps (a raw config layer) for
    ``budget_minutes`` of training when one step of each stage takes
    ``step_seconds[stage]``. ``stages``: the config's trained stages (a stage
    that is off gives its share to stage 1)."""
    shares = {s: SHARES[s] for s in stages}
    if "stage1" in shares:
        shares["stage1"] += sum(v for s, v in SHARES.items() if s not in stages)
    layer: dict = {}
    for stage, share in shares.items():
        n = max(MIN_ITERATIONS, int(budget_minutes * 60 * share / (step_seconds[stage] * OVERHEAD)))
        interval = save_interval(n, step_seconds[stage])
        layer[stage] = {"iterations": n, "report_interval": max(1, min(50, n // 20)),
                        "sample_interval": interval, "checkpoint_interval": interval}
    if "stage1" in layer:
        n1 = layer["stage1"]["iterations"]
        for key, (start, full) in STAGE1_RAMPS.items():
            layer["stage1"][key] = [int(start * n1), int(full * n1)]
        layer["stage1"]["code_plot_interval"] = layer["stage1"]["emb_plot_interval"] = \
            layer["stage1"]["sample_interval"]
    return layer


def speed_override(step_seconds: dict[str, float]) -> str:
    """The ``step_seconds={...}`` override that gives a config these measured
    speeds (so loading it again measures nothing and schedules the same)."""
    return "step_seconds={" + ", ".join(f"{k}: {v}" for k, v in step_seconds.items()) + "}"


def kept_speed(out_dir, overrides) -> list[str]:
    """``overrides``, plus the speed the run in ``out_dir`` (None: no run yet)
    was scheduled with (its ``config.yaml``) unless they give one: resuming a
    run with the same command reschedules nothing."""
    saved = Path(out_dir) / "config.yaml" if out_dir else None
    if saved is None or not saved.exists() or any(o.startswith("step_seconds=") for o in overrides):
        return list(overrides)
    old = load_resolved(saved)
    return list(overrides) + ([speed_override(old.step_seconds)] if old.step_seconds else [])


def describe_choices(cfg) -> str:
    """One line on what the recipe chose for ``cfg`` ('' when it is off)."""
    if cfg.budget_minutes is None:
        return ""
    from dsu_models.steps import trained_stages

    stages = ", ".join(f"{s} {getattr(cfg, s).iterations}" for s in trained_stages(cfg))
    steps = ", ".join(f"{s} {v:.3f}" for s, v in cfg.step_seconds.items())
    target = cfg.stage1.cla1_target
    return (f"{cfg.budget_minutes:g} min of training, {stages} iterations (seconds per step: "
            f"{steps}); unknown code {cfg.unknown_size}, adversary "
            f"{cfg.stage1.cla1_mode} from {(cfg.stage1.cla1_ramp or [0])[0]}"
            + (f", live-leakage target {target}" if target is not None else ""))


def save_interval(iterations: int, step_seconds: float) -> int:
    """Iterations between checkpoints (and picture sets) of a stage of
    ``iterations`` steps of ``step_seconds``: about a tenth of the stage,
    rounded down to a round number (1, 2 or 5 times 10^k), or the first round
    number that spans :data:`MIN_SECONDS_BETWEEN_SAVES` when that is more (a
    stage shorter than that saves once, at its end)."""
    tenth = max(1, iterations // 10)
    magnitude = 10 ** int(math.log10(tenth))
    interval = max(m * magnitude for m in (1, 2, 5) if m * magnitude <= tenth)
    floor = math.ceil(MIN_SECONDS_BETWEEN_SAVES / step_seconds)
    return max(interval, _round_up(floor))


def _round_up(n: int) -> int:
    """The smallest round number (1, 2 or 5 times 10^k) at least ``n``."""
    magnitude = 10 ** int(math.log10(max(1, n)))
    return min(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= n)


def measure_step_seconds(cfg) -> dict[str, float]:
    """Seconds per training step of each of ``cfg``'s stages on its device: a
    few steps on random images, labels and codes of the config's shape, after
    a warm-up, each at its own batch size and built from the previous ones'
    fresh hand-offs."""
    import torch

    from dsu_models import codes
    from dsu_models.data.base import FactorInfo
    from dsu_models.stages import make_stage
    from dsu_models.stages.common import resolve_device
    from dsu_models.steps import trained_stages

    device = resolve_device(cfg.device)
    factors = [FactorInfo(name, spec.classes) for name, spec in cfg.labeled()]
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        m = cfg.unknown_size
        upstream = {"code_stats": codes.code_statistics(torch.randn(256, m) * 0.8,
                                                        torch.rand(256, m) * 0.5 + 0.1) if m else None}
        seconds = {}
        for name in trained_stages(cfg):
            stage = make_stage(name, cfg, factors, upstream, device)
            # past the ramps: the step the stage spends most of its time in
            stage.iteration = stage.steady_from()
            seconds[name] = _timed_steps(stage, _random_batch(cfg, getattr(cfg, name).batch_size), device)
            upstream[name] = stage.handoff()
        return seconds
    finally:
        torch.random.set_rng_state(state)


def _random_batch(cfg, b: int) -> dict:
    """``b`` random images, labels and unknown-code statistics of ``cfg``'s shape."""
    import torch

    s, m = cfg.image_size, cfg.unknown_size
    return {"image": torch.rand(b, cfg.image_channels, s, s) * 2 - 1,
            "labels": torch.stack([torch.randint(0, spec.classes, (b,)) for _, spec in cfg.labeled()], 1)
            if cfg.labeled_factors else torch.zeros(b, 0, dtype=torch.int64),
            "mu": torch.randn(b, m) * 0.8, "sigma": torch.rand(b, m) * 0.5 + 0.1}


def _timed_steps(stage, batch: dict, device) -> float:
    for _ in range(WARMUP_STEPS):
        stage.train_step(batch)
    stage.take_losses()
    _sync(device)
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        stage.train_step(batch)
    stage.take_losses()
    _sync(device)
    return (time.perf_counter() - start) / TIMED_STEPS


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
