"""A real multi-node Ray cluster on one machine, whose nodes share no disk: for
trying the distributed path on a laptop, and for the tests and benchmarks that
prove it (tests/test_cluster.py, benchmarks/cluster.py). Linux, as root (mount
namespaces).

The head (no CPUs: nothing trains there) runs in the test's own mount namespace.
Each worker node is a ``ray start --address=... --block`` process with its own
resources and its own ``--temp-dir``, started in a mount namespace of its own
(``unshare --mount --propagation private``) in which the driver's ``DSU_HOME``,
the test's scratch folders and the head's Ray temp dir are each hidden behind
an empty tmpfs. Only the ``shared`` folder (standing for an NFS mount) and the
installed code are what every node sees alike; ``start_s3()`` (before
``start()``) adds an S3 service on 127.0.0.1 (moto's server, in memory)
for storage that is an object store rather than a mount. A node is killed by SIGKILL of
its whole process group (raylet, object store, workers) and of anything else
still in its namespace.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY = str(Path(sys.executable).with_name("ray"))
LABEL = "dsu_test_node_"  # each worker node carries the resource LABEL + its name
# a dead node is noticed within seconds instead of half a minute
FAST_FAILURE = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
                "RAY_health_check_failure_threshold": "3", "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0"}

_NODE_SCRIPT = """set -e
for d in "$@"; do mount -t tmpfs -o size=64m dsu-hidden "$d"; done
exec "{ray}" start --address={address} --num-cpus={cpus} --temp-dir={temp} \
  --object-store-memory={store} --resources='{{"{label}": 1}}' --block --disable-usage-stats
"""


def namespaces_work() -> str | None:
    """None when a private mount namespace with a tmpfs can be made here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs none /mnt && echo ok"], capture_output=True, text=True)
    if probe.returncode != 0 or "ok" not in probe.stdout:
        return f"cannot make a mount namespace: {(probe.stderr or probe.stdout).strip()[:200]}"
    return None


class Cluster:
    """``Cluster(hidden=[...])``: ``start()`` the head, ``add_node(name, cpus)``,
    ``start_mlflow()``, ``kill_node(name)``, ``shutdown()``. ``root`` holds ``shared/`` (the storage
    every node sees), ``home/`` (the driver's DSU_HOME) and ``scratch/``."""

    def __init__(self, hidden: list[str | Path] = ()):
        self.root = Path(tempfile.mkdtemp(prefix="dsu-cluster-"))
        self.shared, self.home, self.scratch = (self.root / n for n in ("shared", "home", "scratch"))
        self.head_temp = self.root / "head-ray"
        for d in (self.shared, self.home, self.scratch, self.head_temp):
            d.mkdir()
        self.hidden = [str(p) for p in (self.home, self.scratch, self.head_temp, *hidden)]
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_port = free_port()
        self.nodes: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, **FAST_FAILURE}
        self.env.pop("RAY_ADDRESS", None)

    def start_s3(self, bucket: str = "dsu", wait_s: float = 60) -> str:
        """An S3 service on 127.0.0.1 (``moto_server``) holding ``bucket``; every
        process of this cluster (head, nodes, drivers started with :attr:`env`)
        reaches it through the ``AWS_*`` variables set here. Call before
        :meth:`start`. Returns ``s3://bucket``."""
        import urllib.request

        port = free_port()
        self.s3 = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                    "-p", str(port)],
                                   stdout=open(self.root / "s3.log", "wb"), stderr=subprocess.STDOUT)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + wait_s
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or self.s3.poll() is not None:
                    raise RuntimeError(f"the S3 service did not start: {(self.root / 's3.log').read_text()[-2000:]}")
                time.sleep(0.5)
        self.env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                        AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
        return f"s3://{bucket}"

    def start(self, wait_s: float = 90):
        log = open(self.root / "head.log", "wb")
        self.head = subprocess.Popen(
            [RAY, "start", "--head", "--num-cpus=0", f"--port={self.port}", f"--temp-dir={self.head_temp}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
             "--node-ip-address=127.0.0.1", "--object-store-memory=200000000", "--block",
             "--disable-usage-stats"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_for(1, self.head, "head.log", wait_s)
        return self

    def _wait_for(self, nodes: int, proc: subprocess.Popen, log: str, wait_s: float):
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and proc.poll() is None:
            if self.alive_nodes() >= nodes:
                return
            time.sleep(1)
        raise RuntimeError(f"{log}: the node did not join: {(self.root / log).read_text()[-2000:]}")

    def add_node(self, name: str, cpus: int, wait_s: float = 90):
        temp = self.root / f"node-{name}"
        temp.mkdir()
        script = _NODE_SCRIPT.format(ray=RAY, address=self.address, cpus=cpus, temp=temp,
                                     store=150_000_000, label=LABEL + name)
        log = open(self.root / f"node-{name}.log", "wb")
        self.nodes[name] = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "node", *self.hidden],
            env={**self.env, "RAY_ADDRESS": self.address},  # its actors join this cluster, not another
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_for(len(self.nodes) + 1, self.nodes[name], f"node-{name}.log", wait_s)
        return self

    def start_mlflow(self, wait_s: float = 180) -> str:
        """An ``mlflow server`` on 127.0.0.1 (store and artifacts under
        ``scratch/``, which the worker nodes cannot see: they reach it by HTTP);
        returns its tracking URI. Stopped by :meth:`shutdown`."""
        import urllib.request

        port = free_port()
        self.mlflow = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.scratch / 'mlflow.db'}",
             "--artifacts-destination", str(self.scratch / "artifacts")],
            stdout=open(self.root / "mlflow.log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and self.mlflow.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                self.tracking_uri = f"http://127.0.0.1:{port}"
                return self.tracking_uri
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer: {(self.root / 'mlflow.log').read_text()[-2000:]}")

    def alive_nodes(self) -> int:
        # asked from a process of its own: this one may hold the test session's Ray
        out = subprocess.run([sys.executable, "-c", _COUNT, self.address], env=self.env,
                             capture_output=True, text=True, timeout=60)
        return int(out.stdout.strip() or 0)

    def nodes_running(self, class_part: str) -> list[str]:
        """The names of the nodes that hold a live actor whose class name contains
        ``class_part`` (asked of the head's state API)."""
        from ray.util.state import list_actors, list_nodes

        address = f"http://127.0.0.1:{self.dashboard_port}"
        names = {}
        for node in list_nodes(address=address, detail=True):
            for key in node.resources_total:
                if key.startswith(LABEL):
                    names[node.node_id] = key[len(LABEL):]
        actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10000)
        return sorted({names[a.node_id] for a in actors
                       if class_part in (a.class_name or "") and a.node_id in names})

    def namespace_of(self, name: str) -> str:
        return os.readlink(f"/proc/{self.nodes[name].pid}/ns/mnt")

    def pids_in(self, name: str) -> list[int]:
        """Every process in the node's mount namespace."""
        ns = self.namespace_of(name)
        return _pids(lambda pid: os.readlink(f"/proc/{pid}/ns/mnt") == ns)

    def kill_node(self, name: str):
        """SIGKILL the node: its process group, then whatever else is in its namespace."""
        _kill(self.nodes[name], self.pids_in(name))

    def shutdown(self):
        """Kill every node and the head (only this cluster's processes: the test
        session's own Ray instance lives on), and remove the folders."""
        for service in (getattr(self, "mlflow", None), getattr(self, "s3", None)):
            if service is not None and service.poll() is None:
                service.terminate()
                try:
                    service.wait(20)
                except subprocess.TimeoutExpired:
                    service.kill()
        for name, proc in self.nodes.items():
            if proc.poll() is None:
                self.kill_node(name)
        if getattr(self, "head", None) is not None:
            temp = str(self.head_temp)
            _kill(self.head, _pids(lambda pid: temp in Path(f"/proc/{pid}/cmdline").read_bytes()
                                   .replace(b"\0", b" ").decode()))
        shutil.rmtree(self.root, ignore_errors=True)


def _pids(match) -> list[int]:
    """The live processes for which ``match(pid)`` holds (ones that vanish meanwhile are skipped)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if match(entry):
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _kill(leader: subprocess.Popen, pids: list[int]):
    try:
        os.killpg(leader.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    leader.wait(30)


_COUNT = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
"""
