"""Search spaces for Ray Tune sweeps of the loss weights, as YAML (docs/method.md sections 7, 8).

A space file names the stage it tunes and, for each swept config key, one
sampler (the schema is written out in the header of ``tune_spaces/*.yaml``)::

    stage: stage1
    space:
      stage1.cla1_weight: {loguniform: [0.05, 2.0]}
      stage1.cla1_adv_mode: {choice: [nlu, ll]}

Checked in two steps, both before any Ray work:

1. :func:`load_space` (the file alone): the schema, and every key against the
   ``Config`` dataclasses (:func:`config_field`), so a typo names the file and
   the key. A stage-2 space may sweep only ``stage2.*`` keys (everything else
   was fixed when stage 1 and the classifier were trained); a stage-1 space
   may not sweep keys of later stages or of the evaluation.
2. :meth:`Space.validate` (against a base config): every value a sampler can
   produce at its ends (range bounds, every choice) must pass config
   resolution, one key at a time and all keys together.

A sampled trial becomes ``key=value`` overrides (:meth:`Space.overrides`)
layered on the sweep's base config like command-line overrides.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dsu_models.config import STAGE_SECTIONS, Config, ConfigError, FactorSpec, read_yaml

SAMPLERS = ("loguniform", "uniform", "randint", "choice", "grid")
# judged on the validation split (pipelines.sweeps.judge.Judge names its metrics val_<metric>)
OBJECTIVES = {"stage1": "val_stage1_objective", "stage2": "val_summary"}
# Keys a stage-1 sweep must leave alone: they do not change what stage 1 trains
# or how it is judged consistently across trials.
NOT_IN_STAGE1 = ("classifier.", "stage2.", "lenc.", "evaluate.")


def config_field(key: str):
    """The type hint of a dotted config key (``stage1.cla1_weight`` -> float).

    Walks the ``Config`` dataclasses; ``factors.<name>.<field>`` takes any
    factor name (the dataset decides which exist) and ``all_stages.<key>``
    any key of some stage. Raises :class:`ConfigError` naming the bad part."""
    parts = key.split(".")
    cls: Any = Config
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{key}: {prefix!r} is a value, not a section")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = prefix or "the top level"
            raise ConfigError(f"{key}: no key {part!r} in {where} "
                              f"(valid: {', '.join(sorted(hints))})")
        hint = hints[part]
        if cls is Config and part == "factors":
            if len(parts) != i + 3:
                raise ConfigError(f"{key}: write factors.<factor>.<field>, e.g. factors.shape.size")
            return config_field_of(FactorSpec, parts[i + 2], key)
        if cls is Config and part == "all_stages":
            if len(parts) != i + 2:
                raise ConfigError(f"{key}: write all_stages.<stage key>, e.g. all_stages.lr")
            for stage_cls in STAGE_SECTIONS.values():
                if parts[-1] in typing.get_type_hints(stage_cls):
                    return typing.get_type_hints(stage_cls)[parts[-1]]
            raise ConfigError(f"{key}: {parts[-1]!r} is not a key of any stage")
        cls = hint
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"{key}: is a section; sweep one of its keys (e.g. {key}.{dataclasses.fields(cls)[0].name})")
    return cls


def config_field_of(cls, name: str, key: str):
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise ConfigError(f"{key}: no key {name!r} (valid: {', '.join(sorted(hints))})")
    return hints[name]


def _plain(value):
    """Tune's numpy scalars (and lists of them) -> plain Python values."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") and not isinstance(value, (int, float, str)) else value


@dataclass(frozen=True)
class Param:
    """One swept key: ``kind`` is a sampler name, ``values`` its bounds or options."""

    key: str
    kind: str
    values: tuple

    def candidates(self) -> list:
        """Values that must pass config resolution: both range ends, every option."""
        if self.kind in ("loguniform", "uniform"):
            return [float(v) for v in self.values]  # sampled values are floats
        return list(self.values)

    def to_tune(self):
        from ray import tune
        lo_hi = self.values
        if self.kind == "loguniform":
            return tune.loguniform(*lo_hi)
        if self.kind == "uniform":
            return tune.uniform(*lo_hi)
        if self.kind == "randint":
            return tune.randint(lo_hi[0], lo_hi[1] + 1)  # inclusive upper bound in the YAML
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))


@dataclass(frozen=True)
class Space:
    path: Path
    stage: str
    params: tuple[Param, ...]

    @property
    def objective(self) -> str:
        return OBJECTIVES[self.stage]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def param_space(self) -> dict:
        """Tune's ``param_space``: flat, one entry per swept dotted key."""
        return {p.key: p.to_tune() for p in self.params}

    @staticmethod
    def plain(sampled: dict) -> dict:
        return {k: _plain(v) for k, v in sampled.items()}

    @staticmethod
    def overrides(sampled: dict) -> list[str]:
        """A trial's sampled values as ``key=value`` overrides (values as JSON, which YAML reads)."""
        return [f"{k}={json.dumps(_plain(v))}" for k, v in sampled.items()]

    def validate(self, resolve_with: Callable[[list[str]], Config]) -> None:
        """Every candidate value, alone and with the other keys at their first
        candidates, must resolve. ``resolve_with(overrides) -> Config`` layers
        overrides on the sweep's base config."""
        for p in self.params:
            for value in p.candidates():
                self._try(resolve_with, {p.key: value}, f"{p.key}: {p.kind} value {value!r}")
        first = {p.key: p.candidates()[0] for p in self.params}
        self._try(resolve_with, first, "all keys at their first values")

    def _try(self, resolve_with, sampled: dict, what: str):
        try:
            resolve_with(self.overrides(sampled))
        except ConfigError as exc:
            raise ConfigError(f"search space {self.path}: {what} fails config resolution: {exc}") from exc


def _param(path: Path, key: str, spec) -> Param:
    where = f"search space {path}: {key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one sampler, e.g. {{loguniform: [0.05, 2.0]}}; "
                          f"got {spec!r} (samplers: {', '.join(SAMPLERS)})")
    ((kind, values),) = spec.items()
    if kind not in SAMPLERS:
        raise ConfigError(f"{where}: unknown sampler {kind!r} (samplers: {', '.join(SAMPLERS)})")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("loguniform", "uniform", "randint"):
        numeric = int if kind == "randint" else (int, float)
        if len(values) != 2 or not all(isinstance(v, numeric) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}: {kind} needs [low, high] "
                              f"({'integers' if kind == 'randint' else 'numbers'}), got {values!r}")
        low, high = values
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(f"{where}: {kind} needs low < high, got {values!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {values!r}")
    return Param(key, kind, tuple(values))


def load_space(path: str | Path) -> Space:
    """Read and check a space file on its own (schema, keys, stage rules)."""
    path = Path(path)
    data = read_yaml(path, "search space")
    unknown = set(data) - {"stage", "space"}
    if unknown:
        raise ConfigError(f"search space {path}: unknown top-level key(s) {sorted(unknown)} "
                          f"(expected 'stage' and 'space')")
    stage = data.get("stage")
    if stage not in OBJECTIVES:
        raise ConfigError(f"search space {path}: stage: {stage!r} is not one of {', '.join(OBJECTIVES)}")
    entries = data.get("space")
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"search space {path}: space: expected a mapping of config keys to samplers")
    params = []
    for key, spec in entries.items():
        try:
            config_field(str(key))
        except ConfigError as exc:
            raise ConfigError(f"search space {path}: {exc}") from exc
        if stage == "stage2" and not key.startswith("stage2."):
            raise ConfigError(f"search space {path}: {key}: a stage-2 sweep reuses a finished stage 1 "
                              f"and classifier, so only stage2.* keys can vary")
        if stage == "stage1" and key.startswith(NOT_IN_STAGE1):
            raise ConfigError(f"search space {path}: {key}: not part of stage 1 "
                              f"(a stage-1 sweep cannot vary {', '.join(NOT_IN_STAGE1)} keys)")
        if key.split(".")[-1] == "iterations":
            raise ConfigError(f"search space {path}: {key}: the iteration budget is ASHA's time axis "
                              f"and cannot be swept; set it in the config")
        params.append(_param(path, str(key), spec))
    return Space(path.resolve(), stage, tuple(params))
