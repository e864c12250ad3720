"""``benchmarks/swap_errors.py``: when swaps lose the unknown factors."""
from __future__ import annotations

import pytest
import torch

from tests.tiny import load_benchmark
from tiny_model import shared_tiny

swap_errors = load_benchmark("swap_errors")


def test_circular_errors_wrap_to_the_nearest_turn():
    read = torch.tensor([[11, 11], [1, 1], [6, 6]])
    truth = torch.zeros(3, 2, dtype=torch.long)
    err = swap_errors.signed_errors(read, truth, classes=[12, 12], circular=[True, False])
    assert err[:, 0].tolist() == [-1, 1, -6]
    assert err[:, 1].tolist() == [11, 1, 6]


def test_drift_finds_a_position_that_moves_with_the_label():
    """y read a third of a class off per label step (an edge, not the centre),
    x off at random: the drift names y and not x, and steps of 0 keep both."""
    g = torch.Generator().manual_seed(0)
    steps = torch.randint(-5, 6, (3000, 1), generator=g)
    x_err = torch.where(steps[:, 0] == 0, 0, torch.randint(-1, 2, (3000,), generator=g))
    y_err = torch.round(steps[:, 0] / 3).long()
    errors = torch.stack([x_err, y_err], 1)
    lines = []
    out = swap_errors.report(errors, steps, ["x", "y"], ["scale"], log=lines.append)
    assert out["drift"][("y", "scale")] == pytest.approx(1 / 3, abs=0.05)
    assert abs(out["drift"][("x", "scale")]) < 0.05
    rows = {step: share for step, _, share, _ in swap_errors.breakdown(errors, steps[:, 0])}
    assert rows[0] == [1.0, 1.0]
    assert rows[5][1] == 0.0 and rows[1][1] == 1.0     # round(5/3) = 2 off; round(1/3) = 0
    assert any(line.lstrip().startswith("y ") and "drift scale +0.3" in line for line in lines)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


def test_model_directory_reports_every_unknown_factor(tiny, tmp_path, capsys):
    """A real (tiny) model bundle: one kept share per unknown factor, a drift per
    (unknown, labeled) pair, and a table per labeled factor."""
    cfg = tiny["config"]
    out = swap_errors.main([str(tiny["bundle_dir"]), "--pairs", "40", "--cache", str(tmp_path / "oracles")])
    assert sorted(out["kept"]) == sorted(cfg.hidden()) == sorted(out["reconstruction_kept"])
    assert all(0.0 <= v <= 1.0 for v in out["reconstruction_kept"].values())
    assert all(0.0 <= v <= 1.0 for v in out["kept"].values())
    assert sorted(out["drift"]) == sorted((h, k) for h in cfg.hidden() for k in cfg.labeled_factors)
    printed = capsys.readouterr().out
    assert "40 swaps" in printed
    for k in cfg.labeled_factors:
        assert f"by {k} step" in printed


def test_missing_model_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        swap_errors.main([str(tmp_path / "nowhere")])
    assert "nowhere" in capsys.readouterr().err
