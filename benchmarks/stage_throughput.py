"""Images/s of each stage's ``train_step`` on the current device.

    python benchmarks/stage_throughput.py [--steps N] [--configs mnist,rgb32,shapes64]
        [--device auto|cpu|cuda] [--compile] [--no-naive] [--bound]

Configs (default architecture and batch size for the image size):
  mnist    28 px, 1 channel, 1 labeled factor of 10 classes, unknown 64 (batch 64)
  rgb32    32 px RGB, 3 labeled factors of 4 classes, unknown 7 (batch 64)
  shapes64 64 px RGB, 5 labeled factors (3D Shapes without orientation), unknown 2 (batch 32)

``lenc`` is the stage as configured (S also learns from a generated swap batch,
``lenc.generated_weight: 0.5``: G2 on B images and S on 2B per step of batch
B); ``lenc_real`` is the same stage with ``lenc.generated_weight: 0``, S on
the real batch only, which is the reference implementation's math.

For every stage it also times, in the same run, a straightforward
implementation of the same networks and math (``benchmarks/naive.py``): the
step written player by player with a per-sample random offset, the layers
written straight from their formulas and plain (unfused) Adam. ``naive`` is
its images/s and ``ratio`` ours over it. ``struct`` times the same naive step
with this repository's fast layers and optimizers, so ``ours / struct`` is what the
stage structure alone saves and ``struct / naive`` what the layers save.
(``lenc_real`` has no baseline of its own: it is ``lenc``'s baseline with
``generated_weight: 0``.) ``--bound`` adds ``bound``: our step with the activations, residual adds and
pools removed (``naive.without_elementwise_layers``; not the method), which
leaves the convolutions, linear layers, weight norm, losses and optimizer that
every implementation runs; ``bound / naive`` is then the most any elementwise
speed-up could bring the ratio to. ``--compile`` sets ``compile: true`` (networks
compiled in place, see ``stages/common.compile_networks``) for our stages and
prints the seconds the warm-up steps took (compile time); the naive baseline
always runs eager. After each config, ``whole training`` weighs the stages by
the config's iterations: the hours the four stages would take at the measured
rates, ours and naive. Each figure is the best of ``--repeats`` rounds of
``--steps`` steps; each round times ours, ``struct`` and ``naive`` in turn, so a
slow spell of a shared machine hits all three. Synthetic batches: timing does
not depend on pixel values.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

# run as a script, this folder is on sys.path: naive.py imports as a sibling
from naive import (naive_classifier_step, naive_lenc_step, naive_stage1_step,  # noqa: E402
                   naive_stage2_step, without_elementwise_layers)

from dsu_models import codes  # noqa: E402
from dsu_models.allocator import retain_freed_memory  # noqa: E402
from dsu_models.nn.reference import plain_layers, plain_optimizers  # noqa: E402
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


STRAIGHT = ["precision=fp32", "channels_last=false", "cuda_graphs=false"]


def build(name: str, device: str, compile_: bool = False, extra: list[str] = ()):
    overrides, data_factors = CONFIGS[name]
    extra = [f"device={device}", f"compile={str(compile_).lower()}", *extra]
    cfg = resolve(layered_dict({}, overrides + extra), data_factors)
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


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(step, batch: dict, steps: int, device: torch.device) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    _sync(device)
    return steps * batch["image"].shape[0] / (time.perf_counter() - start)


def timed_together(steps_by_name: dict, batch: dict, steps: int, device: torch.device,
                   repeats: int = 1, warmup: int = 2, stat: str = "best") -> tuple[dict, float]:
    """Images/s of each step function over ``repeats`` rounds (``stat``: the best
    round, or the median); each round times every function for ``steps`` steps
    in turn, so that a slow spell of a shared machine hits them alike. Also
    returns the first function's warm-up seconds (compile time with
    ``--compile``; on CUDA also cuDNN's autotuning and the graph capture)."""
    warm = 0.0
    for i, step in enumerate(steps_by_name.values()):
        start = time.perf_counter()
        for _ in range(warmup):
            step(batch)
        _sync(device)
        if i == 0:
            warm = time.perf_counter() - start
    rates: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(repeats):
        for name, step in steps_by_name.items():
            rates[name].append(_rate(step, batch, steps, device))
    pick = max if stat == "best" else statistics.median
    return {name: pick(r) for name, r in rates.items()}, warm


def gpu_memory_mib(build_stage, batch: dict, device: torch.device) -> float:
    """Peak GPU memory (MiB) of one stage alone: its weights, optimizer state,
    CUDA graph pool and a step's transient tensors, above what was allocated
    before ``build_stage()`` made it (the benchmark's other stages)."""
    import gc

    gc.collect()
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    stage = build_stage()
    gc.collect()  # the stages built beside it (their upstream) are gone
    torch.cuda.reset_peak_memory_stats(device)
    stage.iteration = stage.steady_from()
    for _ in range(10):  # past the graph's warm-up and capture
        stage.train_step(batch)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del stage
    gc.collect()
    torch.cuda.empty_cache()
    return peak / 2 ** 20


def kernel_seconds_per_step(step, batch: dict, steps: int, device: torch.device) -> float | None:
    """The GPU's kernel time per step, summed from the profiler's CUDA
    activities (None when the profiler records none)."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(batch)
        _sync(device)
    total_us = 0.0
    for event in prof.key_averages():
        total_us += getattr(event, "self_device_time_total", 0.0) or 0.0
    return total_us / 1e6 / steps if total_us > 0 else None


class _FlopCount(TorchDispatchMode):
    """Counts the floating-point operations of every aten op PyTorch has a
    formula for (``torch.utils.flop_counter``: matrix products, convolutions
    and their backward passes). A plain dispatch mode: ``FlopCounterMode``'s
    module hooks refuse stage 1's ``autograd.grad`` (as_if_frozen)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def step_flops(stage, batch: dict) -> int:
    """Floating-point operations of one eager step (forward and backward;
    convolutions and matrix products, which is where nearly all of them are)."""
    counter = _FlopCount()
    with counter:
        stage.train_step(batch)
    return counter.total


def stages_for(cfg, factors, device):
    s1 = Stage1(cfg, factors, device)
    cla = ClassifierStage(cfg, factors, device)
    stats = codes.code_statistics(torch.randn(512, cfg.unknown_size), torch.rand(512, cfg.unknown_size) + 0.1)
    s2 = Stage2(cfg, factors, {"stage1": s1.handoff(), "classifier": cla.handoff(), "code_stats": stats},
                device)
    lenc_upstream = {"stage2": s2.handoff(), "code_stats": stats}
    lenc = LencStage(cfg, factors, lenc_upstream, device)
    # the reference's lenc math: S on real images only (no generated half, see stages/lenc.py)
    real_only = copy.deepcopy(cfg)
    real_only.lenc.generated_weight = 0.0
    lenc_real = LencStage(real_only, factors, lenc_upstream, device)
    return {"stage1": s1, "classifier": cla, "stage2": s2, "lenc": lenc, "lenc_real": lenc_real}


def naive_steps(config: str, stage_name: str, factors, device, step) -> dict:
    """The naive ``step`` on fresh eager float32 stages: with this repository's
    layers and optimizers (``struct``), and with the straightforward layers and
    plain Adam (``naive``)."""
    eager_cfg, _ = build(config, str(device), False, STRAIGHT)
    torch.manual_seed(0)
    struct = stages_for(eager_cfg, factors, device)[stage_name]
    torch.manual_seed(0)
    plain = stages_for(eager_cfg, factors, device)[stage_name]
    plain_optimizers(plain)

    def naive_step(batch):
        with plain_layers():
            return step(plain, batch)

    return {"struct": lambda batch: step(struct, batch), "naive": naive_step}


def _without_elementwise(step, batch):
    with without_elementwise_layers():
        return step(batch)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stat", choices=("best", "median"), default="best",
                        help="each figure: the best round, or the median round")
    parser.add_argument("--compile", action="store_true", help="compile: true for our stages")
    parser.add_argument("--configs", default="mnist,rgb32,shapes64")
    parser.add_argument("--stages", default="stage1,classifier,stage2,lenc,lenc_real")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", default="fp32",
                        help="our stages in each of these precisions (fp32,bf16,fp16)")
    parser.add_argument("--ablate", default="",
                        help="comma-separated overrides, e.g. cuda_graphs=false,channels_last=false: "
                             "our stages (first precision) with each one alone, a column each")
    parser.add_argument("--large-batch", type=int, default=0,
                        help="also time our stages (last precision) at this batch size")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--bound", action="store_true",
                        help="also time our step without activations, residual adds and pools")
    args = parser.parse_args()
    retain_freed_memory()  # as every training runner does (dsu_models/allocator.py)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    precisions = args.precisions.split(",")
    ablations = [a for a in args.ablate.split(",") if a]
    print(f"device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
          + f", torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"compile {args.compile}; {args.stat} of {args.repeats} x {args.steps} steps; "
          f"ours in {', '.join(precisions)}")
    head = f"{'config':9} {'stage':10} {'batch':>5} " + " ".join(f"{p:>9}" for p in precisions + ablations)
    head += f" {'struct':>9} {'naive':>9} {'ratio':>6} {'warm-up s':>9}"
    if args.bound:
        head += f" {'bound':>9} {'max':>6}"
    if cuda:
        head += f" {'MiB':>7} {'busy':>5} {'TFLOP/s':>8}"
    if args.large_batch:
        head += f" {'@' + str(args.large_batch):>9}"
    print(head)
    naive = {"stage1": naive_stage1_step, "stage2": naive_stage2_step,
             "classifier": naive_classifier_step, "lenc": naive_lenc_step, "lenc_real": naive_lenc_step}
    for name in args.configs.split(","):
        ours = {}
        for p in precisions:
            torch.manual_seed(0)
            cfg, factors = build(name, str(device), args.compile, [f"precision={p}"])
            ours[p] = stages_for(cfg, factors, device)
        for a in ablations:
            torch.manual_seed(0)
            ablated, _ = build(name, str(device), args.compile, [f"precision={precisions[0]}", a])
            ours[a] = stages_for(ablated, factors, device)
        schedule = {}
        for stage_name in args.stages.split(","):
            runs = {}
            for p in precisions + ablations:
                variant = ours[p][stage_name]
                variant.iteration = variant.steady_from()  # lr ramps done: the steady step
                runs[p] = variant.train_step
            stage = ours[precisions[0]][stage_name]
            bs = stage.scfg.batch_size
            batch = batch_for(cfg, bs, stage_name == "stage2")
            if stage_name in naive and not args.no_naive:
                runs.update(naive_steps(name, stage_name, factors, device, naive[stage_name]))
            if args.bound:
                runs["bound"] = lambda b, step=stage.train_step: _without_elementwise(step, b)
            # on CUDA: cuDNN autotuning, then the graph's warm-up steps and capture
            rates, warm = timed_together(runs, batch, args.steps, device, args.repeats,
                                         warmup=8 if cuda else 2, stat=args.stat)
            fastest = max(precisions, key=lambda p: rates[p])
            line = f"{name:9} {stage_name:10} {bs:5d} " + " ".join(f"{rates[p]:9.1f}"
                                                                   for p in precisions + ablations)
            struct_col = base_col = ratio_col = ""
            if "naive" in rates:
                struct_col, base_col = f"{rates['struct']:.1f}", f"{rates['naive']:.1f}"
                ratio_col = f"{rates[fastest] / rates['naive']:.2f}"
            line += f" {struct_col:>9} {base_col:>9} {ratio_col:>6} {warm:9.1f}"
            if "bound" in rates:
                line += f" {rates['bound']:9.1f}"
                if "naive" in rates:
                    line += f" {rates['bound'] / rates['naive']:6.2f}"
            if cuda:
                line += gpu_columns(name, stage_name, fastest, ours[fastest][stage_name], batch,
                                    rates[fastest], device)
            if args.large_batch:
                line += f" {large_batch_rate(name, stage_name, fastest, args, device):9.1f}"
            print(line, flush=True)
            if stage_name != "lenc_real":
                schedule[stage_name] = (stage.scfg.iterations, bs, rates)
        if schedule and all("naive" in rates for _, _, rates in schedule.values()):
            for p in precisions:
                print(whole_training(name, schedule, p), flush=True)


def gpu_columns(config: str, stage_name: str, precision: str, stage, batch: dict, rate: float,
                device) -> str:
    """Peak memory of our stage alone, the share of its step's wall time the
    GPU spends in kernels, and the TFLOP/s it reaches (FLOPs counted on a fresh
    eager copy)."""
    kernel_s = kernel_seconds_per_step(stage.train_step, batch, 5, device)
    wall_s = batch["image"].shape[0] / rate
    busy = f"{min(kernel_s / wall_s, 9.99):5.0%}" if kernel_s else f"{'?':>5}"
    cfg, factors = build(config, str(device), False, [f"precision={precision}"])
    memory = gpu_memory_mib(lambda: stages_for(cfg, factors, device)[stage_name], batch, device)
    cfg, factors = build(config, str(device), False, [f"precision={precision}", "cuda_graphs=false"])
    flops = step_flops(stages_for(cfg, factors, device)[stage_name], batch)
    graph = getattr(stage, "_graph", None)
    mode = "graph" if graph is not None and graph.graph is not None else "eager"
    return f" {memory:7.0f} {busy} {flops / wall_s / 1e12:8.2f} {mode} {flops / 1e9:.2f} GFLOP/step"


def large_batch_rate(config: str, stage_name: str, precision: str, args, device) -> float:
    """Our step's images/s at ``--large-batch`` (learning rates as configured)."""
    cfg, factors = build(config, str(device), args.compile,
                         [f"precision={precision}", f"all_stages.batch_size={args.large_batch}"])
    stage = stages_for(cfg, factors, device)[stage_name]
    stage.iteration = stage.steady_from()
    batch = batch_for(cfg, args.large_batch, stage_name == "stage2")
    rates, _ = timed_together({"ours": stage.train_step}, batch, args.steps, device, args.repeats,
                              warmup=8 if device.type == "cuda" else 2, stat=args.stat)
    return rates["ours"]


def whole_training(config: str, schedule: dict, ours: str) -> str:
    """One line: the hours all four stages take at the config's iterations (its
    dataset's defaults, docs/method.md section 10) at the measured rates, ours
    (in precision ``ours``) and naive; so each stage counts by its share of a
    whole training run."""
    hours = {who: sum(iters * bs / rates[who] for iters, bs, rates in schedule.values()) / 3600
             for who in (ours, "naive")}
    steps = ", ".join(f"{stage} {iters // 1000}k" for stage, (iters, _, _) in schedule.items())
    return (f"{config:9} whole training ({steps} iterations): ours {ours} {hours[ours]:.2f} h, "
            f"naive {hours['naive']:.2f} h, ratio {hours['naive'] / hours[ours]:.2f}")


if __name__ == "__main__":
    main()
