"""Where swaps lose the unknown factors: preservation by how far the labels moved.

    python benchmarks/swap_errors.py MODEL_DIR [--pairs 2000] [--seed 0] [--cache DIR]

The evaluation's preservation figure says how often a swap G(E(a), labels of
b) keeps a's unknown factors, read by the oracles; this says *when* it fails.
First, how often the reconstructions G(E(a), labels of a) keep them: what the
code carries and G draws before any label moves. Then, for each labeled factor
and each signed step between the two images' classes (``b - a`` in class ids;
for an ordered factor such as scale, how far and which way the label moved),
the share of swaps that keep each unknown factor and its mean signed error
(read minus true class id; circular factors, ``init: circle``, wrapped to the
nearest turn). Last, per unknown factor, the histogram of signed errors and
its **drift**: the least-squares slope of the error on each labeled factor's
step. A drift near zero with errors on both sides is noise; a drift of a third
of a class per step means the unknown code holds a position that moves with
the label (an edge of the sprite rather than its centre), which swaps reveal.

MODEL_DIR: a saved model bundle (``quality.py`` prints its path: OUT/model),
whose config names the dataset; the oracles come from ``--cache`` (trained
once per dataset, as ``quality.py`` does). Pairs are drawn from the test split.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor


def signed_errors(read: Tensor, truth: Tensor, classes: list[int], circular: list[bool]) -> Tensor:
    """(P, H) read - true class ids; circular factors wrapped into [-C/2, C/2)."""
    err = read.long() - truth.long()
    for h, (c, wrap) in enumerate(zip(classes, circular)):
        if wrap:
            err[:, h] = (err[:, h] + c // 2) % c - c // 2
    return err


def drift(errors: Tensor, steps: Tensor) -> float:
    """Least-squares slope of ``errors`` (P,) on ``steps`` (P,), with an intercept."""
    s = steps.double() - steps.double().mean()
    var = (s * s).sum()
    return float((s * (errors.double() - errors.double().mean())).sum() / var) if var > 0 else 0.0


def breakdown(errors: Tensor, steps: Tensor) -> list[tuple[int, int, list[float], list[float]]]:
    """Per distinct step of one labeled factor: (step, pairs, kept share per
    unknown factor, mean signed error per unknown factor)."""
    rows = []
    for step in torch.unique(steps).tolist():
        m = steps == step
        e = errors[m].double()
        rows.append((int(step), int(m.sum()), (e == 0).double().mean(0).tolist(), e.mean(0).tolist()))
    return rows


def report(errors: Tensor, steps: Tensor, hidden: list[str], labeled: list[str], log=print) -> dict:
    """Print the tables; returns ``{"kept": {h: share}, "drift": {(h, k): slope}}``."""
    kept = {h: float((errors[:, j] == 0).double().mean()) for j, h in enumerate(hidden)}
    drifts = {(h, k): drift(errors[:, j], steps[:, i])
              for j, h in enumerate(hidden) for i, k in enumerate(labeled)}
    log(f"{len(errors)} swaps; kept overall: " + ", ".join(f"{h} {v:.3f}" for h, v in kept.items()))
    for i, k in enumerate(labeled):
        log(f"\nby {k} step (b - a): pairs | kept per unknown factor | mean signed error")
        for step, n, share, mean in breakdown(errors, steps[:, i]):
            log(f"  {step:+3d}  {n:5d} | " + "  ".join(f"{h} {s:.3f}" for h, s in zip(hidden, share))
                + " | " + "  ".join(f"{h} {e:+.2f}" for h, e in zip(hidden, mean)))
    log("\nsigned error histogram (-3 or less ... +3 or more) and drift in classes per label step:")
    for j, h in enumerate(hidden):
        counts = torch.bincount(errors[:, j].clamp(-3, 3) + 3, minlength=7).tolist()
        log(f"  {h:12s} {counts}  drift " + ", ".join(f"{k} {drifts[(h, k)]:+.3f}" for k in labeled))
    return {"kept": kept, "drift": drifts}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--pairs", type=int, default=2000, help="swap pairs from the test split (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(Path.home() / ".disunknown" / "oracles"),
                        help="where the oracles are cached (default ~/.disunknown/oracles)")
    args = parser.parse_args(argv)
    if args.pairs < 2:
        parser.error(f"--pairs {args.pairs}: must be at least 2")

    from dsu_models.evaluation import load_or_train_oracles, model_columns
    from dsu_models.data.configured import load_data
    from dsu_models.inference import DisUnknownModel, ModelLoadError

    try:
        model = DisUnknownModel.load(args.model_dir, device="cpu")
    except ModelLoadError as e:
        parser.error(str(e))
    cfg = model.config
    train, val, test = load_data(cfg)
    lab_cols, hid_cols = model_columns(model, test)   # the evaluation's columns
    hidden = [test.factors[c].name for c in hid_cols]
    if not hidden or not lab_cols:
        parser.error(f"{args.model_dir}: needs labeled and unknown factors (labeled "
                     f"{model.labeled_factors}, unknown {hidden})")
    oracles = load_or_train_oracles(train, test, cfg.evaluate, args.cache, torch.device("cpu"))

    g = torch.Generator().manual_seed(args.seed)
    a = torch.randint(len(test), (args.pairs,), generator=g)
    b = torch.randint(len(test), (args.pairs,), generator=g)
    read, own = [], []   # the swaps, and the reconstructions with a's own labels
    for start in range(0, args.pairs, cfg.evaluate.batch_size):
        s = slice(start, start + cfg.evaluate.batch_size)
        u = model.encode_unknown(test.images[a[s]])   # E once for both drawings
        for rows, out in ((b[s], read), (a[s], own)):
            drawn = model.generate(u, model.embed_labels(test.labels[rows][:, lab_cols]))
            out.append(oracles.predict(drawn.cpu()))
    read, own = torch.cat(read), torch.cat(own)
    classes = [test.factors[c].classes for c in hid_cols]
    circular = [cfg.factors[n].init == "circle" if n in cfg.factors else False for n in hidden]
    errors = signed_errors(read[:, hid_cols], test.labels[a][:, hid_cols], classes, circular)
    steps = test.labels[b][:, lab_cols] - test.labels[a][:, lab_cols]
    print(f"swap errors: {args.model_dir} ({cfg.dataset}, labeled {model.labeled_factors}, unknown {hidden})")
    recon = {h: float((own[:, c] == test.labels[a][:, c]).double().mean()) for h, c in zip(hidden, hid_cols)}
    print("reconstructions (a's own labels) keep: " + ", ".join(f"{h} {v:.3f}" for h, v in recon.items())
          + "  (what E's code carries and G draws, before any swap)")
    return {**report(errors, steps, hidden, model.labeled_factors), "reconstruction_kept": recon}


if __name__ == "__main__":
    main()
