"""The data a config names: a prepared directory (``data_path``) or a built-in
dataset generated in memory; the one loader of every runner (the
single-process runner, the Ray jobs' judges and evaluation, Tune trials,
``python -m dsu_models`` and the benchmarks), so one config means the same
images everywhere."""
from __future__ import annotations

from dsu_models.config import Config, ConfigError
from dsu_models.data.base import InMemoryDataset
from dsu_models.data.sources.builtin import BUILTIN


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
