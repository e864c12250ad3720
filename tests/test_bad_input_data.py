"""Bad input and wrong re-runs are refused with one-line DataErrors, and nothing
the user already has is lost: --out directories that are not our prepared
datasets, mixed / duplicate / absurd label CSVs, and other image_folder input."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from dsu_models.data import DataError, prepare, read_manifest, read_split
from dsu_models.data import manifest as mf
from dsu_models.data.base import FactorInfo
from dsu_models.data.prepared import abort, begin, check_replaceable, finish, run_task

RNG = np.random.default_rng(7)


def make_folder(root, rows, size=8, header=None, csv_text=None):
    """One RGB image per distinct 'file' value and labels.csv (or ``csv_text`` verbatim)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in {r["file"] for r in rows}:
        path = root / name
        if name and not path.exists():
            Image.fromarray(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    if csv_text is None:
        header = header or list(rows[0])
        lines = [",".join(header)] + [",".join(str(r.get(h, "")) for h in header) for r in rows]
        csv_text = "\n".join(lines) + "\n"
    (root / "labels.csv").write_text(csv_text)


def grid_rows(n=12):
    return [{"file": f"im{i}.png", "color": ["red", "green", "blue"][i % 3], "size": i % 4}
            for i in range(n)]


def one_line_error(tmp_path, match, rows=None, csv_text=None, **opts):
    make_folder(tmp_path / "f", rows if rows is not None else grid_rows(), csv_text=csv_text)
    with pytest.raises(DataError, match=match) as e:
        prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"), **opts)
    assert "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "p").exists()
    return str(e.value)


def user_folder(path):
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")
    (path / "sub").mkdir()
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return path


def assert_untouched(path):
    assert (path / "thesis.tex").read_text() == "years of work"
    assert (path / "sub" / "data.csv").read_text() == "a,b\n1,2\n"


# ---------------------------------------------------------------- 1. --out / --overwrite
@pytest.mark.parametrize("overwrite", [False, True])
def test_overwrite_never_deletes_a_folder_that_is_not_a_prepared_dataset(tmp_path, overwrite):
    out = user_folder(tmp_path / "mine")
    with pytest.raises(DataError) as e:
        prepare("digits", out, image_size=8, overwrite=overwrite)
    msg = str(e.value)
    assert str(out) in msg and "not a prepared dataset" in msg and "no manifest.json" in msg
    assert "overwrite" not in msg.replace(str(tmp_path), "") and "\n" not in msg
    assert_untouched(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]   # no staging left


@pytest.mark.parametrize("manifest", ["not json {", "[1, 2]", json.dumps({"name": "mine"})])
def test_overwrite_refuses_a_manifest_that_is_not_ours(tmp_path, manifest):
    out = user_folder(tmp_path / "mine")
    (out / "manifest.json").write_text(manifest)
    with pytest.raises(DataError, match="not a prepared dataset") as e:
        prepare("digits", out, image_size=8, overwrite=True)
    assert "overwrite" not in str(e.value).replace(str(tmp_path), "")
    assert_untouched(out)
    assert (out / "manifest.json").read_text() == manifest


def test_overwrite_refuses_a_dataset_holding_other_files(tmp_path):
    out = prepare("digits", tmp_path / "p", image_size=8)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"notes\.txt") as e:
        prepare("digits", out, image_size=8, seed=5, overwrite=True)
    assert str(out) in str(e.value)
    assert (out / "notes.txt").read_text() == "mine"
    assert read_manifest(out)["options"]["seed"] == 0


def test_overwrite_refuses_a_file_and_a_symlink(tmp_path):
    (tmp_path / "f").write_text("keep")
    with pytest.raises(DataError, match="not a directory"):
        prepare("digits", tmp_path / "f", image_size=8, overwrite=True)
    assert (tmp_path / "f").read_text() == "keep"
    target = prepare("digits", tmp_path / "real", image_size=8)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(DataError, match="symbolic link"):
        prepare("digits", tmp_path / "link", image_size=8, seed=2, overwrite=True)
    assert read_manifest(target)["options"]["seed"] == 0


def test_overwrite_replaces_our_dataset_even_of_an_older_format(tmp_path):
    out = prepare("digits", tmp_path / "p", image_size=8)
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 0
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="--overwrite"):
        prepare("digits", out, image_size=8)
    prepare("digits", out, image_size=8, overwrite=True)
    assert read_manifest(out)["format_version"] == mf.FORMAT_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_an_empty_directory_is_used_without_overwrite(tmp_path):
    (tmp_path / "p").mkdir()
    out = prepare("digits", tmp_path / "p", image_size=8)
    assert read_manifest(out)["source"] == "digits"


def test_check_replaceable_before_planning(tmp_path):
    assert check_replaceable(tmp_path / "absent", False) is False
    with pytest.raises(DataError, match="not a prepared dataset"):
        check_replaceable(user_folder(tmp_path / "mine"), True)
    out = prepare("digits", tmp_path / "p", image_size=8)
    digest = read_manifest(out)["content_hash"]
    assert check_replaceable(out, False) is False            # undecided until the plan's hash
    assert check_replaceable(out, False, digest) is True     # same preparation: reuse
    with pytest.raises(DataError, match="--overwrite"):
        check_replaceable(out, False, "0" * 64)
    assert check_replaceable(out, True, "0" * 64) is False


def test_folder_created_during_preparation_is_not_replaced(tmp_path):
    out = tmp_path / "p"
    plan, digest, staging = begin("digits", out, False, image_size=8)
    stats = [run_task(plan, i, t, staging) for i, t in enumerate(plan.tasks)]
    user_folder(out)
    try:
        with pytest.raises(DataError, match="not a prepared dataset"):
            finish(plan, digest, staging, out, stats)
    finally:
        abort(staging)
    assert_untouched(out)


# ---------------------------------------------------------------- 2. mixed label columns
def test_integer_column_with_one_name_is_an_error(tmp_path):
    rows = grid_rows()
    rows[6]["size"] = "big"
    msg = one_line_error(tmp_path, r"labels\.csv: line 8, column 'size': 'big' is not an integer", rows=rows)
    assert "line 2" in msg      # where the integers start
    assert "mix" in msg


def test_names_column_with_one_integer_is_an_error(tmp_path):
    rows = grid_rows()
    rows[3]["color"] = 7
    one_line_error(tmp_path, r"line 5, column 'color': '7' is an integer", rows=rows)


# ---------------------------------------------------------------- 3. duplicate rows
def test_same_image_twice_names_both_lines(tmp_path):
    rows = grid_rows()
    rows[9]["file"] = "im2.png"
    rows[9]["size"] = 3
    one_line_error(tmp_path, r"labels\.csv: line 11, column 'file': 'im2.png' is already listed "
                             r"on line 4", rows=rows)


def test_same_image_twice_under_different_spellings(tmp_path):
    rows = grid_rows()
    rows[5]["file"] = "./im1.png"
    one_line_error(tmp_path, r"line 7, column 'file': '\./im1\.png' is already listed on line 3", rows=rows)


def test_same_image_in_both_splits(tmp_path):
    rows = [dict(r, split="test" if i % 4 == 0 else "train") for i, r in enumerate(grid_rows())]
    rows[5]["file"] = "im4.png"
    one_line_error(tmp_path, r"line 7, column 'file': 'im4.png' is in the train split here and in "
                             r"the test split on line 6", rows=rows)


# ---------------------------------------------------------------- 4. absurd class counts
@pytest.mark.timeout(60)
@pytest.mark.parametrize("label", ["1000000", "99999999999", "1" + "0" * 30])
def test_huge_integer_label_is_an_error_not_a_hang(tmp_path, label):
    rows = grid_rows()
    rows[4]["size"] = label
    t0 = time.time()
    msg = one_line_error(tmp_path, rf"labels\.csv: line 6, column 'size': label '{label}' "
                                   rf"means .* classes for 12 rows", rows=rows)
    assert "1024" in msg and time.time() - t0 < 10


def test_huge_declared_class_count_is_an_error(tmp_path):
    one_line_error(tmp_path, r"classes\['size'\] = 50000000 .* 12 rows", classes={"size": 50_000_000})
    one_line_error(tmp_path, r"classes\['size'\] must be an integer", classes={"size": "many"})


def test_large_but_allowed_class_count_prepares(tmp_path):
    rows = grid_rows()
    rows[0]["size"] = 1000       # 1001 classes <= 1024
    make_folder(tmp_path / "f", rows)
    out = prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"), val_portion=0)
    size = read_manifest(out)["factors"][1]
    assert size["classes"] == 1001 and len(size["counts"]["train"]) == 1001
    assert sum(size["counts"]["train"]) + sum(size["counts"]["test"]) == 12


@pytest.mark.timeout(60)
def test_manifest_build_is_linear_in_classes():
    classes = 200_000
    f = FactorInfo("k", classes)
    counts = {s: [np.ones(classes, np.int64)] for s in ("train", "test")}
    t0 = time.time()
    m = mf.build_manifest("x", "image_folder", 8, 3, [f], counts, {"train": 1, "test": 1},
                 {"train": [], "test": []}, {}, "0" * 64)
    assert time.time() - t0 < 5
    assert m["factors"][0]["frequencies"]["train"][0] == pytest.approx(1 / classes)


def test_task_stats_do_not_grow_with_the_class_count(tmp_path):
    rows = grid_rows()
    rows[0]["size"] = 1000
    make_folder(tmp_path / "f", rows)
    plan, _, staging = begin("image_folder", tmp_path / "p", False, root=str(tmp_path / "f"))
    try:
        stats = run_task(plan, 0, plan.tasks[0], staging)
    finally:
        abort(staging)
    assert len(json.dumps(stats)) < 2000


# ---------------------------------------------------------------- other image_folder input
def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    rows = grid_rows()
    lines = ["file,color,size", ""] + [f"{r['file']},{r['color']},{r['size']}" for r in rows]
    lines[5] = "im3.png,green,-2"          # line 6 of the file
    one_line_error(tmp_path, r"line 6, column 'size': negative label '-2'", rows=rows,
                   csv_text="\n".join(lines) + "\n\n")


def test_empty_csv_and_header_only(tmp_path):
    one_line_error(tmp_path, r"labels\.csv: empty CSV", csv_text="")
    one_line_error(tmp_path, r"labels\.csv: no data rows", csv_text="file,color,size\n")


def test_header_problems(tmp_path):
    one_line_error(tmp_path, r"labels\.csv: line 1: column 'size' appears twice",
                   csv_text="file,size,size\nim0.png,1,2\n")
    one_line_error(tmp_path, r"labels\.csv: line 1: column 3 of the header is empty",
                   csv_text="file,size,\nim0.png,1,2\n")
    one_line_error(tmp_path, r"line 1: column 'id' .* reserved",
                   csv_text="file,id\nim0.png,1\nim1.png,0\n")
    one_line_error(tmp_path, r"line 1: no factor columns", csv_text="file\nim0.png\n")


def test_bad_rows(tmp_path):
    rows = grid_rows()
    rows[2]["color"] = ""
    one_line_error(tmp_path, r"line 4, column 'color': empty label", rows=rows)
    rows = grid_rows()
    rows[1]["file"] = ""
    one_line_error(tmp_path, r"line 3, column 'file': empty file name", rows=rows)


def test_paths_outside_the_folder(tmp_path):
    rows = grid_rows()
    (tmp_path / "outside.png").write_bytes(b"x")
    rows[2]["file"] = "../outside.png"
    one_line_error(tmp_path, r"line 4, column 'file': '\.\./outside\.png' is outside the folder",
                   rows=rows)


def test_unknown_split_name(tmp_path):
    rows = [dict(r, split="Test" if i == 3 else "train") for i, r in enumerate(grid_rows())]
    one_line_error(tmp_path, r"line 5, column 'split': 'Test' is not one of 'train', 'val', 'test'",
                   rows=rows)


def test_first_image_unreadable_or_odd_names_its_line(tmp_path):
    make_folder(tmp_path / "f", grid_rows())
    (tmp_path / "f" / "im0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"labels\.csv: line 2: cannot read image .*im0\.png"):
        prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"))
    Image.fromarray(RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)).save(tmp_path / "f" / "im0.png")
    with pytest.raises(DataError, match=r"labels\.csv: line 2: .*im0\.png is 9x6, not square"):
        prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"))


def test_wrong_image_size_names_line(tmp_path):
    make_folder(tmp_path / "f", grid_rows())
    Image.fromarray(RNG.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(tmp_path / "f" / "im5.png")
    one_line_error(tmp_path, r"labels\.csv: line 7: image .*im5\.png is 10x10", rows=grid_rows())


# ---------------------------------------------------------------- transparency, encodings, shapes
def _rgba(path, size=8, clear=((0, 0),)):
    """An RGBA image, red and opaque but for the ``clear`` pixels (fully transparent)."""
    a = np.zeros((size, size, 4), np.uint8)
    a[..., 0], a[..., 3] = 200, 255
    for y, x in clear:
        a[y, x, 3] = 0
    Image.fromarray(a, "RGBA").save(path)


def test_transparent_images_are_composited_onto_white_with_one_note(tmp_path, capsys):
    """Among RGB images, two RGBA ones with transparent pixels and one fully opaque:
    the transparent pixels become white, and the CLI prints one note for the
    preparation naming the first of the two and the count."""
    from pipelines.cli import prepare_main

    make_folder(tmp_path / "f", grid_rows())
    _rgba(tmp_path / "f" / "im7.png")
    _rgba(tmp_path / "f" / "im3.png")
    _rgba(tmp_path / "f" / "im9.png", clear=())          # alpha all 255: nothing lost, no note
    argv = ["image_folder", "--root", str(tmp_path / "f"), "--out", str(tmp_path / "p"), "--no-ray",
            "--val-portion", "0", "--chunk-size", "4"]
    assert prepare_main(argv) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: 2 image(s) had transparent pixels; composited onto white (the first: "
                     f"{tmp_path / 'f' / 'im3.png'})"], err
    images = {}
    for split in ("train", "test"):
        ds = read_split(tmp_path / "p", split)
        images.update(zip(ds.ids.tolist(), ds.images))
    assert images[3][:, 0, 0].tolist() == [255, 255, 255] and images[3][:, 1, 1].tolist() == [200, 0, 0]
    assert images[9][:, 0, 0].tolist() == [200, 0, 0]


def test_the_note_survives_tasks_that_finish_out_of_order(tmp_path):
    """The Ray job runs the tasks in actors and hands their stats to ``finish`` in
    any order: the note still names the first image by CSV order, and the
    manifest keeps it."""
    make_folder(tmp_path / "f", grid_rows())
    _rgba(tmp_path / "f" / "im10.png")
    _rgba(tmp_path / "f" / "im2.png")
    plan, digest, staging = begin("image_folder", tmp_path / "p", False, root=str(tmp_path / "f"),
                                  chunk_size=4, val_portion=0)
    stats = [run_task(plan, i, t, staging) for i, t in enumerate(plan.tasks)]
    out = finish(plan, digest, staging, tmp_path / "p", stats[::-1])
    (note,) = read_manifest(out)["notes"]
    assert note.startswith("2 image(s) had transparent pixels") and note.endswith("im2.png)")


def test_a_label_csv_that_is_not_utf8_names_its_line_and_column(tmp_path):
    rows = grid_rows()
    text = "file,color,size\n" + "".join(f"{r['file']},{r['color']},{r['size']}\n" for r in rows)
    make_folder(tmp_path / "f", rows)
    data = text.encode().replace(b"im4.png,green", "im4.png,gr\u00fcn".encode("latin-1"))
    (tmp_path / "f" / "labels.csv").write_bytes(data)
    with pytest.raises(DataError) as e:
        prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"))
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'f' / 'labels.csv'}: line 6, column 'color': not UTF-8")
    assert "\\xfc" in msg and "\n" not in msg


def _photo(path, w, h):
    """A W x H photo: the left half dark, the right half light."""
    a = np.full((h, w, 3), 200, np.uint8)
    a[:, : w // 2] = 20
    Image.fromarray(a).save(path)


def test_a_non_square_photo_is_refused_naming_its_size_and_the_two_flags(tmp_path):
    make_folder(tmp_path / "f", grid_rows())
    for i in range(12):
        _photo(tmp_path / "f" / f"im{i}.png", 10, 6)
    msg = one_line_error(tmp_path, r"line 2: .*im0\.png is 10x6, not square", rows=grid_rows())
    assert "--square crop" in msg and "--square pad" in msg


def test_a_later_non_square_photo_is_refused_even_with_resize(tmp_path):
    make_folder(tmp_path / "f", grid_rows())
    _photo(tmp_path / "f" / "im5.png", 10, 6)
    msg = one_line_error(tmp_path, r"line 7: image .*im5\.png is 10x6, not square", rows=grid_rows(),
                         resize=True)
    assert "--square crop" in msg and "--square pad" in msg


@pytest.mark.parametrize("how, side", [("crop", 6), ("pad", 10)])
def test_square_crop_or_pad_makes_photos_square(tmp_path, how, side):
    """crop keeps the centred 6x6 (2 dark and 4 light... columns 2..7 of 10);
    pad centres the photo on a black 10x10 (rows 0-1 and 8-9 black)."""
    from pipelines.cli import options_from_args, parse_prepare_args

    make_folder(tmp_path / "f", grid_rows())
    for i in range(12):
        _photo(tmp_path / "f" / f"im{i}.png", 10, 6)
    opts = options_from_args(parse_prepare_args(["image_folder", "--root", str(tmp_path / "f"),
                                                 "--out", "x", "--square", how]))
    assert opts["square"] == how
    out = prepare("image_folder", tmp_path / "p", **opts)
    m = read_manifest(out)
    assert m["image_size"] == side and m["options"]["square"] == how
    image = read_split(out, "train").images[0].permute(1, 2, 0).numpy()
    if how == "crop":
        assert image[0, :, 0].tolist() == [20, 20, 20, 200, 200, 200]
    else:
        assert image[:2].max() == 0 and image[8:].max() == 0
        assert image[2, :, 0].tolist() == [20] * 5 + [200] * 5


def test_an_unknown_square_mode_and_the_chairs_crop_are_apart(tmp_path):
    make_folder(tmp_path / "f", grid_rows())
    one_line_error(tmp_path, r"square must be one of crop, pad, got 'stretch'", square="stretch")
    from pipelines.cli import options_from_args, parse_prepare_args
    opts = options_from_args(parse_prepare_args(["chairs3d", "--root", "r", "--out", "x", "--crop", "0.5"]))
    assert opts["crop"] == 0.5 and "square" not in opts


def test_an_image_folder_without_square_keeps_its_content_hash(tmp_path):
    """The new option, left unset, is not part of the options hashed: a folder
    prepared before it is reused, not refused as a different preparation."""
    make_folder(tmp_path / "f", grid_rows())
    out = prepare("image_folder", tmp_path / "p", root=str(tmp_path / "f"))
    assert "square" not in read_manifest(out)["options"]
