"""Classifier pre-training: the stage-2 classifier R on real images
(docs/method.md sections 2 and 6).

R is an image classifier with ``n_k + 1`` outputs per labeled factor (the last
one is "fake"), built exactly as stage 2 builds it so stage 2 can load these
weights as they are. Here there are no fakes: the loss is, per factor, the
log-softmax over the first ``n_k`` outputs only and the NLL of the true label,
summed over factors. One Adam step on R per iteration (lr and betas from the
``classifier`` config section, lr ramped linearly over ``lr_ramp``).

Choices where docs/method.md is silent:

- Loss terms are checked for NaN/inf *before* the optimizer step, so a bad batch
  raises :class:`~dsu_models.stages.common.NonFiniteLossError` without writing
  non-finite values into R's weights.
- ``random_offset`` (when on) shifts every training image; :meth:`evaluate` sees
  the images as they are. For factors that *are* positions (sprites' ``x``) a
  shift mislabels the image, so the default recipe (``dsu_models/recipe.py``)
  turns it off here and for stage 2's R (``stage2.cla2_offset``): it cannot
  know which labels are positions.
- Metrics per step: ``total`` (summed NLL), ``nll_<factor>`` and ``acc_<factor>``
  (accuracy on the augmented training batch, argmax over the first ``n_k``
  outputs). :meth:`evaluate` returns ``acc_<factor>`` on held-out data.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dsu_models import losses
from dsu_models.config import Config
from dsu_models.data.base import FactorInfo
from dsu_models.nn.builders import build_image_classifier, check_factors
from dsu_models.nn.layers import random_offset
from dsu_models.stages.common import Stage, adam, batched_accuracy, params


class ClassifierStage(Stage):
    """``ClassifierStage(cfg, factors)``; ``factors``: labeled factors' infos in config order."""

    name = "classifier"
    relative_cost = 0.2

    @classmethod
    def active(cls, cfg: Config) -> bool:
        return bool(cfg.labeled_factors)  # only with labeled factors (K > 0)
    handoff_models = ("classifier",)  # R with n_k + 1 outputs per factor, as stage 2 needs it

    def __init__(self, cfg: Config, factors: list[FactorInfo], device=None):
        super().__init__(cfg, device)
        if not cfg.labeled_factors:
            raise ValueError("classifier stage: there are no labeled factors to classify "
                             "(docs/method.md section 2: it only exists when K > 0)")
        check_factors(cfg, factors)
        self.factor_names = list(cfg.labeled_factors)
        self.class_counts = [spec.classes for _, spec in cfg.labeled()]
        self.classifier = build_image_classifier(cfg, extra_fake=True).to(self.device)
        self.models = {"classifier": self.classifier}
        self.optimizers = {"classifier": adam([{"params": params(self.classifier),
                                                "lr": self.scfg.lr}], self.scfg.betas)}
        self.setup_networks(self.classifier)

    def loss_terms(self, batch: dict) -> tuple[dict[str, Tensor], Tensor]:
        """batch: ``image`` (B, C, H, W) in [-1, 1], ``labels`` (B, K) int64 (on the
        device). NLL of the true labels over the first ``n_k`` outputs per factor."""
        x, y = batch["image"], batch["labels"]
        if self.scfg.random_offset:
            x = random_offset(x)
        logits = self.classifier(x)
        terms: dict[str, Tensor] = {}
        total = x.new_zeros(())
        for k, (name, n) in enumerate(zip(self.factor_names, self.class_counts)):
            nll = losses.classifier_nll(logits[k], y[:, k], classes=n)
            terms[f"nll_{name}"] = nll
            with torch.no_grad():
                terms[f"acc_{name}"] = (logits[k][:, :n].argmax(1) == y[:, k]).float().mean()
            total = total + nll
        return {"total": total, **terms}, total

    @torch.no_grad()
    def evaluate(self, images: Tensor, labels: Tensor, batch_size: int | None = None) -> dict[str, float]:
        """Accuracy per factor on held-out data: ``{"acc_<factor>": float in [0, 1]}``.

        images: ``(N, C, H, W)`` uint8 or float in [-1, 1] (or see
        :func:`dsu_models.distill.image_batches`); labels: ``(N, K)`` int64.
        No augmentation, eval mode (restored afterwards), batches of ``batch_size``
        (default: the stage's batch size).
        """
        def predict(x: Tensor) -> list[Tensor]:
            return [lg[:, :n].argmax(1) for lg, n in zip(self.classifier(x), self.class_counts)]

        return batched_accuracy(self.classifier, predict, images, labels, self.factor_names,
                                batch_size or self.scfg.batch_size, self.device)

