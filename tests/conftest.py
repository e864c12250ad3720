"""Shared pytest fixtures.

One Ray instance per test session (started lazily by the first test that
asks for it, with explicit small resources), shut down and its temp folder
removed at the end.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_session():
    from pipelines.local_ray import init_ray

    temp_dir = tempfile.mkdtemp(prefix="dsu-ray-", dir="/tmp")
    os.environ.pop("RAY_ADDRESS", None)
    # started like the pipelines start a local Ray
    ray = init_ray(2, num_gpus=0, _temp_dir=temp_dir, log_to_driver=True,
                   configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


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
