"""Building what a run needs from names: the resolved config, the data, a stage.

The single-process runner (``dsu_models.train``), the Ray jobs and the Tune
trials all start here, so a config, a dataset and a stage mean the same thing
in each of them.
"""
from __future__ import annotations

from pathlib import Path

from dsu_models.config import CONFIG_DIR, Config, ConfigError, layered_dict, read_yaml, resolve
from dsu_models.data.base import InMemoryDataset
from dsu_models.data.sources.builtin import BUILTIN

PRESET_DIR = CONFIG_DIR / "presets"
STAGES = ("stage1", "classifier", "stage2", "lenc")


def config_path(name: str | None) -> Path | None:
    """A YAML path, or a preset name (``quick``) resolved under configs/presets."""
    if name is None:
        return None
    if Path(name).exists() or name.endswith((".yaml", ".yml")):
        return Path(name)
    preset = PRESET_DIR / f"{name}.yaml"
    if preset.exists():
        return preset
    known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"--config {name!r}: no such file and no such preset (presets: {known})")


def build_config(config: str | None, overrides: list[str]) -> Config:
    """Layer, validate and resolve; a prepared dataset's manifest supplies its factor table."""
    path = config_path(config)
    raw = layered_dict(read_yaml(path, "config file") if path else {}, overrides)
    data_factors, eval_factors = None, set()
    if raw.get("data_path"):
        from dsu_models.data import read_manifest
        manifest = read_manifest(raw["data_path"])
        data_factors = {f["name"]: int(f["classes"]) for f in manifest["factors"]}
        eval_factors = {f["name"] for f in manifest["factors"] if f.get("eval_only")}
    return resolve(raw, data_factors, eval_factors)


def load_data(cfg: Config) -> tuple[InMemoryDataset, InMemoryDataset, InMemoryDataset]:
    """(train, val, test) for the config: a prepared directory or a built-in dataset.

    val is empty (0 rows) when the data has no validation split: a built-in
    dataset with ``val_portion=0``, or a directory prepared with ``val_portion=0``."""
    if cfg.data_path:
        from dsu_models.data import has_val, read_manifest, read_split
        train = read_split(cfg.data_path, "train", image_size=cfg.image_size)
        val = (read_split(cfg.data_path, "val", image_size=cfg.image_size)
               if has_val(read_manifest(cfg.data_path)) else train.subset(slice(0, 0)))
        test = read_split(cfg.data_path, "test", image_size=cfg.image_size)
    elif cfg.dataset in BUILTIN:
        from dsu_models.data import load_builtin
        train, val, test = load_builtin(cfg.dataset, image_size=cfg.image_size,
                                        num_samples=cfg.num_samples, seed=cfg.seed,
                                        test_portion=cfg.test_portion, val_portion=cfg.val_portion)
    else:
        raise ConfigError(f"dataset {cfg.dataset!r}: set data_path to a prepared dataset "
                          f"(python pipelines/prepare_data.py {cfg.dataset} --out DIR)")
    for split in (train, val, test):
        if split.channels != cfg.image_channels or split.image_size != cfg.image_size:
            raise ConfigError(f"image_size/image_channels: config says {cfg.image_size} px x "
                              f"{cfg.image_channels} ch, {split.name} has {split.image_size} px x "
                              f"{split.channels} ch")
    return train.with_measured_frequencies(), val, test


def make_stage(name: str, cfg: Config, factors, upstream: dict, device):
    """The stage module ``name`` built from the config; ``upstream`` holds the
    hand-offs it starts from (``stage1``, ``classifier``, ``stage2``, ``code_stats``)."""
    if name == "stage1":
        from dsu_models.stages.stage1 import Stage1
        return Stage1(cfg, factors, device)
    if name == "classifier":
        from dsu_models.stages.classifier import ClassifierStage
        return ClassifierStage(cfg, factors, device)
    if name == "stage2":
        from dsu_models.stages.stage2 import Stage2
        return Stage2(cfg, factors, upstream, device)
    if name == "lenc":
        from dsu_models.stages.lenc import LencStage
        return LencStage(cfg, factors, upstream, device)
    raise ValueError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
