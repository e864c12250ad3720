"""Labeled encoder S (docs/method.md sections 2 and 6; the last stage).

S is an encoder with one diagonal Gaussian head per labeled factor (sizes
``m_k``). It learns to read the labeled codes of the final label embedders B2
from images: the loss is ``KL(B2(y) || S(x))``, summed over code dimensions and
factors, batch mean (``losses.labeled_encoder_loss``). G2 and B2 come from the
stage-2 hand-off and are frozen (``requires_grad`` off, eval mode, used only
under ``torch.no_grad``); only S is trained (Adam, ``lenc`` lr and betas, lr
ramped over ``lr_ramp``).

Each iteration trains S on two halves (docs/method.md lists G2 and B2 as this
stage's inputs; the reference implementation trains on real images only):

- *real*: the batch's images ``x`` with their labels ``y``;
- *generated*: ``x_gen = G2(u, l)`` with nothing dropped, where
  ``u ~ N(mean, cov)`` is drawn from the stage-1 code statistics
  (``codes.sample_from_statistics``, the same Gaussian as stage 2's
  ``random_ucode``: this stage has no per-sample codes), and ``l`` is a sample of
  ``B2(y_gen)`` with ``y_gen`` the batch's labels rolled per factor by an
  independent offset in ``[1, B)`` (``stage1.rolled_labels``, stage 2's cross
  branch). Rolling keeps each factor's class frequencies of the data while
  making the labels independent of each other and of ``u`` -- exactly the swaps
  G2 was trained to make, which are what S must read at use. ``l`` is sampled
  (not the mean) because G2 was trained on sampled codes; the target is still the
  whole Gaussian ``B2(y_gen)``, as for real images, where only the class is known.

``loss = (1 - w) * KL_real + w * KL_gen`` with ``w = lenc.generated_weight``
(default 0.5): the two halves have the same batch size and the same target
form, so an even split keeps the loss on the scale of a single KL while giving
real images (the ground truth) and swaps (where S is used) equal say. Both
halves go through S in one forward pass. With ``w = 0`` the generated half is
not built at all (no G2 pass, S on the real batch only): docs/method.md's loss on
real images alone, at twice the images/s (benchmarks/stage_throughput.py,
``lenc_real``).

No random offset on S's input, whatever ``lenc.random_offset`` says: S must read
the image as it is, and for position factors (dSprites ``x``/``y``) a shift
changes the true label.

Exists only with labeled factors (K > 0) and ``stage2.use_embedding: true``
(otherwise stage 2 trains S itself); building it otherwise raises ValueError.

Metrics per step: ``total``, ``kl_real``, ``kl_gen`` (not with ``w = 0``). :meth:`evaluate`:
``acc_<factor>``, the accuracy of the class whose B2 mean is nearest to S's mean.
:meth:`sample_images` shows what S reads: real images, then G2 with a fixed
random unknown and the labeled codes S reads from them, then the same unknown
with the true labels' B2 means (the last two rows match when S is right);
:meth:`read_plots` draws S's reading of test images over B2's class codes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dsu_models import codes, losses, plots
from dsu_models.config import Config
from dsu_models.data.base import FactorInfo, InMemoryDataset
from dsu_models.distill import image_batches
from dsu_models.embedder import nearest_class
from dsu_models.grids import rows_grid
from dsu_models.nn.builders import build_embedders, build_encoder, build_generator
from dsu_models.stages.common import Stage, adam, batched_accuracy, params
from dsu_models.stages.stage1 import rolled_labels

_STAT_KEYS = ("mean", "std", "eigenvalues", "eigenvectors")


class LencStage(Stage):
    """``LencStage(cfg, factors, upstream)``.

    factors: labeled factors' infos in config order.
    upstream: ``{"stage2": <stage-2 hand-off>, "code_stats": <codes.code_statistics dict>}``;
    the hand-off's ``weights`` hold ``generator`` (G2) and ``embedders`` (B2, a
    ``builders.build_embedders`` ModuleList) state dicts.
    """

    name = "lenc"
    upstream = ("stage2", "distill")
    relative_cost = 0.5

    @classmethod
    def active(cls, cfg: Config) -> bool:
        # S learns from stage 2's label embedders B2, which exist only with labels and use_embedding
        return bool(cfg.labeled_factors) and cfg.stage2.use_embedding
    handoff_models = ("label_encoder",)

    def __init__(self, cfg: Config, factors: list[FactorInfo], upstream: dict, device=None):
        if not cfg.labeled_factors:
            raise ValueError("lenc stage: there are no labeled factors to encode "
                             "(docs/method.md section 2: lenc only exists when K > 0)")
        if not cfg.stage2.use_embedding:
            raise ValueError("lenc stage: stage2.use_embedding is false, so stage 2 trained the "
                             "labeled encoder itself and there are no embedders B2 to learn from")
        super().__init__(cfg, device)
        self.factor_names = list(cfg.labeled_factors)
        self.factors = list(factors)
        self.generator, self.embedders = self._frozen_upstream(cfg, factors, upstream)
        self.code_stats = self._checked_stats(upstream["code_stats"], cfg.unknown_size)
        self.encoder = build_encoder(cfg, [spec.size for _, spec in cfg.labeled()],
                                     zero_init=self.scfg.zero_init).to(self.device)
        self.models = {"label_encoder": self.encoder}
        self.optimizers = {"label_encoder": adam([{"params": params(self.encoder),
                                                   "lr": self.scfg.lr}], self.scfg.betas)}
        self.setup_networks(self.encoder, self.generator)

    def _frozen_upstream(self, cfg: Config, factors: list[FactorInfo], upstream: dict):
        handoff = upstream["stage2"]
        if handoff.get("stage") != "stage2":
            raise ValueError(f"lenc stage: upstream 'stage2' is a {handoff.get('stage')!r} hand-off")
        generator = build_generator(cfg)
        embedders = build_embedders(cfg, factors)
        generator.load_state_dict(handoff["weights"]["generator"])
        embedders.load_state_dict(handoff["weights"]["embedders"])  # frequencies included
        for module in (generator, embedders):
            module.requires_grad_(False)
            module.eval()
        return generator.to(self.device), embedders.to(self.device)

    def _checked_stats(self, stats: dict, unknown_size: int) -> dict[str, Tensor]:
        missing = [k for k in _STAT_KEYS if k not in stats]
        if missing:
            raise ValueError(f"lenc stage: code_stats lacks {missing}")
        if stats["mean"].shape != (unknown_size,):
            raise ValueError(f"lenc stage: code_stats are for a code of size {tuple(stats['mean'].shape)}, "
                             f"unknown_size is {unknown_size}")
        return {k: stats[k].to(self.device, torch.float64) for k in _STAT_KEYS}

    # ---------------------------------------------------------------- step

    def targets(self, labels: Tensor) -> list[tuple[Tensor, Tensor]]:
        """B2's Gaussians for labels (B, K): per factor ``(mean, std)`` (B, m_k)."""
        return [emb(labels[:, k]) for k, emb in enumerate(self.embedders)]

    @torch.no_grad()
    def generate(self, u: Tensor, label_codes: list[Tensor]) -> Tensor:
        """G2(u, l) with nothing dropped: u (B, m_u) (m_u may be 0), label_codes
        per factor (B, m_k) -> image (B, C, H, W) in [-1, 1]."""
        parts = [u] + list(label_codes)
        image, _ = self.generator(codes.generator_input(parts, [torch.ones_like(p) for p in parts]))
        return image

    @torch.no_grad()
    def generated_batch(self, labels: Tensor, dtype: torch.dtype) -> tuple[Tensor, list]:
        """A generated swap batch and its targets (see the module docstring)."""
        y_gen = rolled_labels(labels) if labels.shape[0] > 1 else labels
        targets = self.targets(y_gen)
        l_codes = [codes.sample_code(m, s, None, training=False)[0] for m, s in targets]
        u = codes.sample_from_statistics(self.code_stats, labels.shape[0], dtype=dtype)
        return self.generate(u, l_codes), targets

    def loss_terms(self, batch: dict) -> tuple[dict[str, Tensor], Tensor]:
        """batch: ``image`` (B, C, H, W) in [-1, 1], ``labels`` (B, K) int64 (on the device)."""
        x, y = batch["image"], batch["labels"]
        b = x.shape[0]
        w = self.scfg.generated_weight
        with torch.no_grad():
            real_targets = self.targets(y)
        if w == 0.0:
            kl_real = losses.labeled_encoder_loss(real_targets, self.encoder(x))
            total, parts = kl_real, {"kl_real": kl_real}
        else:
            x_gen, gen_targets = self.generated_batch(y, torch.float32)
            predictions = self.encoder(torch.cat([x, x_gen.to(x.dtype)]))
            kl_real = losses.labeled_encoder_loss(real_targets, [(m[:b], s[:b]) for m, s in predictions])
            kl_gen = losses.labeled_encoder_loss(gen_targets, [(m[b:], s[b:]) for m, s in predictions])
            total = (1.0 - w) * kl_real + w * kl_gen
            parts = {"kl_real": kl_real, "kl_gen": kl_gen}
        return {"total": total, **parts}, total

    # ------------------------------------------------------------ outputs

    @torch.no_grad()
    def evaluate(self, images: Tensor, labels: Tensor, batch_size: int | None = None) -> dict[str, float]:
        """Per factor, the accuracy of ``nearest_class(B2_k, S(x)_k mean)``:
        ``{"acc_<factor>": float in [0, 1]}``.

        images: ``(N, C, H, W)`` uint8 or float in [-1, 1]; labels ``(N, K)`` int64.
        Eval mode (restored afterwards), batches of ``batch_size`` (default: the
        stage's batch size).
        """
        def predict(x: Tensor) -> list[Tensor]:
            return [nearest_class(emb, mean) for emb, (mean, _) in zip(self.embedders, self.encoder(x))]

        return batched_accuracy(self.encoder, predict, images, labels, self.factor_names,
                                batch_size or self.scfg.batch_size, self.device)

    @torch.no_grad()
    def sample_images(self, batch: dict, n: int = 8) -> dict[str, Tensor]:
        """``labels_read``: rows real x / G2(u, S(x) means) / G2(u, B2(y) means), with
        ``u`` drawn from the code statistics by a fixed private generator (the same
        across calls; the global RNG is untouched)."""
        batch = self.to_device({k: v[:n] for k, v in batch.items()})
        x, y = batch["image"], batch["labels"]
        was_training = self.encoder.training
        self.encoder.eval()
        read = [mean for mean, _ in self.encoder(x)]
        self.encoder.train(was_training)
        fixed = torch.Generator(device=self.device).manual_seed(0)
        u = codes.sample_from_statistics(self.code_stats, x.shape[0], generator=fixed, dtype=x.dtype)
        true = [mean for mean, _ in self.targets(y)]
        return {"labels_read": rows_grid([x, self.generate(u, read), self.generate(u, true)])}

    @torch.no_grad()
    def read_plots(self, data: InMemoryDataset) -> dict[str, Tensor]:
        """``read_<factor>``: S's means for ``data``'s images (labels for every
        ground-truth factor, the labeled ones among them), coloured by their true
        class, drawn over B2's class codes (a point should sit in its class's ellipse)."""
        columns = [data.factor_index(name) for name in self.factor_names]
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            reads = [[mean.float().cpu() for mean, _ in self.encoder(x)]
                     for x in image_batches(data.images, 4 * self.scfg.batch_size, self.device)]
        finally:
            self.encoder.train(was_training)
        points = [(torch.cat([r[k] for r in reads]), data.labels[:, j]) for k, j in enumerate(columns)]
        return plots.embedding_plots(self.embedders, self.factors, f"lenc it {self.iteration}: S reads, ",
                                     points, key="read")

    def pictures(self, batch: dict, data: InMemoryDataset | None = None) -> dict[str, Tensor]:
        """Every ``sample_interval`` and at the end: :meth:`sample_images` of the
        runner's fixed batch and, given the fixed scatter set ``data``, :meth:`read_plots`."""
        if not plots.due(self.iteration, self.scfg.sample_interval, self.done):
            return {}
        out = self.sample_images(batch)
        if data is not None and len(data):
            out.update(self.read_plots(data))
        return out
