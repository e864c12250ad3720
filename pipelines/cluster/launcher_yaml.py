"""Offline check of a Ray cluster-launcher YAML (``ray_cluster.yaml``).

    python pipelines/cluster/launcher_yaml.py ray_cluster.yaml   # prints OK or the error

Runs the same steps ``ray up`` runs on the file before it talks to the cloud:
fill in the provider's defaults, then check the result against Ray's
``ray-schema.json`` and its cross-field rules (head type among the node types,
``min_workers`` within ``max_workers``). It contacts no cloud: for AWS the
defaults come from a YAML file shipped inside the ``ray`` package. It catches
unknown top-level keys, wrong types and node types missing ``resources``; it
does not catch typos inside ``provider`` (the schema allows extra keys there)
or instance types and images that do not exist, which only ``ray up`` finds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from dsu_models.config import DuplicateKey, yaml_load


class ClusterConfigError(ValueError):
    """The cluster YAML is not one Ray's cluster launcher would accept."""


def validate_cluster_yaml(path: str | Path) -> dict:
    """Load and validate a cluster-launcher YAML; return it with Ray's defaults filled in.

    Raises ``ClusterConfigError`` naming the offending key for anything Ray's
    launcher would refuse.

    Ray has no public validator (``ray up`` validates only after contacting
    the provider), so this is the one place that uses the private
    ``ray.autoscaler._private.util`` functions ``prepare_config`` (merges the
    provider's defaults.yaml, setup commands and per-type worker limits) and
    ``validate_config`` (JSON schema plus cross-field checks). If a Ray
    upgrade moves them, only this function changes.
    """
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = Path(path)
    try:
        # Ray reads it with yaml.safe_load, which keeps the last of a key given twice
        raw = yaml_load(path.read_text(encoding="utf-8"), yaml.SafeLoader)
    except DuplicateKey as e:
        raise ClusterConfigError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise ClusterConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        config = prepare_config(raw)
        validate_config(config)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "<top level>"
        raise ClusterConfigError(f"{path}: {where}: {e.message}") from None
    # prepare_config indexes and asserts before the schema runs, so a missing
    # `provider` or an unknown provider type surfaces as one of these.
    except (ValueError, KeyError, TypeError, AssertionError, NotImplementedError, RuntimeError) as e:
        raise ClusterConfigError(f"{path}: {type(e).__name__}: {e}") from None
    problems = open_doors(raw)
    if problems:
        raise ClusterConfigError(f"{path}: " + "; ".join(problems))
    return config


def open_doors(raw: dict) -> list[str]:
    """What would leave the cluster open to anyone who can reach it: token auth
    off, the dashboard or MLflow listening on every interface, a node type on
    Ray's default security group (SSH from anywhere). Empty for a closed config."""
    problems = []
    starts = {"head_start_ray_commands": raw.get("head_start_ray_commands") or [],
              "worker_start_ray_commands": raw.get("worker_start_ray_commands") or []}
    for key, commands in starts.items():
        text = " ".join(map(str, commands))
        if "ray start" in text and "RAY_AUTH_MODE=token" not in text:
            problems.append(f"{key}: ray start without RAY_AUTH_MODE=token (anyone reaching the "
                            f"ports could run code on the cluster)")
        for host in ("0.0.0.0", "::"):
            for flag in (f"--dashboard-host={host}", f"--dashboard-host {host}", f"--host {host}"):
                if flag in text:
                    problems.append(f"{key}: {flag} listens on every interface; bind to 127.0.0.1 "
                                    f"or the private address and use an SSH tunnel")
    if "RAY_AUTH_MODE=token" in " ".join(map(str, starts["head_start_ray_commands"])):
        mounts = raw.get("file_mounts") or {}
        if "~/.ray/auth_token" not in mounts:
            problems.append("file_mounts: no ~/.ray/auth_token, so the nodes would not share one token")
    for name, node_type in (raw.get("available_node_types") or {}).items():
        if not (node_type.get("node_config") or {}).get("SecurityGroupIds"):
            problems.append(f"available_node_types.{name}.node_config: no SecurityGroupIds (Ray's "
                            f"default group admits SSH from anywhere)")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python pipelines/cluster/launcher_yaml.py CLUSTER_YAML", file=sys.stderr)
        return 2
    try:
        validate_cluster_yaml(argv[0])
    except (ClusterConfigError, OSError, yaml.YAMLError) as e:
        print(f"INVALID: {e}")
        return 1
    print(f"OK: {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
