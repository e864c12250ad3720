"""``benchmarks/leak_readers.py``: stage 1's C beside the evaluation's leakage probe."""
from __future__ import annotations

import re

import pytest
import torch

from dsu_models.config import save_config
from dsu_models.train import run
from tests.tiny import load_benchmark, tiny_config

leak_readers = load_benchmark("leak_readers")


def test_prints_c_on_every_split_and_the_probe(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSU_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    cfg = tiny_config("stage1.cla1_mode=code", "num_samples=240", "stage1.iterations=6",
                      "stage1.report_interval=2", "stage1.checkpoint_interval=2", "device=cpu")
    run(cfg, tmp_path / "run", log=lambda line: None, stages=["stage1"])
    assert leak_readers.main([str(tmp_path / "run"), "--images", "50",
                              "--threads", str(torch.get_num_threads())]) == 0
    out = capsys.readouterr().out
    assert "at stage-1 iteration 6" in out
    lines = [line for line in out.splitlines() if line.strip().startswith("C on")]
    assert [line.split()[2] for line in lines] == ["train", "train", "val", "val", "test", "test"]
    for line in lines:
        values = re.findall(r"(floor_hue|shape) ([+-]\d\.\d{3}) \(accuracy - p ([+-]\d\.\d{3})\)", line)
        assert [v[0] for v in values] == ["floor_hue", "shape"]
        assert all(-1.0 <= float(v) <= 1.0 for _, over, raw in values for v in (over, raw))
    probe = [line for line in out.splitlines() if "evaluation's probe" in line]
    assert len(probe) == 1 and re.search(r"floor_hue [+-]\d\.\d{3}, shape [+-]\d\.\d{3}", probe[0])


def test_a_run_whose_c_reads_the_image_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    save_config(tiny_config("stage1.cla1_mode=compound"), tmp_path / "run" / "config.yaml")
    with pytest.raises(SystemExit) as stop:
        leak_readers.main([str(tmp_path / "run")])
    assert stop.value.code == 2 and "stage1.cla1_mode: code" in capsys.readouterr().err
