"""Each data source on tiny inputs written here in the source's real format;
lossless round trips through the prepared format; built-in generators."""
from __future__ import annotations

import pickle
import struct
import sys
import time

import h5py
import numpy as np
import pytest
import scipy.io as sio
import torch
from PIL import Image

from dsu_models.config import available_datasets
from dsu_models.data import DataError, load_builtin, prepare, read_manifest, read_split, val_rows
from dsu_models.data.sources import SOURCES, dsprites, shapes3d, sprites

RNG = np.random.default_rng(0)


def write_idx(path, array: np.ndarray):
    codes = {np.dtype("uint8"): 0x08, np.dtype("int32"): 0x0C}
    code = codes[array.dtype]
    head = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + array.astype(array.dtype.newbyteorder(">")).tobytes())


def by_id(ds):
    return {int(i): (ds.images[k], ds.labels[k]) for k, i in enumerate(ds.ids)}


def test_library_does_not_import_ray():
    assert "dsu_models.data" in sys.modules
    import dsu_models.data.prepared  # noqa: F401
    assert "ray" not in sys.modules or "pipelines.data.loading" in sys.modules


def test_registry_declares_defaults():
    from pathlib import Path

    import dsu_models.data.sources as package
    from dsu_models.data.sources.builtin import BUILTIN

    files = {p.stem for p in Path(package.__file__).parent.glob("*.py")
             if not p.stem.startswith("_") and p.stem != "builtin"}
    assert {m.__name__.rsplit(".", 1)[1] for m in SOURCES.values()} == files   # each file registers
    assert list(SOURCES) == sorted(SOURCES)
    for name, m in SOURCES.items():
        assert m.NAME == name
        for attr in ("FACTORS", "DEFAULT_IMAGE_SIZE", "CHANNELS", "OPTIONS", "plan"):
            assert hasattr(m, attr), (name, attr)
        if getattr(m, "IN_MEMORY", False):
            assert "num_samples" in m.OPTIONS and hasattr(m, "DEFAULT_SAMPLES"), name
    assert BUILTIN == ("digits", "shapes3d", "sprites", "sprites_full")
    assert [f for f, _ in SOURCES["shapes3d"].FACTORS] == [f for f, _ in SOURCES["3dshapes"].FACTORS]
    assert [f for f, _ in SOURCES["sprites"].FACTORS] == [f for f, _ in SOURCES["dsprites"].FACTORS]
    assert SOURCES["sprites_full"].FACTORS == SOURCES["dsprites"].FACTORS   # dSprites' own grid


@pytest.mark.parametrize("name,channels,factors", [
    ("shapes3d", 3, [10, 10, 10, 8, 4, 15]), ("sprites", 1, [3, 6, 12, 16, 16]),
    ("sprites_full", 1, [3, 6, 39, 32, 32]), ("digits", 1, [10])])
def test_load_builtin(name, channels, factors):
    train, val, test = load_builtin(name, image_size=16, num_samples=1000 if name != "digits" else None)
    assert train.images.shape[1:] == (channels, 16, 16) and train.images.dtype == torch.uint8
    assert val.images.shape[1:] == (channels, 16, 16)
    assert [f.classes for f in train.factors] == factors
    n = len(train) + len(val) + len(test)
    assert n == (1797 if name == "digits" else 1000) and len(test) == round(0.1 * n)
    # val: about a tenth of what test leaves, chosen by id
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 0.03
    assert val_rows(val.ids.numpy(), 0.1, 0).all() and not val_rows(train.ids.numpy(), 0.1, 0).any()
    ids = [set(d.ids.tolist()) for d in (train, val, test)]
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])
    assert len(set(train.ids.tolist())) == len(train)            # distinct grid points
    for f in train.factors:
        assert f.frequencies and abs(sum(f.frequencies) - 1) < 1e-9
    assert val.factors == train.factors == test.factors
    again, again_val, _ = load_builtin(name, image_size=16,
                                       num_samples=1000 if name != "digits" else None)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    assert torch.equal(again_val.ids, val.ids) and torch.equal(again_val.images, val.images)
    other, _, _ = load_builtin(name, image_size=16, num_samples=1000 if name != "digits" else None,
                               seed=1)
    assert not torch.equal(other.ids, train.ids)


def test_load_builtin_val_portion():
    """val_portion sets the share; 0 gives an empty val and the old train; a bad one is refused."""
    train, val, test = load_builtin("sprites", image_size=16, num_samples=2000, val_portion=0.3)
    assert abs(len(val) / (len(train) + len(val)) - 0.3) < 0.04
    whole, none, same_test = load_builtin("sprites", image_size=16, num_samples=2000, val_portion=0)
    assert len(none) == 0 and torch.equal(same_test.ids, test.ids)
    assert sorted(whole.ids.tolist()) == sorted(train.ids.tolist() + val.ids.tolist())
    for bad in (-0.1, 1.0):
        with pytest.raises(DataError, match=rf"val_portion must be in \[0, 1\), got {bad}"):
            load_builtin("sprites", image_size=16, num_samples=200, val_portion=bad)


def test_builtin_speed_and_odd_size():
    t0 = time.time()
    load_builtin("shapes3d", image_size=32, num_samples=5000)
    assert time.time() - t0 < 4
    with pytest.raises(DataError, match="even"):
        load_builtin("sprites", image_size=31)
    with pytest.raises(DataError, match="num_samples"):
        load_builtin("shapes3d", num_samples=480_001)


def test_every_factor_changes_the_image():
    """Changing any single factor by one class changes the rendered pixels."""
    for mod in (shapes3d, sprites):
        base = np.array([[c // 2 for _, c in mod.FACTORS]])
        ref = mod.render(base, 32).astype(int)
        for j, (name, c) in enumerate(mod.FACTORS):
            other = base.copy()
            other[0, j] += 1
            diff = np.abs(mod.render(other, 32).astype(int) - ref).sum()
            assert diff > 255 * 2, (mod.NAME, name, diff)


def test_sprites_centroid_area_and_front_mark():
    """At 64 px, for every shape and orientation: the white area's centroid is the
    position (within 0.1 px), its size is the same for the three shapes at one
    scale (within 3%), and it grows by the scale step; the images of one shape
    at its 12 orientations all differ (the front mark breaks every symmetry)."""
    size, mid = 64, len(sprites.POSITIONS) // 2
    labels = np.array([[s, k, t, mid, mid] for s in range(3) for k in (0, 5) for t in range(12)])
    img = sprites.render(labels, size)[..., 0].astype(np.float64) / 255
    c = (np.arange(size) + 0.5) / size
    area = img.sum((1, 2))
    cx, cy = (img * c[None, None, :]).sum((1, 2)) / area, (img * c[None, :, None]).sum((1, 2)) / area
    assert np.abs(cx - sprites.POSITIONS[mid]).max() * size < 0.1
    assert np.abs(cy - sprites.POSITIONS[mid]).max() * size < 0.1
    by = area.reshape(3, 2, 12)
    assert by[:, 0].max() / by[:, 0].min() < 1.03 and by[:, 1].max() / by[:, 1].min() < 1.03
    assert by[:, 1].min() / by[:, 0].max() > 0.97 * (sprites.SCALES[5] / sprites.SCALES[0]) ** 2
    flat = img.reshape(3, 2, 12, -1)
    for s in range(3):
        for k in range(2):
            d = np.abs(flat[s, k, :, None] - flat[s, k, None, :]).sum(-1)
            assert d[~np.eye(12, dtype=bool)].min() > 10, (sprites.SHAPES[s], k)


def _tiny_cnn_accuracy(name: str, n: int, epochs: int) -> dict[str, float]:
    from dsu_models.data import to_float

    torch.manual_seed(0)
    train, _, test = load_builtin(name, num_samples=n, seed=1)
    heads = [f.classes for f in train.factors]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(train.channels, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(64 * 8 * 8, 256), torch.nn.ReLU(), torch.nn.Linear(256, sum(heads)))
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    x, y = to_float(train.images), train.labels
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            out = net(x[b]).split(heads, 1)
            loss = sum(torch.nn.functional.cross_entropy(o, y[b, j]) for j, o in enumerate(out))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        out = net(to_float(test.images)).split(heads, 1)
    return {f.name: float((o.argmax(1) == test.labels[:, j]).float().mean())
            for j, (f, o) in enumerate(zip(test.factors, out))}


# ---------------------------------------------------------------- file sources
def test_mnist_idx_round_trip(tmp_path):
    root = tmp_path / "data"
    imgs = {s: RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 12), ("t10k", 6))}
    labs = {s: (np.arange(len(v)) % 10).astype(np.uint8) for s, v in imgs.items()}
    for s in imgs:
        write_idx(root / "MNIST" / "raw" / f"{s}-images-idx3-ubyte", imgs[s])
        write_idx(root / "MNIST" / "raw" / f"{s}-labels-idx1-ubyte", labs[s])
    out = prepare("mnist", tmp_path / "p", root=str(root), chunk_size=5, val_portion=0)
    m = read_manifest(out)
    assert (m["image_size"], m["channels"]) == (28, 1)
    assert m["splits"]["train"]["rows"] == 12 and m["splits"]["test"]["rows"] == 6
    assert m["factors"][0]["counts"]["train"] == np.bincount(labs["train"], minlength=10).tolist()
    train, test = read_split(out, "train"), read_split(out, "test")
    assert torch.equal(train.images[:, 0], torch.from_numpy(imgs["train"]))
    assert torch.equal(test.images[:, 0], torch.from_numpy(imgs["t10k"]))
    assert torch.equal(test.labels[:, 0], torch.from_numpy(labs["t10k"]).long())
    assert test.ids.tolist() == list(range(12, 18))
    assert read_split(out, "train", image_size=32).images.shape == (12, 1, 32, 32)
    assert m["splits"]["plot"]["rows"] == 6


def test_file_source_carves_val_from_its_train_split(tmp_path):
    """A source with a standard train/test split: val is the train rows val_rows
    picks by id (the test rows stay test); too few train rows for any is refused."""
    root = tmp_path / "data"
    for s, n in (("train", 60), ("t10k", 10)):
        write_idx(root / "MNIST" / "raw" / f"{s}-images-idx3-ubyte",
                  RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / "MNIST" / "raw" / f"{s}-labels-idx1-ubyte",
                  (np.arange(n) % 10).astype(np.uint8))
    out = prepare("mnist", tmp_path / "p", root=str(root), chunk_size=25, seed=2)
    m = read_manifest(out)
    train, val, test = (read_split(out, s) for s in ("train", "val", "test"))
    picked = np.flatnonzero(val_rows(np.arange(60), 0.1, 2))
    assert val.ids.tolist() == picked.tolist() and len(picked) > 0
    assert sorted(train.ids.tolist() + val.ids.tolist()) == list(range(60))
    assert test.ids.tolist() == list(range(60, 70))
    assert m["splits"]["val"]["rows"] == len(val) and m["val_from"] == "carved"
    assert m["options"]["val_portion"] == 0.1
    for split, ds in (("train", train), ("val", val)):   # training frequencies: train's alone
        counts = np.bincount(ds.labels[:, 0].numpy(), minlength=10)
        assert m["factors"][0]["counts"][split] == counts.tolist()
    freq = np.bincount(train.labels[:, 0].numpy(), minlength=10) / len(train)
    assert np.allclose(m["factors"][0]["frequencies"]["train"], freq)
    more = read_manifest(prepare("mnist", tmp_path / "q", root=str(root), seed=2, val_portion=0.5))
    assert more["content_hash"] != m["content_hash"] and more["splits"]["val"]["rows"] > len(val)
    few = tmp_path / "few" / "MNIST" / "raw"     # ids 0 and 1: val_rows picks neither
    for s in ("train", "t10k"):
        write_idx(few / f"{s}-images-idx3-ubyte", RNG.integers(0, 256, (2, 28, 28), dtype=np.uint8))
        write_idx(few / f"{s}-labels-idx1-ubyte", np.array([1, 2], np.uint8))
    assert not val_rows(np.arange(2), 0.1, 0).any()
    with pytest.raises(DataError, match=r"the val split is empty .*val_portion=0 for no validation"):
        prepare("mnist", tmp_path / "r", root=str(tmp_path / "few"))


def test_fashion_mnist_and_missing_root(tmp_path):
    with pytest.raises(DataError, match="--download"):
        prepare("fashion_mnist", tmp_path / "p", root=str(tmp_path))
    raw = tmp_path / "FashionMNIST" / "raw"
    for s, n in (("train", 4), ("t10k", 2)):
        write_idx(raw / f"{s}-images-idx3-ubyte", RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{s}-labels-idx1-ubyte", np.array([1, 9, 3, 4][:n], np.uint8))
    m = read_manifest(prepare("fashion_mnist", tmp_path / "p", root=str(tmp_path), val_portion=0))
    assert m["factors"][0]["class_names"][9] == "ankle boot"


def test_qmnist_nist_writers(tmp_path):
    raw = tmp_path / "QMNIST" / "raw"
    n = 20
    imgs = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    lab = np.zeros((n, 8), np.int32)
    lab[:, 0] = np.arange(n) % 10
    lab[:, 2] = np.array([2100, 7, 7, 350] * 5)            # writer ids, renumbered by value
    write_idx(raw / "xnist-images-idx3-ubyte", imgs)
    write_idx(raw / "xnist-labels-idx2-int", lab)
    out = prepare("qmnist", tmp_path / "p", root=str(tmp_path), test_portion=0.2)
    m = read_manifest(out)
    assert [f["name"] for f in m["factors"]] == ["class", "writer"]
    assert m["factors"][1]["class_names"] == ["7", "350", "2100"]
    full = {**by_id(read_split(out, "train")), **by_id(read_split(out, "val")),
            **by_id(read_split(out, "test"))}
    assert len(full) == n
    for i in range(n):
        assert torch.equal(full[i][0][0], torch.from_numpy(imgs[i]))
        assert full[i][1].tolist() == [i % 10, {7: 0, 350: 1, 2100: 2}[int(lab[i, 2])]]


@pytest.mark.parametrize("compressed", [True, False])
def test_svhn_mat_streaming(tmp_path, compressed):
    data = {}
    for fname, n in (("train_32x32.mat", 7), ("test_32x32.mat", 3), ("extra_32x32.mat", 5)):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(-1, 1)            # 10 means digit 0
        sio.savemat(tmp_path / fname, {"X": x, "y": y.astype(np.uint8)}, do_compression=compressed)
        data[fname] = (x, y)
    out = prepare("svhn", tmp_path / "p", root=str(tmp_path), chunk_size=2, val_portion=0)
    train = read_split(out, "train")
    assert len(train) == 12 and len(read_split(out, "test")) == 3
    x, y = data["extra_32x32.mat"]
    rows = by_id(train)
    for k in range(5):
        img, lab = rows[2 * 10_000_000 + k]
        assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(x[..., k]))
        assert int(lab[0]) == int(y[k, 0]) % 10
    no_extra = read_manifest(prepare("svhn", tmp_path / "q", root=str(tmp_path), extra=False,
                                     val_portion=0))
    assert no_extra["splits"]["train"]["rows"] == 7


def test_cifar10_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = RNG.integers(0, 256, (3, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": d, b"labels": [1, 2, 3]}, f)
        data[name] = d
    out = prepare("cifar10", tmp_path / "p", root=str(tmp_path), val_portion=0)
    test = read_split(out, "test")
    assert len(read_split(out, "train")) == 15 and len(test) == 3
    assert torch.equal(test.images.reshape(3, -1), torch.from_numpy(data["test_batch"]))


def _write_dsprites(path, n_per=2):
    """Tiny .npz laid out like dSprites: imgs (N, 64, 64) in {0,1}, latents_classes (N, 6)."""
    rows = []
    for shape in range(3):
        for orient in (0, 1, 10, 39):
            for k in range(n_per):
                rows.append([0, shape, k % 6, orient, (3 * k) % 32, (5 * k + shape) % 32])
    latents = np.array(rows, np.int64)
    imgs = RNG.integers(0, 2, (len(rows), 64, 64), dtype=np.uint8)
    np.savez_compressed(path, imgs=imgs, latents_classes=latents,
                        latents_values=latents.astype(np.float64))
    return imgs, latents


def test_dsprites_npz(tmp_path):
    imgs, lat = _write_dsprites(tmp_path / "d.npz")
    out = prepare("dsprites", tmp_path / "p", path=str(tmp_path / "d.npz"), chunk_size=5,
                  test_portion=0.25)
    rows = {**by_id(read_split(out, "train")), **by_id(read_split(out, "val")),
            **by_id(read_split(out, "test"))}
    kept = np.flatnonzero(lat[:, 3] != 39)
    assert sorted(rows) == kept.tolist()                       # orientation 39 dropped
    for i in kept:
        assert torch.equal(rows[i][0][0], torch.from_numpy(imgs[i] * 255))
        assert rows[i][1].tolist() == lat[i, 1:].tolist()
    rel = prepare("dsprites", tmp_path / "r", path=str(tmp_path / "d.npz"), relabel_orientation=True)
    rrows = {**by_id(read_split(rel, "train")), **by_id(read_split(rel, "val")),
             **by_id(read_split(rel, "test"))}
    for i in kept:
        t = lat[i, 3]
        assert int(rrows[i][1][2]) == {0: (4 * t) % 39, 1: (2 * t) % 39, 2: t}[int(lat[i, 1])]
    with pytest.raises(DataError, match="not found"):
        prepare("dsprites", tmp_path / "x", path=str(tmp_path / "missing.npz"))


def test_dsprites_relabel_goes_round():
    t = np.arange(39)
    lab = np.stack([np.zeros(39, int), t * 0, t, t * 0, t * 0], 1)
    assert sorted(dsprites.relabel_orientation(lab)[:, 2]) == list(range(39))


def test_3dshapes_h5(tmp_path):
    levels = [np.arange(10) / 10, np.arange(10) / 10, np.arange(10) / 10,
              np.linspace(0.75, 1.25, 8), np.arange(4.0), np.linspace(-30, 30, 15)]
    n = 30
    values = np.stack([lv[(np.arange(n) + 3 * j) % len(lv)] for j, lv in enumerate(levels)], 1)
    imgs = RNG.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "3dshapes.h5", "w") as f:
        f.create_dataset("images", data=imgs, chunks=(1, 64, 64, 3))
        f.create_dataset("labels", data=values)
    out = prepare("3dshapes", tmp_path / "p", path=str(tmp_path / "3dshapes.h5"), chunk_size=7,
                  image_size=64)
    m = read_manifest(out)
    assert m["factors"][5]["class_names"][0] == "-30" and m["factors"][3]["classes"] == 8
    rows = {**by_id(read_split(out, "train")), **by_id(read_split(out, "val")),
            **by_id(read_split(out, "test"))}
    for i in range(n):
        assert torch.equal(rows[i][0].permute(1, 2, 0), torch.from_numpy(imgs[i]))
        assert rows[i][1].tolist() == [int((i + 3 * j) % len(lv)) for j, lv in enumerate(levels)]


def test_chairs3d_tree(tmp_path):
    root = tmp_path / "rendered_chairs"
    for chair in ("b_chair", "a_chair"):
        d = root / chair / "renders"
        d.mkdir(parents=True)
        k = 0
        for p in (20, 30):
            for t in (0, 11, 22):
                img = RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"image_{k:03d}_p{p:03d}_t{t:03d}_r096.png")
                k += 1
    (root / "all_chair_names.mat").write_bytes(b"")
    out = prepare("chairs3d", tmp_path / "p", root=str(root), image_size=16, test_portion=0.25,
                  val_portion=0)
    m = read_manifest(out)
    assert [(f["name"], f["classes"]) for f in m["factors"]] == [("class", 2), ("altitude", 2),
                                                                  ("azimuth", 3)]
    assert m["factors"][0]["class_names"] == ["a_chair", "b_chair"]
    assert m["splits"]["train"]["rows"] + m["splits"]["test"]["rows"] == 12
    assert read_split(out, "train").images.shape[1:] == (3, 16, 16)


@pytest.mark.parametrize("num_samples", [None, 300])
def test_digits_prepared_matches_memory(tmp_path, num_samples):
    out = prepare("digits", tmp_path / "p", image_size=16, num_samples=num_samples)
    train, val, test = load_builtin("digits", image_size=16, num_samples=num_samples)
    assert len(train) + len(val) + len(test) == (num_samples or 1797)
    got = read_split(out, "train")
    assert torch.equal(got.images, train.images) and torch.equal(got.labels, train.labels)
    assert got.factors == train.factors
    got_val = read_split(out, "val")
    assert torch.equal(got_val.ids, val.ids) and torch.equal(got_val.images, val.images)
    assert torch.equal(read_split(out, "test").ids, test.ids)


def test_digits_subset():
    """A seeded subset of distinct images, ids naming rows of the whole set; out of range refused."""
    whole = torch.cat([d.ids for d in load_builtin("digits", image_size=8)])
    parts = load_builtin("digits", image_size=8, num_samples=300, seed=2)
    ids = torch.cat([d.ids for d in parts])
    assert len(set(ids.tolist())) == 300 and set(ids.tolist()) <= set(whole.tolist())
    assert len(parts[2]) == 30
    for bad in (0, 1798):
        with pytest.raises(DataError, match=rf"digits: num_samples must be in \[1, 1797\], got {bad}"):
            load_builtin("digits", num_samples=bad)



def test_sprites_full_draws_the_sprites_on_the_dsprites_grid():
    """sprites_full shares the sprites drawing: where the two grids meet (angle 0,
    the outermost positions) the images are identical; at its default 64 px every
    class step of every factor changes the image, and one shape's 39 orientations
    all differ."""
    from dsu_models.data.sources import sprites_full

    full = sprites.DSPRITES
    assert sprites_full.DEFAULT_IMAGE_SIZE == 64 and [c for _, c in full.factors] == [3, 6, 39, 32, 32]
    same = sprites.render(np.array([[2, 4, 0, 0, 15]]), 64)
    assert np.array_equal(sprites.render(np.array([[2, 4, 0, 0, 31]]), 64, full), same)
    assert np.array_equal(sprites.render(np.array([[2, 4, 13, 0, 31]]), 64, full),     # 13/39 = 4/12
                          sprites.render(np.array([[2, 4, 4, 0, 15]]), 64))
    base = np.array([[c // 2 for _, c in full.factors]])
    ref = sprites.render(base, 64, full).astype(int)
    for j, (name, c) in enumerate(full.factors):
        other = base.copy()
        other[0, j] += 1
        diff = np.abs(sprites.render(other, 64, full).astype(int) - ref).sum()
        assert diff > 255 * 2, (name, diff)
    for s in range(3):
        labels = np.array([[s, 0, t, 16, 16] for t in range(39)])      # the smallest scale
        flat = sprites.render(labels, 64, full).reshape(39, -1).astype(int)
        d = np.abs(flat[:, None] - flat[None, :]).sum(-1)
        assert d[~np.eye(39, dtype=bool)].min() > 255, sprites.SHAPES[s]
    train, _, _ = load_builtin("sprites_full", image_size=64, num_samples=50)
    assert train.images.shape[1:] == (1, 64, 64)


@pytest.mark.parametrize("name", available_datasets())
def test_each_dataset_table_is_declared_by_its_source(name):
    """A dataset's image size, channels and class counts come from its source module:
    the resolved config carries them, in the module's factor order; the YAML gives only
    what the module leaves to the data."""
    from dsu_models.config import dataset_defaults, load_config

    m = SOURCES[name]
    layer = dataset_defaults(name)
    declared = {f: c for f, c in m.FACTORS if c is not None}
    # what a prepared dataset's manifest would add: the undecided counts the YAML lacks
    data = {f: 7 for f, c in m.FACTORS if c is None and "classes" not in layer["factors"][f]}
    cfg = load_config(overrides=[f"dataset={name}"],
                      data_factors=data if m.FACTORS else {"a": 3})   # image_folder: all from the data
    assert {f: cfg.factors[f].classes for f in declared} == declared
    assert list(cfg.factors)[:len(m.FACTORS)] == [f for f, _ in m.FACTORS]
    assert cfg.image_size == (m.DEFAULT_IMAGE_SIZE or layer["image_size"])
    assert cfg.image_channels == (m.CHANNELS or layer["image_channels"])
    assert cfg.num_samples is None   # built-in sources: their DEFAULT_SAMPLES (sample_count)


@pytest.mark.parametrize("name", ["digits", "shapes3d", "sprites", "sprites_full"])
def test_sample_count_follows_the_source(name, monkeypatch):
    """``num_samples: null`` means the module's DEFAULT_SAMPLES (None: all), which its
    plan accepts; a given count wins; changing the attribute changes the data drawn."""
    from dsu_models.data.sources import make_plan
    from dsu_models.data.sources.builtin import sample_count

    m = SOURCES[name]
    assert sample_count(name, None) == m.DEFAULT_SAMPLES and sample_count(name, 123) == 123
    make_plan(name, {"num_samples": m.DEFAULT_SAMPLES, "image_size": 8})   # within the grid
    monkeypatch.setattr(m, "DEFAULT_SAMPLES", 200)
    assert sum(len(d) for d in load_builtin(name, image_size=8)) == 200
    if name == "sprites_full":
        train, val, test = load_builtin(name, num_samples=40)
        assert train.images.shape[1:] == (1, 64, 64) and len(train) + len(val) + len(test) == 40


def test_one_config_means_the_same_data_in_both_runners():
    """``num_samples: null`` draws the source's default count in the single-process runner
    and under Ray alike (the pipeline once prepared the whole factor grid for it)."""
    from dsu_models.config import load_config
    from dsu_models.data.configured import load_data
    from pipelines.cli import builtin_options

    cfg = load_config(None, ["dataset=sprites", "image_size=8"])
    assert cfg.num_samples is None
    train, val, test = load_data(cfg)
    assert (builtin_options(cfg)["num_samples"] == len(train) + len(val) + len(test)
            == SOURCES["sprites"].DEFAULT_SAMPLES)
    for count in (None, 300):   # digits too: all of them, or the config's subset
        digits = load_config(None, ["dataset=digits", "image_size=8", f"num_samples={count or 'null'}"])
        train, val, test = load_data(digits)
        assert builtin_options(digits)["num_samples"] == count
        assert len(train) + len(val) + len(test) == (count or 1797)
