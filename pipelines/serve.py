"""Serve a trained model over HTTP with Ray Serve, with the swap explorer at ``/``.

    python pipelines/serve.py --model models:/disunknown-shapes3d@champion
    python pipelines/serve.py --model runs/x/model --port 8000 --replicas 2
    python pipelines/serve.py --model models:/NAME@champion --autoscale 1:4 --gpu
    python pipelines/serve.py --model models:/NAME@champion --extra-model runs/y/model --max-models 2

It starts (or joins, under ``RAY_ADDRESS``) Ray, binds Serve's HTTP proxy to
``--host`` (127.0.0.1 unless you ask) and ``--port``, deploys
:class:`pipelines.serving.app.SwapService` and waits until Ctrl-C or SIGTERM
(systemd, Kubernetes, ``ray job stop``): either shuts Serve and Ray down and
exits with status 130 (Ctrl-C) or 143 (SIGTERM), 128 + the signal's number
(``pipelines.cluster.stopping``). A model that cannot be loaded stops it with
the loader's error (status 1; a bad flag, status 2). A request may choose
another model than ``--model`` with the ``serve_multiplexed_model_id`` header:
any ``models:/`` URI of the store (unless ``--listed-models-only``) or one
named with ``--extra-model``. The endpoints are in
docs/serving.md; the same application runs from a Serve config
(``serve run serve_config.yaml``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

APP_NAME = "disunknown"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/disunknown-shapes3d@champion",
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/PATH or a bundle "
                             "directory (default: %(default)s)")
    parser.add_argument("--tracking-uri", help="MLflow store for models:/ and runs:/ URIs; default "
                        "$MLFLOW_TRACKING_URI, else sqlite:///$DSU_HOME/mlflow.db (~/.disunknown)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, help="fixed number of replicas (default 1)")
    parser.add_argument("--autoscale", metavar="MIN:MAX",
                        help="autoscale between MIN and MAX replicas instead")
    parser.add_argument("--target-ongoing", type=float, default=8.0,
                        help="requests per replica the autoscaler aims at (default %(default)s)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per replica, model on CUDA")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="requests batched into one forward pass (default %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=4.0,
                        help="how long a batch waits to fill (default %(default)s ms)")
    parser.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body")
    parser.add_argument("--extra-model", action="append", default=[], metavar="URI_OR_DIR",
                        help="another model a request may choose (repeat for more)")
    parser.add_argument("--max-models", type=int, default=3,
                        help="chosen models a replica keeps loaded besides --model; the least "
                             "recently used is evicted beyond it (default %(default)s)")
    parser.add_argument("--listed-models-only", action="store_true",
                        help="requests may choose only --model and --extra-model, not any "
                             "models:/ URI of the store")
    return parser.parse_args(argv)


def app_args(a: argparse.Namespace) -> dict:
    """The application builder's args from the command line; refuses what does not fit."""
    from pipelines.tracking.runs import default_tracking_uri

    if not 0 < a.port < 65536:
        raise ValueError(f"--port {a.port}: not a TCP port")
    if a.replicas is not None and a.autoscale:
        raise ValueError("give --replicas or --autoscale, not both")
    if (a.num_cpus <= 0 or a.max_batch_size < 1 or a.batch_wait_ms < 0 or a.max_body_mb <= 0
            or a.max_models < 1):
        raise ValueError("--num-cpus, --max-batch-size, --max-body-mb and --max-models must be "
                         "positive, --batch-wait-ms at least 0")
    args = {"model": a.model, "tracking_uri": a.tracking_uri or default_tracking_uri(),
            "device": "cuda" if a.gpu else "cpu", "num_cpus": a.num_cpus, "num_gpus": 1 if a.gpu else 0,
            "max_batch_size": a.max_batch_size, "batch_wait_timeout_s": a.batch_wait_ms / 1000,
            "limits": {"max_body_bytes": int(a.max_body_mb * (1 << 20))},
            "models": [_local_or_uri(m) for m in a.extra_model], "max_models": a.max_models,
            "allow_registry": not a.listed_models_only}
    if a.autoscale:
        low, sep, high = a.autoscale.partition(":")
        if not sep or not low.isdigit() or not high.isdigit() or int(low) > int(high) or int(high) < 1:
            raise ValueError(f"--autoscale {a.autoscale!r}: MIN:MAX replicas, e.g. 1:4")
        args["autoscaling"] = {"min_replicas": int(low), "max_replicas": int(high),
                               "target_ongoing_requests": a.target_ongoing}
    elif a.replicas is not None:
        if a.replicas < 1:
            raise ValueError(f"--replicas {a.replicas}: at least 1")
        args["replicas"] = a.replicas
    args["model"] = _local_or_uri(a.model)
    return args


def _local_or_uri(model: str) -> str:
    """An existing local path made absolute (the id requests name it by); a URI as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def start(args: dict, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME,
          route_prefix: str = "/", access_log: bool = False):
    """Deploy the application on the running Ray (Serve's proxy on host:port) and
    return its handle; raises ``ModelLoadError`` (the loader's) or RuntimeError."""
    from ray import serve

    from pipelines.serving.app import build

    # per-request access lines cost the proxy and the replica more than a small model's swap
    serve.start(http_options={"host": host, "port": port},
                logging_config={"enable_access_log": access_log, "log_level": "WARNING"})
    try:
        return serve.run(build(args), name=name, route_prefix=route_prefix)
    except RuntimeError as exc:
        status = serve.status().applications.get(name)
        report = "\n".join([str(exc)] + ([d.message for d in status.deployments.values()] if status else []))
        serve.delete(name)   # a failed application would keep retrying its replicas
        raise RuntimeError(deployment_error(report)) from None


def deployment_error(text: str) -> str:
    """The one line that says why a replica failed to start (the loader's error), out of
    Serve's report with its traceback."""
    for marker in ("ModelLoadError: ", "ValueError: ", "ConfigError: "):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip().splitlines()[0]
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else text


def main(argv=None) -> int:
    from pipelines.cluster.stopping import stop_on_sigterm

    stop_on_sigterm()   # SIGTERM stops it as Ctrl-C does; init_ray installs it again over Ray's
    a = parse_args(argv)
    try:
        args = app_args(a)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from pipelines.cluster.ray_init import init_ray

    init_ray(dashboard=False, num_gpus=1 if a.gpu else 0)   # both ignored when joining RAY_ADDRESS
    try:
        start(args, a.host, a.port)
    except RuntimeError as exc:
        print(f"error: the model service did not start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:     # stopped while its replicas start
        return stop(exc)
    print(f"serving {a.model} at http://{a.host}:{a.port}/ (explorer), /info, /swap, /encode, "
          f"/generate; another model per request with the header serve_multiplexed_model_id "
          f"(GET /info lists them); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as exc:     # Ctrl-C, or SIGTERM (stopping.Terminated)
        return stop(exc)


def stop(exc: KeyboardInterrupt) -> int:
    """Shut Serve (its proxy and replicas) and Ray down; the exit status for ``exc``."""
    from ray import serve

    from pipelines.cluster.stopping import interrupt_status, shutdown_ray, stop_reason

    serve.shutdown()
    shutdown_ray()
    print(f"stopped by {stop_reason(exc)}", file=sys.stderr, flush=True)
    return interrupt_status(exc)


if __name__ == "__main__":
    sys.exit(main())
