"""Joining a Ray cluster, or starting a local Ray instance."""
from __future__ import annotations

import os

from pipelines.cluster.stopping import stop_on_sigterm


def init_ray(num_cpus: int | None = None, dashboard: bool = True, **init_kwargs):
    """Join ``RAY_ADDRESS`` (``ray job submit``, a cluster) or start a local
    instance with ``num_cpus`` (None: Ray's count, which heeds container limits) and the dashboard bound to 127.0.0.1
    (or none); ``init_kwargs`` go to ``ray.init`` for a local instance
    (``log_to_driver`` and ``runtime_env`` also when joining: whether workers'
    output reaches this console, ``pipelines.console``). The MLflow login of
    this process (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``) reaches
    the workers through the runtime environment's variables. No-op
    when Ray is already up. Afterwards SIGTERM stops this process as Ctrl-C does
    (``pipelines.cluster.stopping``), in place of Ray's handler, which exits
    without the cleanup."""
    import ray

    if ray.is_initialized():
        return ray
    from pipelines.tracking.runs import login_env
    login = login_env()
    if login and not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # the workers log to MLflow too (a job's workers already share its driver's environment)
        env = dict(init_kwargs.get("runtime_env") or {})
        env["env_vars"] = {**env.get("env_vars", {}), **login}
        init_kwargs["runtime_env"] = env
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**{k: v for k, v in init_kwargs.items() if k in ("log_to_driver", "runtime_env")})
    else:
        if dashboard:
            # the dashboard also serves Train's placement-group cleaner
            init_kwargs.setdefault("dashboard_host", "127.0.0.1")
        else:
            init_kwargs["include_dashboard"] = False
        ray.init(num_cpus=num_cpus, **init_kwargs)
    stop_on_sigterm()
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
