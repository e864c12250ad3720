"""In-memory dataset types shared by the data layer, the runner and the stages.

A dataset is a set of images with integer labels for every factor that has
ground truth, plus the factor table (docs/method.md section 1 and 10): names,
class counts, class names and class frequencies on the training split.
Images are kept as uint8 ``(N, C, H, W)`` so a full split stays small in
memory; :func:`to_float` converts a batch to ``[-1, 1]`` floats on demand.

torch is imported where it is used, not at module level: the preparation code
(sources, ``prepared.run_task``) imports this module for :class:`FactorInfo`
and runs in Ray worker processes that would otherwise each load torch (about
0.3 GiB) without needing it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

# the label of a row that has none for an evaluation-only factor (FactorInfo.eval_only)
MISSING = -1


@dataclass(frozen=True)
class FactorInfo:
    """One ground-truth factor: its name, class count, class names, frequencies.

    ``frequencies``: shape (classes,), sums to 1, measured on the train split
    (on its labeled rows for an eval-only factor).
    ``eval_only``: a factor kept for evaluation and never trained on; rows
    without a label for it hold :data:`MISSING` in its column.
    """

    name: str
    classes: int
    class_names: tuple[str, ...] = ()
    frequencies: tuple[float, ...] = ()
    eval_only: bool = False

    def __post_init__(self):
        if self.classes < 2:
            raise ValueError(f"factor {self.name!r} has {self.classes} class(es); need at least 2")
        if self.class_names and len(self.class_names) != self.classes:
            raise ValueError(
                f"factor {self.name!r}: {len(self.class_names)} class names for {self.classes} classes")
        if self.frequencies and len(self.frequencies) != self.classes:
            raise ValueError(
                f"factor {self.name!r}: {len(self.frequencies)} frequencies for {self.classes} classes")

    def names(self) -> tuple[str, ...]:
        return self.class_names or tuple(str(c) for c in range(self.classes))

    def freq_tensor(self) -> torch.Tensor:
        import torch

        if self.frequencies:
            return torch.tensor(self.frequencies, dtype=torch.float32)
        return torch.full((self.classes,), 1.0 / self.classes)

    def to_dict(self) -> dict:
        d = {"name": self.name, "classes": self.classes,
             "class_names": list(self.class_names), "frequencies": list(self.frequencies)}
        if self.eval_only:   # only when set: other factors' dicts, and hashes of them, are unchanged
            d["eval_only"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FactorInfo":
        return cls(d["name"], int(d["classes"]), tuple(d.get("class_names") or ()),
                   tuple(float(f) for f in d.get("frequencies") or ()), bool(d.get("eval_only", False)))


def measured_frequencies(labels: np.ndarray, classes: int) -> tuple[float, ...]:
    """Class frequencies of one factor's label column over its labeled rows.
    labels: (N,) int; MISSING rows (an eval-only factor's) are not counted."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels[labels != MISSING], minlength=classes).astype(np.float64)
    return tuple(float(c) for c in counts / max(counts.sum(), 1.0))


@dataclass
class InMemoryDataset:
    """Images with labels for every ground-truth factor.

    images: (N, C, H, W) uint8; labels: (N, F) int64, column j = factors[j];
    ids: (N,) int64, stable and unique.
    """

    images: torch.Tensor
    labels: torch.Tensor
    factors: list[FactorInfo]
    ids: torch.Tensor = field(default=None)
    name: str = "dataset"

    def __post_init__(self):
        import torch

        if self.ids is None:
            self.ids = torch.arange(len(self.images), dtype=torch.int64)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.name}: images must be uint8 (N, C, H, W), got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (len(self.images), len(self.factors)):
            raise ValueError(f"{self.name}: labels shape {tuple(self.labels.shape)} does not match "
                             f"{len(self.images)} images x {len(self.factors)} factors")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def factor_index(self, name: str) -> int:
        for j, f in enumerate(self.factors):
            if f.name == name:
                return j
        raise KeyError(f"{self.name}: no factor {name!r}; factors are {[f.name for f in self.factors]}")

    def subset(self, index) -> "InMemoryDataset":
        return InMemoryDataset(self.images[index], self.labels[index], self.factors,
                               self.ids[index], self.name)

    def with_measured_frequencies(self) -> "InMemoryDataset":
        """Same data, factor frequencies measured on these labels (use on the train split)."""
        factors = [dataclasses.replace(f, frequencies=measured_frequencies(self.labels[:, j].numpy(),
                                                                            f.classes))
                   for j, f in enumerate(self.factors)]
        return InMemoryDataset(self.images, self.labels, factors, self.ids, self.name)


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float32 in [-1, 1]."""
    return images_uint8.float().mul_(2.0 / 255.0).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (B, C, H, W) in [-1, 1] -> uint8, clamped."""
    import torch

    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
