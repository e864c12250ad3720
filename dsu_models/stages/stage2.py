"""Stage 2, the final generator (docs/method.md section 8).

Trains the generator G2 (initialised from G1), the discriminator D, the label
embedders B2 (initialised from B1) or, with ``use_embedding: false``, the
labeled encoder S, and the stage-2 classifier R (initialised from the
pre-trained R1; trained only with ``cla2_adv``). One iteration, on a batch
``(x, y, mu_u, sigma_u)`` whose unknown codes were distilled by stage 1:

1. ``u = mu_u + sigma_u * noise`` (stratified, no dropout). Labeled codes from
   ``B2(y)`` (or ``S(x)``) with nested dropout, as in stage 1; code loss (and,
   for S, batch loss).
2. Branches. *rec*: ``G2(u, l)`` with the true labels; *cross*: the labeled
   codes (and masks) rolled per factor by independent offsets in ``[1, B)``
   (labels ``y_alt``), with ``u`` or, with ``random_ucode``, a draw from the
   Gaussian fitted to the stage-1 codes. Both run through G2 in ONE forward.
3. Rec loss (Gaussian NLL with G2's predicted std) on the rec branch.
4. The unknown condition: ``dis`` — D judges channel-stacked pairs, real
   ``(x, G1(u, B1(y).mean))``, fake ``(x_hat, G1(u', labels of x_hat))``
   (G1/B1 frozen; one G1 forward serves both branches and the real pair, whose
   G1 image is also the rec branch's partner); ``mse`` — a frozen E re-encodes
   every fake and ``match_loss`` pulls its mean to the code it was made from.
5. Least-squares D (real vs. fakes), R (true labels on reals; with
   ``cla2_adv``, ``-log(1 - p(target))`` on fakes) and the generator's
   adversarial losses (D and R on its fakes with their target labels).

``has_rec_branch`` averages the two branches (factor 0.5 on each branch's
adversarial, classifier and match losses; the rec loss and the real losses
are not scaled, as in the reference).

Gradient routing, all in ONE backward pass of the sum of every term:

- D and R losses update only D and R: they see the generator's outputs
  detached (and G1's partner images carry no graph at all).
- Generator losses (rec, ``g_dis``, ``g_cla``, ``match``, labeled code/batch
  losses) update G2 and B2 or S. D and R run with detached parameters for them
  (:func:`common.detached_call`), so their gradients reach the fakes but never
  D's or R's weights. Without ``cla2_adv`` R is frozen like G1.
- Frozen G1, B1, E (and R without ``cla2_adv``): ``requires_grad`` off, eval
  mode, in no optimizer; G1/B1 run under ``no_grad``. They come from the
  upstream hand-offs, so they are not in ``self.models`` nor the checkpoint.

Speed: one G2 forward for both branches, one G1 forward for all partner
images, one D (and one R) training forward over real and fake rows together,
one detached D (and R) forward over the fakes for the generator, every code
(unknown and labeled) sampled in one stratified draw with per-factor nested
dropout, per-factor R losses computed on one padded ``(N, K, n_max + 1)``
logit tensor, one random-offset gather shared by D and R.

Choices where docs/method.md is silent (following the reference implementation
where it has one):

- ``mse`` mode still has a D, judging single images (no pairs): realism still
  needs an adversary; only the unknown condition moves to the match loss.
- ``fake_reflect``: the reflected feature is ``2*c(real) - c(rec)`` where ``c``
  is the trunk's flattened *convolutional* output; it then goes through the
  trunk's FC part and the head. (Reflecting the final trunk feature would give
  a linear head nothing new: ``head(2a - b) = 2 head(a) - head(b)``.) It
  applies to the rec branch, whose fakes pair with their own real images, and
  so has no effect without the rec branch. Its loss is averaged with the rec
  branch's plain fake loss.
- ``random_offset``: each real image and its reconstruction share one shift
  (the pair behind a reflection must stay aligned); cross fakes get their own.
  A D input pair is shifted as one tensor; R sees the same shifted images,
  or with ``cla2_offset: false`` (an option beyond the method) the images as
  they are: a shift moves a labeled position while its label stays.
- K = 0 (all unknown): no labels, no R; the cross branch exists only with
  ``random_ucode`` (otherwise it would repeat the rec branch), and the rec
  branch exists when ``has_rec_branch`` or when there is no cross branch.
- ``unknown_size`` = 0 (all labeled): ``u`` is empty; in ``mse`` mode there is
  no E and no match loss (nothing to match).
- Losses over several labeled factors are summed over factors (each a batch
  mean); the reported terms are unweighted, ``total`` is what is minimised.
- The match target of the rec branch (and of the cross branch without
  ``random_ucode``) is the stored mean ``mu_u``; with ``random_ucode`` it is
  the random code itself.
- B2 starts as an exact copy of B1, class frequencies included (both come
  from the same train split); S starts fresh (``stage2.zero_init``).
- As in stage 1, the non-finite check runs after the backward pass and
  before the optimizer step, so a bad loss never reaches the weights; the
  error names the index of the failed iteration.
- The stratified noise of the unknown and labeled codes is drawn jointly over
  all their dimensions (each dimension is still stratified on its own); each
  labeled factor draws its own nested-dropout level per sample.

Options beyond docs/method.md, off by default (the method is one setting away):
``ema_decay`` hands on an exponential moving average of G2 and B2 (or S)
instead of their last weights (``stages/ema.py``); ``dis_lr`` gives D and R a
learning rate of their own (two time-scale updates); ``r1_weight`` adds an R1
penalty on D (:meth:`Stage2._r1_penalty`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dsu_models import codes, losses, plots
from dsu_models.config import Config
from dsu_models.data.base import FactorInfo
from dsu_models.grids import sample_grids
from dsu_models.nn.builders import (build_discriminator, build_embedders, build_encoder,
                               build_generator, build_image_classifier, check_factors)
from dsu_models.nn.layers import sample_offsets, shift_images
from dsu_models.nn.reference import plain_layers
from dsu_models.stages.common import Stage, adam, detached_call, params
from dsu_models.stages.ema import WeightAverage


def _weights(handoff: dict | None, stage: str) -> dict:
    if handoff is None or handoff["stage"] != stage:
        got = None if handoff is None else handoff["stage"]
        raise ValueError(f"stage2 needs the {stage!r} hand-off, got {got!r}")
    return handoff["weights"]


def _frozen(module: nn.Module, state: dict) -> nn.Module:
    module.load_state_dict(state)
    return module.requires_grad_(False).eval()


@dataclass(frozen=True)
class Rows:
    """Where each group of images sits in one iteration's stacked batches, so
    the step can name them instead of computing offsets.

    G2 makes the fakes ``[rec (n, with the rec branch), cross (n, with the cross
    branch)]`` in one forward; D and R judge ``[real (n), fakes]`` in one forward
    and, with ``fake_reflect``, their outputs gain ``n`` reflection rows at the end.
    """
    n: int
    rec_branch: bool
    cross_branch: bool

    @property
    def fakes(self) -> int:
        return self.n * (self.rec_branch + self.cross_branch)

    # in G2's output (the fakes) and in the stacked fake labels
    @property
    def rec(self) -> slice:
        return slice(0, self.n)

    @property
    def cross(self) -> slice:
        start = self.n * self.rec_branch
        return slice(start, start + self.n)

    # in D's and R's inputs and outputs
    @property
    def real(self) -> slice:
        return slice(0, self.n)

    @property
    def judged_fakes(self) -> slice:
        return slice(self.n, self.n + self.fakes)

    @property
    def judged_rec(self) -> slice:
        return slice(self.n, 2 * self.n)

    @property
    def judged_cross(self) -> slice:
        start = self.n + self.n * self.rec_branch
        return slice(start, start + self.n)

    @property
    def reflections(self) -> slice:
        start = self.n + self.fakes
        return slice(start, start + self.n)


class Stage2(Stage):
    """``Stage2(cfg, factors, upstream)``.

    factors: the labeled factors' infos in config order. upstream:
    ``{"stage1": handoff, "classifier": handoff or None, "code_stats": dict}``
    (``code_stats`` from :func:`codes.code_statistics`; needed only for
    ``random_ucode`` and for ``mse`` mode with an unknown code).
    """

    name = "stage2"
    upstream = ("stage1", "classifier", "distill")
    reads_codes = True
    relative_cost = 2.3
    handoff_models = ("generator", "embedders", "label_encoder")

    def __init__(self, cfg: Config, factors: list[FactorInfo], upstream: dict, device=None):
        super().__init__(cfg, device)
        s = cfg.stage2
        check_factors(cfg, factors)
        self.factors = list(factors)
        self.num_labeled = len(cfg.labeled_factors)
        self.unknown_size = cfg.unknown_size
        self.dis_mode = s.unknown_mode == "dis"
        self.cross_branch = self.num_labeled > 0 or s.random_ucode
        self.rec_branch = s.has_rec_branch or not self.cross_branch
        self.branch_factor = 0.5 if self.rec_branch and self.cross_branch else 1.0
        self.reflect = s.fake_reflect and self.rec_branch
        self._init_models(cfg, factors, upstream)
        self._init_code_layout(cfg)
        self._init_stats(upstream["code_stats"])

        self.models = {"generator": self.generator, "discriminator": self.discriminator}
        dis_lr = s.lr if s.dis_lr is None else s.dis_lr
        groups = [{"params": params(self.generator), "lr": s.lr},
                  {"params": params(self.discriminator), "lr": dis_lr}]
        if self.embedders is not None:
            self.models["embedders"] = self.embedders
            groups.append({"params": params(self.embedders), "lr": s.emb_lr})
        if self.label_encoder is not None:
            self.models["label_encoder"] = self.label_encoder
            groups.append({"params": params(self.label_encoder), "lr": s.lr})
        if self.classifier is not None:
            self.models["classifier"] = self.classifier
            if s.cla2_adv:
                groups.append({"params": params(self.classifier), "lr": dis_lr})
        self.optimizers = {"main": adam(groups, s.betas)}
        self.average = None
        if s.ema_decay > 0:  # what is handed on: G2 and its label side, averaged
            side = {n: m for n, m in (("generator", self.generator), ("embedders", self.embedders),
                                      ("label_encoder", self.label_encoder)) if m is not None}
            self.average = WeightAverage(side, s.ema_decay)
            self.models.update({f"{n}_ema": m for n, m in self.average.copies.items()})
        self.setup_networks(*self.models.values(), self.generator1, self.encoder)

    # ------------------------------------------------------------ setup

    def _init_models(self, cfg: Config, factors: list[FactorInfo], upstream: dict):
        s, dev = cfg.stage2, self.device
        w1 = _weights(upstream["stage1"], "stage1")
        self.generator = build_generator(cfg).to(dev)
        self.generator.load_state_dict(w1["generator"])
        self.embedders = self.label_encoder = self.classifier = None
        if self.num_labeled and s.use_embedding:
            self.embedders = build_embedders(cfg, factors).to(dev)
            self.embedders.load_state_dict(w1["embedders"])
        elif self.num_labeled:
            sizes = [spec.size for _, spec in cfg.labeled()]
            self.label_encoder = build_encoder(cfg, sizes, s.zero_init).to(dev)
        self.discriminator = build_discriminator(cfg, pairs=self.dis_mode).to(dev)
        if self.num_labeled:
            self.classifier = build_image_classifier(cfg, extra_fake=True).to(dev)
            self.classifier.load_state_dict(_weights(upstream["classifier"], "classifier")["classifier"])
            if not s.cla2_adv:
                self.classifier.requires_grad_(False).eval()

        # Frozen stage-1 networks (not trained, not checkpointed).
        self.generator1 = self.embedders1 = self.encoder = None
        if self.dis_mode:
            self.generator1 = _frozen(build_generator(cfg).to(dev), w1["generator"])
            if self.num_labeled:
                self.embedders1 = _frozen(build_embedders(cfg, factors).to(dev), w1["embedders"])
        elif self.unknown_size:
            self.encoder = _frozen(build_encoder(cfg, [self.unknown_size], cfg.stage1.zero_init).to(dev),
                                   w1["encoder"])

    def _init_code_layout(self, cfg: Config):
        """Layout of the concatenated code ``[u, l_1..l_K]``: per-dim keep
        probability and segment id (0 = unknown, k + 1 = factor k)."""
        dev = self.device
        keep = [1.0] * self.unknown_size
        segment = [0] * self.unknown_size
        self.keep_l: list[Tensor | None] = []
        for k, (_, spec) in enumerate(cfg.labeled()):
            kp = spec.keep_prob or [1.0] * spec.size
            keep += kp
            segment += [k + 1] * spec.size
            self.keep_l.append(torch.tensor(spec.keep_prob, device=dev) if spec.keep_prob else None)
        self.keep = torch.tensor(keep, device=dev)
        self.segment = torch.tensor(segment, dtype=torch.long, device=dev)
        self.any_dropout = any(p < 1.0 for p in keep)
        # Padded per-factor logits: factor k's n_k + 1 columns, then the -inf column.
        sizes = [spec.classes + 1 for _, spec in cfg.labeled()]
        self.max_classes = max(sizes, default=0)
        total, index, start = sum(sizes), [], 0
        for n in sizes:
            index += list(range(start, start + n)) + [total] * (self.max_classes - n)
            start += n
        self.pad_index = torch.tensor(index, dtype=torch.long, device=dev)

    def _init_stats(self, stats: dict | None):
        s = self.scfg
        needed = s.random_ucode or (not self.dis_mode and self.unknown_size > 0)
        if needed and stats is None:
            raise ValueError("stage2: upstream code_stats are needed for random_ucode or mse mode")
        self.code_stats = ({k: v.to(self.device) for k, v in stats.items()}
                           if stats is not None else None)
        self.match_std = (self.code_stats["std"].float()
                          if needed and self.unknown_size else None)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in (self.generator1, self.embedders1, self.encoder):
            if m is not None:
                m.eval()
        if self.classifier is not None and not self.scfg.cla2_adv:
            self.classifier.eval()

    # ------------------------------------------------------------ step

    def loss_terms(self, batch: dict) -> tuple[dict[str, Tensor], Tensor]:
        """Every loss term of one iteration (tensors with graph), ``total``
        included, and ``total`` as the objective (one backward pass, one Adam
        step; gradient routing as in the module docstring); ``batch`` already on
        the device."""
        s = self.scfg
        x, y = batch["image"], batch["labels"]
        rows = Rows(x.shape[0], self.rec_branch, self.cross_branch)
        terms: dict[str, Tensor] = {}
        mean_l, std_l = self._labeled_params(x, y, terms)
        mu, sigma = self._unknown_params(batch, x)
        # the whole code [u, l_1..l_K] in one stratified draw; each factor its own dropout level
        code, mask = codes.sample_code(torch.cat([mu, mean_l], 1), torch.cat([sigma, std_l], 1),
                                       self.keep if self.any_dropout else None, training=True,
                                       segment=self.segment, segments=self.num_labeled + 1)
        u = code[:, :self.unknown_size]

        # Branch inputs, stacked along the batch as in ``rows``: rec, then cross.
        z_rows, y_rows, target_rows = [], [], []
        if self.rec_branch:
            z_rows.append(torch.cat([code, 1.0 - mask], 1))
            y_rows.append(y)
            target_rows.append(mu)
        u_cross = y_alt = None
        if self.cross_branch:
            code_alt, mask_alt, y_alt, u_cross, u_target = self._cross_codes(code, mask, y, mu)
            z_rows.append(torch.cat([code_alt, 1.0 - mask_alt], 1))
            y_rows.append(y_alt)
            target_rows.append(u_target)
        fakes, noise_std = self.generator(torch.cat(z_rows))
        targets = torch.cat(y_rows)

        if self.rec_branch:
            terms["rec"] = losses.reconstruction_nll(fakes[rows.rec], x, noise_std[rows.rec])
        if self.encoder is not None:
            mean_hat = self.encoder(fakes)[0][0]
            terms["match"] = losses.match_loss(mean_hat, torch.cat(target_rows), self.match_std)

        stack = torch.cat([x, fakes])            # what D judges: [real, fakes]
        if self.dis_mode:                        # ... as pairs with G1's image of the same code
            stack = torch.cat([stack, self._partners(rows, u, y, u_cross, y_alt)], 1)
        unshifted = stack
        if s.random_offset:
            stack = self._shift(stack, rows)
        self._adversarial_terms(stack, rows, y, targets, terms,
                                stack if s.cla2_offset else unshifted)

        weights = {"rec": s.rec_weight, "lcode": s.lcode_weight, "lbatch": s.lbatch_weight,
                   "match": s.match_weight, "g_dis": s.dis_weight, "g_cla": s.cla2_weight,
                   "d_real": 1.0, "d_fake": 1.0, "r_real": 1.0, "r_fake": s.cla2_fake_weight,
                   "r1": s.r1_weight}
        terms["total"] = sum(weights[k] * v for k, v in terms.items())
        return terms, terms["total"]

    # ------------------------------------------------------------ codes

    def _labeled_params(self, x: Tensor, y: Tensor, terms: dict) -> tuple[Tensor, Tensor]:
        """Labeled code ``(mean, std)``, each (B, sum m_k), from B2(y) or S(x);
        adds the code loss (and S's batch loss) to ``terms``."""
        if self.embedders is not None:
            means, stds, lcode = [], [], x.new_zeros(())
            for k, emb in enumerate(self.embedders):
                mean, std = emb(y[:, k])
                means.append(mean)
                stds.append(std)
                lcode = lcode + emb.code_loss(self.keep_l[k])
            terms["lcode"] = lcode
            return torch.cat(means, 1), torch.cat(stds, 1)
        if self.label_encoder is not None:
            parts = self.label_encoder(x)
            mean = torch.cat([m for m, _ in parts], 1)
            std = torch.cat([sd for _, sd in parts], 1)
            keep = self.keep[self.unknown_size:]
            terms["lcode"] = codes.code_loss(mean, std, keep)
            terms["lbatch"] = codes.batch_loss(mean, std, keep, reduce=self.batch_reduce)
            return mean, std
        empty = x.new_zeros(x.shape[0], 0)
        return empty, empty

    def _unknown_params(self, batch: dict, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.unknown_size:
            return batch["mu"], batch["sigma"]
        empty = x.new_zeros(x.shape[0], 0)
        return empty, empty

    def _cross_codes(self, code: Tensor, mask: Tensor, y: Tensor, mu: Tensor):
        """Cross-branch code: labeled parts (codes and masks) rolled per factor by
        independent offsets in [1, B), ``u`` kept or replaced by a random code.
        Returns (code_alt, mask_alt, y_alt, u_cross, match target)."""
        n, m_u = code.shape[0], self.unknown_size
        if self.num_labeled:
            offsets = torch.randint(1, n, (self.num_labeled,), device=code.device)
            rows = torch.arange(n, device=code.device)[:, None]
            y_alt = y.gather(0, (rows - offsets) % n)
            per_dim = torch.cat([offsets.new_zeros(1), offsets])[self.segment]
            index = (rows - per_dim) % n
            code_alt, mask_alt = code.gather(0, index), mask.gather(0, index)
        else:
            y_alt, code_alt, mask_alt = y, code, mask
        if self.scfg.random_ucode:
            u_cross = codes.sample_from_statistics(self.code_stats, n, dtype=code.dtype)
            return torch.cat([u_cross, code_alt[:, m_u:]], 1), mask_alt, y_alt, u_cross, u_cross
        return code_alt, mask_alt, y_alt, code[:, :m_u], mu

    @torch.no_grad()
    def _partners(self, rows: Rows, u: Tensor, y: Tensor, u_cross: Tensor | None,
                  y_alt: Tensor | None) -> Tensor:
        """G1's pair images for the rows ``[real, rec fakes, cross fakes]``: one G1
        forward over ``[(u, y), (u_cross, y_alt)]`` with B1's means, nothing
        dropped; the real row's image is reused for the rec branch."""
        n = rows.n
        us, ys = [u], [y]
        if self.cross_branch:
            us.append(u_cross)
            ys.append(y_alt)
        labels = torch.cat(ys)
        means = [emb(labels[:, k])[0] for k, emb in enumerate(self.embedders1 or [])]
        z = torch.cat([torch.cat(us)] + means, 1)
        images = self.generator1(torch.cat([z, torch.zeros_like(z)], 1))[0]
        real = images[:n]
        return torch.cat([real] + ([real] if self.rec_branch else []) +
                         ([images[n:]] if self.cross_branch else []))

    # ------------------------------------------------------------ adversaries

    def _shift(self, stack: Tensor, rows: Rows) -> Tensor:
        """Random offset of the rows ``[real, rec, cross]``: a real image and its
        reconstruction share a shift; cross fakes get their own."""
        height, width, n = stack.shape[-2], stack.shape[-1], rows.n
        dy, dx = sample_offsets(n, height, width, stack.device)
        ys, xs = [dy], [dx]
        if self.rec_branch:
            ys.append(dy)
            xs.append(dx)
        if self.cross_branch:
            cy, cx = sample_offsets(n, height, width, stack.device)
            ys.append(cy)
            xs.append(cx)
        return shift_images((stack,), torch.cat(ys), torch.cat(xs))[0]

    def _judge(self, net: nn.Module, inputs: Tensor, rows: Rows):
        """``net`` (D or R) on ``inputs`` (rows ``[real, fakes]``); with
        ``fake_reflect`` the output gains ``rows.reflections``, judging
        ``2*c(real) - c(rec)`` (``c``: the trunk's convolutional features)."""
        feats = net.trunk.conv(inputs).flatten(1)
        if self.reflect:
            feats = torch.cat([feats, 2.0 * feats[rows.real] - feats[rows.judged_rec]])
        return net.head(net.trunk.fc(feats))

    def _r1_penalty(self, real: Tensor) -> Tensor:
        """R1 (Mescheder et al. 2018): ``mean_b ||d D(real_b) / d real_b||^2``,
        D's gradient at the real inputs (B, C', H, W) (pairs in ``dis`` mode, as
        D judged them). Trains D only: its value depends on D's weights, and the
        inputs are detached. Why: a D flat around the real images gives G smooth
        gradients and keeps D from overshooting on a short schedule.

        Runs on the reference layers (:func:`plain_layers`): this gradient is
        itself differentiated, and the fast path's hand-written backwards are
        not differentiable twice. An extra D forward and double backward over
        the real rows."""
        real = real.detach().requires_grad_(True)
        with plain_layers():
            (grad,) = torch.autograd.grad(self.discriminator(real).sum(), real, create_graph=True)
        return grad.square().flatten(1).sum(1).mean()

    def _fake_mean(self, loss_fn, out: Tensor, rows: Rows, targets: Tensor) -> Tensor:
        """Branch-weighted fake loss on ``out`` (rows ``[real, fakes, reflections]``):
        ``branch_factor * sum_branch loss_fn(its rows, its target labels)``; the
        rec branch's loss is averaged with that of its reflections."""
        parts = []
        if self.rec_branch:
            rec = loss_fn(out[rows.judged_rec], targets[rows.rec])
            if self.reflect:
                rec = 0.5 * (rec + loss_fn(out[rows.reflections], targets[rows.rec]))
            parts.append(rec)
        if self.cross_branch:
            parts.append(loss_fn(out[rows.judged_cross], targets[rows.cross]))
        return self.branch_factor * sum(parts)

    def _padded(self, logits: list[Tensor]) -> Tensor:
        """Per-factor logits ``[(N, n_k + 1)]`` -> ``(N, K, n_max + 1)``, padded
        with -inf (zero probability, zero gradient)."""
        pad = logits[0].new_full((logits[0].shape[0], 1), float("-inf"))
        flat = torch.cat(list(logits) + [pad], 1).index_select(1, self.pad_index)
        return flat.view(-1, self.num_labeled, self.max_classes)

    def _adversarial_terms(self, stack: Tensor, rows: Rows, y: Tensor, targets: Tensor, terms: dict,
                           r_stack: Tensor):
        """D, R and generator adversarial terms. ``stack``: rows ``[real, fakes]``
        (D's input); ``r_stack``: the same rows as R reads them (its first C
        channels; ``stack`` itself unless ``cla2_offset`` is off); ``targets``: the fakes' labels.
        D and R learn from ``stack.detach()`` (their losses train only them); the
        generator's terms run D and R with detached parameters (they train only
        the generator side)."""
        s = self.scfg
        judged, fake_in = stack.detach(), stack[rows.judged_fakes]
        d = self._judge(self.discriminator, judged, rows)
        terms["d_real"] = losses.lsgan_real_loss(d[rows.real])
        terms["d_fake"] = self._fake_mean(lambda out, _: losses.lsgan_fake_loss(out), d, rows, targets)
        terms["g_dis"] = losses.lsgan_g_loss(detached_call(self.discriminator, fake_in))
        if s.r1_weight > 0:
            terms["r1"] = self._r1_penalty(judged[rows.real])
        if self.classifier is None:
            return
        k, c, r_net = self.num_labeled, self.cfg.image_channels, self.classifier
        if r_stack is not stack:
            judged, fake_in = r_stack.detach(), r_stack[rows.judged_fakes]
        if s.cla2_adv:
            logits = self._padded(self._judge(r_net, judged[:, :c], rows))
            terms["r_real"] = k * losses.cla2_real_loss(logits[rows.real].flatten(0, 1), y.flatten())
            terms["r_fake"] = self._fake_mean(
                lambda out, t: k * losses.cla2_fake_loss(out.flatten(0, 1), t.flatten()),
                logits, rows, targets)
            g_logits = detached_call(r_net, fake_in[:, :c])
        else:
            g_logits = r_net(fake_in[:, :c])  # frozen: no parameter gradients
        terms["g_cla"] = k * losses.cla2_generator_loss(self._padded(g_logits).flatten(0, 1),
                                                       targets.flatten())

    def after_update(self):
        if self.average is not None:
            self.average.update()

    def handoff(self) -> dict:
        """As every stage's, with the averaged networks in place of the last
        weights when ``ema_decay`` is on."""
        out = super().handoff()
        if self.average is not None:
            out["weights"].update({n: self.weights(f"{n}_ema")[f"{n}_ema"] for n in self.average.copies})
        return out

    def _shown(self, name: str):
        """The network handed on under ``name``: its average when there is one."""
        return self.models.get(f"{name}_ema", getattr(self, name))

    # ------------------------------------------------------------ outputs

    @torch.no_grad()
    def generate(self, u: Tensor | None, label_codes: list[Tensor]) -> Tensor:
        """G2's images (B, C, H, W) (the averaged G2 with ``ema_decay``) from
        unknown codes ``u`` (B, m_u) (None or empty when m_u = 0) and labeled
        codes ``[(B, m_k)]``, nothing dropped."""
        z = torch.cat(([u] if u is not None else []) + list(label_codes), 1)
        generator = self._shown("generator")
        was_training = generator.training
        generator.eval()
        images = generator(torch.cat([z, torch.zeros_like(z)], 1))[0]
        generator.train(was_training)
        return images

    @torch.no_grad()
    def label_means(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """Labeled code means ``[(B, m_k)]``: B2(y) means, or S(x) means."""
        if self.embedders is not None:
            return [emb(y[:, k])[0] for k, emb in enumerate(self._shown("embedders"))]
        if self.label_encoder is not None:
            return [mean for mean, _ in self._shown("label_encoder")(x)]
        return []

    @torch.no_grad()
    def sample_images(self, batch: dict, n: int = 8) -> dict[str, Tensor]:
        """``reconstruction``: rows real / G2(mu_u, own labels); ``swap`` (when
        there are labeled factors and an unknown code): row i keeps image i's
        unknown, column j takes image j's labels. Code means, no dropout."""
        self.train(False)
        batch = self.to_device({k: v[:n] for k, v in batch.items()})
        x, y = batch["image"], batch["labels"]
        u = batch["mu"] if self.unknown_size else None
        grids = sample_grids(x, u, self.label_means(x, y), self.generate)
        self.train(True)
        return grids

    @torch.no_grad()
    def class_sweeps(self, batch: dict, n: int = plots.SWEEP_ROWS) -> dict[str, Tensor]:
        """``sweep_<factor>`` (with label embedders): row i is image i of
        ``batch``, then G2(mu_u of image i, B2 means of its labels with the
        factor set to each class in turn). Nothing without embedders (S reads
        labels from images; it cannot make a class's code)."""
        if self.embedders is None:
            return {}
        batch = self.to_device({k: v[:n] for k, v in batch.items()})
        x, y = batch["image"], batch["labels"]
        u = batch["mu"] if self.unknown_size else None

        def embed(labels: Tensor) -> list[Tensor]:
            return [emb(labels[:, k])[0] for k, emb in enumerate(self._shown("embedders"))]

        return plots.class_sweep_pictures(x, u, y, embed, self.generate, self.factors)

    def embedding_plots(self) -> dict[str, Tensor]:
        """``embedding_<factor>``: B2's normalised class codes (nothing without B2)."""
        if self.embedders is None:
            return {}
        return plots.embedding_plots(self._shown("embedders"), self.factors,
                                     f"stage 2 it {self.iteration}: ")

    def pictures(self, batch: dict, data=None) -> dict[str, Tensor]:
        """The pictures due after this iteration: :meth:`sample_images` and
        :meth:`class_sweeps` every ``sample_interval``, :meth:`embedding_plots`
        every ``emb_plot_interval`` (each also at the end). ``batch``: the
        runner's fixed sample batch with its distilled codes. ``data`` is unused:
        the unknown codes are fixed in this stage, stage 1 already plotted them."""
        s, it, done = self.scfg, self.iteration, self.done
        out = {}
        if plots.due(it, s.sample_interval, done):
            out.update(self.sample_images(batch))
            out.update(self.class_sweeps(batch))
        if plots.due(it, s.emb_plot_interval, done):
            out.update(self.embedding_plots())
        return out
