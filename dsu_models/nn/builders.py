"""Build the networks of docs/method.md section 5 from a resolved config.

Encoder and generator trunks use ``architecture.enc_gen_fc_layers`` FC blocks,
the discriminator and classifiers ``architecture.dis_cla_fc_layers``.
"""
from __future__ import annotations

from torch import nn

from dsu_models.config import Config
from dsu_models.data.base import FactorInfo
from dsu_models.embedder import LabelEmbedder
from dsu_models.nn.networks import (CodeClassifier, Discriminator, Encoder, Generator,
                                    ImageClassifier, Stage1Classifier)


def _trunk_args(cfg: Config, channels: int, fc_layers: int) -> tuple:
    a = cfg.architecture
    return (channels, cfg.image_size, a.conv_channels, a.conv_layers, a.fc_features, fc_layers)


def generator_code_size(cfg: Config) -> int:
    """Total code size fed to G: unknown + every labeled factor's code."""
    return cfg.unknown_size + sum(spec.size for _, spec in cfg.labeled())


def build_encoder(cfg: Config, code_sizes: list[int], zero_init: bool) -> Encoder:
    return Encoder(*_trunk_args(cfg, cfg.image_channels, cfg.architecture.enc_gen_fc_layers),
                   code_sizes=code_sizes, zero_init=zero_init)


def build_generator(cfg: Config) -> Generator:
    return Generator(*_trunk_args(cfg, cfg.image_channels, cfg.architecture.enc_gen_fc_layers),
                     code_size=generator_code_size(cfg))


def build_discriminator(cfg: Config, pairs: bool) -> Discriminator:
    """D; with ``pairs`` it judges two images stacked on channels (stage 2, ``dis`` mode)."""
    channels = cfg.image_channels * (2 if pairs else 1)
    return Discriminator(*_trunk_args(cfg, channels, cfg.architecture.dis_cla_fc_layers))


def build_image_classifier(cfg: Config, extra_fake: bool) -> ImageClassifier:
    counts = [spec.classes for _, spec in cfg.labeled()]
    return ImageClassifier(*_trunk_args(cfg, cfg.image_channels, cfg.architecture.dis_cla_fc_layers),
                           class_counts=counts, extra_fake=extra_fake)


def build_stage1_classifier(cfg: Config) -> Stage1Classifier:
    s1 = cfg.stage1
    counts = [spec.classes for _, spec in cfg.labeled()]
    image = build_image_classifier(cfg, False) if s1.cla1_mode != "code" else None
    code = (CodeClassifier(cfg.unknown_size, counts, s1.code_cla1_layers, s1.code_cla1_features)
            if s1.cla1_mode != "image" else None)
    return Stage1Classifier(s1.cla1_mode, image, code)


def build_embedders(cfg: Config, factors: list[FactorInfo]) -> nn.ModuleList:
    """One label embedder per labeled factor, frequencies from ``factors`` (same order)."""
    check_factors(cfg, factors)
    return nn.ModuleList(LabelEmbedder(spec.classes, spec.size, spec.init, info.freq_tensor())
                         for (_, spec), info in zip(cfg.labeled(), factors))


def check_factors(cfg: Config, factors: list[FactorInfo]):
    """``factors`` must be the labeled factors' infos, in config order."""
    names = [f.name for f in factors]
    if names != list(cfg.labeled_factors):
        raise ValueError(f"factor infos {names} do not match labeled_factors {cfg.labeled_factors}")
    for info, (name, spec) in zip(factors, cfg.labeled()):
        if info.classes != spec.classes:
            raise ValueError(f"factor {name!r}: data has {info.classes} classes, config {spec.classes}")
