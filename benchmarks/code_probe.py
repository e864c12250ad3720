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

    from dsu_models.evaluation.metrics import standardised

    x_train, x_test = standardised(train_codes, test_codes)
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

    from dsu_models.config import load_resolved
    from dsu_models.data.configured import load_data
    from pipelines.data.stage_inputs import lookup_codes
    from pipelines.sweeps.reused_stages import from_runner

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").exists():
        parser.error(f"{run_dir / 'config.yaml'}: not found (RUN_DIR must hold a finished stage 1 and its "
                     "distilled codes)")
    if args.train_samples < 1:
        parser.error(f"--train-samples {args.train_samples}: must be at least 1")
    cfg = load_resolved(run_dir / "config.yaml")
    try:   # the runner's codes as a stage-2 sweep reads them (sorted by id)
        codes = from_runner(run_dir)["codes"]
    except ValueError as e:
        parser.error(str(e))
    if codes is None:
        parser.error(f"{run_dir}: the config has no unknown code to probe")
    train, val, test = load_data(cfg)
    try:   # joined to the data's rows by id
        train_mu, _ = lookup_codes(codes["train"], train.ids)
        test_mu, _ = lookup_codes(codes["test"], test.ids)
    except KeyError as e:
        parser.error(f"{run_dir}: {e.args[0]}")

    n = min(args.train_samples, len(train))
    accuracy = probe(train_mu[:n], train.labels[:n], test_mu, test.labels)
    print(f"code probe: {run_dir}, unknown code size {cfg.unknown_size}, {n} train / {len(test)} test codes")
    for info, acc in zip(train.factors, accuracy):
        role = "labeled" if info.name in cfg.labeled_factors else "unknown"
        print(f"  {info.name:16s} {role:8s} probe {acc:.3f}  chance {1 / info.classes:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
