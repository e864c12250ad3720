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
