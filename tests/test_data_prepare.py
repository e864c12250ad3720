"""The prepared format: manifest counts, idempotent re-runs, atomic output, and
clear errors for bad input (image_folder CSVs, images, splits, options)."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dsu_models.data import (DataError, FactorInfo, load_builtin, prepare, read_manifest, read_split,
                             split_files, split_rows, val_rows)
from dsu_models.data.manifest import factor_infos

RNG = np.random.default_rng(1)


def make_folder(root, rows, size=8, mode="RGB", header=None):
    """Write one image per row and labels.csv; rows: list of dicts with a 'file' key."""
    root.mkdir(parents=True, exist_ok=True)
    images = {}
    for r in rows:
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        img = RNG.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(img, mode).save(root / r["file"])
        images[r["file"]] = img
    header = header or list(rows[0])
    lines = [",".join(header)] + [",".join(str(r.get(h, "")) for h in header) for r in rows]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return images


def grid_rows(n=12):
    return [{"file": f"im{i}.png", "color": ["red", "green", "blue"][i % 3], "size": i % 4}
            for i in range(n)]


def test_image_folder_round_trip_and_manifest(tmp_path):
    rows = grid_rows()
    images = make_folder(tmp_path / "imgs", rows)
    out = prepare("image_folder", tmp_path / "p", root=str(tmp_path / "imgs"), test_portion=0.25,
                  val_portion=0)
    m = read_manifest(out)
    assert m["format_version"] == 1 and m["name"] == "imgs" and m["channels"] == 3
    color = m["factors"][0]
    assert color["name"] == "color" and color["class_names"] == ["blue", "green", "red"]
    assert m["splits"]["train"]["rows"] == 9 and m["splits"]["test"]["rows"] == 3
    train, test = read_split(out, "train"), read_split(out, "test")
    for ds, split in ((train, "train"), (test, "test")):
        for j, f in enumerate(m["factors"]):
            counts = np.bincount(ds.labels[:, j].numpy(), minlength=f["classes"]).tolist()
            assert f["counts"][split] == counts
            assert np.allclose(f["frequencies"][split], np.array(counts) / len(ds))
        for k, i in enumerate(ds.ids.tolist()):
            assert torch.equal(ds.images[k].permute(1, 2, 0), torch.from_numpy(images[f"im{i}.png"]))
            assert ds.labels[k].tolist() == [{"blue": 0, "green": 1, "red": 2}[rows[i]["color"]],
                                             rows[i]["size"]]
    assert [f.frequencies for f in test.factors] == [f.frequencies for f in train.factors]
    t = pq.read_table(out / "train" / m["splits"]["train"]["files"][0])
    assert t.schema.names == ["id", "image", "color", "size"]
    assert str(t.schema.field("id").type) == "int64" and str(t.schema.field("size").type) == "int64"


def test_split_column_and_grayscale(tmp_path):
    rows = [dict(r, split="test" if i < 4 else "train") for i, r in enumerate(grid_rows())]
    make_folder(tmp_path / "g", rows, mode="L")
    out = prepare("image_folder", tmp_path / "p", root=str(tmp_path / "g"), plot_size=2)
    m = read_manifest(out)
    assert m["channels"] == 1 and m["splits"]["test"]["rows"] == 4 and m["splits"]["plot"]["rows"] == 2
    assert read_split(out, "test").ids.tolist() == [0, 1, 2, 3]
    assert set(read_split(out, "plot").ids.tolist()) <= {0, 1, 2, 3}


def test_rerun_is_idempotent_and_options_change_hash(tmp_path):
    out = prepare("sprites", tmp_path / "p", num_samples=300, image_size=16)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    digest = read_manifest(out)["content_hash"]
    again = prepare("sprites", tmp_path / "p", num_samples=300, image_size=16, chunk_size=7)
    assert again == out and (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="overwrite"):
        prepare("sprites", tmp_path / "p", num_samples=300, image_size=16, seed=3)
    prepare("sprites", tmp_path / "p", num_samples=300, image_size=16, seed=3, overwrite=True)
    assert read_manifest(out)["content_hash"] != digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]   # no staging/old dirs left


def test_failed_preparation_leaves_nothing(tmp_path):
    rows = grid_rows(10)
    make_folder(tmp_path / "imgs", rows)
    data = (tmp_path / "imgs" / "im9.png").read_bytes()
    (tmp_path / "imgs" / "im9.png").write_bytes(data[: len(data) // 2])   # truncated
    with pytest.raises(DataError, match="im9.png"):
        prepare("image_folder", tmp_path / "out", root=str(tmp_path / "imgs"), chunk_size=4)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_stale_staging_of_dead_process_is_removed(tmp_path):
    stale = tmp_path / ".p.tmp-999999999-deadbeef"
    (stale / "train").mkdir(parents=True)
    prepare("digits", tmp_path / "p", image_size=8)
    assert not stale.exists()


def test_directory_that_is_not_prepared(tmp_path):
    (tmp_path / "p").mkdir()
    with pytest.raises(DataError, match="not a prepared dataset"):
        read_manifest(tmp_path / "p")
    (tmp_path / "p" / "mine.txt").write_text("keep")
    for overwrite in (False, True):     # never replaced, and --overwrite is not suggested
        with pytest.raises(DataError, match=r"not a prepared dataset .*choose another --out$"):
            prepare("digits", tmp_path / "p", overwrite=overwrite)
    assert (tmp_path / "p" / "mine.txt").read_text() == "keep"
    (tmp_path / "p" / "mine.txt").unlink()
    assert read_manifest(prepare("digits", tmp_path / "p", image_size=8))["source"] == "digits"


def _expect_error(tmp_path, rows, match, header=None, **opts):
    make_folder(tmp_path / "f", rows, header=header)
    with pytest.raises(DataError, match=match):
        prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"), **opts)
    assert not (tmp_path / "p").exists()


def test_missing_declared_column(tmp_path):
    _expect_error(tmp_path, grid_rows(), r"missing factor column.*'shape'",
                  factors="color,size,shape")


def test_extra_column(tmp_path):
    _expect_error(tmp_path, [dict(r, note="x") for r in grid_rows()], r"unexpected column.*'note'",
                  factors=["color", "size"])


def test_missing_file_column(tmp_path):
    _expect_error(tmp_path, grid_rows(), "missing file column 'path'", file_column="path")


def test_non_integer_label(tmp_path):
    rows = grid_rows()
    rows[5]["size"] = "2.5"
    _expect_error(tmp_path, rows, r"line 7, column 'size': non-integer label '2.5'")


def test_negative_label(tmp_path):
    rows = grid_rows()
    rows[3]["size"] = -1
    _expect_error(tmp_path, rows, r"line 5, column 'size': negative label '-1'")


def test_label_outside_declared_classes(tmp_path):
    _expect_error(tmp_path, grid_rows(), r"line 5, column 'size': label '3' is outside",
                  classes={"size": 3})


def test_single_class_factor(tmp_path):
    rows = [dict(r, size=2) for r in grid_rows()]
    _expect_error(tmp_path, rows, r"column 'size' has a single class")


def test_unreadable_image(tmp_path):
    rows = grid_rows()
    make_folder(tmp_path / "f", rows)
    (tmp_path / "f" / "im4.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"line 6: cannot read image .*im4.png"):
        prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"))


def test_mixed_sizes_unless_resize(tmp_path):
    rows = grid_rows()
    make_folder(tmp_path / "f", rows)
    Image.fromarray(RNG.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(tmp_path / "f" / "im7.png")
    with pytest.raises(DataError, match=r"im7.png is 10x10 .*resize"):
        prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"))
    out = prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"), resize=True)
    assert read_split(out, "train").images.shape[1:] == (3, 8, 8)


def test_mixed_channels_unless_resize(tmp_path):
    rows = grid_rows()
    make_folder(tmp_path / "f", rows)
    Image.fromarray(RNG.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(tmp_path / "f" / "im2.png")
    with pytest.raises(DataError, match=r"im2.png .* 1 channel"):
        prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"))
    out = prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"), resize=True)
    assert read_manifest(out)["channels"] == 3


def test_empty_split(tmp_path):
    rows = [dict(r, split="train") for r in grid_rows()]
    _expect_error(tmp_path, rows, "test split is empty")
    with pytest.raises(DataError, match="empty split"):
        load_builtin("digits", num_samples=3, test_portion=0.1)


def test_bad_split_value_and_missing_image_file(tmp_path):
    rows = [dict(r, split="valid" if i == 2 else "train") for i, r in enumerate(grid_rows())]
    _expect_error(tmp_path, rows, r"line 4, column 'split': 'valid'")
    rows = grid_rows()
    make_folder(tmp_path / "m", rows)
    os.remove(tmp_path / "m" / "im3.png")
    with pytest.raises(DataError, match=r"line 5, column 'file': file .*im3.png not found"):
        prepare("image_folder", tmp_path / "q", root=str(tmp_path / "m"))


def test_unknown_option_and_source(tmp_path):
    with pytest.raises(DataError, match=r"unknown option.*'colour'"):
        prepare("sprites", tmp_path / "p", colour=1)
    with pytest.raises(DataError, match="unknown data source 'mnsit'"):
        prepare("mnsit", tmp_path / "p")
    with pytest.raises(DataError, match="test_portion"):
        prepare("digits", tmp_path / "p", test_portion=1.5)


def test_manifest_is_json_with_factor_table(tmp_path):
    out = prepare("shapes3d", tmp_path / "p", num_samples=200, image_size=8)
    m = json.loads((out / "manifest.json").read_text())
    assert [f["name"] for f in m["factors"]] == ["floor_hue", "wall_hue", "object_hue", "scale",
                                                  "shape", "orientation"]
    assert m["factors"][4]["class_names"] == ["cube", "sphere", "cone", "pill"]
    assert sum(m["factors"][0]["counts"]["train"]) == m["splits"]["train"]["rows"]
    assert sum(m["factors"][0]["counts"]["val"]) == m["splits"]["val"]["rows"]
    assert m["splits"]["train"]["rows"] + m["splits"]["val"]["rows"] == 180
    assert len(m["content_hash"]) == 64


# ---------------------------------------------------------------- validation split
def _ids(out, split):
    return read_split(out, split).ids.tolist()


def test_procedural_prepare_carves_val_like_load_builtin(tmp_path):
    out = prepare("sprites", tmp_path / "p", num_samples=1000, image_size=8, seed=4)
    m = read_manifest(out)
    train, val, test = (set(_ids(out, s)) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test) and len(train | val | test) == 1000
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 0.03
    assert m["splits"]["val"]["rows"] == len(val) and m["val_from"] == "carved"
    assert sorted(val) == sorted(i for i in train | val if val_rows(np.array([i]), 0.1, 4)[0])
    _, mem_val, mem_test = load_builtin("sprites", image_size=8, num_samples=1000, seed=4)
    assert sorted(mem_val.ids.tolist()) == sorted(val) and sorted(mem_test.ids.tolist()) == sorted(test)
    assert split_rows(m, "val") == len(val)
    assert set(_ids(out, "plot")) <= test                    # the plot subset stays test's


def test_val_portion_zero_and_bad_values(tmp_path):
    out = prepare("digits", tmp_path / "p", image_size=8, val_portion=0)
    m = read_manifest(out)
    assert m["splits"]["val"] == {"rows": 0, "files": []} and not (out / "val").exists()
    assert len(read_split(out, "train")) == m["splits"]["train"]["rows"] == 1797 - 180
    for read in (read_split, split_files):
        with pytest.raises(DataError, match=r"has no validation split .*--val-portion"):
            read(out, "val")
    for bad in (-0.5, 1.0, 2):
        with pytest.raises(DataError, match=rf"val_portion must be in \[0, 1\), got {float(bad)}"):
            prepare("digits", tmp_path / "q", val_portion=bad)
    with pytest.raises(DataError, match="the train split is empty"):
        prepare("digits", tmp_path / "q", test_portion=0.5, val_portion=0.999999)


def test_image_folder_csv_val_is_used_as_given(tmp_path):
    rows = [dict(r, split=["train", "val", "train", "test"][i % 4]) for i, r in enumerate(grid_rows(16))]
    make_folder(tmp_path / "f", rows)
    out = prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"), val_portion=0.5)
    m = read_manifest(out)
    assert m["val_from"] == "csv"
    assert _ids(out, "val") == [1, 5, 9, 13] and _ids(out, "test") == [3, 7, 11, 15]
    assert _ids(out, "train") == [0, 2, 4, 6, 8, 10, 12, 14]        # nothing carved


def test_image_folder_without_val_rows_carves_them(tmp_path):
    rows = grid_rows(40)
    make_folder(tmp_path / "f", rows)
    out = prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"), val_portion=0.3)
    m = read_manifest(out)
    assert m["val_from"] == "carved" and m["options"]["val_portion"] == 0.3
    val, rest = _ids(out, "val"), _ids(out, "train")
    assert val and val_rows(np.array(val), 0.3, 0).all() and not val_rows(np.array(rest), 0.3, 0).any()
    assert len(val) + len(rest) + len(_ids(out, "test")) == 40


def _make_legacy(out):
    """Rewrite a dataset prepared with val_portion=0 into the layout written
    before validation splits: no val split, no val_portion, no val_from."""
    m = json.loads((out / "manifest.json").read_text())
    del m["splits"]["val"], m["options"]["val_portion"], m["val_from"]
    for f in m["factors"]:
        del f["counts"]["val"], f["frequencies"]["val"]
    (out / "manifest.json").write_text(json.dumps(m, indent=1))
    return out


def _carving_warnings(record, out):
    return [w for w in record if f"{out} was prepared before validation splits" in str(w.message)]


def test_old_dataset_carves_val_on_the_fly_with_one_warning(tmp_path):
    out = _make_legacy(prepare("sprites", tmp_path / "p", num_samples=600, image_size=8, seed=3,
                               val_portion=0))
    m = read_manifest(out)
    old_train = set(pq.read_table(out / "train" / m["splits"]["train"]["files"][0])["id"].to_pylist())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train, val = set(_ids(out, "train")), set(_ids(out, "val"))
        again = set(_ids(out, "train"))
        test = _ids(out, "test")
    assert len(_carving_warnings(record, out)) == 1
    assert str(_carving_warnings(record, out)[0].message) == (
        f"{out} was prepared before validation splits; carving val (10% of train, by id) on the "
        f"fly; prepare it again to make this permanent")
    assert train.isdisjoint(val) and train | val == old_train and again == train
    assert val == {i for i in old_train if val_rows(np.array([i]), 0.1, 3)[0]}
    assert set(test).isdisjoint(old_train) and len(test) == m["splits"]["test"]["rows"]
    assert split_rows(m, "val") == round(0.1 * len(old_train))
    assert split_rows(m, "train") == len(old_train) - round(0.1 * len(old_train))
    # preparing it again with the defaults makes the same split permanent
    new = prepare("sprites", tmp_path / "n", num_samples=600, image_size=8, seed=3)
    assert set(_ids(new, "val")) == val and set(_ids(new, "train")) == train


# ---------------------------------------------------------------- evaluation-only factors
def _eval_rows(n=20):
    """grid rows plus 'pose', labeled on every fifth row only."""
    return [dict(r, pose=["left", "right"][i // 5 % 2] if i % 5 == 0 else "")
            for i, r in enumerate(grid_rows(n))]


def test_eval_only_factor_prepares_with_missing_labels(tmp_path):
    rows = _eval_rows()
    make_folder(tmp_path / "f", rows)
    out = prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"), eval_factors="pose",
                  val_portion=0.3)
    m = read_manifest(out)
    pose = m["factors"][2]
    assert pose["name"] == "pose" and pose["eval_only"] is True
    assert pose["class_names"] == ["left", "right"]
    assert "eval_only" not in m["factors"][0] and m["options"]["eval_factors"] == ["pose"]
    assert [f.eval_only for f in factor_infos(m)] == [False, False, True]
    seen = 0
    for split in ("train", "val", "test"):
        ds = read_split(out, split)
        col = ds.labels[:, 2].numpy()
        want = [{"left": 0, "right": 1}.get(rows[i]["pose"], -1) for i in ds.ids.tolist()]
        assert col.tolist() == want
        assert pose["labeled"][split] == int((col >= 0).sum()) == sum(pose["counts"][split])
        assert pose["counts"][split] == np.bincount(col[col >= 0], minlength=2).tolist()
        seen += pose["labeled"][split]
        assert ds.factors[2].eval_only
    assert seen == 4
    train = read_split(out, "train").with_measured_frequencies()     # -1 is not a class
    assert train.factors[2].eval_only and abs(sum(train.factors[2].frequencies) - 1) < 1e-9
    assert FactorInfo.from_dict(train.factors[2].to_dict()) == train.factors[2]
    # the list spelling is the same preparation as the comma-separated one
    assert prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"), eval_factors=["pose"],
                   val_portion=0.3) == out


def test_empty_cell_only_in_an_eval_only_column(tmp_path):
    rows = _eval_rows()
    rows[6]["color"] = ""
    _expect_error(tmp_path, rows, r"line 8, column 'color': empty label \(only columns named in "
                                  r"eval_factors", eval_factors="pose")
    rows = _eval_rows()
    _expect_error(tmp_path, rows, r"line 3, column 'pose': empty label")       # not declared
    _expect_error(tmp_path, rows, r"eval_factors \['angle'\] are not factor columns",
                  eval_factors="pose,angle")
    rows = [dict(r, pose="") for r in grid_rows()]
    _expect_error(tmp_path, rows, r"column 'pose' \(evaluation-only\) has no labels",
                  eval_factors="pose")


def test_config_on_eval_only_data_leaves_the_factor_out(tmp_path):
    from dsu_models.config import ConfigError
    from dsu_models.config import load_config
    from dsu_models.data.configured import load_data

    make_folder(tmp_path / "f", _eval_rows(40))
    out = prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"), eval_factors="pose")
    base = ["dataset=image_folder", f"data_path={out}", "image_size=8"]
    cfg = load_config(None, base)
    assert cfg.labeled_factors == ["color", "size"] and "pose" in cfg.factors
    assert cfg.unknown_size == 0
    cfg = load_config(None, base + ["labeled_factors=[color]"])
    assert cfg.unknown_size == cfg.factors["size"].size
    with pytest.raises(ConfigError, match=r"'pose' is evaluation-only \(declared with eval_factors\)"):
        load_config(None, base + ["labeled_factors=[color, pose]"])
    train, val, test = load_data(cfg)
    assert (train.labels[:, 2] == -1).any() and train.factors[2].eval_only
    assert len(val)
    assert sorted(train.ids.tolist() + val.ids.tolist() + test.ids.tolist()) == list(range(40))


def test_old_manifest_factors_are_not_eval_only(tmp_path):
    out = prepare("digits", tmp_path / "p", image_size=8)
    m = read_manifest(out)
    assert "eval_only" not in m["factors"][0] and factor_infos(m)[0].eval_only is False
