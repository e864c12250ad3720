"""What every stage shares: device and precision, optimizers with linear LR
ramps, the step itself (backward, non-finite check, optimizer updates, CUDA
graphs), loss bookkeeping, full checkpoint state and gradient routing.

A stage module builds its models and optimizers from the resolved config and
writes its iteration as ``loss_terms(batch) -> (terms, objective)``; the base
class's ``train_step(batch)`` runs it. It also exposes ``state_dict()`` /
``load_state_dict()`` (models, optimizers, iteration, RNG) and ``handoff()``
(what the next stage needs). Batches are dicts of tensors:
``image`` (B, C, H, W) float in [-1, 1] (or uint8 in [0, 255], converted on the
device: a quarter of the bytes to copy), ``labels`` (B, K) int64 (labeled
factors in config order); stage 2 adds ``mu`` and ``sigma`` (B, m_u).
"""
from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from dsu_models import precision as prec
from dsu_models.config import Config, ConfigError
from dsu_models.data.base import to_float
from dsu_models.stages.graphs import StepGraph


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; names the stage, iteration and term."""

    def __init__(self, stage: str, iteration: int, term: str, value: float):
        super().__init__(f"{stage}: loss term {term!r} is {value} at iteration {iteration}; "
                         f"stopping (the last good checkpoint is kept)")
        self.stage, self.iteration, self.term, self.value = stage, iteration, term, value


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` (auto, cpu, cuda, cuda:N) names on this machine;
    a CUDA device this machine does not have is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} asked for, but this machine has no CUDA "
                              f"(use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name!r}: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s)")
    return device


def ramp(iteration: int, start: int, length: int) -> float:
    """Linear ramp: 0 before ``start``, then up to 1 over ``length`` iterations."""
    if iteration < start:
        return 0.0
    if length <= 0:
        return 1.0
    return min(1.0, (iteration - start + 1) / length)


def ramped(weight: float, span: list[int] | None, iteration: int) -> float:
    """``weight`` at ``iteration`` under a config ramp ``span = [t1, t2]`` (0 before
    t1, full from t2); ``None``: full throughout."""
    return weight if span is None else weight * ramp(iteration, span[0], span[1] - span[0])


def adam(groups: list[dict], betas) -> torch.optim.Adam:
    """Adam (eps 1e-8) over groups ``{"params", "lr", "ramp_start"}``; see :func:`set_lr`."""
    groups = [dict(g, base_lr=g["lr"], ramp_start=g.get("ramp_start", 0)) for g in groups if g["params"]]
    # fused: one kernel for all parameters (CPU and CUDA) instead of a loop of small ops
    return torch.optim.Adam(groups, betas=tuple(betas), eps=1e-8, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, iteration: int, ramp_length: int):
    """Each group's lr = base lr x its linear ramp (docs/method.md section 7 step 8)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * ramp(iteration, group["ramp_start"], ramp_length)


def params(*modules: nn.Module | None) -> list[nn.Parameter]:
    return [p for m in modules if m is not None for p in m.parameters()]


class _MethodCall(nn.Module):
    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.m, self.method = module, method

    def forward(self, *args, **kwargs):
        return getattr(self.m, self.method)(*args, **kwargs)


def detached_call(module: nn.Module, *args, method: str = "forward", **kwargs):
    """Run ``module.<method>`` with its parameters detached: gradients flow through
    to the inputs but none reach the module's own parameters. This routes an
    adversarial loss through a network it must not train, within the same
    backward pass as the losses that do train it."""
    frozen = {"m." + name: p.detach() for name, p in module.named_parameters()}
    return functional_call(_MethodCall(module, method), frozen, args, kwargs)


def as_if_frozen(loss: Tensor, inputs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """The term that trains the producers of a network's inputs with ``loss`` as
    if the network's parameters were frozen, from the network's one forward pass.

    ``inputs``: ``(source, copy)`` pairs, where the network ran on ``copy =
    source.detach().requires_grad_()``. ``loss``'s gradient with respect to each
    copy is taken here (nothing reaches the network's parameters), and the
    returned ``sum(source * grad)`` hands exactly that gradient to ``source`` when
    it is back-propagated with the other losses. Same gradients as running the
    network a second time through :func:`detached_call`, one forward and one
    backward of the network cheaper."""
    grads = torch.autograd.grad(loss, [copy for _, copy in inputs], retain_graph=True,
                                allow_unused=True)  # e.g. an image classifier ignores u
    return sum(((source * g).sum() for (source, _), g in zip(inputs, grads) if g is not None),
               loss.new_zeros(()))


def compile_networks(*modules: nn.Module | None):
    """``torch.compile`` the networks' big regions in place (``Config.compile``).

    Compiled in place with ``nn.Module.compile()``, so module trees and
    ``state_dict`` keys stay as they are. The regions are the parts stages call
    as modules: each trunk's conv levels and FC stack, the generator's FC part
    and conv part, the code classifier's MLP; heads and the loss glue stay eager
    (stages call ``forward_fc`` / ``trunk.conv`` / ``head`` separately, so a
    whole network is not one call). Works on CPU and CUDA.

    Every ``Chain`` instance shares one ``forward`` code object, and dynamo's
    recompile limit (default 8) counts graphs per code object: with more than 8
    regions (or grad / no-grad / detached-parameter variants of them) the rest
    silently ran eager, which is why compiling such submodules gained little.
    The limit is raised to cover every region and its variants.
    """
    import torch._dynamo

    from dsu_models.nn.layers import Chain
    from dsu_models.nn.networks import GeneratorFC

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 1024)
    for root in modules:
        if root is None:
            continue
        inside: set[int] = set()
        for m in root.modules():
            if id(m) in inside or not isinstance(m, (Chain, GeneratorFC)):
                continue
            m.compile(dynamic=False)
            inside.update(id(sub) for sub in m.modules())


@torch.no_grad()
def batched_accuracy(network: nn.Module, predict: Callable[[Tensor], list[Tensor]], images, labels: Tensor,
                     names: list[str], batch_size: int, device) -> dict[str, float]:
    """Per-factor accuracy of ``predict(x) -> [(b,) class ids per factor]`` over
    ``images`` (``(N, C, H, W)`` uint8 or float in [-1, 1], or batches; see
    :func:`dsu_models.distill.image_batches`) against ``labels`` ``(N, K)``:
    ``{"acc_<name>": float in [0, 1]}``. ``network`` is put in eval mode for the
    pass and restored afterwards."""
    from dsu_models.distill import image_batches

    was_training = network.training
    network.eval()
    correct = torch.zeros(len(names), dtype=torch.int64, device=device)
    seen = 0
    try:
        for x in image_batches(images, batch_size, device):
            y = labels[seen:seen + x.shape[0]].to(device)
            correct += torch.stack([(p == y[:, k]).sum() for k, p in enumerate(predict(x))])
            seen += x.shape[0]
    finally:
        network.train(was_training)
    if seen != labels.shape[0]:
        raise ValueError(f"evaluate: {seen} images but {labels.shape[0]} label rows")
    accuracy = (correct.double() / max(seen, 1)).tolist()
    return {f"acc_{name}": a for name, a in zip(names, accuracy)}


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_state_tensors(state: dict) -> dict:
    """RNG state as plain tensors/lists so ``torch.load(weights_only=True)`` accepts it."""
    np_state = state["numpy"]
    out = {"torch": state["torch"],
           "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                     int(np_state[2]), int(np_state[3]), float(np_state[4])],
           "python": [state["python"][0], list(state["python"][1]), state["python"][2]]}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def rng_state_from_tensors(saved: dict) -> dict:
    np_state = saved["numpy"]
    state = {"torch": saved["torch"],
             "numpy": (np_state[0], np_state[1].numpy().astype(np.uint32), np_state[2], np_state[3],
                       np_state[4]),
             "python": (saved["python"][0], tuple(saved["python"][1]), saved["python"][2])}
    if "cuda" in saved:
        state["cuda"] = saved["cuda"]
    return state


class _LossBook:
    """Running sums of a stage's loss terms since the last report, on the
    device, and (with deferred checks) the first non-finite step among them.
    ``add`` is device work only (it is part of a captured CUDA graph); the
    host counts the steps."""

    def __init__(self):
        self.names: list[str] | None = None
        self.sums = self.first_bad = self.bad_values = self.step_no = None
        self.count = 0

    def add(self, names: list[str], stacked: Tensor, track_bad: bool) -> Tensor | None:
        """Add one step's values; with ``track_bad`` return its non-finite flag
        (0-d float32 on the device, 1.0 when some term is inf or NaN)."""
        if self.names is None:
            self.names = names
            self.sums = torch.zeros_like(stacked)
            self.bad_values = torch.zeros_like(stacked)
            self.first_bad = torch.full((), -1, dtype=torch.int64, device=stacked.device)
            self.step_no = torch.zeros((), dtype=torch.int64, device=stacked.device)
        elif names != self.names:
            raise RuntimeError(f"loss terms changed between steps: {self.names} -> {names}")
        self.sums.add_(stacked)
        if not track_bad:
            return None
        bad = ~torch.isfinite(stacked).all()
        first = bad & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(first, self.step_no, self.first_bad))
        self.bad_values.copy_(torch.where(first, stacked, self.bad_values))
        self.step_no.add_(1)
        return bad.float()

    def take(self) -> tuple[dict[str, float], int, dict[str, float]]:
        """(mean of each term, first non-finite step's index in the window or -1,
        that step's values); resets the window. One device sync."""
        if self.names is None or self.count == 0:
            return {}, -1, {}
        values = torch.cat([self.sums / self.count, self.bad_values,
                            self.first_bad.to(self.sums.dtype).reshape(1)]).tolist()
        n = len(self.names)
        self.sums.zero_()
        self.step_no.zero_()
        self.first_bad.fill_(-1)
        self.count = 0
        return (dict(zip(self.names, values[:n])), int(values[-1]),
                dict(zip(self.names, values[n:2 * n])))


class Stage:
    """State bookkeeping and the step shared by the four stage modules
    (composition target, not a framework): subclasses fill ``self.models`` and
    ``self.optimizers``, call :meth:`setup_networks` at the end of their
    constructor, and implement ``loss_terms`` and ``handoff``.

    One step (:meth:`train_step`): the batch goes to the device; the subclass's
    ``loss_terms`` runs under the configured precision (``precision.py``); the
    objective is back-propagated into the optimizers' parameters; the terms are
    checked and added up (:meth:`finish`); every optimizer steps. On a CPU the
    check reads the values at once and a non-finite term raises before any
    weight moves. On a GPU nothing waits for the device: a non-finite step is
    skipped on the device (fused Adam's ``found_inf``: no weight or optimizer
    state changes) and raised at the next report (:meth:`take_losses`), before
    that report's checkpoint, naming the iteration where it happened; and once
    the schedule is constant the step replays as a CUDA graph (``graphs.py``).
    """

    # The stage's declaration, read by the step table (``dsu_models.steps``) and
    # every runner: ``name`` is its step name and its config section; ``upstream``
    # the steps whose outputs it starts from (its constructor takes them as
    # ``upstream``); ``reads_codes``: its batches carry the distilled unknown
    # codes (``mu``, ``sigma``); :meth:`active`: whether a config has the stage.
    name = "stage"
    upstream: tuple[str, ...] = ()
    reads_codes = False
    # time per image relative to stage 1's (what the console's pipeline ETA weighs
    # the stages still to come by; from the CPU throughput in docs/benchmarks.md)
    relative_cost = 1.0

    @classmethod
    def active(cls, cfg: Config) -> bool:
        """Whether the stage exists for ``cfg`` (docs/method.md section 2)."""
        return True

    @classmethod
    def build(cls, cfg: Config, factors, upstream: dict, device=None) -> "Stage":
        """The stage from its config, the labeled factors' infos and its
        upstream hand-offs (``dsu_models.steps.stage_upstream``)."""
        if cls.upstream:
            return cls(cfg, factors, upstream, device)
        return cls(cfg, factors, device)

    def __init__(self, cfg: Config, device: torch.device | str | None = None):
        self.cfg = cfg
        self.scfg = getattr(cfg, self.name)
        self.device = torch.device(device) if device is not None else resolve_device(cfg.device)
        self.iteration = 0
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        # Data-parallel runners set these. grad_sync(stage, losses): once per
        # iteration, after the backward pass and before the optimizer steps, it
        # averages the gradients and the loss values over the workers (one
        # all-reduce) and returns the averaged losses. batch_reduce: a sum over
        # the workers that carries gradients, so the batch-statistic losses see
        # the global batch (codes.batch_loss).
        self.grad_sync: Callable[["Stage", Tensor], Tensor] | None = None
        self.batch_reduce: Callable[[Tensor], Tensor] | None = None
        cuda = self.device.type == "cuda"
        self.autocast_dtype = prec.autocast_dtype(cfg.precision)
        self.loss_scale = (prec.LossScale(self.device) if self.autocast_dtype == torch.float16
                           else None)
        self.channels_last = cuda if cfg.channels_last is None else cfg.channels_last
        self.use_graphs = (cuda if cfg.cuda_graphs is None else cfg.cuda_graphs) and cuda
        # deferred: loss values stay on the device until a report (no per-step sync)
        self.deferred_checks = cuda
        prec.configure_backends(self.device, cfg.cudnn_benchmark)
        self._book = _LossBook()
        self._window_start = 0
        self._graph: StepGraph | None = None

    def setup_networks(self, *compiled: nn.Module | None):
        """End of a subclass constructor: every network of the stage in
        channels-last layout when configured, and ``compiled`` compiled when
        ``cfg.compile`` (:func:`compile_networks`)."""
        if self.channels_last:
            modules = [m for m in vars(self).values() if isinstance(m, nn.Module)]
            for module in modules + list(self.models.values()):
                module.to(memory_format=torch.channels_last)
        if self.cfg.compile:
            compile_networks(*compiled)

    # ------------------------------------------------------------ steps

    def to_device(self, batch: dict) -> dict:
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        image = out.get("image")
        if image is not None:
            if image.dtype == torch.uint8:
                image = to_float(image)
            if self.channels_last and image.dim() == 4:
                image = image.contiguous(memory_format=torch.channels_last)
            out["image"] = image
        return out

    def loss_terms(self, batch: dict) -> tuple[dict[str, Tensor], Tensor]:
        """The iteration's loss terms (0-d tensors, reported) and the objective
        to back-propagate; ``batch`` is on the device. Written by each stage."""
        raise NotImplementedError

    def steady_from(self) -> int:
        """The first iteration from which every step runs the same kernels with
        the same constants (learning-rate ramps done); stages with ramps of
        their own extend it. A CUDA graph is captured only from there."""
        starts = [g.get("ramp_start", 0) for o in self.optimizers.values() for g in o.param_groups]
        return max(starts, default=0) + self.scfg.lr_ramp

    def train_step(self, batch: dict) -> dict[str, float] | None:
        """One iteration. Returns the terms as floats when the values are checked
        at once (CPU), else None (read them with :meth:`take_losses`)."""
        batch = self.to_device(batch)
        self.train(True)
        self.set_lrs()
        metrics = None
        if self._graphable(batch):
            if self._graph is None:
                self._graph = StepGraph(self._device_step, list(self.optimizers.values()), self.name)
            self._graph.run(batch)
        else:
            metrics = self._device_step(batch)
        self._book.count += 1
        self.iteration += 1
        return metrics

    def _graphable(self, batch: dict) -> bool:
        return (self.use_graphs and self.grad_sync is None and self.loss_scale is None
                and self.iteration >= self.steady_from()
                and (self._graph is None or self._graph.usable(batch)))

    def _device_step(self, batch: dict) -> dict[str, float] | None:
        """The step's device work (what a CUDA graph captures): losses, backward,
        bookkeeping, optimizer updates. Host values only without deferred checks."""
        with prec.autocast(self.device, self.autocast_dtype, cache=self._graph is None):
            terms, objective = self.loss_terms(batch)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if self.loss_scale is not None:
            objective = objective * self.loss_scale.scale
        # gradients for the optimizers' parameters only (no input gradients of
        # networks whose inputs were detached copies; stage 1's as_if_frozen)
        objective.backward(inputs=[p for p in self.trainable_parameters() if p.requires_grad])
        metrics, bad = self.finish(terms)  # before the step: a bad loss never reaches the weights
        self._optimizer_steps(bad)
        self.after_update()
        return metrics

    def after_update(self):
        """Device work after the optimizer steps (part of a captured step);
        stage 2's weight average."""

    def _optimizer_steps(self, bad: Tensor | None):
        """Every optimizer steps, skipping (on the device) when ``bad`` is 1, or
        when the fp16 loss scale finds non-finite gradients."""
        grad_bad = None
        if self.loss_scale is not None:
            grad_bad = self.loss_scale.unscale(self.trainable_parameters())
            bad = grad_bad if bad is None else torch.maximum(bad, grad_bad)
        for opt in self.optimizers.values():
            if bad is not None:
                opt.found_inf = bad  # fused Adam: no update of weights or state when 1
            opt.step()
            if bad is not None:
                del opt.found_inf
        if grad_bad is not None:
            self.loss_scale.update(grad_bad)

    def finish(self, terms: dict[str, Tensor]) -> tuple[dict[str, float] | None, Tensor | None]:
        """Add the terms to the running sums; check that every one is finite.

        Called after ``backward()`` and before the optimizer steps. With
        ``grad_sync`` (a data-parallel runner) the values are the workers'
        means, so a term that is non-finite on any worker stops every worker in
        the same iteration. Immediate checks (CPU): returns ``(floats, None)``
        and raises ``NonFiniteLossError`` here, while ``self.iteration`` is still
        the index of the iteration being computed. Deferred (GPU): returns
        ``(None, flag)``, the flag making the optimizer steps skip on the device."""
        names = list(terms)
        stacked = torch.stack([terms[n].detach().float().reshape(()) for n in names])
        if self.grad_sync is not None:
            stacked = self.grad_sync(self, stacked)
        bad = self._book.add(names, stacked, track_bad=self.deferred_checks)
        if self.deferred_checks:
            return None, bad
        values = stacked.tolist()
        for n, v in zip(names, values):
            if not math.isfinite(v):
                raise NonFiniteLossError(self.name, self.iteration, n, v)
        return dict(zip(names, values)), None

    def take_losses(self) -> dict[str, float]:
        """The mean of each term over the steps since the last call (one device
        sync). With deferred checks, raises ``NonFiniteLossError`` naming the
        first iteration since then whose loss was not finite (that step and
        any later non-finite ones changed nothing)."""
        means, first_bad, values = self._book.take()
        start, self._window_start = self._window_start, self.iteration
        if first_bad >= 0:
            term = next((n for n, v in values.items() if not math.isfinite(v)), next(iter(values)))
            raise NonFiniteLossError(self.name, start + first_bad, term, values[term])
        return means

    def set_lrs(self):
        for opt in self.optimizers.values():
            set_lr(opt, self.iteration, self.scfg.lr_ramp)

    def train(self, mode: bool = True):
        for m in self.models.values():
            m.train(mode)

    @property
    def done(self) -> bool:
        return self.iteration >= self.scfg.iterations

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        state = {"stage": self.name, "iteration": self.iteration,
                 "models": {k: m.state_dict() for k, m in self.models.items()},
                 "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                 "rng": rng_state_tensors(capture_rng())}
        if self.loss_scale is not None:
            state["loss_scale"] = self.loss_scale.state_dict()
        return state

    def load_state_dict(self, state: dict, restore_random: bool = True):
        if state["stage"] != self.name:
            raise ValueError(f"checkpoint is for stage {state['stage']!r}, not {self.name!r}")
        for k, m in self.models.items():
            m.load_state_dict(state["models"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        if self.loss_scale is not None and "loss_scale" in state:
            self.loss_scale.load_state_dict(state["loss_scale"])
        self.iteration = self._window_start = int(state["iteration"])
        self._graph = None  # the optimizer state tensors are new: capture again
        if restore_random:
            restore_rng(rng_state_from_tensors(state["rng"]))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter some optimizer of this stage updates, in a fixed order."""
        return [p for opt in self.optimizers.values() for g in opt.param_groups for p in g["params"]]

    def weights(self, *names: str) -> dict:
        return {n: {k: v.detach().cpu() for k, v in self.models[n].state_dict().items()} for n in names}

    # Models a finished stage hands on (those present in ``self.models``).
    handoff_models: tuple[str, ...] = ()

    def handoff(self) -> dict:
        """Self-describing output: the hand-on weights (CPU), resolved config, iteration."""
        names = [n for n in self.handoff_models if n in self.models]
        return {"stage": self.name, "config": self.cfg.to_dict(), "iteration": self.iteration,
                "weights": self.weights(*names)}
