"""The single-process runner: end to end, resume, refusal of bad input, NaN stop."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dsu_models import train
from dsu_models.config import PRESET_DIR, load_config
from dsu_models.data.configured import load_data
from dsu_models.data.sources.builtin import BUILTIN
from dsu_models.files import CheckpointError, load_torch
from dsu_models.loop import FileCheckpoints
from dsu_models.config import ConfigError, load_resolved
from dsu_models.stages.common import NonFiniteLossError

FAST = ["image_size=8", "architecture.conv_channels=[8]", "architecture.fc_features=16",
        "num_samples=160", "all_stages.iterations=12", "all_stages.checkpoint_interval=4",
        "all_stages.report_interval=4", "all_stages.sample_interval=6", "all_stages.batch_size=8"]


def config(*extra: str):
    return load_config("tiny", FAST + list(extra))


def weights(out: Path, stage: str) -> dict:
    return load_torch(out / stage / "handoff.pt")["weights"]


def test_end_to_end_writes_every_stage(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--config", "tiny", "--out", str(out)] + FAST) == 0
    printed = capsys.readouterr().out
    assert "[stage1] 4/12" in printed and "img/s" in printed
    for stage in ("stage1", "classifier", "stage2", "lenc"):
        assert (out / stage / "handoff.pt").exists()
        assert (out / stage / "metrics.jsonl").read_text().count("\n") == 3
    assert (out / "stage2" / "samples" / "swap_0000012.png").exists()
    assert (out / "stage1" / "codes.pt").exists() and (out / "config.yaml").exists()
    # the run's model, usable by the inference CLI and the Python API
    from dsu_models.inference import DisUnknownModel
    model = DisUnknownModel.load(out / "model", device="cpu")
    assert model.labeled_factors == config().labeled_factors
    swapped = model.swap(np.zeros((2, 8, 8, 3), np.uint8), {"shape": 1})
    assert swapped.shape == (2, 8, 8, 3) and swapped.dtype == np.uint8
    # Re-running skips everything and changes nothing.
    before = weights(out, "stage2")
    assert train.main(["--config", "tiny", "--out", str(out)] + FAST) == 0
    assert "already finished" in capsys.readouterr().out
    after = weights(out, "stage2")
    assert all(torch.equal(before["generator"][k], after["generator"][k]) for k in before["generator"])


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    cfg = config()
    train.run(cfg, tmp_path / "straight", stages=["stage1"], log=lambda s: None)

    def stop_at_8(stage, iteration, metrics):
        if iteration == 8:
            raise Interrupt

    out = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        train.run(cfg, out, stages=["stage1"], log=lambda s: None, on_report=stop_at_8)
    assert not (out / "stage1" / "handoff.pt").exists()
    assert load_torch(out / "stage1" / "checkpoint.pt")["iteration"] == 8
    lines = []
    train.run(cfg, out, stages=["stage1"], log=lines.append)
    assert "[stage1] resuming from iteration 8" in lines
    a, b = weights(tmp_path / "straight", "stage1"), weights(out, "stage1")
    for module in a:
        for key in a[module]:
            assert torch.allclose(a[module][key], b[module][key], atol=1e-6), (module, key)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    from dsu_models.stages.stage1 import Stage1
    original = Stage1.train_step

    def poisoned(self, batch):
        if self.iteration == 6:
            batch = dict(batch, image=batch["image"] * float("nan"))
        return original(self, batch)

    monkeypatch.setattr(Stage1, "train_step", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="stage1: loss term .* at iteration 6"):
        train.run(config(), out, stages=["stage1"], log=lambda s: None)
    state = load_torch(out / "stage1" / "checkpoint.pt")
    assert state["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in state["models"]["generator"].values())


def test_bad_inputs_refused_before_work(tmp_path, capsys):
    assert train.main(["--config", "tiny", "--out", str(tmp_path / "x"), "stage1.cla1_mode=bogus"]) == 2
    assert "stage1.cla1_mode: 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="no such preset"):
        load_config("nonexistent", [])
    with pytest.raises(ConfigError, match="set data_path"):
        load_data(load_config(None, ["dataset=mnist"]))
    out = tmp_path / "run"
    train.check_out_dir(config(), out)
    with pytest.raises(ConfigError, match="different config .*stage1.cla1_weight"):
        train.check_out_dir(config("stage1.cla1_weight=0.1"), out)
    # evaluation settings do not touch training: accepted, and the saved config follows them
    train.check_out_dir(config("evaluate.pairs=77"), out)
    assert load_resolved(out / "config.yaml").evaluate.pairs == 77


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_resolves(name):
    """Presets are data checked against the config (a typo in one is an error)."""
    cfg = load_config(name, [])
    assert cfg.dataset in BUILTIN and cfg.stage1.iterations > 0


def test_checkpoints_keep_the_previous_one_and_fall_back_to_it(tmp_path):
    ckpt = FileCheckpoints(tmp_path)
    ckpt.save({"iteration": 4, "w": torch.ones(3)})
    ckpt.save({"iteration": 8, "w": torch.ones(3) * 2})
    assert ckpt.load()["iteration"] == 8 and load_torch(ckpt.previous)["iteration"] == 4
    # a truncated latest (a crash while copying it): the previous one, with a warning naming it
    ckpt.latest.write_bytes(ckpt.latest.read_bytes()[:100])
    with pytest.warns(UserWarning, match="checkpoint.pt.*resuming from the previous checkpoint"):
        assert ckpt.load()["iteration"] == 4
    # both unreadable: an error that names the file, never a raw unpickling trace
    ckpt.previous.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint.prev.pt"):
        ckpt.load()
    assert FileCheckpoints(tmp_path / "empty").load() is None


def test_a_checkpoint_that_does_not_read_back_never_replaces_a_good_one(tmp_path, monkeypatch):
    from dsu_models import loop
    ckpt = FileCheckpoints(tmp_path)
    ckpt.save({"iteration": 4})

    def broken_save(state, path):
        Path(path).write_bytes(b"half a file")
        return Path(path)

    monkeypatch.setattr(loop, "save_torch", broken_save)
    with pytest.raises(CheckpointError):
        ckpt.save({"iteration": 8})
    assert ckpt.load()["iteration"] == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_the_runner_resumes_a_stage_from_the_previous_checkpoint_when_the_latest_is_corrupt(tmp_path):
    def stop_at_8(stage, iteration, metrics):
        if iteration == 8:
            raise Interrupt

    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        train.run(config(), out, stages=["stage1"], log=lambda s: None, on_report=stop_at_8)
    latest = out / "stage1" / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:50])
    lines = []
    with pytest.warns(UserWarning, match="previous checkpoint"):
        train.run(config(), out, stages=["stage1"], log=lines.append)
    assert "[stage1] resuming from iteration 4" in lines
    assert (out / "stage1" / "handoff.pt").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["all_stages.iterations=0"], "iterations: 0"),
    (["stage2.iterations=0"], "stage2.iterations: 0"),
    (["data_path=/nothing/here"], "/nothing/here"),
    (["device=cuda:7"] if torch.cuda.device_count() < 8 else ["device=tpu"], "device: "),
])
def test_runner_refuses_bad_values_before_writing_anything(tmp_path, capsys, argv, fragment):
    out = tmp_path / "x"
    assert train.main(["--config", "tiny", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
    assert not (out / "config.yaml").exists()  # the corrected rerun is not refused


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("stage1:\n  lr: 0.001 # d\xe9j\xe0 vu\n".encode("latin-1"))
    assert train.main(["--config", str(path), "--out", str(tmp_path / "x")] + FAST) == 2
    err = capsys.readouterr().err.strip()
    assert str(path) in err and "UTF-8" in err and len(err.splitlines()) == 1
