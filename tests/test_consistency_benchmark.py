"""``benchmarks/consistency_honesty.py``: content_consistency beside the oracles' preservation."""
from __future__ import annotations

import re

import pytest

from tests.tiny import load_benchmark

honesty = load_benchmark("consistency_honesty")


def test_spearman_known_answers():
    assert honesty.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert honesty.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert honesty.spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(0.866, abs=1e-3)   # a tie: mean ranks


@pytest.mark.slow
def test_the_table_ranks_degenerate_models_low(tmp_path, capsys):
    """A real (tiny) run: a row per model, the copier at 1 and the models that ignore the
    content at 0 on content_consistency, and the rank correlation line."""
    assert honesty.main(["--dataset", "shapes3d", "--config", "tiny", "--scale", "1",
                         "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "oracles"), "--threads", "1",
                         "num_samples=1000", "evaluate.pairs=100", "evaluate.oracle_samples=400",
                         "evaluate.oracle_epochs=1", "evaluate.oracle_width=8", "evaluate.field_samples=0"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): [float(v) for v in m.group(2).split()]
            for m in re.finditer(r"^  (\S+)\s+((?:[-\d.]+\s+){4}[-\d.]+)$", out, re.M)}
    assert {"untrained", "final", "shrunk", "prototype", "constant", "copy"} <= set(rows), out
    assert any(name.startswith("stage1@") for name in rows)
    assert rows["copy"][1] == 1.0
    for name in ("untrained", "prototype", "constant"):
        assert rows[name][1] < 0.05, (name, rows[name])
    assert re.search(r"Spearman\(preserve_mean, content_consistency\) -?[\d.]+", out)
