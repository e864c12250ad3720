"""``benchmarks/recon_probe.py``: stage 1's E and G as an autoencoder, read by the oracles."""
from __future__ import annotations

import re

import pytest
import torch

from tests.tiny import load_benchmark

recon_probe = load_benchmark("recon_probe")

SMALL_EVAL = ["device=cpu", "evaluate.oracle_epochs=1", "evaluate.oracle_width=8"]


@pytest.mark.parametrize("code, extra", [
    ("ae", []), ("stage1", []),
    ("stage1", ["--code-ramp", "3", "stage1.ubatch_ramp=[1, 3]"]),   # the ramps' paths
    ("stage", []),                                                   # the Stage1 class itself
], ids=["ae", "stage1", "stage1-ramped", "stage"])
def test_reports_what_the_oracles_read_back_at_each_interval(code, extra, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSU_HOME", str(tmp_path))
    assert recon_probe.main(["--config", "tiny", "--dataset", "shapes3d", "--code", code,
                             "--iterations", "5", "--every", "2", "--test-images", "60",
                             "--cache", str(tmp_path / "oracles"),
                             "--threads", str(torch.get_num_threads()), *SMALL_EVAL, *extra]) == 0
    out = capsys.readouterr().out
    assert f"code {code}" in out
    reports = [line for line in out.splitlines() if " | kept " in line]
    # every 2 iterations, and the last one
    assert [int(line.split("|")[0]) for line in reports] == [2, 4, 5]
    for line in reports:
        kept = dict(re.findall(r"(\w+) ([01]\.\d{3})", line.split("kept")[1]))
        assert set(kept) == {"floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"}
        assert all(0.0 <= float(v) <= 1.0 for v in kept.values())
    assert ("ucode_weight" in out) == (code in ("stage1", "stage"))
    assert ("labeled ['floor_hue'" in out) == (code == "stage")


def test_bad_counts_are_refused(capsys):
    with pytest.raises(SystemExit):
        recon_probe.main(["--code", "ae", "--every", "0"])
    assert "--every must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recon_probe.main(["--code", "ae", "--code-ramp", "-1"])
    assert "--code-ramp >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recon_probe.main(["--code", "stage", "--code-ramp", "5"])
    assert "not with --code stage" in capsys.readouterr().err
