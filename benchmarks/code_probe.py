"""What stage 1's unknown code carries: a probe per factor on the distilled codes.

    python benchmarks/code_probe.py RUN_DIR [--train-samples 10000]

RUN_DIR is a single-process run's directory (``benchmarks/quality.py --out``,
``python -m dsu_models train --out``): its ``config.yaml`` and
``stage1/codes.pt`` (E's means for every train and test image). For every
ground-truth factor a small MLP (two hidden layers of 128) learns to read the
factor from the train codes; its test accuracy is printed next to chance.

Read it beside the evaluation's preservation: an unknown factor the code
carries (probe well above chance) but the generator does not keep
(preservation near chance) is lost in drawing, not in encoding; a labeled
factor the probe reads is leakage. The evaluation's own leakage probe is a
linear one on labeled factors only; this one is nonlinear and covers the
unknown factors too.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def probe(train_codes, train_labels, test_codes, test_labels, seed: int = 0) -> list[float]:
    """Per factor (label column): test accuracy of an MLP probe trained on the
    standardised train codes."""
    from sklearn.exceptions import ConvergenceWarning   # lazy: sklearn is slow to import
    from sklearn.neural_network import MLPClassifier

    mean, std = train_codes.double().mean(0), train_codes.double().std(0).clamp_min(1e-8)
    x_train = ((train_codes.double() - mean) / std).numpy()
    x_test = ((test_codes.double() - mean) / std).numpy()
    out = []
    for k in range(train_labels.shape[1]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            mlp = MLPClassifier((128, 128), max_iter=300, random_state=seed)
            mlp.fit(x_train, train_labels[:, k].numpy())
        out.append(float((mlp.predict(x_test) == test_labels[:, k].numpy()).mean()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--train-samples", type=int, default=10000,
                        help="train codes the probes learn from (default 10000)")
    args = parser.parse_args(argv)

    import torch

    from dsu_models.config import load_resolved
    from dsu_models.distill import load_codes
    from dsu_models.factory import load_data

    run_dir = Path(args.run_dir)
    for needed in (run_dir / "config.yaml", run_dir / "stage1" / "codes.pt"):
        if not needed.exists():
            parser.error(f"{needed}: not found (RUN_DIR must hold a finished stage 1 and its distilled codes)")
    if args.train_samples < 1:
        parser.error(f"--train-samples {args.train_samples}: must be at least 1")
    cfg = load_resolved(run_dir / "config.yaml")
    train, test = load_data(cfg)
    codes = load_codes(run_dir / "stage1" / "codes.pt")["codes"]

    def rows(data, part):
        """The codes' rows in the data's order (codes are stored with their ids)."""
        where = {int(i): n for n, i in enumerate(part["ids"])}
        missing = [int(i) for i in data.ids if int(i) not in where]
        if missing:
            parser.error(f"{run_dir / 'stage1' / 'codes.pt'}: no code for sample id {missing[0]} "
                         f"({len(missing)} missing): the codes belong to other data")
        return part["mu"][torch.tensor([where[int(i)] for i in data.ids])]

    n = min(args.train_samples, len(train))
    accuracy = probe(rows(train, codes["train"])[:n], train.labels[:n], rows(test, codes["test"]), test.labels)
    print(f"code probe: {run_dir}, unknown code size {cfg.unknown_size}, {n} train / {len(test)} test codes")
    for info, acc in zip(train.factors, accuracy):
        role = "labeled" if info.name in cfg.labeled_factors else "unknown"
        print(f"  {info.name:16s} {role:8s} probe {acc:.3f}  chance {1 / info.classes:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
