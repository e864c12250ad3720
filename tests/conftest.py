"""Shared pytest fixtures.

One Ray instance per test session (started lazily by the first test that
asks for it, with explicit small resources), shut down and its temp folder
removed at the end. Its worker processes, and this process, carry the tests'
fault injection (``tests/faults.py``), which fires only when a test writes a
plan with the ``faults`` fixture.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import faults
import pytest


FAULT_DIR = Path(tempfile.mkdtemp(prefix="dsu-faults-", dir="/tmp"))
os.environ[faults.PLAN_ENV] = str(FAULT_DIR / "plan.json")
faults.install()


LAST = ("test_ray_job_submit_against_a_local_head",)  # shuts the session's Ray down


def pytest_collection_modifyitems(session, config, items):
    """Tests that need the machine to themselves run last, so that the session's
    Ray is not started a second time after them."""
    items.sort(key=lambda item: item.name in LAST)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(FAULT_DIR, ignore_errors=True)


@pytest.fixture
def faults_plan(tmp_path):
    """``plan(iteration, stage=None, kill=False, rank="last", nan=False) -> marker``: the next
    matching training step fails once (see ``tests/faults.py``); the marker file
    exists once it has fired. The plan is removed after the test."""
    def plan(iteration: int, stage: str | None = None, kill: bool = False, rank: str = "last",
             nan: bool = False) -> Path:
        marker = tmp_path / f"fault-{stage}-{iteration}"
        faults.plan(Path(os.environ[faults.PLAN_ENV]), iteration, marker, stage, kill, rank, nan)
        return marker

    yield plan
    Path(os.environ[faults.PLAN_ENV]).unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _mlflow_store_not_inherited():
    """``mlflow.set_tracking_uri`` also sets ``$MLFLOW_TRACKING_URI``, which the
    pipeline's default store follows: one test's store (a server it stopped) must
    not become the next test's default."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def _ray_temp_dir():
    temp_dir = tempfile.mkdtemp(prefix="dsu-ray-", dir="/tmp")
    try:
        yield temp_dir
    finally:
        import ray
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ensure_ray(temp_dir: str):
    """Start the test session's local Ray unless it is up (2 CPUs, the tests' fault
    injection in every worker)."""
    import ray
    if not ray.is_initialized():
        from pipelines.cluster.ray_init import init_ray
        os.environ.pop("RAY_ADDRESS", None)
        # started like the pipelines start a local Ray, plus the tests' fault injection;
        # by value: Ray workers cannot import the tests folder by name
        ray.cloudpickle.register_pickle_by_value(faults)
        runtime_env = {"worker_process_setup_hook": faults.install,
                       "env_vars": {faults.PLAN_ENV: os.environ[faults.PLAN_ENV]}}
        init_ray(2, num_gpus=0, _temp_dir=temp_dir, log_to_driver=True,
                 configure_logging=False, runtime_env=runtime_env)
    return ray


@pytest.fixture
def ray_session(_ray_temp_dir):
    """The test session's local Ray instance, started on first use and again after a
    test that shut it down (the ``ray job submit`` test needs the machine to itself)."""
    return _ensure_ray(_ray_temp_dir)


@pytest.fixture(scope="module")
def ray_module(_ray_temp_dir):
    """The same instance, for module-scoped fixtures (a Serve application)."""
    return _ensure_ray(_ray_temp_dir)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks gain nothing from a second intra-op thread on a shared
    2-core machine, only contention. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
