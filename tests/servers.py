"""Servers that tests start: a free loopback port, and waiting until one answers."""
from __future__ import annotations

import subprocess
import time
import urllib.request

from pipelines.cluster.local_cluster import free_port  # noqa: F401  (the tests' one copy)




def wait_for(url: str, seconds: float = 60, process: subprocess.Popen | None = None):
    """Poll ``url`` until it answers; fail early when ``process`` (the server) has exited."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


def stop(process: subprocess.Popen, seconds: float = 20):
    """Terminate a server started by a test, then kill it if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(seconds)
