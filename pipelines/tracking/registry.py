"""Log a finished model to MLflow and keep the best one behind an alias
(docs/method.md section 11: higher ``summary`` = a better model).

:func:`log_and_register` logs a bundle directory (``dsu_models.inference.save_bundle``)
as an MLflow pyfunc model in a run, from the models-from-code file
``pipelines/tracking/pyfunc_model.py`` with the bundle as its ``bundle`` artifact, a
tensor signature (``images`` uint8 ``(-1, S, S, C)``, ``labels`` int64
``(-1, K)`` -> uint8 ``(-1, S, S, C)``), an input example, and the
``dsu_models`` package itself as its code (``code_paths``; MLflow puts it on
``sys.path`` when the model loads), so that ``mlflow models serve`` and a fresh
environment built from the logged requirements can load it without this
repository installed. It registers the
model as ``disunknown-<dataset>``, tags the new version with its summary score
(on the validation split), dataset and run id, and moves ``alias`` (default
``champion``) to the new version only when it earns it: it meets the champion
bar (``bar_failures`` is empty: ``dsu_models.evaluation.metrics.champion_failures``
on its validation metrics) and its summary beats the current holder's
(strictly), or nothing holds the alias yet. A holder without a recorded summary
counts as beaten; a non-finite new summary never takes the alias. A version
that fails stays registered without the alias, and ``describe`` says why in one
line. Reading the alias holder fails the step on any registry error other than
"this alias is not set", rather than moving the alias on a guess.

Load the champion with ``DisUnknownModel.load("models:/disunknown-<dataset>@champion")``
or ``mlflow.pyfunc.load_model`` (see ``pyfunc_model.py`` for ``predict``).

Concurrency: two registrations racing for the same alias may both read the
old holder; the last one to set the alias wins. Register from one driver.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Schema, TensorSpec

import dsu_models
from dsu_models.inference import DisUnknownModel

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
SUMMARY_TAG, DATASET_TAG, RUN_TAG = "dsu.summary", "dsu.dataset", "dsu.run_id"
MODEL_PREFIX = "disunknown-"
# what ``dsu_models.inference`` imports, pinned to the versions installed here
_REQUIREMENTS = ("torch", "numpy", "pillow", "pyyaml", "mlflow")
CODE_DIR = Path(dsu_models.__file__).resolve().parent


@dataclass
class Registration:
    """What :func:`log_and_register` did."""

    name: str
    version: str
    summary: float
    promoted: bool
    previous_version: str | None   # the alias holder before (None: there was none)
    previous_summary: float | None
    model_uri: str                 # MLflow URI of the logged model (models:/m-...)
    bar_failures: tuple[str, ...] = ()   # why it does not meet the champion bar (empty: it does)

    def describe(self, alias: str) -> str:
        """One line for the console: the version, whether it took ``alias`` (and
        why not) and the URI to load the model by."""
        this = f"{self.name} version {self.version} (summary {self.summary:.3f})"
        if self.bar_failures:
            return (f"{this} registered without @{alias}: it misses the champion bar on val ("
                    + "; ".join(self.bar_failures) + f"); load it as models:/{self.name}/{self.version}")
        if not self.promoted:
            return (f"{this} registered; @{alias} stays on version {self.previous_version} "
                    f"(summary {self.previous_summary:.3f}); load this one as "
                    f"models:/{self.name}/{self.version}")
        was = "" if self.previous_version is None else \
            f", replacing version {self.previous_version} (summary {self.previous_summary:.3f})"
        return f"{this} is now @{alias}{was}; load it as models:/{self.name}@{alias}"


def model_name(dataset: str) -> str:
    return f"{MODEL_PREFIX}{dataset}"


def signature_for(model: DisUnknownModel) -> tuple[ModelSignature, dict]:
    """The pyfunc's tensor signature and a matching two-image input example."""
    size, channels = model.config.image_size, model.config.image_channels
    k = len(model.labeled_factors)
    specs = [TensorSpec(np.dtype(np.uint8), (-1, size, size, channels), "images")]
    example = {"images": np.zeros((2, size, size, channels), np.uint8)}
    if k:
        specs.append(TensorSpec(np.dtype(np.int64), (-1, k), "labels"))
        example["labels"] = np.zeros((2, k), np.int64)
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, channels))])
    return ModelSignature(inputs=Schema(specs), outputs=outputs), example


def _requirements() -> list[str]:
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


@contextlib.contextmanager
def _package_copy():
    """A clean copy of the ``dsu_models`` package (no ``__pycache__``) for ``code_paths``."""
    with tempfile.TemporaryDirectory(prefix="dsu-code-") as tmp:
        target = Path(tmp) / CODE_DIR.name
        shutil.copytree(CODE_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        yield target


@contextlib.contextmanager
def _tracking(client: MlflowClient):
    """Point MLflow's fluent tracking API (``log_model``, ``start_run``) at the
    client's store for the duration, then put back what was there, including
    "not set". The registry is used only through ``client``."""
    was_set, old = mlflow.tracking.is_tracking_uri_set(), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old if was_set else None)


@contextlib.contextmanager
def _in_run(client: MlflowClient, run_id: str):
    """Make ``run_id`` the active run (it may already be); ending it restores its status."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    status = client.get_run(run_id).info.status
    mlflow.start_run(run_id=run_id, nested=active is not None)
    try:
        yield
    finally:
        mlflow.end_run(status=status)


def _register(client: MlflowClient, name: str, info, run_id: str, tags: dict):
    """A new version of ``name`` (created if missing) for the logged model, via
    ``client`` so that its registry, not a process-wide default, is used."""
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags,
                                       model_id=info.model_id)


def _summary_of(version) -> float | None:
    text = (version.tags or {}).get(SUMMARY_TAG)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def beats(summary: float, has_holder: bool, holder_summary: float | None) -> bool:
    """Whether a new version with ``summary`` takes the alias: a finite summary
    strictly above the holder's; any finite one when there is no holder or the
    holder has no finite recorded summary."""
    if not math.isfinite(summary):
        return False
    if not has_holder or holder_summary is None or not math.isfinite(holder_summary):
        return True
    return summary > holder_summary


def _alias_holder(client: MlflowClient, name: str, alias: str):
    """The version holding ``alias``, None when the alias is not set; any other registry
    error propagates (moving the alias without knowing the holder could demote a better model)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        not_set = exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") \
            and "not found" in str(exc).lower() and "alias" in str(exc).lower()
        if not_set:
            return None
        raise


def log_and_register(client: MlflowClient | str, run_id: str, bundle_dir: str | Path, dataset: str,
                     summary: float, alias: str = "champion", artifact_name: str = "model",
                     bar_failures: list[str] | tuple[str, ...] = ()) -> Registration:
    """Log ``bundle_dir`` as a pyfunc model in run ``run_id``, register it as
    ``disunknown-<dataset>`` and move ``alias`` to it if it meets the champion bar
    (``bar_failures`` empty) and its ``summary`` (on val) is better than the holder's.

    client: an ``MlflowClient`` or a tracking URI (e.g. ``sqlite:////abs/mlflow.db``).
    """
    client = client if isinstance(client, MlflowClient) else MlflowClient(client)
    bundle_dir = Path(bundle_dir).resolve()
    model = DisUnknownModel.load(bundle_dir, device="cpu")  # fails early on a bad bundle
    signature, example = signature_for(model)
    name = model_name(dataset)
    summary = float(summary)
    with _tracking(client), _in_run(client, run_id), _package_copy() as code:
        info = mlflow.pyfunc.log_model(name=artifact_name, python_model=str(PYFUNC_FILE),
                                       artifacts={"bundle": str(bundle_dir)}, signature=signature,
                                       input_example=example, pip_requirements=_requirements(),
                                       code_paths=[str(code)])
    tags = {SUMMARY_TAG: repr(summary), DATASET_TAG: dataset, RUN_TAG: run_id}
    with _tracking(client):  # the registry looks the logged model up through the tracking URI
        version = str(_register(client, name, info, run_id, tags).version)

    holder = _alias_holder(client, name, alias)
    previous_summary = _summary_of(holder) if holder is not None else None
    better = not bar_failures and beats(summary, holder is not None, previous_summary)
    if better:
        client.set_registered_model_alias(name, alias, version)
    return Registration(name, version, summary, better,
                        str(holder.version) if holder is not None else None, previous_summary,
                        info.model_uri, tuple(bar_failures))
