"""Model bundles: what a trained model needs at use, gathered from the stage
hand-offs (docs/method.md section 2, the table's "hands on" column), and their files.

A bundle is a dict of plain tensors, lists, dicts and strings (so
``torch.load(weights_only=True)`` reads it): ``format`` / ``format_version``,
the resolved ``config``, the final ``weights`` (``encoder`` = E from stage 1 when
``unknown_size`` > 0; ``generator`` = G2, or G1 for a stage-1 model;
``embedders`` = B2 (or B1) when the model has label embeddings;
``label_encoder`` = S from ``lenc``, or from stage 2 with
``stage2.use_embedding: false``), the factor tables ``factors`` (labeled, config
order) and ``all_factors`` (every ground-truth factor) as ``FactorInfo.to_dict``
dicts, ``code_stats`` (the distilled unknown's statistics, or None),
``generator_stage``, the stages' ``iterations`` and, optionally, ``examples``: a
few held-out images of the training data (``images`` uint8 ``(N, C, S, S)``,
``labels`` int64 ``(N, F)`` over ``all_factors``), so that a served model can
show content images to swap wherever it runs (:func:`example_rows`).

Files (:func:`save_bundle`): ``DIR/model.pt`` plus ``DIR/config.yaml`` and
``DIR/factors.json`` for people. :func:`load_bundle` reads a directory, a
``model.pt`` or an MLflow URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
``runs:/RUN_ID/PATH``); MLflow is imported only then, so the library keeps
importing without it (tests/test_layering.py).

Hand-offs must come from one run: their configs may differ only in keys that
do not change weights (``device``, ``compile``).
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch

from dsu_models.config import Config, config_from_dict, flat_params, save_config
from dsu_models.data.base import FactorInfo
from dsu_models.files import save_torch, write_text
from dsu_models.nn.builders import check_factors

FORMAT = "disunknown-model"
FORMAT_VERSION = 1
BUNDLE_FILE = "model.pt"
_STAT_KEYS = ("mean", "std", "variance_ratio", "eigenvalues", "eigenvectors")
# What the hand-offs of one model must agree on: the data and every network's
# shape (top-level keys) and whether stage 2 kept embeddings. Stage sections may
# differ otherwise (stage 2 re-run or swept with new loss weights on one stage 1),
# and so may settings that do not change the weights.
_SHARED_SECTIONS = ("architecture", "factors")
_SHARED_STAGE_KEYS = ("stage2.use_embedding",)
_RUNTIME_KEYS = ("device", "compile")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


class ModelLoadError(RuntimeError):
    """A model URI or file could not be read; the message names it."""


# ------------------------------------------------------------------ bundles


def make_bundle(stage1: dict, stage2: dict | None = None, lenc: dict | None = None,
                code_stats: dict | None = None, factors: list[FactorInfo] | None = None,
                all_factors: list[FactorInfo] | None = None, examples: dict | None = None) -> dict:
    """A model bundle from stage hand-offs (``Stage.handoff()`` dicts).

    stage2 None: a stage-1 model (G1, B1; no S). lenc: S when stage 2 kept
    embeddings. code_stats: :func:`dsu_models.codes.code_statistics` of the
    train codes (``train.run(...)["codes"]["stats"]``). factors: the labeled
    factors' infos in config order (class names); default from the config, with
    the class frequencies the embedders hold. all_factors: every ground-truth
    factor (default: the config's factor table). examples: :func:`example_rows`
    of held-out data, or None.
    """
    handoffs = {"stage1": stage1, "stage2": stage2, "lenc": lenc}
    for name, h in handoffs.items():
        if h is not None and h.get("stage") != name:
            raise ValueError(f"make_bundle: the {name} argument is a {h.get('stage')!r} hand-off")
    if lenc is not None and stage2 is None:
        raise ValueError("make_bundle: a lenc hand-off needs the stage2 hand-off it was trained on")
    given = {n: h for n, h in handoffs.items() if h is not None}
    cfg = _common_config(given)
    last = lenc if lenc is not None else stage2 if stage2 is not None else stage1  # newest settings
    weights = _final_weights(cfg, stage1, stage2, lenc)
    factors = list(factors) if factors is not None else _config_factors(cfg, weights.get("embedders"))
    check_factors(cfg, factors)
    all_factors = list(all_factors) if all_factors is not None else _all_factors(cfg, factors)
    _check_all_factors(factors, all_factors)
    stats = None
    if code_stats is not None:
        missing = [k for k in _STAT_KEYS if k not in code_stats]
        if missing:
            raise ValueError(f"make_bundle: code_stats lacks {missing}")
        stats = {k: code_stats[k].detach().cpu() for k in _STAT_KEYS}
    if examples is not None:
        _check_examples(cfg, examples, all_factors)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "config": last["config"],
            "weights": weights, "factors": [f.to_dict() for f in factors],
            "all_factors": [f.to_dict() for f in all_factors], "code_stats": stats,
            "generator_stage": "stage2" if stage2 is not None else "stage1",
            "iterations": {n: int(h["iteration"]) for n, h in given.items()},
            "examples": examples}


EXAMPLES = 16  # held-out images a bundle carries by default


def example_rows(dataset, n: int = EXAMPLES) -> dict:
    """The first ``n`` images of an ``InMemoryDataset`` (a test or plot split) and
    their labels over all its factors, as a bundle's ``examples``."""
    n = min(n, len(dataset))
    return {"images": dataset.images[:n].clone().to(torch.uint8),
            "labels": dataset.labels[:n].clone().to(torch.int64)}


def _check_examples(cfg: Config, examples: dict, all_factors: list[FactorInfo]):
    images, labels = examples.get("images"), examples.get("labels")
    shape = (cfg.image_channels, cfg.image_size, cfg.image_size)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or tuple(images.shape[1:]) != shape:
        raise ValueError(f"make_bundle: examples['images'] must be uint8 (N, {', '.join(map(str, shape))})")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (images.shape[0], len(all_factors)):
        raise ValueError(f"make_bundle: examples['labels'] must be ({images.shape[0]}, {len(all_factors)})")


def bundle_from_run(results: dict, train=None, test=None) -> dict:
    """A bundle from :func:`dsu_models.train.run`'s result ``{stage: handoff, "distill": ...}``.
    train: the train split (an ``InMemoryDataset``) for class names; test: the
    held-out split its ``examples`` come from; both optional."""
    factors = all_factors = None
    if train is not None:
        cfg = config_from_dict(results["stage1"]["config"])
        all_factors = list(train.factors)
        by_name = {f.name: f for f in all_factors}
        factors = [by_name[name] for name in cfg.labeled_factors]
    stats = results["distill"]["stats"] if "distill" in results else None
    examples = example_rows(test) if test is not None and len(test) else None
    return make_bundle(results["stage1"], results.get("stage2"), results.get("lenc"), stats,
                       factors, all_factors, examples)


def _shared(key: str) -> bool:
    """Must hand-offs agree on this flat config key (see ``_SHARED_SECTIONS``)?"""
    if key in _RUNTIME_KEYS:
        return False
    head = key.split(".", 1)[0]
    if "." not in key or head in _SHARED_SECTIONS:
        return True
    return key in _SHARED_STAGE_KEYS


def _common_config(handoffs: dict[str, dict]) -> Config:
    flats = {n: flat_params(config_from_dict(h["config"])) for n, h in handoffs.items()}
    first, ref = next(iter(flats.items()))
    for name, flat in flats.items():
        diff = sorted(k for k in ref.keys() | flat.keys()
                      if ref.get(k) != flat.get(k) and _shared(k))
        if diff:
            raise ValueError(f"make_bundle: the {first} and {name} hand-offs have different configs "
                             f"(keys: {', '.join(diff[:8])})")
    return config_from_dict(handoffs[first]["config"])


def _final_weights(cfg: Config, stage1: dict, stage2: dict | None, lenc: dict | None) -> dict:
    def take(handoff: dict, key: str) -> dict:
        if key not in handoff["weights"]:
            raise ValueError(f"make_bundle: the {handoff['stage']} hand-off has no {key!r} weights "
                             f"(it has {sorted(handoff['weights'])})")
        return handoff["weights"][key]

    weights = {}
    if cfg.unknown_size:
        weights["encoder"] = take(stage1, "encoder")
    last = stage2 if stage2 is not None else stage1
    weights["generator"] = take(last, "generator")
    if "embedders" in last["weights"]:
        weights["embedders"] = last["weights"]["embedders"]
    elif cfg.labeled_factors and (stage2 is None or cfg.stage2.use_embedding):
        take(last, "embedders")  # raises: a model with labels needs B or S
    if stage2 is not None and "label_encoder" in stage2["weights"]:
        weights["label_encoder"] = stage2["weights"]["label_encoder"]
    if lenc is not None:
        weights["label_encoder"] = take(lenc, "label_encoder")
    return weights


def _config_factors(cfg: Config, embedder_weights: dict | None) -> list[FactorInfo]:
    out = []
    for k, (name, spec) in enumerate(cfg.labeled()):
        freq = embedder_weights.get(f"{k}.frequencies") if embedder_weights else None
        out.append(FactorInfo(name, spec.classes, (),
                              tuple(freq.tolist()) if freq is not None else ()))
    return out


def _all_factors(cfg: Config, factors: list[FactorInfo]) -> list[FactorInfo]:
    labeled = {f.name: f for f in factors}
    return [labeled.get(name) or FactorInfo(name, spec.classes) for name, spec in cfg.factors.items()]


def _check_all_factors(factors: list[FactorInfo], all_factors: list[FactorInfo]):
    table = {f.name: f.classes for f in all_factors}
    for f in factors:
        if table.get(f.name) != f.classes:
            raise ValueError(f"make_bundle: labeled factor {f.name!r} ({f.classes} classes) is not in "
                             f"all_factors as such: {table}")


def save_bundle(bundle: dict, directory: str | Path) -> Path:
    """Write ``directory/model.pt``, ``config.yaml`` and ``factors.json`` (each
    atomically); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_torch(bundle, directory / BUNDLE_FILE)
    save_config(config_from_dict(bundle["config"]), directory / "config.yaml")
    table = {k: bundle[k] for k in ("factors", "all_factors", "generator_stage", "iterations")}
    table["labeled_factors"] = [f["name"] for f in bundle["factors"]]
    text = json.dumps(table, indent=1)
    write_text(directory / "factors.json", text)
    return directory


def load_bundle(uri: str | Path, tracking_uri: str | None = None) -> dict:
    """Read a bundle from a directory, a ``model.pt`` file or an MLflow URI
    (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH``;
    any other artifact URI MLflow downloads works too)."""
    text = str(uri)
    if _URI.match(text) and not Path(text).exists():
        with tempfile.TemporaryDirectory(prefix="dsu-model-") as tmp:
            return _read_bundle(_bundle_file(_download(text, tmp, tracking_uri), text))
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{text}: no such file or directory (give a bundle directory, its "
                             f"{BUNDLE_FILE}, or models:/NAME@ALIAS, models:/NAME/VERSION, "
                             f"runs:/RUN_ID/PATH)")
    return _read_bundle(_bundle_file(path, text))


def _download(uri: str, dst: str, tracking_uri: str | None) -> Path:
    try:
        import mlflow
        import mlflow.artifacts
    except ImportError as exc:
        raise ModelLoadError(f"{uri}: loading from MLflow needs the mlflow package") from exc
    # Parts of MLflow's models:/ resolution use the process-wide tracking URI
    # whatever is passed in, so point it at the store for the download and put
    # back what was there (including "not set").
    was_set, old = mlflow.tracking.is_tracking_uri_set(), mlflow.get_tracking_uri()
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst,
                                                        tracking_uri=tracking_uri))
    except Exception as exc:  # MLflow raises many types; the user needs one clear line
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{uri}: could not download from MLflow: {message}") from exc
    finally:
        if tracking_uri is not None:
            mlflow.set_tracking_uri(old if was_set else None)


def _bundle_file(path: Path, uri: str) -> Path:
    """The bundle file at ``path``: the file itself, ``path/model.pt``, or the one
    ``model.pt`` below it (an MLflow pyfunc model keeps it under ``artifacts/``)."""
    if path.is_file():
        return path
    if (path / BUNDLE_FILE).is_file():
        return path / BUNDLE_FILE
    found = sorted(path.rglob(BUNDLE_FILE))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelLoadError(f"{uri}: no {BUNDLE_FILE} in {path}")
    raise ModelLoadError(f"{uri}: several {BUNDLE_FILE} files below it: "
                         f"{[str(p.relative_to(path)) for p in found]}")


def _read_bundle(path: Path) -> dict:
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable model bundle ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: not a DisUnknown model bundle (no format {FORMAT!r})")
    if bundle.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: bundle format version {bundle.get('format_version')}, "
                             f"this code reads version {FORMAT_VERSION}")
    return bundle
