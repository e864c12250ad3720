"""Config layering, derivation, validation and round trip (docs/method.md sections 3, 5, 10)."""
from __future__ import annotations

import pytest
import yaml

from dsu_models.config import (ConfigError, available_datasets, default_batch_size, load_config,
                               load_resolved, parse_override, save_config)
from dsu_models.steps import trained_stages


def test_every_dataset_default_resolves():
    names = available_datasets()
    for expected in ("shapes3d", "sprites", "digits", "mnist", "fashion_mnist", "qmnist", "svhn",
                     "cifar10", "3dshapes", "dsprites", "chairs3d", "image_folder"):
        assert expected in names
    for name in names:
        data_factors = {"writer": 100} if name == "qmnist" else ({"style": 3} if name == "image_folder" else None)
        cfg = load_config(overrides=[f"dataset={name}"], data_factors=data_factors)
        assert cfg.dataset == name
        assert cfg.stage1.batch_size == default_batch_size(cfg.image_size)


def test_layering_order(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({
        "dataset": "mnist",
        "all_stages": {"batch_size": 16, "lr": 3e-4, "cla1_weight": 0.7},
        "stage2": {"batch_size": 8},
        "stage1": {"iterations": 50},
    }))
    cfg = load_config(user, ["stage1.iterations=7", "stage1.cla1_weight=0.3"])
    assert cfg.image_size == 28 and cfg.image_channels == 1  # dataset defaults
    assert cfg.stage1.iterations == 7  # override beats the user file
    assert cfg.stage1.cla1_weight == 0.3  # override beats all_stages
    assert cfg.stage1.batch_size == 16 and cfg.classifier.batch_size == 16  # all_stages
    assert cfg.stage2.batch_size == 8  # stage section beats all_stages
    assert cfg.lenc.lr == 3e-4
    assert cfg.classifier.iterations == 40000  # MNIST schedule
    assert cfg.stage1.lcode_weight == 0.01 and cfg.stage1.ucode_weight == 0.001


def test_derived_values_mnist():
    cfg = load_config(overrides=["dataset=mnist"])
    assert cfg.architecture.conv_channels == [32, 64, 128]
    assert cfg.architecture.fc_features == 512
    assert cfg.architecture.conv_layers == [1, 1, 1]
    assert cfg.labeled_factors == ["class"]
    assert cfg.unknown_size == 64
    assert cfg.unknown_keep_prob[0] == 1.0 and cfg.unknown_keep_prob[-1] == pytest.approx(0.2)
    assert cfg.factors["class"].keep_prob[:2] == [1.0, 0.95]
    assert trained_stages(cfg) == ["stage1", "classifier", "stage2", "lenc"]


def test_unknown_derived_from_hidden_factors():
    cfg = load_config(overrides=["labeled_factors=[floor_hue, wall_hue, object_hue, shape]"])
    # scale (2, [0.8]) and orientation (2, [0.8]) are hidden: sizes add, keep probs sorted.
    assert cfg.unknown_size == 4
    assert cfg.unknown_keep_prob == [1.0, 1.0, 0.8, 0.8]
    assert cfg.hidden() == ["scale", "orientation"]


def test_all_labeled_and_all_unknown_variants():
    assert load_config().hidden() == ["floor_hue", "wall_hue"]   # shapes3d's default labels
    cfg = load_config(overrides=["labeled_factors=null"])
    assert cfg.unknown_size == 0 and cfg.unknown_keep_prob is None
    cfg = load_config(overrides=["labeled_factors=[]"])
    assert cfg.unknown_size == sum(f.size for f in cfg.factors.values())
    assert trained_stages(cfg) == ["stage1", "stage2"]
    cfg = load_config(overrides=["stage2.use_embedding=false", "dataset=mnist"])
    assert trained_stages(cfg) == ["stage1", "classifier", "stage2"]


def test_nested_dropout_off():
    cfg = load_config(overrides=["dataset=mnist", "nested_dropout=false"])
    assert cfg.unknown_keep_prob is None and cfg.factors["class"].keep_prob is None


@pytest.mark.parametrize("size,batch", [(28, 64), (32, 64), (64, 32), (128, 16), (512, 4), (1024, 4)])
def test_default_batch_size(size, batch):
    assert default_batch_size(size) == batch


@pytest.mark.parametrize("overrides,fragment", [
    (["stage1.cla1_wieght=0.3"], "stage1.cla1_wieght: unknown key"),
    (["bogus=1"], "bogus: unknown key"),
    (["all_stages.nonsense=1"], "all_stages.nonsense: unknown key"),
    (["architecture.conv_chanels=[1]"], "architecture.conv_chanels: unknown key"),
    (["stage1.cla1_weight=high"], "stage1.cla1_weight: expected a number, got 'high'"),
    (["stage1.iterations=1.5"], "stage1.iterations: expected an integer, got 1.5"),
    (["stage2.cla2_adv=3"], "stage2.cla2_adv: expected true or false, got 3"),
    (["labeled_factors=[floor_hue, colour]"], "labeled_factors[1]: dataset 'shapes3d' has no factor 'colour'"),
    (["image_size=33"], "image_size: 33"),
    (["unknown_dropout=[0.5, 1.5]", "unknown_size=4"], "unknown_dropout[1]: keep probability 1.5 is not within (0, 1]"),
    (["factors.shape.dropout=[0.0]"], "factors.shape.dropout[0]: keep probability 0.0 is not within (0, 1]"),
    (["stage1.cla1_mode=pixels"], "stage1.cla1_mode: 'pixels' is not one of image, code, compound"),
    (["stage1.cla1_adv_mode=xx"], "stage1.cla1_adv_mode: 'xx'"),
    (["stage2.unknown_mode=l1"], "stage2.unknown_mode: 'l1'"),
    (["stage2.r1_weight=-1"], "stage2.r1_weight: -1"),
    (["factors.floor_hue.init=spiral"], "factors.floor_hue.init: 'spiral'"),
    (["dataset=imagenet"], "dataset: no defaults for 'imagenet'"),
    (["stage1.cla1_ramp=[5, 2]"], "stage1.cla1_ramp: [5, 2]"),
    (["stage1.ubatch_ramp=[3]"], "stage1.ubatch_ramp: [3]"),
    (["device=tpu"], "device: 'tpu'"),
    (["worker_cache_mb=-1"], "worker_cache_mb: -1"),
    (["val_portion=1.0"], "val_portion: 1.0 (must be within [0, 1)"),
    (["val_portion=-0.1"], "val_portion: -0.1 (must be within [0, 1)"),
    (["architecture.conv_layers=[1, 1]"], "architecture.conv_layers: [1, 1] has 2 entries for 3 conv levels"),
])
def test_bad_configs_name_key_and_value(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert fragment in str(info.value)


def test_bad_override_syntax_and_file(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("stage1.cla1_weight")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_data_factor_table_checked():
    with pytest.raises(ConfigError, match="factors.class.classes: config says 10, the data has 12"):
        load_config(overrides=["dataset=mnist"], data_factors={"class": 12})
    with pytest.raises(ConfigError, match="factors.writer.classes: not given"):
        load_config(overrides=["dataset=qmnist"])
    cfg = load_config(overrides=["dataset=image_folder"], data_factors={"colour": 5, "kind": 30})
    assert cfg.labeled_factors == ["colour", "kind"]
    assert cfg.factors["kind"].size == 16


def test_eval_only_factors_are_never_trained_on():
    """An evaluation-only factor of the data: not labeled by default, refused when
    named, and not in the default unknown code; a config naming neither resolves."""
    from dsu_models.config import layered_dict, resolve

    data = {"colour": 5, "kind": 30, "pose": 4}
    cfg = resolve(layered_dict({}, ["dataset=image_folder"]), data, {"pose"})
    assert cfg.labeled_factors == ["colour", "kind"] and cfg.hidden() == ["pose"]
    assert cfg.unknown_size == 0 and cfg.factors["pose"].classes == 4
    cfg = resolve(layered_dict({}, ["dataset=image_folder", "labeled_factors=[colour]"]), data, {"pose"})
    assert cfg.unknown_size == cfg.factors["kind"].size == 16       # kind, not pose
    with pytest.raises(ConfigError, match=r"labeled_factors\[1\]: 'pose' is evaluation-only \(declared "
                                          r"with eval_factors\); it cannot be trained on"):
        resolve(layered_dict({}, ["dataset=image_folder", "labeled_factors=[colour, pose]"]), data,
                {"pose"})


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(overrides=["labeled_factors=[floor_hue, shape]", "stage1.cla1_weight=0.25",
                                 "all_stages.batch_size=8"])
    path = save_config(cfg, tmp_path / "resolved.yaml")
    again = load_resolved(path)
    assert again == cfg
    save_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == path.read_text()


def test_scientific_notation_is_a_number(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("stage1:\n  lr: 3e-4\n")
    cfg = load_config(user, ["stage2.lr=1e-5"])
    assert cfg.stage1.lr == 3e-4 and cfg.stage2.lr == 1e-5


def test_later_all_stages_beats_earlier_stage_section(tmp_path):
    """mnist.yaml sets stage1.iterations; the user's all_stages.iterations wins,
    and the user's own stage section still beats the user's all_stages."""
    user = tmp_path / "user.yaml"
    user.write_text("dataset: mnist\nall_stages: {iterations: 20}\nlenc: {iterations: 5}\n")
    cfg = load_config(user)
    assert (cfg.stage1.iterations, cfg.classifier.iterations, cfg.stage2.iterations,
            cfg.lenc.iterations) == (20, 20, 20, 5)
    cfg = load_config(user, ["all_stages.iterations=3"])
    assert cfg.lenc.iterations == 3


def test_a_key_given_twice_is_refused_naming_the_file_key_and_lines(tmp_path):
    """YAML keeps the last of two equal keys without a word; every YAML the
    project reads refuses them: user configs, resolved configs, search spaces,
    overrides, and nested keys are named with their section."""
    from pipelines.sweeps.space import load_space

    user = tmp_path / "twice.yaml"
    user.write_text("dataset: shapes3d\nstage1:\n  cla1_weight: 0.3\n  lr: 1e-4\n  cla1_weight: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(user)
    assert str(e.value).startswith(f"config file {user}: key 'stage1.cla1_weight' is given twice, "
                                   f"on line 3 and line 5")
    resolved = tmp_path / "config.yaml"
    save_config(load_config(overrides=["image_size=8"]), resolved)
    resolved.write_text(resolved.read_text() + "image_size: 16\n")
    with pytest.raises(ConfigError, match=r"resolved config .*config\.yaml: key 'image_size' is given "
                                          r"twice, on line \d+ and line \d+"):
        load_resolved(resolved)
    space = tmp_path / "space.yaml"
    space.write_text("stage: stage1\nspace:\n  stage1.lr: {loguniform: [1e-4, 1e-3]}\n"
                     "stage: stage2\n")
    with pytest.raises(ConfigError, match=r"search space .*space\.yaml: key 'stage' is given twice, "
                                          r"on line 1 and line 4"):
        load_space(space)
    with pytest.raises(ConfigError, match=r"override .*: key 'a' is given twice"):
        parse_override("stage1={a: 1, a: 2}")


def test_merge_keys_may_still_override_and_the_shipped_yaml_has_no_twice_given_key():
    from pathlib import Path

    from dsu_models.config import read_yaml, yaml_load

    assert yaml_load("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")["other"] == {"x": 3, "y": 2}
    root = Path(__file__).resolve().parents[1]
    shipped = [p for p in [*root.glob("dsu_models/configs/**/*.yaml"), *root.glob("tune_spaces/*.yaml"),
                           root / "serve_config.yaml", root / "ray_cluster.yaml"]]
    assert len(shipped) > 10
    for path in shipped:
        read_yaml(path, "shipped YAML")
