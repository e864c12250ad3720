"""The default recipe: every stage's schedule from a time budget and the data
(docs/method.md, "Beyond the method": "The default recipe").

The presets (``configs/presets``) are schedules measured by hand on one
dataset each. The recipe is what a run gets when it names none: given
``budget_minutes`` it sets what the presets set, from what a user has on any
data:

- **Each stage's length** from the budget and this machine's speed: one
  stage-1 step of this very config (architecture, image size, channels,
  batch) is timed here (:func:`measure_step_seconds`, a few seconds) unless
  ``step_seconds`` is given, and each stage gets its share of the budget
  (:data:`SHARES`), the other stages' steps costing :data:`STEP_COST` times
  stage 1's.
- **Stage 1's schedule in proportion to its length**: the unknown batch loss
  ramps in over a quarter to three eighths of it, after the generator has
  learnt to draw detail with a sharp code; the adversary over five sixteenths
  to five eighths (:data:`STAGE1_RAMPS`).
- **The adversary** reads the unknown code alone (``cla1_mode: code``) and
  holds its own accuracy, the live leakage, at :data:`LEAK_TARGET` over
  chance by raising its weight while it reads the labels
  (``stage1.cla1_target``; stages/stage1.py, "Live leakage"), so a code larger
  than the hidden factors need does not keep the labels.
- **The unknown code's size**: :data:`UNKNOWN_SIZE` dimensions, whatever the
  data's hidden factors are (an image folder has none to count).
- **The classifier's strength**: its share of the budget at the stage-1
  learning rate.
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

# Share of the budget per stage (distillation and the hand-offs come out of
# stage 1's share): from the fine-bar runs on sprites and shapes3d, where
# stage 1 took about seven tenths of the training time (docs/benchmarks.md).
SHARES = {"stage1": 0.70, "classifier": 0.05, "stage2": 0.22, "lenc": 0.03}
# One step of each stage in units of one step of stage 1 with the code-only
# adversary, at the same batch size (measured at 32 px: docs/benchmarks.md,
# "The default recipe").
STEP_COST = {"stage1": 1.0, "classifier": 0.25, "stage2": 3.5, "lenc": 1.0}
# Stage 1's ramps as fractions of its iterations: [start, full].
STAGE1_RAMPS = {"ubatch_ramp": (0.25, 0.375), "cla1_ramp": (0.3125, 0.625)}
LEAK_TARGET = 0.02
UNKNOWN_SIZE = 12
# No stage shorter than this, whatever the budget (a schedule needs room for its ramps).
MIN_ITERATIONS = 50
TIMED_STEPS, WARMUP_STEPS = 12, 4


def structure() -> dict:
    """The recipe's choices that do not depend on the budget (a raw config layer)."""
    return {
        "unknown_size": UNKNOWN_SIZE,
        "stage1": {"lr": 3.0e-4, "ucode_weight": 0.001, "cla1_mode": "code",
                   "cla1_target": LEAK_TARGET},
        # the networks that learn labels from images see them unshifted: a shift
        # moves a labeled position (sprites' x) while its label stays
        "classifier": {"lr": 3.0e-4, "random_offset": False},
        "stage2": {"lr": 1.0e-4, "cla2_offset": False},
    }


def schedule(budget_minutes: float, step_seconds: float, stages: list[str]) -> dict:
    """Each stage's iterations and stage 1's ramps (a raw config layer) for
    ``budget_minutes`` of training when one stage-1 step takes ``step_seconds``.
    ``stages``: the config's trained stages (a stage that is off gives its share
    to stage 1)."""
    shares = {s: SHARES[s] for s in stages}
    if "stage1" in shares:
        shares["stage1"] += sum(v for s, v in SHARES.items() if s not in stages)
    layer: dict = {}
    for stage, share in shares.items():
        n = max(MIN_ITERATIONS, int(budget_minutes * 60 * share / (step_seconds * STEP_COST[stage])))
        interval = _round_interval(n)
        layer[stage] = {"iterations": n, "report_interval": max(1, min(50, n // 20)),
                        "sample_interval": interval, "checkpoint_interval": interval}
    if "stage1" in layer:
        n1 = layer["stage1"]["iterations"]
        for key, (start, full) in STAGE1_RAMPS.items():
            layer["stage1"][key] = [int(start * n1), int(full * n1)]
        layer["stage1"]["code_plot_interval"] = layer["stage1"]["emb_plot_interval"] = \
            layer["stage1"]["sample_interval"]
    return layer


def _round_interval(iterations: int) -> int:
    """About a tenth of the stage, rounded to a round number (1, 2 or 5 times 10^k)."""
    tenth = max(1, iterations // 10)
    magnitude = 10 ** int(math.log10(tenth))
    return max(m * magnitude for m in (1, 2, 5) if m * magnitude <= tenth)


def measure_step_seconds(cfg) -> float:
    """Seconds per stage-1 training step of ``cfg`` on its device: a few steps
    on random images and labels of the config's shape, after a warm-up."""
    import torch

    from dsu_models.data.base import FactorInfo
    from dsu_models.stages.common import resolve_device
    from dsu_models.stages.stage1 import Stage1

    device = resolve_device(cfg.device)
    factors = [FactorInfo(name, spec.classes) for name, spec in cfg.labeled()]
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        stage = Stage1(cfg, factors, device)
        b, s = cfg.stage1.batch_size, cfg.image_size
        batch = {"image": torch.rand(b, cfg.image_channels, s, s) * 2 - 1,
                 "labels": torch.stack([torch.randint(0, spec.classes, (b,)) for _, spec in cfg.labeled()], 1)
                 if cfg.labeled_factors else torch.zeros(b, 0, dtype=torch.int64)}
        # past the ramps: the step the stage spends most of its time in
        stage.iteration = max(stage.steady_from(), (cfg.stage1.cla1_ramp or [0, 0])[1])
        for _ in range(WARMUP_STEPS):
            stage.train_step(batch)
        _sync(device)
        start = time.perf_counter()
        for _ in range(TIMED_STEPS):
            stage.train_step(batch)
        stage.take_losses()
        _sync(device)
        return (time.perf_counter() - start) / TIMED_STEPS
    finally:
        torch.random.set_rng_state(state)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
