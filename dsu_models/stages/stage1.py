"""Stage 1, unknown distillation (docs/method.md section 7).

Trains the unknown encoder E, the generator G1, the label embedders B1 and
the stage-1 classifier C. One iteration:

1. ``y_alt``: per factor, the batch's labels rolled by an independent random
   offset in ``[1, B)``.
2. ``(mu_u, sigma_u) = E(x)``; nested dropout + stratified sample ``u``;
   unknown code loss and batch loss.
3. Labeled codes from ``B(y)`` (and ``B(y_alt)``), dropout + sample; embedder
   code loss and batch loss.
4. Reconstruction ``G(u, l)``; Gaussian NLL with G's predicted std.
5. Cross image ``G(u, l_alt)``. When the adversary trains G's FC part
   (``gen_fc_adv``, the default) both codes go through that part as one
   batch of 2B; the conv part runs apart (detached for the cross image
   unless ``gen_conv_adv``).
6. C reads the *true* labels ``y`` from the detached cross image and/or ``u``.
7. The adversarial loss (``nlu``, ``ll`` or ``prior``) x ``cla1_weight`` (ramped by
   ``cla1_ramp``) flows back through the cross image and ``u``.
8. One Adam step for everything.

Gradient routing, with one forward pass of every network:

- rec, code and batch losses update E, B and all of G.
- C's NLL updates only C: its inputs (cross image, ``u``) are detached.
- The adversarial loss updates E and B, G's FC part when ``gen_fc_adv`` and
  G's conv part when ``gen_conv_adv``. The parts of G it must not train run with
  detached parameters (:func:`common.detached_call`) so gradients pass through
  them to E and B without reaching their weights. It never trains C: it reaches
  the cross image and ``u`` through C as if C were frozen
  (:func:`common.as_if_frozen`, from C's one forward pass); then one backward
  pass of everything.

Degenerate cases: with no labeled factors (K = 0) this is a plain VAE; with
``unknown_size == 0`` a label-conditioned decoder. Neither has C.
The adversarial forward is skipped entirely while its ramped weight is 0.
Random offset augmentation (``random_offset``) shifts the cross image C sees.

Live leakage (an option beyond the method, ``cla1_target``). C's accuracy on
each batch says how much of the labels the unknown code still carries, with
nothing a user lacks: per factor ``(acc_k - p_k) / (1 - p_k)`` with ``p_k`` the
most frequent class's share, averaged over the factors (0: C reads nothing
beyond chance; 1: every label). It is logged as ``leak`` whether or not the
option is on. With ``cla1_target`` set, once ``cla1_ramp`` has brought the
adversary to full weight its weight is multiplied by ``exp(s)``, where ``s``
follows the leakage's running mean ``m`` (over about 100 iterations):
``s += LEAK_RATE * (m - cla1_target)`` each iteration, kept within
``[0, log LEAK_MAX_SCALE]``. The weight rises while C reads the labels above the
target and falls back to ``cla1_weight`` once it does not: a constraint held by
its multiplier, so a code that does not leak keeps the method's weight. ``s``
and ``m`` are device tensors updated without a host sync (a captured CUDA graph
replays the update) and travel in the checkpoint.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from dsu_models import codes, losses, plots
from dsu_models.config import STAGE1_RAMP_KEYS, Config
from dsu_models.data.base import FactorInfo, InMemoryDataset
from dsu_models.distill import distill_batch_size, encode_images
from dsu_models.grids import sample_grids
from dsu_models.nn.builders import (build_embedders, build_encoder, build_generator,
                               build_stage1_classifier)
from dsu_models.nn.layers import random_offset
from dsu_models.stages.common import Stage, adam, as_if_frozen, detached_call, params, ramped


# Live leakage (module docstring): the running mean's decay per iteration, the
# multiplier's rate (a sustained excess of .1 over the target doubles the weight
# in about 1,000 iterations) and its ceiling.
LEAK_DECAY = 0.99
LEAK_RATE = 0.007
LEAK_MAX_SCALE = 8.0
_LEAK_MAX_LOG = math.log(LEAK_MAX_SCALE)


def keep_tensor(keep: list[float] | None, device) -> Tensor | None:
    return None if keep is None else torch.tensor(keep, dtype=torch.float32, device=device)


def rolled_labels(labels: Tensor) -> Tensor:
    """Per factor, roll the batch's labels by an independent offset in [1, B).
    labels: (B, K) -> (B, K). Vectorised: one gather."""
    b, k = labels.shape
    offsets = torch.randint(1, b, (k,), device=labels.device)
    index = (torch.arange(b, device=labels.device)[:, None] - offsets[None, :]) % b
    return labels.gather(0, index)


class Stage1(Stage):
    """``Stage1(cfg, factors)``; ``factors``: labeled factors' infos in config order."""

    name = "stage1"
    handoff_models = ("encoder", "generator", "embedders")

    def __init__(self, cfg: Config, factors: list[FactorInfo], device=None):
        super().__init__(cfg, device)
        s = cfg.stage1
        dev = self.device
        self.num_labeled = len(cfg.labeled_factors)
        self.factors = list(factors)
        self.encoder = build_encoder(cfg, [cfg.unknown_size], s.zero_init).to(dev) \
            if cfg.unknown_size else None
        self.embedders = build_embedders(cfg, factors).to(dev)
        self.generator = build_generator(cfg).to(dev)
        self.adversarial = self.num_labeled > 0 and cfg.unknown_size > 0
        # the reconstruction and the cross image share G's FC pass when both train
        # it (off only to test that sharing changes nothing)
        self.share_fc_pass = True
        self.classifier = build_stage1_classifier(cfg).to(dev) if self.adversarial else None
        self.freqs = [f.freq_tensor().to(dev) for f in factors]
        # live leakage (module docstring): chance per factor, the running mean, log multiplier
        self.chance = torch.stack([f.max() for f in self.freqs]).float() if self.freqs else None
        self.leak_mean = torch.zeros((), device=dev)
        self.leak_log_scale = torch.zeros((), device=dev)
        self.keep_u = keep_tensor(cfg.unknown_keep_prob, dev)
        self.keep_l = [keep_tensor(spec.keep_prob, dev) for _, spec in cfg.labeled()]

        self.models = {"generator": self.generator, "embedders": self.embedders}
        if self.encoder is not None:
            self.models["encoder"] = self.encoder
        if self.classifier is not None:
            self.models["classifier"] = self.classifier
        self.optimizers = {"main": adam([
            {"params": params(self.generator), "lr": s.lr},
            {"params": params(self.encoder), "lr": s.lr, "ramp_start": s.enc_freeze},
            {"params": params(self.embedders), "lr": s.emb_lr, "ramp_start": s.emb_freeze},
        ], s.betas)}
        if self.classifier is not None:
            self.optimizers["classifier"] = adam([{"params": params(self.classifier), "lr": s.lr}],
                                                 s.betas)
        self.setup_networks(*self.models.values())

    # ---------------------------------------------------------------- step

    def adversarial_weight(self) -> float:
        return ramped(self.scfg.cla1_weight, self.scfg.cla1_ramp, self.iteration) if self.adversarial else 0.0

    def ubatch_weight(self) -> float:
        """The unknown batch loss's weight: ``ubatch_weight``, ramped by ``ubatch_ramp``
        (an option; the method has it at full weight from the start)."""
        return ramped(self.scfg.ubatch_weight, self.scfg.ubatch_ramp, self.iteration)

    def ucode_weight(self) -> float:
        """The unknown code loss's weight: ``ucode_weight``, ramped by ``ucode_ramp``
        (an option; the method has it at full weight from the start)."""
        return ramped(self.scfg.ucode_weight, self.scfg.ucode_ramp, self.iteration)

    def _labeled_codes(self, labels: Tensor, terms: dict | None):
        """Sampled labeled codes and masks for ``labels`` (B, K); adds the
        embedder code/batch losses to ``terms`` when given."""
        out_codes, out_masks = [], []
        for k, emb in enumerate(self.embedders):
            mean, std = emb(labels[:, k])
            code, mask = codes.sample_code(mean, std, self.keep_l[k], training=True)
            out_codes.append(code)
            out_masks.append(mask)
            if terms is not None:
                terms["lcode"] = terms["lcode"] + emb.code_loss(self.keep_l[k])
                terms["lbatch"] = terms["lbatch"] + codes.batch_loss(mean, std, self.keep_l[k],
                                                                         reduce=self.batch_reduce)
        return out_codes, out_masks

    def loss_terms(self, batch: dict) -> tuple[dict[str, Tensor], Tensor]:
        """One iteration's terms (module docstring, steps 1-7) and the objective
        whose backward pass trains every network as the table below says."""
        s = self.scfg
        x, y = batch["image"], batch["labels"]
        zero = x.new_zeros(())
        terms = {"rec": zero, "ucode": zero, "ubatch": zero, "lcode": zero, "lbatch": zero}

        u_codes, u_masks = [], []
        if self.encoder is not None:
            ((mu, sigma),) = self.encoder(x)
            u, u_mask = codes.sample_code(mu, sigma, self.keep_u, training=True)
            u_codes, u_masks = [u], [u_mask]
            terms["ucode"] = codes.code_loss(mu, sigma, self.keep_u)
            terms["ubatch"] = codes.batch_loss(mu, sigma, self.keep_u, reduce=self.batch_reduce)
        l_codes, l_masks = self._labeled_codes(y, terms)

        z = codes.generator_input(u_codes + l_codes, u_masks + l_masks)
        weight = self.adversarial_weight()
        z_cross = top_cross = None
        if self.adversarial and s.cla1_mode != "code":
            with torch.set_grad_enabled(weight > 0):
                z_cross = self._cross_input(u_codes[0], u_masks[0], y)
        if z_cross is not None and weight > 0 and s.gen_fc_adv and self.share_fc_pass:
            # both train G's FC part: the reconstruction's and the cross image's
            # codes go through it as one batch (same values, one pass fewer)
            top_both, noise_both = self.generator.forward_fc(torch.cat([z, z_cross]))
            b = x.shape[0]
            top_cross, noise_std = top_both[b:], noise_both[:b]
            x_hat = self.generator.forward_conv(top_both[:b])
        else:
            x_hat, noise_std = self.generator(z)
        terms["rec"] = losses.reconstruction_nll(x_hat, x, noise_std)

        # What the step minimises, and which parameters each term trains:
        #   rec, ucode, ubatch, lcode, lbatch     E, B and G
        #   cla_nll                               C only (it reads detached inputs)
        #   weight * adv                          E, B and the parts of G the options
        #                                         name; never C (C as if frozen)
        total = (s.rec_weight * terms["rec"] + self.ucode_weight() * terms["ucode"]
                 + self.ubatch_weight() * terms["ubatch"] + s.lcode_weight * terms["lcode"]
                 + s.lbatch_weight * terms["lbatch"])
        backward = total
        weight_t = x.new_full((), weight)
        if self.adversarial:
            if s.cla1_target is not None and weight > 0:
                weight_t = weight_t * self.leak_log_scale.exp()
            nll, adv, accuracy, adv_through_c, leak = self._classifier_losses(
                x, y, u_codes[0], u_masks[0], weight, weight_t, z_cross, top_cross)
            terms.update(cla_nll=nll, adv=adv.detach(), cla_acc=accuracy, leak=leak)
            total = total + nll + weight_t * adv.detach()
            backward = backward + nll + adv_through_c  # = weight_t * adv, routed past C's weights
            if weight > 0:
                self._follow_leakage(leak)
        terms["total"] = total
        terms["adv_weight"] = weight_t.detach()
        # The base class back-propagates into the parameters only: C's detached
        # input copies need no gradient (as_if_frozen took theirs), so C's first
        # layer skips its input gradient, a third of that layer's backward.
        return terms, backward

    def steady_from(self) -> int:
        """The learning-rate ramps, the adversarial weight's ``cla1_ramp`` and the
        unknown code's ``ubatch_ramp`` and ``ucode_ramp``."""
        spans = [getattr(self.scfg, key) for key in STAGE1_RAMP_KEYS]
        ends = [span[1] for span in spans if span is not None]
        return max([super().steady_from()] + ends)

    @torch.no_grad()
    def _follow_leakage(self, leak: Tensor):
        """Update the leakage's running mean and, once the ramp is done and
        ``cla1_target`` is set, the adversary's log multiplier (module docstring)."""
        self.leak_mean.mul_(LEAK_DECAY).add_(leak.float(), alpha=1.0 - LEAK_DECAY)
        s = self.scfg
        if s.cla1_target is None or self.iteration < (s.cla1_ramp or [0, 0])[1]:
            return
        step = (self.leak_mean - s.cla1_target) * LEAK_RATE
        self.leak_log_scale.add_(step).clamp_(0.0, _LEAK_MAX_LOG)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["leakage"] = {"mean": self.leak_mean.detach().cpu(),
                            "log_scale": self.leak_log_scale.detach().cpu()}
        return state

    def load_state_dict(self, state: dict, restore_random: bool = True):
        super().load_state_dict(state, restore_random)
        saved = state.get("leakage")   # absent in checkpoints from before the option
        if saved is not None:
            self.leak_mean.copy_(saved["mean"])
            self.leak_log_scale.copy_(saved["log_scale"])

    def _classifier_losses(self, x: Tensor, y: Tensor, u: Tensor, u_mask: Tensor, weight: float,
                           weight_t: Tensor, z_cross: Tensor | None, top_cross: Tensor | None):
        """C's NLL of the true labels and the adversarial loss, from ONE forward
        pass of C on detached copies of its inputs (the cross image and ``u``).

        The NLL, back-propagated, trains C only. The adversarial loss must train
        E, B and the selected parts of G but not C: ``adv_through_c``
        (:func:`common.as_if_frozen`) carries ``weight * adv``'s gradient to the
        real cross image and ``u`` and none to C's weights. ``z_cross``: G's input
        for the cross image (None in ``code`` mode); ``top_cross``: its top
        features when the caller ran G's FC part for it already. ``weight``: the
        ramped weight (0: no adversarial pass); ``weight_t``: the weight applied,
        with the live-leakage multiplier.
        Returns (nll, adv, accuracy, adv_through_c, leak); ``leak``: C's accuracy
        over chance, the mean over factors (module docstring).
        """
        s = self.scfg
        use_adv = weight > 0
        x_cross = None
        if s.cla1_mode != "code":
            with torch.set_grad_enabled(use_adv):
                x_cross = self._cross_image(z_cross, top_cross)
        c_x = x_cross.detach().requires_grad_(use_adv) if x_cross is not None else None
        c_u = u.detach().requires_grad_(use_adv)
        log_probs = self.classifier(c_x, c_u, u_mask)
        nll = sum(-lp.gather(1, y[:, k:k + 1]).mean() for k, lp in enumerate(log_probs))
        with torch.no_grad():
            per_factor = torch.stack([(lp.argmax(1) == y[:, k]).float().mean()
                                      for k, lp in enumerate(log_probs)])
            accuracy = per_factor.mean()
            leak = ((per_factor - self.chance) / (1.0 - self.chance).clamp_min(1e-6)).mean()
        adv = x.new_zeros(())
        adv_through_c = x.new_zeros(())
        if use_adv:
            for k, lp in enumerate(log_probs):
                adv = adv + (losses.adversarial_nlu(lp, y[:, k], self.freqs[k]) if s.cla1_adv_mode == "nlu"
                             else losses.adversarial_ll(lp, y[:, k]) if s.cla1_adv_mode == "ll"
                             else losses.adversarial_prior(lp, self.freqs[k]))
            pairs = [(t, c) for t, c in ((x_cross, c_x), (u, c_u)) if c is not None]
            adv_through_c = as_if_frozen(weight_t * adv, pairs)
        return nll, adv, accuracy, adv_through_c, leak

    def _cross_input(self, u: Tensor, u_mask: Tensor, y: Tensor) -> Tensor:
        """G's input for the cross image: ``u`` with the codes of ``y_alt``."""
        alt_codes, alt_masks = self._labeled_codes(rolled_labels(y), None)
        return codes.generator_input([u] + alt_codes, [u_mask] + alt_masks)

    def _cross_image(self, z: Tensor, top: Tensor | None = None) -> Tensor:
        """G(u, l_alt) from its input ``z`` (:meth:`_cross_input`), with the
        generator parts the adversary must not train run detached; randomly
        offset for C when ``random_offset``. ``top``: the output of G's FC part
        for ``z``, when already computed."""
        s = self.scfg
        gen = self.generator
        if top is None:
            top, _ = gen.forward_fc(z) if s.gen_fc_adv else detached_call(gen, z, method="forward_fc")
        x_cross = gen.forward_conv(top) if s.gen_conv_adv else detached_call(gen, top, method="forward_conv")
        return random_offset(x_cross) if s.random_offset else x_cross

    # ------------------------------------------------------------ outputs

    @torch.no_grad()
    def generate(self, u: Tensor | None, label_means: list[Tensor]) -> Tensor:
        """Images from unknown codes u (B, m_u) and labeled codes, nothing dropped."""
        parts = ([u] if u is not None else []) + list(label_means)
        ones = [torch.ones_like(p) for p in parts]
        image, _ = self.generator(codes.generator_input(parts, ones))
        return image

    @torch.no_grad()
    def sample_images(self, batch: dict, n: int = 8) -> dict[str, Tensor]:
        """``reconstruction``: rows real / G(u, own labels); ``swap``: row i keeps
        image i's unknown, column j takes image j's labels (means, no dropout)."""
        self.train(False)
        batch = self.to_device({k: v[:n] for k, v in batch.items()})
        x, y = batch["image"], batch["labels"]
        u = self.encoder(x)[0][0] if self.encoder is not None else None
        means = [emb(y[:, k])[0] for k, emb in enumerate(self.embedders)]
        grids = sample_grids(x, u, means, self.generate)
        self.train(True)
        return grids

    def unknown_means(self, images: Tensor) -> Tensor | None:
        """E's code means ``(N, m_u)`` on the CPU (None without an unknown code).
        images: ``(N, C, H, W)`` uint8 or float in [-1, 1]; encoded as the distill
        step encodes them (``distill.encode_images``)."""
        if self.encoder is None:
            return None
        return encode_images(self.encoder, images, distill_batch_size(self.cfg), self.device)[0]

    def code_plots(self, data: InMemoryDataset) -> dict[str, Tensor]:
        """``codes_<factor>``: E's code means of ``data`` (e.g. a fixed set of test
        images, labels for every ground-truth factor) coloured by each factor."""
        if self.encoder is None or len(data) == 0:
            return {}
        means = self.unknown_means(data.images)
        return plots.code_scatters(means, data.labels, data.factors, self.cfg.labeled_factors,
                                   f"stage 1 it {self.iteration}: unknown code")

    def embedding_plots(self) -> dict[str, Tensor]:
        """``embedding_<factor>``: B1's normalised class codes."""
        return plots.embedding_plots(self.embedders, self.factors, f"stage 1 it {self.iteration}: ")

    def pictures(self, batch: dict, data: InMemoryDataset | None = None) -> dict[str, Tensor]:
        """The pictures due after this iteration: :meth:`sample_images` every
        ``sample_interval``, :meth:`code_plots` of ``data`` every
        ``code_plot_interval`` and :meth:`embedding_plots` every
        ``emb_plot_interval`` (each also at the end). ``batch``: the runner's
        fixed sample batch; ``data``: its fixed scatter set (None: no scatter)."""
        s, it, done = self.scfg, self.iteration, self.done
        out = {}
        if plots.due(it, s.sample_interval, done):
            out.update(self.sample_images(batch))
        if data is not None and plots.due(it, s.code_plot_interval, done):
            out.update(self.code_plots(data))
        if plots.due(it, s.emb_plot_interval, done):
            out.update(self.embedding_plots())
        return out
