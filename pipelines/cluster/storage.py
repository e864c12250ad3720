"""The pipeline's storage: the one place every node of the cluster reaches.

Ray Train's and Tune's ``storage_path``, prepared datasets (built-in ones too),
the distilled codes on their way to MLflow and the oracle cache live under one
root, chosen by ``--storage``, else the config's ``storage:``, else
``$DSU_STORAGE``, else ``$DSU_HOME`` (a single machine's default)::

    <root>/prepared/<dataset>-<size>px-<hash>/   prepared Parquet datasets
    <root>/ray_results/<stage>-<run id>/         Ray Train checkpoints
    <root>/codes/<distill run id>/<split>/       distilled codes (removed once in MLflow)
    <root>/oracles/                              evaluation oracles, by data content
    <root>/tune/<sweep>/                         Tune experiments and sweep outputs

The root is an absolute path (a shared filesystem: NFS, EFS, Lustre mounted at
the same place on every node) or a URI that pyarrow's filesystems read
(``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``), which Ray Train, Tune
and Ray Data take directly. With a URI, a built-in dataset is prepared on the
driver and uploaded (manifest last), the oracle cache stays on each node's
``$DSU_HOME``, and a sweep's record (space, base config, ``sweep.json``, best
config) is written on the driver's ``$DSU_HOME/tune/<sweep>`` and mirrored to
``<root>/tune/<sweep>``.

On a cluster of several nodes :func:`check_reachable` proves the root is shared
before any work starts: the driver writes a marker file and a task pinned to
each node looks for it. A root some node cannot see is refused with the nodes
named and what to pass instead; so is an MLflow store that is a file on the
driver's node (training rank 0 logs from wherever it runs).

A cluster that may still add nodes (an autoscaling one: its yaml sets
``DSU_CLUSTER_GROWS=1`` on the head, see ray_cluster.yaml) is checked even
while the head is its only node, and a probe of today's nodes cannot speak for
the nodes that join later: there a path root must lie under a mount the
cluster declares every node has (``DSU_SHARED_MOUNTS``, colon-separated, set by
the same yaml beside the mount command) and is then proven through it with the
marker; otherwise it must be a URI. The MLflow store must be a server there too.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from dsu_models.config import ConfigError
from pipelines.cluster.placement import alive_nodes

ENV = "DSU_STORAGE"
GROWS_ENV = "DSU_CLUSTER_GROWS"    # the cluster may add nodes (its yaml sets it on the head)
SHARED_ENV = "DSU_SHARED_MOUNTS"   # mount points every node of the cluster has, colon-separated
# the URI schemes pyarrow.fs.FileSystem.from_uri resolves (besides file://)
URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
HINT = ("pass --storage (or storage: in the config, or DSU_STORAGE) a folder every node "
        "mounts at the same path (NFS/EFS) or a URI such as s3://BUCKET/PREFIX")


def resolve_root(configured: str | None) -> str:
    """The storage root: ``configured`` (``--storage`` / ``storage:``), else
    ``$DSU_STORAGE``, else ``$DSU_HOME``; paths made absolute, URIs checked."""
    from pipelines.tracking.runs import dsu_home

    value = configured or os.environ.get(ENV) or str(dsu_home())
    return normalise(value)


def normalise(value: str) -> str:
    """An absolute path for a local path or ``file://`` URI; the URI itself
    (without a trailing slash) for the other schemes. Raises ConfigError for an
    empty value or a scheme pyarrow cannot read."""
    text = str(value).strip()
    if not text:
        raise ConfigError("storage: empty; " + HINT)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return str(Path(text).expanduser().resolve())
    if scheme == "file":
        return str(Path(rest or "/").resolve())
    if scheme not in URI_SCHEMES or not rest.strip("/"):
        raise ConfigError(f"storage: {text!r} is neither an absolute path nor a URI pyarrow reads "
                          f"({', '.join(s + '://' for s in URI_SCHEMES)})")
    return text.rstrip("/")


def has_scheme(root: str) -> bool:
    return "://" in root


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a path or a URI alike."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(root: str):
    """``(pyarrow filesystem, path within it)`` for ``root``."""
    import pyarrow.fs as pafs

    if not has_scheme(root):
        return pafs.LocalFileSystem(), root
    return pafs.FileSystem.from_uri(root)


def mirror(folder: Path, dest: str | None) -> None:
    """Copy the files directly in ``folder`` to the URI ``dest`` (nothing when
    ``dest`` is None): a sweep's record, kept on the driver and in the storage."""
    if dest is None:
        return
    import pyarrow.fs as pafs

    fs, base = filesystem(dest)
    fs.create_dir(base, recursive=True)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            pafs.copy_files(str(path), join(base, path.name), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)


def oracle_cache(root: str) -> Path:
    """The evaluation oracles' cache: under a path root (shared by the nodes),
    else (a URI root) on this node's ``$DSU_HOME``."""
    from pipelines.tracking.runs import dsu_home

    return Path(join(str(dsu_home()) if has_scheme(root) else root, "oracles"))


def _sees(root: str, marker: str) -> bool:
    import pyarrow.fs as pafs

    fs, base = filesystem(root)
    return fs.get_file_info(join(base, marker)).type == pafs.FileType.File


def cluster_grows(joined: bool) -> bool:
    """Whether the cluster this process joined may add nodes: its yaml says so
    (``DSU_CLUSTER_GROWS``). A local instance the pipeline started never does."""
    return joined and os.environ.get(GROWS_ENV, "").strip().lower() in ("1", "true", "yes")


def declared_mounts() -> list[str]:
    """The mount points the cluster declares every node has (``DSU_SHARED_MOUNTS``)."""
    return [str(Path(m).resolve()) for m in os.environ.get(SHARED_ENV, "").split(":") if m.strip()]


def _under_declared_mount(root: str) -> bool:
    path = Path(root)
    return any(path == Path(m) or Path(m) in path.parents for m in declared_mounts())


def check_reachable(root: str, tracking_uri: str, ray, timeout_s: float = 120, grows: bool = False) -> int:
    """Refuse a storage root or MLflow store that some node of the cluster cannot
    reach (ConfigError naming the nodes and what to pass). Returns the number of
    alive nodes. With one node and ``grows`` false there is nothing to prove;
    with ``grows`` (:func:`cluster_grows`) a path root must also lie under a
    declared shared mount (see the module docstring)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes(ray)
    if len(nodes) < 2 and not grows:
        return len(nodes)
    where = (f"this cluster may add nodes ({GROWS_ENV} is set)" if grows
             else f"this cluster has {len(nodes)} nodes")
    if not tracking_uri.startswith(("http://", "https://", "databricks")):
        raise ConfigError(f"--tracking-uri {tracking_uri}: {where} and a training worker on any of them "
                          f"logs to MLflow, but this store is a file on the driver's node; start "
                          f"`mlflow server --host ADDRESS` and pass --tracking-uri http://ADDRESS:5000")
    if grows and not has_scheme(root) and not _under_declared_mount(root):
        mounts = ", ".join(declared_mounts()) or "none declared"
        raise ConfigError(f"storage {root}: {where}, and a node that joins later sees a folder only "
                          f"through a mount every node has; pass --storage a folder under a mount the "
                          f"cluster declares in {SHARED_ENV} ({mounts}; see ray_cluster.yaml) or a URI "
                          f"such as s3://BUCKET/PREFIX")
    fs, base = filesystem(root)
    marker = f".dsu-reach-{uuid.uuid4().hex}"
    try:
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(join(base, marker)) as out:
            out.write(b"reachable\n")
    except OSError as exc:
        raise ConfigError(f"storage {root}: cannot write there ({exc}); {HINT}") from None
    probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
    try:
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(root, marker) for n in nodes]
        seen = ray.get(refs, timeout=timeout_s)
    finally:
        try:
            fs.delete_file(join(base, marker))
        except OSError:
            pass
    blind = [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise ConfigError(f"storage {root} is not shared: {len(blind)} of the cluster's {len(nodes)} nodes "
                          f"cannot see it ({', '.join(blind)}); {HINT}")
    return len(nodes)
