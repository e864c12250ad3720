"""The prepared format: manifest counts, idempotent re-runs, atomic output, and
clear errors for bad input (image_folder CSVs, images, splits, options)."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dsu_models.data import DataError, load_builtin, prepare, read_manifest, read_split

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
    out = prepare("image_folder", tmp_path / "p", root=str(tmp_path / "imgs"), test_portion=0.25)
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
    assert sum(m["factors"][0]["counts"]["train"]) == m["splits"]["train"]["rows"] == 180
    assert len(m["content_hash"]) == 64
