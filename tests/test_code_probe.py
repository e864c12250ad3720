"""``benchmarks/code_probe.py``: what the distilled unknown code carries, per factor."""
from __future__ import annotations

import pytest
import torch

from tests.tiny import load_benchmark

code_probe = load_benchmark("code_probe")


def test_probe_reads_what_the_code_carries_and_not_what_it_lacks():
    """One factor written into the code on a circle (as an orientation would be),
    one absent from it: the probe reads the first and stays near chance on the second."""
    g = torch.Generator().manual_seed(0)
    n = 2400
    labels = torch.stack([torch.randint(0, 12, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)], 1)
    angle = labels[:, 0].double() * (2 * torch.pi / 12)
    codes = torch.stack([angle.cos(), angle.sin(), torch.randn(n, generator=g, dtype=torch.float64)], 1)
    codes[:, :2] += 0.02 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    carried, absent = code_probe.probe(codes[:2000].float(), labels[:2000], codes[2000:].float(), labels[2000:])
    assert carried > 0.95
    assert absent < 0.4     # chance .25: four classes, none of them in the code


def test_run_directory_probe_names_every_factor(tmp_path, capsys):
    """A real (tiny) stage 1 and its distilled codes: one line per factor, with its role."""
    from dsu_models.config import load_config
    from dsu_models.train import run

    cfg = load_config("tiny", ["device=cpu"])
    run(cfg, tmp_path / "run", log=lambda line: None, stages=["stage1"])
    assert code_probe.main([str(tmp_path / "run"), "--train-samples", "300"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert sorted(lines) == sorted(cfg.labeled_factors + cfg.hidden())
    for name, (_, role, _, accuracy, _, chance) in lines.items():
        assert role == ("labeled" if name in cfg.labeled_factors else "unknown")
        assert 0.0 <= float(accuracy) <= 1.0 and 0.0 < float(chance) < 1.0

    # codes of other images (ids shifted past the data's) are refused, naming an id
    from dsu_models.distill import load_codes
    from dsu_models.files import save_torch

    path = tmp_path / "run" / "stage1" / "codes.pt"
    distilled = load_codes(path)
    for part in distilled["codes"].values():
        part["ids"] = part["ids"] + 10**6
    save_torch(distilled, path)
    with pytest.raises(SystemExit):
        code_probe.main([str(tmp_path / "run")])
    assert "no distilled unknown code for image id" in capsys.readouterr().err


def test_directory_without_codes_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        code_probe.main([str(tmp_path)])
    assert "config.yaml: not found" in capsys.readouterr().err
