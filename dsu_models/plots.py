"""Pictures for users: unknown-code scatter plots, label-embedding plots,
captioned class sweeps, and the set an evaluation logs (docs/method.md sections 4, 7
and 11: what the distilled unknown holds, how each factor's classes sit in their
code space, and whether swaps work).

Every function returns a uint8 ``(3, H, W)`` CHW tensor (or a dict of them), the
same form as :mod:`dsu_models.grids`, ready for ``grids.save_png`` or, after
``grids.to_hwc``, MLflow's ``log_image``.

Figures are drawn with ``matplotlib.figure.Figure`` on a ``FigureCanvasAgg``:
no pyplot, no backend selection, no rcParams changes, so nothing global is
touched and the figure is freed with its last reference. Nothing here draws
from the global random generators (point order and 1-d jitter use a private,
seeded NumPy generator), so taking pictures never changes a training run.
"""
from __future__ import annotations

import textwrap

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, Ellipse
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from dsu_models import grids
from dsu_models.data.base import FactorInfo, InMemoryDataset, to_float

SCATTER_POINTS = 512    # test images behind a code scatter plot
SWEEP_ROWS = 4          # content images per class sweep
LEGEND_CLASSES = 20     # up to this many classes get a legend, more a colorbar
FONT = 7


def due(iteration: int, interval: int, done: bool) -> bool:
    """Whether pictures with this interval are due after ``iteration``: every
    ``interval`` iterations and at the end of the stage; ``interval <= 0`` turns
    them off."""
    return interval > 0 and (done or iteration % interval == 0)


def scatter_subset(data: InMemoryDataset, n: int = SCATTER_POINTS, seed: int = 0) -> InMemoryDataset:
    """A fixed, seeded subset of up to ``n`` rows (private generator)."""
    g = torch.Generator().manual_seed(seed)
    return data.subset(torch.randperm(len(data), generator=g)[:n].sort().values)


# ------------------------------------------------------------------ figures


def new_figure(width: float = 5.0, height: float = 3.8, dpi: int = 100) -> Figure:
    """A figure with its own Agg canvas (no pyplot)."""
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_pixels(fig: Figure) -> Tensor:
    """Draw ``fig`` -> uint8 (3, H, W)."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return torch.from_numpy(np.ascontiguousarray(rgba[..., :3])).permute(2, 0, 1).contiguous()


def class_colors(classes: int) -> np.ndarray:
    """(classes, 4) RGBA: tab10 / tab20 for up to 20 classes, else viridis."""
    if classes <= 10:
        return colormaps["tab10"](np.arange(classes))
    if classes <= LEGEND_CLASSES:
        return colormaps["tab20"](np.arange(classes))
    return colormaps["viridis"](np.linspace(0.0, 1.0, classes))


def _class_key(ax, fig: Figure, factor: FactorInfo, colors: np.ndarray):
    """Legend with class names (few classes) or a colorbar labelled with some."""
    names = factor.names()
    if factor.classes <= LEGEND_CLASSES:
        handles = [Line2D([], [], marker="o", linestyle="", color=colors[c], markersize=4, label=names[c])
                   for c in range(factor.classes)]
        ax.legend(handles=handles, title=factor.name, fontsize=FONT - 1, title_fontsize=FONT,
                  loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                  ncols=1 if factor.classes <= 12 else 2)
        return
    cmap = ListedColormap(colors)
    norm = BoundaryNorm(np.arange(factor.classes + 1) - 0.5, factor.classes)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax)
    ticks = np.unique(np.linspace(0, factor.classes - 1, 8).round().astype(int))
    bar.set_ticks(ticks, labels=[names[t] for t in ticks], fontsize=FONT - 1)
    bar.set_label(factor.name, fontsize=FONT)


def _style(ax, title: str, xlabel: str, ylabel: str):
    # A figure title, wrapped: an axes title is centred on the axes and gets
    # clipped when it is wider than they are (legends sit beside them).
    ax.figure.suptitle(textwrap.fill(title, 80), fontsize=FONT + 1)
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.tick_params(labelsize=FONT - 1)


# ------------------------------------------------------------------ code scatter


def project_2d(codes: Tensor) -> tuple[np.ndarray, tuple[str, str]]:
    """codes (N, m), m >= 1 -> (N, 2) float64 points and axis labels: the first
    two principal components (sign fixed so each component's largest loading is
    positive); for m = 1 the code against a small fixed jitter."""
    x = codes.detach().double().cpu().numpy()
    n, m = x.shape
    if m == 0 or n == 0:
        raise ValueError(f"project_2d: need at least one point and one dimension, got {(n, m)}")
    if m == 1:
        jitter = np.random.default_rng(0).uniform(-1.0, 1.0, n)
        return np.stack([x[:, 0], jitter], 1), ("dim 0", "jitter")
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:2] * np.sign(vt[:2][np.arange(2), np.abs(vt[:2]).argmax(1)])[:, None]
    share = s[:2] ** 2 / max(float((s ** 2).sum()), 1e-12)
    return centred @ vt.T, (f"PC1 ({share[0]:.0%} var)", f"PC2 ({share[1]:.0%} var)")


def code_scatter(codes: Tensor, labels: Tensor, factor: FactorInfo, title: str | None = None) -> Tensor:
    """Unknown codes in their first two principal components, coloured by
    ``factor``. codes: (N, m) code means, m >= 1; labels: (N,) class ids of
    ``factor`` (-1: not labeled, drawn grey). Points are drawn in a fixed
    shuffled order so no class hides the others."""
    if labels.shape != (codes.shape[0],):
        raise ValueError(f"code_scatter: labels {tuple(labels.shape)} for {codes.shape[0]} codes")
    points, (xlabel, ylabel) = project_2d(codes)
    y = labels.cpu().numpy()
    order = np.random.default_rng(0).permutation(len(y))
    unlabeled = order[y[order] < 0]       # an evaluation-only factor labeled on a few images
    order = order[y[order] >= 0]
    colors = class_colors(factor.classes)
    fig = new_figure()
    ax = fig.add_subplot()
    if len(unlabeled):
        ax.scatter(points[unlabeled, 0], points[unlabeled, 1], c="lightgrey", s=4, alpha=0.5, linewidths=0)
    ax.scatter(points[order, 0], points[order, 1], c=colors[y[order]], s=6, alpha=0.8, linewidths=0)
    _style(ax, title or f"unknown code, coloured by {factor.name}", xlabel, ylabel)
    _class_key(ax, fig, factor, colors)
    return figure_pixels(fig)


def code_scatters(codes: Tensor, labels: Tensor, factors: list[FactorInfo],
                  labeled: list[str] = (), title: str = "unknown code") -> dict[str, Tensor]:
    """``codes_<factor>`` for every factor: codes (N, m) with m >= 1, labels
    (N, F) column j = factors[j]. A labeled factor's title says it should look
    mixed (the unknown must not hold it); a hidden one's that it may separate."""
    out = {}
    for j, factor in enumerate(factors):
        role = "labeled: should look mixed" if factor.name in labeled else "hidden: lives in the unknown"
        out[f"codes_{factor.name}"] = code_scatter(
            codes, labels[:, j], factor, f"{title} by {factor.name} ({role})")
    return out


# ------------------------------------------------------------------ label embeddings


def embedding_plot(mean: Tensor, std: Tensor, factor: FactorInfo, prefix: str = "",
                   points: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """One factor's class codes: mean, std (n, m) from ``LabelEmbedder.normalized()``.

    m >= 2: dims 0 and 1 (the first, most kept dims under nested dropout), a
    1-std ellipse per class, class names at the means, the prior's unit circle
    dashed. m = 1: one line per class, mean +- 1 std on the code axis.
    points: optional ``(codes (N, m), labels (N,))`` drawn underneath in class
    colours (e.g. what the labeled encoder reads from test images). prefix:
    put before the title (e.g. the stage and iteration)."""
    mean = mean.detach().double().cpu().numpy()
    std = std.detach().double().cpu().numpy()
    n, m = mean.shape
    if m == 0:
        raise ValueError(f"embedding_plot: factor {factor.name!r} has a code of size 0")
    colors, names = class_colors(n), factor.names()
    fig = new_figure(4.6, 4.0 if m >= 2 else max(2.4, 0.5 + 0.13 * n))
    ax = fig.add_subplot()
    annotate = set(np.unique(np.linspace(0, n - 1, min(n, 40)).round().astype(int)).tolist())
    if points is not None:
        p, y = points[0].detach().double().cpu().numpy(), points[1].cpu().numpy()
        py = p[:, 1] if m >= 2 else y + np.random.default_rng(0).uniform(-0.3, 0.3, len(y))
        ax.scatter(p[:, 0], py, c=colors[y], s=4, alpha=0.35, linewidths=0)
    if m >= 2:
        for c in range(n):
            ax.add_patch(Ellipse((mean[c, 0], mean[c, 1]), 2 * std[c, 0], 2 * std[c, 1],
                                 facecolor=colors[c], alpha=0.25, edgecolor=colors[c]))
            if c in annotate:
                ax.annotate(names[c], (mean[c, 0], mean[c, 1]), xytext=(3, 3), textcoords="offset points",
                            fontsize=FONT - 1)
        ax.scatter(mean[:, 0], mean[:, 1], c=colors, s=10, zorder=3)
        ax.add_patch(Circle((0, 0), 1.0, fill=False, linestyle="--", edgecolor="0.6"))
        lo = min((mean[:, :2] - std[:, :2]).min(), -1.0)
        hi = max((mean[:, :2] + std[:, :2]).max(), 1.0)
        pad = 0.05 * (hi - lo)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        _style(ax, f"{prefix}{factor.name}: class codes (dims 0-1 of {m}, 1 std)", "dim 0", "dim 1")
    else:
        ax.errorbar(mean[:, 0], np.arange(n), xerr=std[:, 0], fmt="none", ecolor=colors, elinewidth=2)
        ax.scatter(mean[:, 0], np.arange(n), c=colors, s=12, zorder=3)
        ticks = sorted(annotate)
        ax.set_yticks(ticks, labels=[names[t] for t in ticks])
        ax.invert_yaxis()
        _style(ax, f"{prefix}{factor.name}: class codes (1 dim, mean +- 1 std)", "dim 0", "class")
    return figure_pixels(fig)


def embedding_plots(embedders, factors: list[FactorInfo], prefix: str = "",
                    points: list[tuple[Tensor, Tensor]] | None = None,
                    key: str = "embedding") -> dict[str, Tensor]:
    """``<key>_<factor>`` per labeled factor with a code of size >= 1.
    embedders: LabelEmbedders (anything with ``normalized() -> (mean, std)``) in
    the order of ``factors``; points: optional per-factor overlays (see
    :func:`embedding_plot`)."""
    out = {}
    for k, (emb, factor) in enumerate(zip(embedders, factors)):
        with torch.no_grad():
            mean, std = emb.normalized()
        if mean.shape[1] == 0:
            continue
        out[f"{key}_{factor.name}"] = embedding_plot(
            mean, std, factor, prefix, points[k] if points is not None else None)
    return out


# ------------------------------------------------------------------ class sweeps


def caption(grid: Tensor, text: str) -> Tensor:
    """A uint8 (C, H, W) grid with ``text`` wrapped in a white strip above it
    (4 lines at most; a narrow grid gets a white margin on the right so the text fits)."""
    image = Image.fromarray(grids.to_hwc(grid))
    font = ImageFont.load_default()
    width = max(image.width, 240)
    chars = max(12, int(width / max(font.getlength("x"), 1.0)))
    lines = textwrap.wrap(text, chars, max_lines=4, placeholder=" ...")
    line_h = font.getbbox("Ag")[3] + 2
    out = Image.new(image.mode, (width, image.height + line_h * len(lines) + 4), "white")
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((2, 2 + i * line_h), line, fill="black", font=font)
    out.paste(image, (0, line_h * len(lines) + 4))
    array = np.array(out)  # a writable copy
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def class_sweep_pictures(x: Tensor, u: Tensor | None, labels: Tensor, embed, generate,
                         factors: list[FactorInfo]) -> dict[str, Tensor]:
    """:func:`grids.class_sweeps` with a caption naming the factor and its columns.
    x: (r, C, H, W) content images in [-1, 1]; u: (r, m_u) or None; labels: (r, K)."""
    sweeps = grids.class_sweeps(x, u, labels, embed, generate, [(f.name, f.classes) for f in factors])
    out = {}
    for f in factors:
        shown = grids.sweep_classes(f.classes).tolist()
        names = ", ".join(f.names()[c] for c in shown)
        subset = "" if len(shown) == f.classes else f" ({len(shown)} of {f.classes})"
        out[f"sweep_{f.name}"] = caption(
            sweeps[f"sweep_{f.name}"], f"{f.name}: left, the content image; then classes{subset} {names}")
    return out


# ------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluation_pictures(model, test: InMemoryDataset, n: int = 8, seed: int = 0,
                        scatter_points: int = SCATTER_POINTS) -> dict[str, Tensor]:
    """The pictures an evaluation logs, from a model with the DisUnknownModel
    interface (duck typed: ``encode_unknown``, ``embed_labels``, ``generate``,
    ``labeled_factors``, ``factors``, ``embedders``):

    - ``reconstruction``: rows real / generated from the image's own codes;
    - ``swap``: ``n`` seeded test images as content (rows) x ``n`` others as
      label sources (columns);
    - ``sweep_<factor>``: every class of each labeled factor over the first
      :data:`SWEEP_ROWS` content images;
    - ``codes_<factor>``: the unknown code of up to ``scatter_points`` test
      images coloured by every ground-truth factor (when the unknown is not empty);
    - ``embedding_<factor>``: the label embedders' class codes (when the model has them).

    test: labels for every ground-truth factor; images are chosen with a private
    generator seeded by ``seed``."""
    if len(test) == 0:
        raise ValueError("evaluation_pictures: the test set is empty")
    n = min(n, len(test))
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
    content = order[:n]
    source = order[n:2 * n] if len(order) >= 2 * n else content.roll(1)
    columns = [test.factor_index(name) for name in model.labeled_factors]
    x, x_src = to_float(test.images[content]), to_float(test.images[source])
    y, y_src = test.labels[content][:, columns], test.labels[source][:, columns]
    u = model.encode_unknown(test.images[content])

    out = {"reconstruction": grids.rows_grid([x, model.generate(u, model.embed_labels(y))])}
    if columns:
        rows, cols = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
        cells = model.generate(u[rows], [c[cols] for c in model.embed_labels(y_src)])
        out["swap"] = grids.swap_matrix(x, x_src, cells.reshape(n, n, *x.shape[1:]))
        r = min(SWEEP_ROWS, n)
        out.update(class_sweep_pictures(x[:r], u[:r], y[:r], model.embed_labels, model.generate,
                                        list(model.factors)))
    if u is not None and u.shape[1] > 0:
        subset = scatter_subset(test, scatter_points, seed)
        out.update(code_scatters(model.encode_unknown(subset.images), subset.labels, subset.factors,
                                 list(model.labeled_factors)))
    if model.embedders is not None:
        out.update(embedding_plots(model.embedders, list(model.factors)))
    return out


def confusion_picture(counts: Tensor, factor: FactorInfo) -> Tensor:
    """A swap confusion matrix: ``counts`` (n, n), class asked for (rows) against the class
    the oracle read from the swap (columns), each row as shares of its swaps; the
    diagonal is a working swap. Class names label the axes up to :data:`LEGEND_CLASSES`."""
    counts = counts.double()
    shares = (counts / counts.sum(1, keepdim=True).clamp_min(1)).numpy()
    n = factor.classes
    side = min(7.0, 2.4 + 0.18 * n)
    fig = new_figure(side + 0.8, side)
    ax = fig.add_subplot()
    shown = ax.imshow(shares, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="share of the row's swaps")
    acc = float(counts.diagonal().sum() / counts.sum().clamp_min(1))
    _style(ax, f"swaps of {factor.name}: {acc:.3f} read as asked", "class read", "class asked for")
    if n <= LEGEND_CLASSES:
        names = [textwrap.shorten(str(c), 12, placeholder="..") for c in factor.names()]
        ax.set_xticks(range(n), names, rotation=90, fontsize=FONT)
        ax.set_yticks(range(n), names, fontsize=FONT)
    return figure_pixels(fig)


def worst_consistency_picture(worst) -> Tensor:
    """The round trips that ended farthest from their content (``dsu_models.evaluation.consistency.Worst``),
    one row each: the content image, its swap, the swap sent back to the content's
    labels, and a decoy's round trip (another image through the same swaps)."""
    if not len(worst.distance):
        raise ValueError("worst_consistency_picture: no examples")
    columns = [to_float(worst.content), to_float(worst.swap), to_float(worst.back), to_float(worst.decoy_back)]
    grid = grids.rows_grid([torch.stack(row) for row in zip(*columns)])
    distances = ", ".join(f"{s:.3f}" for s in worst.distance.tolist())
    return caption(grid, "round trips that ended farthest from their content, one row each: content, swap, "
                         f"swapped back, a decoy swapped back (mean squared distance: {distances})")
