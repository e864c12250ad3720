"""SIGTERM (systemd, Kubernetes, ``ray job stop``) stops the pipeline and the
model service as Ctrl-C does (``pipelines.cluster.stopping``): the pipeline's
parent run and its running stage's run end KILLED and it exits 143; the
service shuts Serve and Ray down and exits 143, with no native stack dump.
Each test runs the command in a subprocess and signals it."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from servers import free_port, stop, wait_for

REPO = Path(__file__).resolve().parents[1]

# full_main with a stage that blocks where a Ray job would run: init_ray and the
# train runner replaced, as tests/test_pipeline_refusals.py replaces them in-process
_BLOCKING_PIPELINE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipelines import cli

    class OneNode:
        @staticmethod
        def nodes():
            return [{"Alive": True, "NodeID": "0" * 56, "NodeManagerAddress": "127.0.0.1"}]

    def blocks(step, cfg, data_dir, run_id, upstream, args, uri):
        Path(sys.argv[1]).write_text(run_id)
        while True:
            time.sleep(0.1)

    cli.init_ray = lambda *a, **k: OneNode
    cli.RUNNERS["train"] = blocks
    sys.exit(cli.full_main(sys.argv[2:]))
""")


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, DSU_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


def _start(argv: list[str], tmp_path: Path, env: dict) -> tuple[subprocess.Popen, Path]:
    """The command with its output in a file (a pipe nobody reads could fill and block it)."""
    log = tmp_path / "output.txt"
    with open(log, "w") as out:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT), log


def _wait_for_file(path: Path, process: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} early:\n{log.read_text()}")
        if time.monotonic() > deadline:
            stop(process)
            raise AssertionError(f"not started in {seconds} s:\n{log.read_text()}")
        time.sleep(0.2)


def _assert_clean(output: str) -> None:
    # Python's fault handler and Ray's native one (``*** SIGTERM received ... PC: @``)
    for dump in ("Fatal Python error", "Traceback (most recent call last)", "Stack (most recent call first)",
                 "*** SIGTERM received", "*** SIGABRT received", "PC: @"):
        assert dump not in output, output


@pytest.mark.timeout(120)
def test_sigterm_stops_the_pipeline_with_its_runs_killed(tmp_path):
    from mlflow.tracking import MlflowClient

    from dsu_models.data import prepare
    from pipelines.tracking import runs as tracking

    data = prepare("shapes3d", tmp_path / "data", num_samples=64, image_size=8)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = tmp_path / "stage-started"
    argv = [sys.executable, "-c", _BLOCKING_PIPELINE, str(started), "--tracking-uri", uri,
            "--config", "tiny", "image_size=8", "all_stages.batch_size=8", "stage1.iterations=7",
            "--data", str(data), "--stages", "stage1"]
    process, log = _start(argv, tmp_path, _env(tmp_path))
    _wait_for_file(started, process, log, 60)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    output = log.read_text()
    assert process.returncode == 143, output
    _assert_clean(output)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("disunknown")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`dsu.pipeline` = 'true'")
    assert parent.info.status == "KILLED"
    stage = tracking.child_runs(client, parent.info.run_id)["stage1"]
    assert stage.info.run_id == started.read_text() and stage.info.status == "KILLED"
    assert f"stopped by SIGTERM; its MLflow runs are marked KILLED; continue it with --resume " \
           f"{parent.info.run_id}" in output


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigterm_stops_the_model_service_without_a_stack_dump(tmp_path, tmp_path_factory):
    """``pipelines/serve.py`` with a tiny model on 127.0.0.1: up, SIGTERM, exit 143
    (it used to abort with a native stack trace and status 134)."""
    from tiny_model import shared_tiny

    bundle = shared_tiny(tmp_path_factory)["bundle_dir"]
    port = free_port()
    env = _env(tmp_path)
    ray_tmp = Path(tempfile.mkdtemp(prefix="dsu-serve-stop-", dir="/tmp"))   # its own Ray session
    env["RAY_TMPDIR"] = str(ray_tmp)
    process, log = _start(
        [sys.executable, "pipelines/serve.py", "--model", str(bundle), "--host", "127.0.0.1",
         "--port", str(port), "--num-cpus", "0.5", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
        tmp_path, env)
    try:
        try:
            wait_for(f"http://127.0.0.1:{port}/info", 120, process)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}:\n{log.read_text()}") from None
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        stop(process)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = log.read_text()
    assert process.returncode == 143, output
    assert "stopped by SIGTERM" in output
    _assert_clean(output)


def test_sigterm_raises_terminated_once_then_stops_at_once():
    """The handler itself: a KeyboardInterrupt subclass, exit statuses 130 / 143
    (143 for any interrupt once SIGTERM came), and a second SIGTERM falls back to
    the default action."""
    code = textwrap.dedent("""
        import os, signal
        from pipelines.cluster import stopping
        assert stopping.stop_on_sigterm()
        assert stopping.interrupt_status(KeyboardInterrupt()) == 130
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            raise SystemExit("no interrupt")
        except KeyboardInterrupt as exc:
            assert isinstance(exc, stopping.Terminated)
            assert stopping.interrupt_status(exc) == 143
            # what a ray.get that SIGTERM interrupted raises counts as SIGTERM too
            assert stopping.interrupt_status(KeyboardInterrupt()) == 143
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        print("ok", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        print("still here")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.stdout == "ok\n" and done.returncode == -signal.SIGTERM, done.stdout + done.stderr
