"""How many logical CPUs each Train worker of a stage takes."""
from __future__ import annotations


def default_cpus_per_worker(nodes: list[float], workers: int, use_gpu: bool = False) -> float:
    """Logical CPUs per Train worker (its torch threads: the integer part), given
    the CPUs of each node (``nodes``). One per GPU worker. On CPU, the largest share that
    places every worker on some node and leaves one CPU free on a node for Ray
    Data's decoding (none free: the job starves, see docs/pipeline.md): on one node, all
    its CPUs but one shared out; on a cluster, never more than a node holds."""
    if use_gpu:
        return 1
    even = (sum(nodes) - 1) / workers
    whole = range(int(max(nodes, default=1)), 0, -1)
    for share in sorted({even, *whole}, reverse=True):
        if share >= 0.5 and _fits(nodes, workers, share):
            return share
    return 0.5


def alive_nodes(ray) -> list[dict]:
    """``ray.nodes()`` entries of the live nodes (``ray``: the module, or a stand-in)."""
    return [n for n in ray.nodes() if n.get("Alive")]


def node_cpus() -> list[float]:
    """The CPUs of each live node of the Ray cluster this process is connected to."""
    import ray
    return [n["Resources"].get("CPU", 0) for n in alive_nodes(ray)]


def _fits(nodes: list[float], workers: int, share: float) -> bool:
    """Whether ``workers`` workers of ``share`` CPUs each fit on the nodes, the
    largest first, with a whole CPU left over on at least one node."""
    left, spare = workers, False
    for cpus in sorted(nodes, reverse=True):
        placed = min(left, int(cpus / share + 1e-9))
        left -= placed
        spare = spare or cpus - placed * share >= 1 - 1e-9
    return left == 0 and spare
