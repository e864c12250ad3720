"""Where a restarted Ray Train worker group resumes: the newest checkpoint in
the run's storage folder whose state loads (``pipelines.jobs.worker.newest_state``),
also when Ray Train did not register it before a node died."""
from __future__ import annotations

from pathlib import Path

import torch

from pipelines.jobs.worker import STATE_FILE, newest_state


def _checkpoint(run: Path, name: str, iteration: int | None):
    folder = run / name
    folder.mkdir(parents=True)
    if iteration is None:  # a copy cut short
        (folder / STATE_FILE).write_bytes(b"PK\x03\x04 truncated")
    else:
        torch.save({"iteration": iteration}, folder / STATE_FILE)


def test_newest_loadable_checkpoint_is_taken(tmp_path):
    run = tmp_path / "stage2-abc"
    assert newest_state(str(run), tmp_path / "work", "cpu") is None  # no folder yet
    _checkpoint(run, "checkpoint_2026-12-03_06-29-10.000001", 10)
    _checkpoint(run, "checkpoint_2026-12-03_06-29-20.000001", 20)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    assert newest_state(str(run), tmp_path / "work", "cpu") == {"iteration": 20}
    # a newer copy that does not load (the node died while it was written) is skipped,
    # and so is a folder without a state file
    _checkpoint(run, "checkpoint_2026-12-03_06-29-30.000001", None)
    (run / "checkpoint_2026-12-03_06-29-40.000001").mkdir()
    assert newest_state(str(run), tmp_path / "work", "cpu") == {"iteration": 20}
    assert not any((tmp_path / "work").rglob(STATE_FILE))  # the downloads are gone


def test_a_storage_uri_is_read_through_its_filesystem(tmp_path):
    run = tmp_path / "stage1-abc"
    _checkpoint(run, "checkpoint_2026-12-03_06-29-10.000001", 4)
    assert newest_state(run.as_uri(), tmp_path / "work", "cpu") == {"iteration": 4}
