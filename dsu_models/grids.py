"""Sample grids (docs/method.md section 11): reconstruction rows, swap matrices and
class sweeps.

All inputs are float images in [-1, 1]; outputs are uint8 ``(3 or 1, H, W)``
CHW tensors ready to save as PNG or log as an image (``dsu_models.plots``
returns its figures in the same form).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from dsu_models.data.base import to_uint8
from dsu_models.files import atomic_write


def rows_grid(rows: list[Tensor], pad: int = 2) -> Tensor:
    """Stack equally long rows of images: rows[i] is (n, C, H, W). E.g. [real, recon]."""
    n = rows[0].shape[0]
    return to_uint8(make_grid(torch.cat([r.detach().float().cpu() for r in rows]), nrow=n,
                              padding=pad, pad_value=1.0, normalize=False))


def swap_matrix(content: Tensor, sources: Tensor, cells: Tensor, pad: int = 2) -> Tensor:
    """A swap matrix: row i keeps ``content[i]``'s unknown, column j takes
    ``sources[j]``'s labels; ``cells``: (n_content, n_source, C, H, W).
    The top row shows the label sources, the left column the content images,
    the top-left corner is blank."""
    n_c, n_s = cells.shape[:2]
    blank = torch.ones_like(content[:1])
    top = torch.cat([blank, sources.detach().float().cpu()[:n_s].to(blank.device)])
    body = [torch.cat([content[i:i + 1], cells[i]]) for i in range(n_c)]
    images = torch.cat([top.cpu()] + [b.detach().float().cpu() for b in body])
    return to_uint8(make_grid(images, nrow=n_s + 1, padding=pad, pad_value=1.0, normalize=False))


def sample_grids(x: Tensor, u: Tensor | None, label_codes: list[Tensor], generate) -> dict[str, Tensor]:
    """The stages' sample grids. ``x``: (n, C, H, W) real images; ``u``: their
    unknown codes (or None); ``label_codes``: their labeled codes; ``generate(u,
    codes) -> images``. ``reconstruction``: rows real / generated from the
    image's own codes; ``swap`` (when there are both unknown and labeled codes):
    row i keeps image i's unknown, column j takes image j's labels, all n*n
    cells generated in one batch."""
    grids = {"reconstruction": rows_grid([x, generate(u, label_codes)])}
    if label_codes and u is not None:
        n = x.shape[0]
        rows = torch.arange(n, device=x.device).repeat_interleave(n)
        cols = torch.arange(n, device=x.device).repeat(n)
        cells = generate(u[rows], [c[cols] for c in label_codes])
        grids["swap"] = swap_matrix(x, x, cells.reshape(n, n, *x.shape[1:]))
    return grids


MAX_SWEEP_CLASSES = 64  # wider rows are unreadable; larger factors show an even subset


def sweep_classes(classes: int, limit: int = MAX_SWEEP_CLASSES) -> Tensor:
    """The classes a sweep shows: all of them, or ``limit`` evenly spaced ones. (c,) int64."""
    if classes <= limit:
        return torch.arange(classes)
    return torch.linspace(0, classes - 1, limit).round().long().unique()


def class_sweeps(x: Tensor, u: Tensor | None, labels: Tensor, embed, generate,
                 factors: list[tuple[str, int]], limit: int = MAX_SWEEP_CLASSES) -> dict[str, Tensor]:
    """Per labeled factor k, ``sweep_<name>``: row i is the content image ``x[i]``,
    then ``generate(u[i], embed(labels[i] with factor k set to c))`` for every
    class c of factor k (:func:`sweep_classes`) in class order; the other factors
    keep image i's own labels, so the cell of image i's own class is its
    reconstruction.

    x: (r, C, H, W); u: (r, m_u) or None; labels: (r, K) int64 of the labeled
    factors; ``embed(labels (B, K)) -> [(B, m_k)]`` code means; ``generate(u,
    codes) -> (B, C, H, W)``; factors: ``[(name, classes)]`` in label-column
    order. Each factor's cells are generated in one batch."""
    r = x.shape[0]
    out = {}
    for k, (name, classes) in enumerate(factors):
        shown = sweep_classes(classes, limit).to(labels.device)
        c = shown.numel()
        swept = labels.repeat_interleave(c, dim=0).clone()
        swept[:, k] = shown.repeat(r)
        cells = generate(None if u is None else u.repeat_interleave(c, dim=0), embed(swept))
        images = torch.cat([torch.cat([x[i:i + 1].to(cells.device), cells[i * c:(i + 1) * c]])
                            for i in range(r)])
        out[f"sweep_{name}"] = to_uint8(make_grid(images.detach().float().cpu(), nrow=c + 1,
                                                  padding=2, pad_value=1.0, normalize=False))
    return out


def to_hwc(grid: Tensor) -> np.ndarray:
    """A uint8 (C, H, W) tensor as the (H, W, C) array image libraries take
    (PIL, MLflow's ``log_image``); (H, W) for one channel."""
    array = grid.detach().cpu().permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[2] == 1 else array


def save_png(grid: Tensor, path: str | Path) -> Path:
    """Write a uint8 (C, H, W) grid as PNG, atomically (temp name, then rename)."""
    image = Image.fromarray(to_hwc(grid))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# what an image path's extension asks for: PNG and lossless WebP keep the pixels,
# JPEG (quality 95) does not
IMAGE_FORMATS = {".png": ("PNG", {}), ".jpg": ("JPEG", {"quality": 95}),
                 ".jpeg": ("JPEG", {"quality": 95}), ".webp": ("WEBP", {"lossless": True})}


def image_format(path: str | Path) -> tuple[str, dict]:
    """(PIL format, save options) for ``path``'s extension; ValueError naming the
    path and the extensions that can be written otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        what = f"{suffix!r} images" if suffix else "an image without an extension"
        raise ValueError(f"{path}: cannot write {what}; the extension picks the format, one of "
                         f"{', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def save_image(grid: Tensor, path: str | Path) -> Path:
    """Write a uint8 (C, H, W) grid in the format ``path``'s extension names
    (:data:`IMAGE_FORMATS`), atomically (temp name, then rename)."""
    fmt, options = image_format(path)
    image = Image.fromarray(to_hwc(grid))
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **options))
