"""Joining a Ray cluster, or starting a local Ray instance."""
from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None, dashboard: bool = True, **init_kwargs):
    """Join ``RAY_ADDRESS`` (``ray job submit``, a cluster) or start a local
    instance with ``num_cpus`` (None: Ray's count, which heeds container limits) and the dashboard bound to 127.0.0.1
    (or none); ``init_kwargs`` go to ``ray.init`` for a local instance. No-op
    when Ray is already up."""
    import ray

    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return ray
    if dashboard:
        # the dashboard also serves Train's placement-group cleaner
        init_kwargs.setdefault("dashboard_host", "127.0.0.1")
    else:
        init_kwargs["include_dashboard"] = False
    ray.init(num_cpus=num_cpus, **init_kwargs)
    return ray


def pipeline_cpus() -> int:
    """Logical CPUs for a local Ray instance that runs the pipeline: the cores Ray
    counts (heeding container limits) plus one. A stage's Train workers share all
    logical CPUs but one, which stays free for Ray Data's decoding (without it the
    job starves, see ``pipelines.cluster.placement``); with the extra one the workers get a
    thread per core, and decoding, light next to training (small PNGs, served from
    the worker's memory after the first epoch when the split fits), shares a core.
    On 2 cores that is 2 training threads instead of 1."""
    from ray._private.utils import get_num_cpus

    return get_num_cpus() + 1
