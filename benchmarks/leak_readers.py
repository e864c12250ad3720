"""Two readers of the labels in the unknown code: stage 1's own classifier C
and the evaluation's leakage probe, side by side on one trained run.

    python benchmarks/leak_readers.py RUN_DIR [--images N]

RUN_DIR: a run of ``python -m dsu_models.train`` or ``benchmarks/quality.py``
(its ``config.yaml`` and ``stage1/checkpoint.pt``). Per labeled factor and
split (train, val, test; up to ``--images`` seeded images each), prints C's
accuracy on E's sampled code (as in training, nested dropout included) and on
E's means, as the live leakage counts it: ``(accuracy - p) / (1 - p)`` with
``p`` the most frequent class's share. Then the evaluation's probe (a logistic
regression on E's means, fitted on train, scored on test; balanced accuracy
minus chance, ``leak_<k>`` of ``dsu_models.evaluation``).

C was trained on the train split only: if it reads val and test as well as
train, what it reads is in the code of any image, not a memory of the
training images (docs/benchmarks.md, "The default recipe", run R9).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def encode(stage, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """E's means and stds of ``images`` (uint8, N x C x H x W)."""
    with torch.no_grad():
        parts = [stage.encoder(images[i:i + batch].float() / 127.5 - 1)[0]
                 for i in range(0, len(images), batch)]
    return torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])


def read(stage, mu: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, sampled: bool) -> torch.Tensor:
    """C's accuracy per labeled factor (labels: N x K) on the sampled code or on the means."""
    from dsu_models import codes

    with torch.no_grad():
        u, mask = (codes.sample_code(mu, sigma, stage.keep_u, training=True) if sampled
                   else (mu, torch.ones_like(mu)))
        return torch.stack([(log_probs.argmax(1) == labels[:, k]).float().mean()
                            for k, log_probs in enumerate(stage.classifier(None, u, mask))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dsu_models.config import load_resolved
    from dsu_models.data.configured import load_data
    from dsu_models.evaluation import metrics
    from dsu_models.stages import make_stage

    cfg = load_resolved(args.run / "config.yaml")
    if cfg.stage1.cla1_mode != "code" or not cfg.labeled_factors or not cfg.unknown_size:
        parser.error(f"{args.run}: needs a run whose stage-1 C reads the unknown code alone "
                     f"(stage1.cla1_mode: code, labeled factors and an unknown code)")
    train, val, test = load_data(cfg)
    names = [f.name for f in train.factors]
    labeled = [names.index(n) for n in cfg.labeled_factors]
    stage = make_stage("stage1", cfg, [train.factors[j] for j in labeled], {"code_stats": None},
                       torch.device("cpu"))
    stage.load_state_dict(torch.load(args.run / "stage1" / "checkpoint.pt", weights_only=True),
                          restore_random=False)
    stage.encoder.eval()
    stage.classifier.eval()
    chance = stage.chance
    torch.manual_seed(0)
    print(f"leak_readers: {args.run} at stage-1 iteration {stage.iteration}; C's accuracy over "
          f"chance, (acc - p) / (1 - p), p = " + ", ".join(f"{n} {float(p):.3f}" for n, p in
                                                           zip(cfg.labeled_factors, chance)))
    means, labels = {}, {}
    for split, data in (("train", train), ("val", val), ("test", test)):
        if data is None or len(data) == 0:
            continue
        rows = torch.randperm(len(data))[:args.images]
        mu, sigma = encode(stage, data.images[rows])
        means[split], labels[split] = mu, data.labels[rows][:, labeled]
        for sampled in (True, False):
            raw = read(stage, mu, sigma, labels[split], sampled) - chance
            print(f"  C on {split:5s} {'sampled code' if sampled else 'means       '}: "
                  + ", ".join(f"{n} {float(v / (1 - p)):+.3f} (accuracy - p {float(v):+.3f})"
                              for n, v, p in zip(cfg.labeled_factors, raw, chance)))
    probe = metrics.probe_leakage(means["train"], labels["train"], means["test"], labels["test"])
    print("  evaluation's probe (logistic regression on means, train -> test), accuracy - chance: "
          + ", ".join(f"{n} {acc - ch:+.3f}" for n, (acc, ch) in zip(cfg.labeled_factors, probe)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
