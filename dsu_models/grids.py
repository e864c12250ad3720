"""Sample grids (METHOD.md section 11): reconstruction rows and swap matrices.

All inputs are float images in [-1, 1]; outputs are uint8 ``(3 or 1, H, W)``
grids ready to save as PNG or log as an image.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from dsu_models.data.base import to_uint8


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


def save_png(grid: Tensor, path: str | Path) -> Path:
    """Write a uint8 (C, H, W) grid as PNG, atomically (temp name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
