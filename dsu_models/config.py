"""Typed, layered, validated configuration (docs/method.md sections 3, 5, 9, 10).

Layers, later wins: global defaults (the dataclasses below, defined once) ->
dataset defaults (``configs/datasets/<dataset>.yaml``) -> the user's YAML file
-> command-line overrides (``stage1.cla1_weight=0.3``). Inside the result,
``all_stages`` is merged under each stage section (``stage1``, ``classifier``,
``stage2``, ``lenc``), so a stage section wins over ``all_stages``.

Derived values are computed once, in :func:`resolve`: the architecture from the
image size, default batch sizes, keep probabilities, the unknown code's size and
keep probabilities when not given, labeled factor code sizes. Resolution is
idempotent, so a saved resolved config reloads unchanged.

Every error is a :class:`ConfigError` naming the key and the bad value.

Choices where docs/method.md is silent (written down here once):
- Adam betas default to (0.5, 0.999) in every stage: all stages but the
  classifier pre-training are adversarial.
- ``zero_init`` defaults to true (encoders start at the prior, like the
  all-zero label embedders).
- ``random_offset`` defaults to true (augmentation for D and classifiers).
- A factor without a code size in the dataset defaults gets ``min(classes, 16)``.
- ``lenc.generated_weight`` defaults to 0.5: the labeled encoder also learns
  from G2's swaps (``stages/lenc.py``); 0 trains it on real images only.
- ``compile`` defaults to false: on CPU it costs minutes of compile time per
  stage for a modest speed-up (see ``benchmarks/stage_throughput.py --compile``).
- ``precision``, ``channels_last`` and ``cuda_graphs`` default to what measured
  fastest on each device while the losses still track float32's
  (docs/benchmarks.md, "On a GPU"); none changes the method's math beyond
  rounding.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsu_models.codes import keep_probabilities
from dsu_models.precision import PRECISIONS
from dsu_models.nn.networks import default_architecture

CONFIG_DIR = Path(__file__).parent / "configs"
DATASET_DIR = CONFIG_DIR / "datasets"
PRESET_DIR = CONFIG_DIR / "presets"


class ConfigError(ValueError):
    """A config key or value is wrong; the message names both."""


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


class DuplicateKey(yaml.YAMLError):
    """A mapping gives one key twice (YAML would keep the last value silently)."""

    def __init__(self, key: str, first: yaml.Mark, second: yaml.Mark):
        def where(mark, same_line):
            return f"line {mark.line + 1}" + (f", column {mark.column + 1}" if same_line else "")

        same = first.line == second.line
        super().__init__(f"key {key!r} is given twice, on {where(first, same)} and "
                         f"{where(second, same)} (YAML would silently keep the second); keep one")


def _no_duplicate_keys(node: yaml.Node, path: str = "", seen: set | None = None) -> None:
    """Raise :class:`DuplicateKey` for the first mapping, at any depth, that
    repeats a key; ``path``: the dotted key of ``node`` (``stage1.lr``)."""
    seen = set() if seen is None else seen
    if id(node) in seen:      # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        marks: dict[str, yaml.Mark] = {}
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":   # `<<: *base` may override: YAML's merge
                _no_duplicate_keys(value, path, seen)
                continue
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            dotted = f"{path}.{name}" if path else str(name)
            if name is not None and name in marks:
                raise DuplicateKey(dotted, marks[name], key.start_mark)
            if name is not None:
                marks[name] = key.start_mark
            _no_duplicate_keys(value, dotted, seen)
    elif isinstance(node, yaml.SequenceNode):
        for k, item in enumerate(node.value):
            _no_duplicate_keys(item, f"{path}[{k}]", seen)


def yaml_load(text: str, loader_class: type = _Loader):
    """Safe YAML (:class:`_Loader`, or ``yaml.SafeLoader`` for files another
    program reads too) that refuses a key given twice (:class:`DuplicateKey`)."""
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _no_duplicate_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


# ----------------------------------------------------------------- schema


@dataclass
class FactorSpec:
    """One ground-truth factor of the dataset (docs/method.md section 10 table)."""

    classes: int | None = None  # None: read from the prepared data's manifest
    size: int | None = None
    dropout: list[float] | None = None
    init: str = "zero"
    keep_prob: list[float] | None = None  # derived from dropout when not given


@dataclass
class ArchConfig:
    """Network shape (docs/method.md section 5); None = derived from the image size."""

    conv_channels: list[int] | None = None
    conv_layers: list[int] | None = None
    fc_features: int | None = None
    enc_gen_fc_layers: int = 2
    dis_cla_fc_layers: int = 0


@dataclass
class StageConfig:
    """Keys every stage has (docs/method.md sections 7-9)."""

    iterations: int = 100000
    batch_size: int | None = None
    lr: float = 1e-4
    lr_ramp: int = 100
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    random_offset: bool = True
    report_interval: int = 100
    sample_interval: int = 1000
    log_interval: int = 2000
    checkpoint_interval: int = 20000


# Stage 1's ramps, each [t1, t2] or null: the adversary's and the unknown code's two losses'
STAGE1_RAMP_KEYS = ("cla1_ramp", "ubatch_ramp", "ucode_ramp")


@dataclass
class Stage1Config(StageConfig):
    iterations: int = 200000
    emb_lr: float = 1e-3
    rec_weight: float = 1.0
    ucode_weight: float = 0.001
    lcode_weight: float = 0.001
    ubatch_weight: float = 0.1
    lbatch_weight: float = 0.1
    cla1_weight: float = 0.5
    cla1_mode: str = "compound"
    cla1_adv_mode: str = "nlu"   # nlu, ll (the method's) or prior (losses.adversarial_prior)
    cla1_ramp: list[int] | None = None
    # option beyond the method: after cla1_ramp, the adversary's weight adapts so that C's
    # accuracy over chance (0 = chance, 1 = every label read; mean over factors) stays at
    # or under this (stages/stage1.py, "Live leakage"); null: the fixed weight
    cla1_target: float | None = None
    ubatch_ramp: list[int] | None = None  # option beyond the method: the unknown batch loss from 0 at t1 to full at t2
    ucode_ramp: list[int] | None = None   # option beyond the method: the unknown code loss likewise
    gen_conv_adv: bool = False
    gen_fc_adv: bool = True
    enc_freeze: int = 0
    emb_freeze: int = 0
    zero_init: bool = True
    code_cla1_layers: int = 2
    code_cla1_features: int = 512
    code_plot_interval: int = 10000
    emb_plot_interval: int = 1000


@dataclass
class ClassifierConfig(StageConfig):
    iterations: int = 100000


@dataclass
class Stage2Config(StageConfig):
    iterations: int = 200000
    lr: float = 5e-5
    emb_lr: float = 1e-3
    unknown_mode: str = "dis"
    random_ucode: bool = False
    use_embedding: bool = True
    cla2_adv: bool = True
    has_rec_branch: bool = True
    fake_reflect: bool = False
    rec_weight: float = 1.0
    dis_weight: float = 1.0
    cla2_weight: float = 1.0
    cla2_fake_weight: float = 1.0
    match_weight: float = 0.1
    lcode_weight: float = 0.001
    lbatch_weight: float = 0.1
    zero_init: bool = True
    emb_plot_interval: int = 1000
    # an exponential moving average of G2 and its label side, handed on instead of
    # the last weights (stages/ema.py); 0: off, the method
    ema_decay: float = 0.0
    # > 0: an R1 penalty, this weight x mean ||grad of D at the real pairs||^2, trains D
    # (stage2.py); 0: off, the method
    r1_weight: float = 0.0
    # the discriminator's (and the adversarial classifier's) learning rate; null: lr
    dis_lr: float | None = None
    # with random_offset: whether R reads the shifted images too (the method) or the
    # images as they are, so that a labeled position keeps its label (the recipe's choice)
    cla2_offset: bool = True


@dataclass
class LencConfig(StageConfig):
    iterations: int = 100000
    zero_init: bool = True
    generated_weight: float = 0.5   # share of the loss from G2's swaps (stages/lenc.py); 0: real images only


@dataclass
class EvaluateConfig:
    """Evaluation of a finished model (``dsu_models.evaluation``, docs/method.md section 11).

    Oracles (one small CNN per ground-truth factor, trained on real training
    images, cached by dataset content) judge generated images; ``pairs`` seeded
    test pairs (a, b) measure swaps; a logistic-regression probe on up to
    ``probe_samples`` unknown-code means measures leakage.
    """

    pairs: int = 2000
    batch_size: int = 256
    oracle_epochs: int = 6
    oracle_samples: int | None = 4000   # training images the oracles see (None: all)
    oracle_width: int = 16              # oracle trunk channels (2x, then 4x, deeper down)
    probe_samples: int | None = 10000   # train codes for the leakage probe (None: all)
    # images per split behind the field's metrics (DCI, MIG, SAP, FactorVAE) on the whole
    # code; 0 turns them off (they need every factor labeled on every image)
    field_samples: int = 2000
    seed: int = 0
    # the bar a registered version must meet on the validation split to take the champion
    # alias (dsu_models.evaluation.metrics.champion_failures): mean swap accuracy, preservation
    # (oracles where hidden factors have labels, else content_consistency), leakage over chance
    champion_swap: float = 0.9
    champion_preserve: float = 0.8
    champion_leak: float = 0.1
    # evaluation curves while the Ray pipeline trains stage 1 and stage 2: every this many
    # iterations (at the first report past each multiple, and at the end) the model so far
    # is evaluated on the validation split by a Ray task beside the workers (one CPU) and
    # logged to the stage's MLflow run as val_* curves (pipelines/jobs/curves.py); 0: off
    curve_interval: int = 0


@dataclass
class Config:
    """The whole run. Top-level keys; see the module docstring for layering."""

    dataset: str = "shapes3d"
    data_path: str | None = None
    # where the Ray pipeline keeps what every node reaches (a shared path or a
    # URI, see pipelines.cluster.storage); None: $DSU_STORAGE, else $DSU_HOME
    storage: str | None = None
    # built-in datasets: how many images; None: the source module's DEFAULT_SAMPLES
    # (digits: all of them), in the single-process runner and the Ray pipeline alike
    num_samples: int | None = None
    test_portion: float = 0.1
    val_portion: float = 0.1  # share of train held out for validation (built-in datasets)
    image_size: int = 32
    image_channels: int = 3
    factors: dict[str, FactorSpec] = field(default_factory=dict)
    labeled_factors: list[str] | None = None
    unknown_size: int | None = None
    unknown_dropout: list[float] | None = None
    unknown_keep_prob: list[float] | None = None
    nested_dropout: bool = True
    seed: int = 0
    # the default recipe (dsu_models/recipe.py): every stage's schedule from this many
    # minutes of training and the data; null: the schedule is the config's own (presets)
    budget_minutes: float | None = None
    # the recipe's measured seconds per training step of each stage on this machine
    # ({stage1: 0.08, ...}; given: not measured)
    step_seconds: dict[str, float] | None = None
    device: str = "auto"
    compile: bool = False  # torch.compile the networks in place (stages/common.py); keys unchanged
    # numeric precision of training (dsu_models/precision.py): fp32, bf16 (autocast,
    # no loss scaling), fp16 (autocast and a dynamic loss scale)
    precision: str = "fp32"
    # conv networks and images in channels-last layout; null: on for CUDA, off on CPU
    channels_last: bool | None = None
    # cuDNN's autotuner picks each convolution's fastest algorithm (CUDA only)
    cudnn_benchmark: bool = True
    # each step replayed as one CUDA graph once the schedule is constant
    # (stages/graphs.py); null: on for CUDA (a CPU has no graphs)
    cuda_graphs: bool | None = None
    # Ray Train workers keep their decoded share of the training split (uint8 pixels)
    # in memory after the first epoch when it fits in this many MiB (0 = always
    # stream from Ray Data); 1024 holds 343k RGB images at 32 px, 87k at 64 px
    worker_cache_mb: int = 1024
    # Ray Train stages: the decoded training split is materialized once in the
    # cluster's object store when it fits in this many MiB (0 = off): decoded
    # once for all workers and epochs, and a restarted worker group reads it
    # from there instead of decoding again
    cluster_cache_mb: int = 0
    architecture: ArchConfig = field(default_factory=ArchConfig)
    all_stages: dict[str, Any] = field(default_factory=dict)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    lenc: LencConfig = field(default_factory=LencConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    # ------------------------------------------------------------ views

    def labeled(self) -> list[tuple[str, FactorSpec]]:
        """Labeled factors in config order: [(name, spec)]."""
        return [(name, self.factors[name]) for name in self.labeled_factors]

    def hidden(self) -> list[str]:
        """Factors with ground truth that are not labeled (lumped into the unknown)."""
        return [name for name in self.factors if name not in self.labeled_factors]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The stage sections, in training order: the fields of Config that hold a
# StageConfig, with its class (each is also a stage class's ``name``, dsu_models.stages).
STAGE_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)
                  if isinstance(f.default_factory, type) and issubclass(f.default_factory, StageConfig)}
STAGES = tuple(STAGE_SECTIONS)


# ------------------------------------------------------------- type checks


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check(value, hint, key: str):
    """Validate ``value`` against a type hint; return it (ints widened to float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if hint is Any:
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(hint)}")


def _build(cls, data: dict, prefix: str):
    """Dataclass ``cls`` from a dict: unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (valid keys: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{prefix}{f.name}: required key is missing")
            continue
        value, hint, key = data[f.name], hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, key + ".")
        elif f.name == "factors":
            kwargs[f.name] = {str(n): _build(FactorSpec, v, f"{key}.{n}.")
                              for n, v in _check(value, hint, key).items()}
        else:
            kwargs[f.name] = _check(value, hint, key)
    return cls(**kwargs)


# ---------------------------------------------------------------- layering


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path, what: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {exc.start}: "
                          f"{exc.object[exc.start:exc.start + 1]!r})") from None
    try:
        data = yaml_load(text)
    except DuplicateKey as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping at top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> nested dict; the value is parsed as YAML (``0.3``, ``[1,2]``, ``true``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. stage1.cla1_weight=0.3")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part in {key!r}")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except DuplicateKey as exc:
        raise ConfigError(f"override {text!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    nested: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def available_datasets() -> list[str]:
    return sorted(p.stem for p in DATASET_DIR.glob("*.yaml"))


def dataset_defaults(name: str) -> dict:
    """The dataset layer: what data source ``name``'s module declares
    (:func:`source_declared`) with ``configs/datasets/<name>.yaml`` over it. The YAML
    holds what a user tunes (code sizes, dropout, init, stage settings) and only the
    values the module leaves to the data; restating a declared one is an error."""
    path = DATASET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"dataset: no defaults for {name!r} "
                          f"(known datasets: {', '.join(available_datasets())})")
    tuned = read_yaml(path, "dataset defaults")
    declared = source_declared(name)
    restated = _restated(declared, tuned)
    if restated:
        raise ConfigError(f"dataset defaults {path}: {', '.join(restated)} restate what data source "
                          f"{name!r} declares (its DEFAULT_IMAGE_SIZE, CHANNELS and FACTORS); "
                          f"remove them from the YAML")
    return _deep_merge(declared, tuned)


def source_declared(name: str) -> dict:
    """The config keys data source ``name``'s module declares: ``image_size`` (its
    ``DEFAULT_IMAGE_SIZE``), ``image_channels`` (``CHANNELS``) and ``factors`` in its
    ``FACTORS`` order with their ``classes``. A None there (the data decide) leaves
    the value out, but a factor keeps its place in the order. {} when no source has
    that name."""
    # here, not at module level: the data package is heavier to import than the config
    from dsu_models.data.sources import SOURCES

    module = SOURCES.get(name)
    if module is None:
        return {}
    out: dict = {"factors": {f: ({} if c is None else {"classes": c}) for f, c in module.FACTORS}}
    for key, value in (("image_size", module.DEFAULT_IMAGE_SIZE), ("image_channels", module.CHANNELS)):
        if value is not None:
            out[key] = value
    return out


def _restated(declared: dict, tuned: dict) -> list[str]:
    """Keys of a dataset YAML (``tuned``) that :func:`source_declared` already gives."""
    keys = [k for k in ("image_size", "image_channels") if k in declared and k in tuned]
    factors = tuned.get("factors")
    if declared and isinstance(factors, dict):   # not a mapping: resolve() names the error
        keys += [f"factors.{f}.classes" for f, spec in declared["factors"].items()
                 if "classes" in spec and isinstance(factors.get(f), dict) and "classes" in factors[f]]
    return keys


def layered_dict(user: dict | None = None, overrides: list[str] | tuple = (),
                 recipe: dict | None = None) -> dict:
    """Raw merged dict of dataset defaults, the recipe's layer (when given),
    the user's dict and the overrides."""
    user = user or {}
    over: dict = {}
    for text in overrides:
        over = _deep_merge(over, parse_override(text))
    name = over.get("dataset", user.get("dataset", Config.dataset))
    if not isinstance(name, str):
        raise ConfigError(f"dataset: expected a string, got {name!r}")
    layers = [dataset_defaults(name), recipe or {}, user, over]
    # Expand each layer's all_stages into its own stage sections first, so a
    # later layer's all_stages beats an earlier layer's stage section.
    merged: dict = {}
    for layer in layers:
        merged = _deep_merge(merged, _merge_all_stages(layer, keep_sections_only=True))
    return merged


def config_path(name: str | Path | None) -> Path | None:
    """A YAML path, or a preset name (``quick``) resolved under ``configs/presets``."""
    if name is None:
        return None
    if Path(name).exists() or str(name).endswith((".yaml", ".yml")):
        return Path(name)
    preset = PRESET_DIR / f"{name}.yaml"
    if preset.exists():
        return preset
    known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"--config {name!r}: no such file and no such preset (presets: {known})")


# The budget of the default recipe when an entry point runs with no --config.
DEFAULT_BUDGET_MINUTES = 30.0


def load_config(config: str | Path | None = None, overrides: list[str] | tuple = (),
                data_factors: dict[str, int] | None = None, default_recipe: bool = False,
                recipe=None) -> Config:
    """The one config loader: layer, validate and resolve.

    config: a YAML file or a preset name (``quick``, ``quality``, ``tiny``);
    overrides: ``key=value`` strings. When ``data_factors`` is not given and the
    layered config names a prepared dataset (``data_path``), its manifest supplies
    the factor table (classes, evaluation-only factors); see :func:`resolve`.
    With ``budget_minutes`` set, the default recipe is a layer under the user's
    file and overrides: ``recipe(base)`` returns it, given ``base(layer)``, the
    config resolved with a trial layer (``dsu_models.recipe.configured`` passes
    it; this module does not import the recipe, which times stages).
    ``default_recipe``: with no ``config`` named, ``budget_minutes`` defaults to
    :data:`DEFAULT_BUDGET_MINUTES` (what the entry points do)."""
    path = config_path(config)
    user = read_yaml(path, "config file") if path else {}
    if default_recipe and path is None:
        overrides = [f"budget_minutes={DEFAULT_BUDGET_MINUTES}"] + list(overrides)
    raw = layered_dict(user, overrides)
    eval_factors: set[str] = set()
    if data_factors is None and raw.get("data_path"):
        from dsu_models.data import read_manifest  # the data package imports numpy; config stays light
        manifest = read_manifest(raw["data_path"])
        data_factors = {f["name"]: int(f["classes"]) for f in manifest["factors"]}
        eval_factors = {f["name"] for f in manifest["factors"] if f.get("eval_only")}
    if raw.get("budget_minutes") is not None:
        if recipe is None:
            raise ConfigError("budget_minutes: the default recipe sets the schedule; load this config "
                              "with dsu_models.recipe.configured (or set budget_minutes: null)")
        layer = recipe(lambda trial: resolve(layered_dict(user, overrides, trial), data_factors, eval_factors))
        raw = layered_dict(user, overrides, layer)
    return resolve(raw, data_factors, eval_factors)


# --------------------------------------------------------------- resolution


def _merge_all_stages(raw: dict, keep_sections_only: bool = False) -> dict:
    """Apply ``all_stages`` under every stage section that has the key (the
    stage section wins). ``keep_sections_only``: leave ``all_stages`` empty
    and add stage sections only where they receive keys."""
    common = raw.get("all_stages") or {}
    if not isinstance(common, dict):
        raise ConfigError(f"all_stages: expected a mapping, got {common!r}")
    known = set().union(*({f.name for f in dataclasses.fields(c)} for c in STAGE_SECTIONS.values()))
    for key in common:
        if key not in known:
            raise ConfigError(f"all_stages.{key}: unknown key (not a key of any stage)")
    raw = dict(raw)
    for stage, cls in STAGE_SECTIONS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        section = raw.get(stage) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{stage}: expected a mapping, got {section!r}")
        merged = {**{k: v for k, v in common.items() if k in names}, **section}
        if merged or not keep_sections_only:
            raw[stage] = merged
    if keep_sections_only and "all_stages" in raw:
        raw["all_stages"] = {}
    return raw


def default_batch_size(image_size: int) -> int:
    """docs/method.md section 5: 64 up to 32 px, then 2048 // size up to 512 px, else 4."""
    if image_size <= 32:
        return 64
    if image_size <= 512:
        return max(2048 // image_size, 4)
    return 4


def _check_probs(values: list[float] | None, key: str):
    if values is None:
        return
    for i, v in enumerate(values):
        if not 0.0 < v <= 1.0:
            raise ConfigError(f"{key}[{i}]: keep probability {v!r} is not within (0, 1]")


def _check_choice(value: str, choices: tuple, key: str):
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def _resolve_factors(cfg: Config, data_factors: dict[str, int] | None, eval_factors=frozenset()):
    if data_factors is not None:
        for name, spec in cfg.factors.items():
            if name in data_factors and spec.classes is not None and data_factors[name] != spec.classes:
                raise ConfigError(f"factors.{name}.classes: config says {spec.classes}, "
                                  f"the data has {data_factors[name]}")
        for name, classes in data_factors.items():
            cfg.factors.setdefault(name, FactorSpec(classes=classes))
            if cfg.factors[name].classes is None:
                cfg.factors[name].classes = classes
    if cfg.labeled_factors is None:
        cfg.labeled_factors = [name for name in cfg.factors if name not in eval_factors]
    for i, name in enumerate(cfg.labeled_factors):
        if name not in cfg.factors:
            raise ConfigError(f"labeled_factors[{i}]: dataset {cfg.dataset!r} has no factor {name!r} "
                              f"(factors: {', '.join(cfg.factors) or 'none'})")
        if name in eval_factors:
            raise ConfigError(f"labeled_factors[{i}]: {name!r} is evaluation-only (declared with "
                              f"eval_factors); it cannot be trained on")
    if len(set(cfg.labeled_factors)) != len(cfg.labeled_factors):
        raise ConfigError(f"labeled_factors: repeated names in {cfg.labeled_factors!r}")
    for name, spec in cfg.factors.items():
        key = f"factors.{name}"
        if spec.classes is None:
            raise ConfigError(f"{key}.classes: not given, and no prepared dataset says it "
                              f"(set data_path to the prepared dataset)")
        if spec.classes < 2:
            raise ConfigError(f"{key}.classes: {spec.classes} (a factor needs at least 2 classes)")
        _check_choice(spec.init, ("zero", "linear", "circle"), f"{key}.init")
        if spec.size is None:
            spec.size = min(spec.classes, 16)
        if spec.size < 1:
            raise ConfigError(f"{key}.size: {spec.size} (must be at least 1)")
        if spec.init == "circle" and spec.size < 2:
            raise ConfigError(f"{key}.size: {spec.size} (circle init needs a code of at least 2 dims)")
        _check_probs(spec.dropout, f"{key}.dropout")
        if spec.keep_prob is None and cfg.nested_dropout:
            spec.keep_prob = keep_probabilities(spec.dropout, spec.size)
        if not cfg.nested_dropout:
            spec.keep_prob = None
        _check_keep_prob(spec.keep_prob, spec.size, f"{key}.keep_prob")


def _check_keep_prob(keep: list[float] | None, size: int, key: str):
    if keep is None:
        return
    _check_probs(keep, key)
    if len(keep) != size:
        raise ConfigError(f"{key}: {len(keep)} values for a code of size {size}")
    if any(b > a for a, b in zip(keep, keep[1:])):
        raise ConfigError(f"{key}: {keep!r} must be non-increasing")


def _resolve_unknown(cfg: Config, eval_factors=frozenset()):
    _check_probs(cfg.unknown_dropout, "unknown_dropout")
    hidden = [n for n in cfg.hidden() if n not in eval_factors]
    if cfg.unknown_size is None:
        cfg.unknown_size = sum(cfg.factors[n].size for n in hidden)
        if cfg.unknown_keep_prob is None and cfg.unknown_dropout is None and cfg.nested_dropout:
            keep = []
            for n in hidden:
                spec = cfg.factors[n]
                keep += spec.keep_prob if spec.keep_prob else [1.0] * spec.size
            keep.sort(reverse=True)
            cfg.unknown_keep_prob = keep if any(k < 1.0 for k in keep) else None
    if cfg.unknown_size < 0:
        raise ConfigError(f"unknown_size: {cfg.unknown_size} (must be >= 0)")
    if cfg.unknown_keep_prob is None and cfg.nested_dropout:
        cfg.unknown_keep_prob = keep_probabilities(cfg.unknown_dropout, cfg.unknown_size)
    if not cfg.nested_dropout:
        cfg.unknown_keep_prob = None
    _check_keep_prob(cfg.unknown_keep_prob, cfg.unknown_size, "unknown_keep_prob")
    if cfg.unknown_size == 0 and not cfg.labeled_factors:
        raise ConfigError("unknown_size: 0 with no labeled factors leaves the generator no input")


def _resolve_architecture(cfg: Config):
    arch = cfg.architecture
    derived = default_architecture(cfg.image_size)
    if arch.conv_channels is None:
        arch.conv_channels = list(derived["conv_channels"])
    if arch.fc_features is None:
        arch.fc_features = derived["fc_features"]
    if arch.conv_layers is None:
        arch.conv_layers = [1] * len(arch.conv_channels)
    if len(arch.conv_layers) != len(arch.conv_channels):
        raise ConfigError(f"architecture.conv_layers: {arch.conv_layers!r} has {len(arch.conv_layers)} "
                          f"entries for {len(arch.conv_channels)} conv levels")
    for key in ("enc_gen_fc_layers", "dis_cla_fc_layers", "fc_features"):
        if getattr(arch, key) < 0:
            raise ConfigError(f"architecture.{key}: {getattr(arch, key)} (must be >= 0)")
    for i, n in enumerate(arch.conv_layers):
        if n < 1:
            raise ConfigError(f"architecture.conv_layers[{i}]: {n} (must be >= 1)")
    # Each level halves the size (rounded up to even before non-final levels).
    size = cfg.image_size
    for i in range(len(arch.conv_channels)):
        last = i == len(arch.conv_channels) - 1
        if not last and size % 4 == 2:
            size += 2
        size //= 2
        if size < 1 or (not last and size < 2):
            raise ConfigError(f"architecture.conv_channels: {len(arch.conv_channels)} levels are too many "
                              f"for image_size {cfg.image_size}")


def _resolve_stages(cfg: Config):
    for stage in STAGES:
        sc = getattr(cfg, stage)
        if sc.batch_size is None:
            sc.batch_size = default_batch_size(cfg.image_size)
        for key in ("iterations", "batch_size", "report_interval", "sample_interval",
                    "log_interval", "checkpoint_interval"):
            value = getattr(sc, key)
            if value < 1:
                raise ConfigError(f"{stage}.{key}: {value} (must be positive"
                                  + ("; a stage of 0 iterations would hand on untrained weights)"
                                     if key == "iterations" else ")"))
        if sc.lr_ramp < 0:
            raise ConfigError(f"{stage}.lr_ramp: {sc.lr_ramp} (must be >= 0)")
        if len(sc.betas) != 2 or not all(0 <= b < 1 for b in sc.betas):
            raise ConfigError(f"{stage}.betas: {sc.betas!r} (need two values in [0, 1))")
        if sc.batch_size < 2:
            raise ConfigError(f"{stage}.batch_size: {sc.batch_size} (batch statistics need at least 2)")
    s1, s2 = cfg.stage1, cfg.stage2
    _check_choice(s1.cla1_mode, ("image", "code", "compound"), "stage1.cla1_mode")
    _check_choice(s1.cla1_adv_mode, ("nlu", "ll", "prior"), "stage1.cla1_adv_mode")
    _check_choice(s2.unknown_mode, ("dis", "mse"), "stage2.unknown_mode")
    if s1.cla1_target is not None and not 0.0 <= s1.cla1_target < 1.0:
        raise ConfigError(f"stage1.cla1_target: {s1.cla1_target} (must be within [0, 1): C's "
                          f"accuracy over chance; null keeps the weight fixed)")
    for key in STAGE1_RAMP_KEYS:
        span = getattr(s1, key)
        if span is not None and (len(span) != 2 or not 0 <= span[0] <= span[1]):
            raise ConfigError(f"stage1.{key}: {span!r} (need [t1, t2] with 0 <= t1 <= t2)")
    if not 0.0 <= cfg.lenc.generated_weight < 1.0:
        raise ConfigError(f"lenc.generated_weight: {cfg.lenc.generated_weight} (must be within [0, 1): "
                          f"real images always keep a share)")
    if not 0.0 <= s2.ema_decay < 1.0:
        raise ConfigError(f"stage2.ema_decay: {s2.ema_decay} (must be within [0, 1); 0 turns it off)")
    if s2.r1_weight < 0:
        raise ConfigError(f"stage2.r1_weight: {s2.r1_weight} (must be >= 0; 0 turns it off)")
    if s2.dis_lr is not None and s2.dis_lr <= 0:
        raise ConfigError(f"stage2.dis_lr: {s2.dis_lr} (must be positive, or null for stage2.lr)")
    if s2.random_ucode and cfg.unknown_size == 0:
        raise ConfigError("stage2.random_ucode: true needs an unknown code (unknown_size is 0)")
    ev = cfg.evaluate
    for key in ("pairs", "batch_size", "oracle_epochs", "oracle_width", "oracle_samples", "probe_samples"):
        value = getattr(ev, key)
        if value is not None and value < 1:
            raise ConfigError(f"evaluate.{key}: {value} (must be positive)")
    if ev.curve_interval < 0:
        raise ConfigError(f"evaluate.curve_interval: {ev.curve_interval} (must be >= 0; 0 turns the curves off)")
    if ev.field_samples < 0:
        raise ConfigError(f"evaluate.field_samples: {ev.field_samples} (must be >= 0; 0 turns them off)")
    for key in ("champion_swap", "champion_preserve", "champion_leak"):
        if not 0.0 <= getattr(ev, key) <= 1.0:
            raise ConfigError(f"evaluate.{key}: {getattr(ev, key)} (must be within [0, 1])")


def _check_device(device: str):
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return
    raise ConfigError(f"device: {device!r} is not one of auto, cpu, cuda, cuda:N")


def resolve(raw: dict, data_factors: dict[str, int] | None = None,
            eval_factors: frozenset[str] | set[str] = frozenset()) -> Config:
    """Validate a raw layered dict and compute every derived value.

    data_factors: ``{factor: classes}`` read from a prepared dataset's
    manifest, when the data decides the factor table (e.g. ``image_folder``);
    factors the dataset defaults do not list are added with default code sizes.
    eval_factors: the data's evaluation-only factors (manifest ``eval_only``):
    never labeled (left out of the default ``labeled_factors``, refused when
    named) and not counted in the default ``unknown_size``.
    """
    cfg = _build(Config, _merge_all_stages(raw), "")
    if cfg.image_size < 2 or cfg.image_size % 2:
        raise ConfigError(f"image_size: {cfg.image_size} (must be even and at least 2)")
    if cfg.image_channels < 1:
        raise ConfigError(f"image_channels: {cfg.image_channels} (must be at least 1)")
    if not 0.0 < cfg.test_portion < 1.0:
        raise ConfigError(f"test_portion: {cfg.test_portion} (must be within (0, 1))")
    if not 0.0 <= cfg.val_portion < 1.0:
        raise ConfigError(f"val_portion: {cfg.val_portion} (must be within [0, 1); "
                          f"0 = no validation split)")
    if cfg.cluster_cache_mb < 0:
        raise ConfigError(f"cluster_cache_mb: {cfg.cluster_cache_mb} (must be >= 0; 0 turns it off)")
    if cfg.worker_cache_mb < 0:
        raise ConfigError(f"worker_cache_mb: {cfg.worker_cache_mb} (must be >= 0; 0 turns the cache off)")
    if cfg.num_samples is not None and cfg.num_samples < 2:
        raise ConfigError(f"num_samples: {cfg.num_samples} (must be at least 2)")
    _check_device(cfg.device)
    _check_choice(cfg.precision, PRECISIONS, "precision")
    if cfg.cuda_graphs and cfg.device == "cpu":
        raise ConfigError("cuda_graphs: true needs a CUDA device (device is cpu)")
    _resolve_factors(cfg, data_factors, eval_factors)
    _resolve_unknown(cfg, eval_factors)
    _resolve_architecture(cfg)
    _resolve_stages(cfg)
    return cfg


# ------------------------------------------------------------- save / load


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically: temp name, then rename)."""
    from dsu_models.files import write_text  # files imports torch; config stays light
    return write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(data: dict) -> Config:
    """Rebuild a config from :meth:`Config.to_dict` output (e.g. a checkpoint)."""
    return resolve(data)


def load_resolved(path: str | Path) -> Config:
    """Reload a config written by :func:`save_config` (no dataset layering)."""
    return resolve(read_yaml(Path(path), "resolved config"))


def flat_params(cfg: Config) -> dict[str, str]:
    """``{"stage1.cla1_weight": "0.5", ...}``: the config as flat strings (e.g. for tracking)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(value)

    walk("", cfg.to_dict())
    return out


def config_diff(old: Config, new: Config) -> list[str]:
    """The flat keys (``stage1.lr``, ...) whose values differ between two configs, sorted."""
    a, b = flat_params(old), flat_params(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
