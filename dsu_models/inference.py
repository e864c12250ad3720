"""The final model for use: encode, swap, generate (docs/method.md sections 1, 2 and 11).

A *bundle* gathers what a trained DisUnknown model needs at use, from the
stage hand-offs: the unknown encoder E (stage 1), the final generator G2 and
label embedders B2 (stage 2), the labeled encoder S (``lenc``, or stage 2 when
``stage2.use_embedding`` is false), the resolved config, the factor table with
class names (the labeled factors, and every ground-truth factor of the
dataset) and the statistics of the distilled unknown codes.
:class:`DisUnknownModel` rebuilds the networks from it with the same builders
the stages use and answers, batched and under ``torch.no_grad``:

- ``encode_unknown(images)`` -> ``(B, m_u)`` unknown code means of E;
- ``encode_labels(images)`` -> ``(B, K)`` classes read by S (nearest B2 mean);
- ``embed_labels(labels)`` -> per factor ``(B, m_k)`` B2 means;
- ``generate(u, label_codes)`` -> ``(B, C, H, W)`` in [-1, 1] (nothing dropped);
- ``swap(content_images, {factor: class id or name})`` -> uint8 ``(B, H, W, C)``
  numpy images: each content image's unknown with the given labels; factors not
  set keep the content image's own labels as read by S.

The lower-level methods return CPU tensors; ``swap`` returns numpy images, the
form image libraries write. What "images" may be (tensors, numpy arrays, PIL
images) is in :mod:`dsu_models.image_inputs`.

Bundles (what a model is made of, its files and how URIs are read) live in
:mod:`dsu_models.bundle`; ``make_bundle``, ``save_bundle`` and friends are
re-exported here. :meth:`DisUnknownModel.load` takes a bundle directory, a
``model.pt`` path, or an MLflow URI (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH``).

Degenerate models: ``unknown_size`` 0 has no E (codes ``(B, 0)``); K = 0 has
no labels (``swap`` with ``{}`` reconstructs); ``stage2.use_embedding: false``
has S but no B2, so classes cannot be set or read (``embed_labels``,
``encode_labels`` and swaps that set a factor raise), and ``swap`` with ``{}``
reconstructs from S's codes; a stage-1 model (no stage-2 hand-off) uses G1 and
B1 and has no S, so a swap must set every factor or pass ``content_labels``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dsu_models import codes
from dsu_models.bundle import (BUNDLE_FILE, FORMAT, ModelLoadError, bundle_from_run, load_bundle,
                               make_bundle, save_bundle)
from dsu_models.config import Config, config_from_dict
from dsu_models.data.base import FactorInfo, to_uint8
from dsu_models.distill import image_batches
from dsu_models.embedder import nearest_class
from dsu_models.image_inputs import image_batch
from dsu_models.nn.builders import build_embedders, build_encoder, build_generator
from dsu_models.stages.common import resolve_device

__all__ = ["DisUnknownModel", "ModelLoadError", "make_bundle", "bundle_from_run", "save_bundle",
           "load_bundle", "to_hwc_uint8", "BUNDLE_FILE"]


def _ready(module: nn.Module, state: dict, device: torch.device) -> nn.Module:
    module.load_state_dict(state)
    return module.requires_grad_(False).eval().to(device)


def to_hwc_uint8(images: Tensor) -> np.ndarray:
    """float (B, C, H, W) in [-1, 1] -> uint8 numpy (B, H, W, C)."""
    return to_uint8(images).permute(0, 2, 3, 1).contiguous().numpy()


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, np.integer)) or (
        isinstance(value, (np.ndarray, Tensor)) and value.ndim == 0)


class DisUnknownModel:
    """A trained model for use (see the module docstring). ``bundle``: a
    :func:`make_bundle` dict; ``device``: ``"auto"`` (CUDA when available),
    ``"cpu"``, ``"cuda"``, ... Networks are in eval mode with gradients off."""

    def __init__(self, bundle: dict, device: str | torch.device = "auto"):
        if bundle.get("format") != FORMAT:
            raise ValueError(f"not a DisUnknown model bundle (no format {FORMAT!r})")
        self.bundle = bundle
        self.config: Config = config_from_dict(bundle["config"])
        cfg = self.config
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.labeled_factors: list[str] = list(cfg.labeled_factors)
        self.factors = [FactorInfo.from_dict(d) for d in bundle["factors"]]
        self.all_factors = [FactorInfo.from_dict(d) for d in bundle["all_factors"]]
        self.unknown_size: int = cfg.unknown_size
        self.generator_stage: str = bundle["generator_stage"]
        self.iterations: dict[str, int] = dict(bundle["iterations"])
        self.batch_size = cfg.evaluate.batch_size
        # held-out images (uint8 (N, C, S, S)) and their labels over all_factors, or None
        self.examples: dict | None = bundle.get("examples")
        stats = bundle.get("code_stats")
        self.code_stats = {k: v.clone() for k, v in stats.items()} if stats is not None else None
        self._build(bundle["weights"])

    def _build(self, weights: dict):
        cfg, dev = self.config, self.device
        self.encoder = (_ready(build_encoder(cfg, [cfg.unknown_size], cfg.stage1.zero_init),
                               weights["encoder"], dev) if cfg.unknown_size else None)
        self.generator = _ready(build_generator(cfg), weights["generator"], dev)
        self.embedders = None
        if "embedders" in weights:
            self.embedders = _ready(build_embedders(cfg, self.factors), weights["embedders"], dev)
        elif not self.labeled_factors:
            self.embedders = nn.ModuleList()
        self.label_encoder = None
        if "label_encoder" in weights:
            sizes = [spec.size for _, spec in cfg.labeled()]
            self.label_encoder = _ready(build_encoder(cfg, sizes, cfg.lenc.zero_init),
                                        weights["label_encoder"], dev)

    # -------------------------------------------------------------- loading

    @classmethod
    def load(cls, uri: str | Path, device: str | torch.device = "auto",
             tracking_uri: str | None = None) -> "DisUnknownModel":
        """From a bundle directory, a ``model.pt`` path, ``models:/NAME@ALIAS``,
        ``models:/NAME/VERSION`` or ``runs:/RUN_ID/PATH`` (MLflow's current
        tracking URI unless ``tracking_uri`` is given). Raises ModelLoadError."""
        return cls(load_bundle(uri, tracking_uri), device)

    @classmethod
    def from_handoffs(cls, stage1: dict, stage2: dict | None = None, lenc: dict | None = None,
                      code_stats: dict | None = None, factors: list[FactorInfo] | None = None,
                      all_factors: list[FactorInfo] | None = None,
                      device: str | torch.device = "auto") -> "DisUnknownModel":
        """Straight from hand-offs (see :func:`make_bundle`); stage2 None gives a
        stage-1 model (G1, B1) for stage-1 evaluation."""
        return cls(make_bundle(stage1, stage2, lenc, code_stats, factors, all_factors), device)

    def save(self, directory: str | Path) -> Path:
        return save_bundle(self.bundle, directory)

    # -------------------------------------------------------------- factors

    def factor_index(self, name: str) -> int:
        if name in self.labeled_factors:
            return self.labeled_factors.index(name)
        hidden = [f.name for f in self.all_factors if f.name not in self.labeled_factors]
        note = (f" ({name!r} is not labeled: it is part of the unknown code)" if name in hidden else "")
        raise ValueError(f"unknown factor {name!r}{note}; labeled factors: "
                         f"{', '.join(self.labeled_factors) or '(none)'}")

    def class_id(self, factor: str, value: int | str) -> int:
        """A class id from an id (int) or a class name (str; a numeric string that
        is not a class name is read as an id)."""
        info = self.factors[self.factor_index(factor)]
        names = info.names()
        if isinstance(value, str):
            if value in names:
                return names.index(value)
            if re.fullmatch(r"[+-]?\d+", value.strip()) and 0 <= int(value) < info.classes:
                return int(value)
        elif isinstance(value, (int, np.integer, np.ndarray, Tensor)) and not isinstance(value, bool):
            if int(value) == value and 0 <= int(value) < info.classes:
                return int(value)
        shown = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
        raise ValueError(f"factor {factor!r}: no class {value!r}; valid class ids 0..{info.classes - 1}"
                         f" or names: {shown}")

    def class_name(self, factor: str, class_id: int) -> str:
        return self.factors[self.factor_index(factor)].names()[int(class_id)]

    def label_matrix(self, settings: dict, batch: int, content_labels=None) -> Tensor:
        """``(batch, K)`` int64 labels from ``{factor: id or name, or a sequence of
        them, one per image}``; unset factors come from ``content_labels``
        (``(batch, K)``) or are -1 ("keep the content image's own")."""
        y = (self._labels(content_labels, allow_keep=True) if content_labels is not None
             else torch.full((batch, len(self.labeled_factors)), -1, dtype=torch.int64))
        if y.shape[0] != batch:
            raise ValueError(f"content_labels: {y.shape[0]} rows for {batch} images")
        for name, value in settings.items():
            k = self.factor_index(name)
            if _is_scalar(value):
                y[:, k] = self.class_id(name, value)
                continue
            values = list(value)
            if len(values) != batch:
                raise ValueError(f"factor {name!r}: {len(values)} values for {batch} images "
                                 f"(give one value, or one per image)")
            y[:, k] = torch.tensor([self.class_id(name, v) for v in values], dtype=torch.int64)
        return y

    def _labels(self, labels, allow_keep: bool = False) -> Tensor:
        """Checked ``(B, K)`` int64 labels (CPU); -1 allowed with ``allow_keep``."""
        y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
        k = len(self.labeled_factors)
        if y.numel() == 0:  # e.g. [[], []] for K = 0 arrives as float
            y = y.to(torch.int64)
        if y.dim() == 1 and k == 1:
            y = y[:, None]
        if y.dim() != 2 or y.shape[1] != k or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"labels: expected integer (B, {k}) class ids, columns "
                             f"{self.labeled_factors}; got {y.dtype} {tuple(y.shape)}")
        y = y.to(torch.int64).cpu().clone()
        for j, info in enumerate(self.factors):
            low = -1 if allow_keep else 0
            bad = (y[:, j] < low) | (y[:, j] >= info.classes)
            if bool(bad.any()):
                raise ValueError(f"labels: factor {info.name!r} has class {int(y[bad.nonzero()[0, 0], j])}; "
                                 f"valid 0..{info.classes - 1}" + (" (-1: keep)" if allow_keep else ""))
        return y

    # -------------------------------------------------------------- networks

    def images(self, images) -> Tensor:
        """Checked CPU batch ``(B, C, S, S)``, uint8 or float in [-1, 1]."""
        x = image_batch(images, self.config.image_channels, self.config.image_size)
        if x.shape[0] == 0:
            raise ValueError("images: got an empty batch")
        return x

    def _need(self, module: nn.Module | None, what: str, why: str):
        if module is None:
            raise ValueError(f"{what}: {why}")

    @torch.no_grad()
    def encode_unknown(self, images) -> Tensor:
        """images -> ``(B, m_u)`` float32 means of E(x) (``(B, 0)`` without an unknown)."""
        x = self.images(images)
        if self.encoder is None:
            return torch.zeros(x.shape[0], 0)
        return torch.cat([self.encoder(b)[0][0].float().cpu()
                          for b in image_batches(x, self.batch_size, self.device)])

    @torch.no_grad()
    def read_label_codes(self, images) -> list[Tensor]:
        """images -> per labeled factor the ``(B, m_k)`` code means of S(x)."""
        self._need(self.label_encoder, "read_label_codes", "this model has no labeled encoder S "
                   "(a stage-1 model, or a model without labeled factors)")
        x = self.images(images)
        parts = [[m.float().cpu() for m, _ in self.label_encoder(b)]
                 for b in image_batches(x, self.batch_size, self.device)]
        return [torch.cat([p[k] for p in parts]) for k in range(len(self.labeled_factors))]

    @torch.no_grad()
    def embed_labels(self, labels) -> list[Tensor]:
        """labels ``(B, K)`` int64 -> per factor ``(B, m_k)`` float32 means of B."""
        self._need(self.embedders, "embed_labels", "this model has no label embedders "
                   "(stage2.use_embedding: false), so classes have no codes")
        y = self._labels(labels).to(self.device)
        return [emb(y[:, k])[0].float().cpu() for k, emb in enumerate(self.embedders)]

    @torch.no_grad()
    def encode_labels(self, images) -> Tensor:
        """images -> ``(B, K)`` int64: per factor, the class whose B mean is nearest
        to S's code mean."""
        self._need(self.embedders, "encode_labels", "this model has no label embedders "
                   "(stage2.use_embedding: false), so there are no classes to snap to")
        if not self.labeled_factors:
            return torch.zeros(self.images(images).shape[0], 0, dtype=torch.int64)
        read = self.read_label_codes(images)
        return torch.stack([nearest_class(emb, r.to(self.device)).cpu()
                            for emb, r in zip(self.embedders, read)], dim=1)

    @torch.no_grad()
    def generate(self, unknown: Tensor | None, label_codes: list[Tensor]) -> Tensor:
        """G(u, l) with nothing dropped. unknown ``(B, m_u)`` (None when m_u = 0);
        label_codes: K tensors ``(B, m_k)`` -> ``(B, C, H, W)`` float32 in [-1, 1]."""
        specs = [spec.size for _, spec in self.config.labeled()]
        if len(label_codes) != len(specs):
            raise ValueError(f"generate: {len(label_codes)} label codes for {len(specs)} labeled factors")
        batch = unknown.shape[0] if unknown is not None else (label_codes[0].shape[0] if label_codes else 0)
        u = torch.zeros(batch, 0) if unknown is None else torch.as_tensor(unknown)
        parts = [u] + list(label_codes)
        for part, size, name in zip(parts, [self.unknown_size] + specs, ["unknown"] + self.labeled_factors):
            if part.dim() != 2 or tuple(part.shape) != (batch, size):
                raise ValueError(f"generate: the {name} code must be ({batch}, {size}), got {tuple(part.shape)}")
        out = []
        for start in range(0, batch, self.batch_size):
            chunk = [p[start:start + self.batch_size].to(self.device, torch.float32) for p in parts]
            image, _ = self.generator(codes.generator_input(chunk, [torch.ones_like(p) for p in chunk]))
            out.append(image.float().cpu())
        if not out:
            c, s = self.config.image_channels, self.config.image_size
            return torch.zeros(0, c, s, s)
        return torch.cat(out)

    # -------------------------------------------------------------- swaps

    def swap_labels(self, content_images, labels) -> Tensor:
        """G(E(content), B(labels)): ``(B, C, H, W)`` float in [-1, 1].

        labels: ``(B, K)`` class ids; -1 keeps the content image's own class as
        read by S. One content image with several label rows (or one label row for
        several images) is broadcast."""
        x = self.images(content_images)
        y = self._labels(labels, allow_keep=True)
        if x.shape[0] != y.shape[0]:
            if x.shape[0] == 1:
                x = x.expand(y.shape[0], *x.shape[1:])
            elif y.shape[0] == 1:
                y = y.expand(x.shape[0], -1)
            else:
                raise ValueError(f"swap: {x.shape[0]} content images but {y.shape[0]} label rows")
        keep = y < 0
        if bool(keep.any()):
            if self.label_encoder is None:
                missing = [n for j, n in enumerate(self.labeled_factors) if bool(keep[:, j].any())]
                raise ValueError(f"swap: factors {missing} are not set and this model has no labeled "
                                 f"encoder S to read them from the content images; set them, or pass "
                                 f"content_labels")
            y = torch.where(keep, self.encode_labels(x), y)
        return self.generate(self.encode_unknown(x), self.embed_labels(y))

    def reconstruct(self, images, labels=None) -> Tensor:
        """G(E(x), l): ``l`` = B(labels) when labels ``(B, K)`` are given, else the
        codes S reads from x (no snapping to classes). -> ``(B, C, H, W)`` in [-1, 1]."""
        x = self.images(images)
        if labels is not None:
            return self.generate(self.encode_unknown(x), self.embed_labels(labels))
        if self.labeled_factors and self.label_encoder is None:
            raise ValueError("reconstruct: this model has no labeled encoder S; pass labels (B, K)")
        read = self.read_label_codes(x) if self.labeled_factors else []
        return self.generate(self.encode_unknown(x), read)

    def swap(self, content_images, labels: dict | None = None, content_labels=None) -> np.ndarray:
        """Each content image's unknown with new labels -> uint8 numpy ``(B, H, W, C)``.

        labels: ``{factor: class id or class name}`` (or a sequence, one per image).
        Factors not set keep the content images' own labels: ``content_labels``
        ``(B, K)`` when given, else as read by S. Unknown factors or classes raise
        ValueError listing the valid ones. With no label embedders
        (``stage2.use_embedding: false``) classes cannot be set: ``{}`` reconstructs."""
        x = self.images(content_images)
        settings = dict(labels or {})
        for name in settings:
            self.factor_index(name)
        if self.embedders is None:
            if settings:
                raise ValueError(f"swap: this model has no label embedders (stage2.use_embedding: "
                                 f"false), so classes cannot be set (asked for {sorted(settings)}); "
                                 f"swap with {{}} reconstructs")
            return to_hwc_uint8(self.reconstruct(x))
        y = self.label_matrix(settings, x.shape[0], content_labels)
        return to_hwc_uint8(self.swap_labels(x, y))

    def __repr__(self) -> str:
        parts = [f"{len(self.factors)} labeled factors {self.labeled_factors}",
                 f"unknown size {self.unknown_size}", f"generator from {self.generator_stage}",
                 "with S" if self.label_encoder is not None else "no S",
                 f"{self.config.image_size} px x {self.config.image_channels} ch", f"on {self.device}"]
        return f"DisUnknownModel({', '.join(parts)})"
