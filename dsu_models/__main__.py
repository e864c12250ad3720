"""Use a trained DisUnknown model from the command line (docs/method.md section 11).

    python -m dsu_models swap --model URI --content in.png [more.png ...] \\
        --set object_hue=3 --set shape=cube --out out.png
    python -m dsu_models encode --model URI --images a.png b.png [--out codes.json]
    python -m dsu_models evaluate --model URI [--data DIR_OR_BUILTIN] [--split val|test]
        [--out metrics.json]
    python -m dsu_models samples --model URI --out DIR [--count 8] [--data DIR_OR_BUILTIN]

URI: a bundle directory, its model.pt, or an MLflow URI (models:/NAME@ALIAS,
models:/NAME/VERSION, runs:/RUN_ID/PATH; ``--tracking-uri`` or
``$MLFLOW_TRACKING_URI`` says which store).

``swap``: ``--set factor=value`` takes a class name or a class id (a name wins
when a name is also a number); factors not set keep each content image's own
labels as the model's labeled encoder reads them. One content image: ``--out``
is the swapped image. Several: ``--out`` is one grid with two rows, the content
images on top and their swaps below, in the order given. ``--out``'s extension
picks the format: .png, .jpg/.jpeg (quality 95) or .webp (lossless); another
is refused before any work. Images of another size are resized to the
model's (bilinear, antialiased); transparent pixels are composited onto white
(as when an image folder is prepared; a note on stderr says so) and the
result converted to the model's channels. A non-square image is refused
unless ``--square crop`` (keep the centred square) or ``--square pad`` (pad
the short side with black) says how to make it square (``swap``, ``encode``).

``encode``: prints, per image, the unknown code means and the labels read,
with class names; ``--out`` also writes them as JSON.

``evaluate``: the full metric set of ``dsu_models.evaluation.evaluate`` on a
prepared data directory or a built-in dataset (default: the data the model
was trained on, per its config), on its test split (``--split val`` to compare
models without touching test); oracles are cached under ``--oracle-cache``.

``samples``: writes ``--count`` test images of the model's data (or ``--data``)
as PNGs named by their labels (``000_floor_hue=2_shape=cube.png``): content
images to try ``swap`` on.

Errors (bad URI, unreadable image, unknown factor or class) print one line
``error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import torch

from dsu_models.config import ConfigError
from dsu_models.data.base import to_float
from dsu_models.data.codec import SQUARE_HINT, SQUARE_MODES, flatten_alpha, square_image
from dsu_models.files import write_text
from dsu_models.grids import image_format, rows_grid, save_image, save_png
from dsu_models.inference import DisUnknownModel, ModelLoadError


def _parse_sets(items: list[str]) -> dict[str, str]:
    settings = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"--set {item!r}: expected factor=value, e.g. --set shape=cube")
        settings[name.strip()] = value.strip()
    return settings


def _read_images(paths: list[str], square: str | None = None) -> list:
    """The files as PIL images without transparency (composited onto white, one
    note for all) and square (``square``: crop or pad; None refuses a
    non-square image, naming it, its size and the two flags)."""
    from PIL import Image, UnidentifiedImageError

    images, flattened = [], []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                image, was_transparent = flatten_alpha(im.copy())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such image file") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{path}: cannot read as an image ({exc})") from None
        w, h = image.size
        if w != h and square is None:
            raise ValueError(f"{path} is {w}x{h}, not square: pass {SQUARE_HINT}")
        images.append(square_image(image, square or "crop"))
        if was_transparent:
            flattened.append(path)
    if flattened:
        print(f"note: {len(flattened)} image(s) had transparent pixels; composited onto white "
              f"(the first: {flattened[0]})", file=sys.stderr)
    return images


def _device(text: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N (a CUDA device this machine lacks is refused at load)."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, cpu, cuda, cuda:N")


def _load(args) -> DisUnknownModel:
    return DisUnknownModel.load(args.model, device=args.device, tracking_uri=args.tracking_uri)


def cmd_swap(args) -> int:
    image_format(args.out)     # an --out it cannot write is refused before any work
    model = _load(args)
    settings = _parse_sets(args.set or [])
    images = _read_images(args.content, args.square)
    swapped = torch.from_numpy(model.swap(images, settings)).permute(0, 3, 1, 2)
    if len(images) == 1:
        save_image(swapped[0], args.out)
        print(f"wrote {args.out}: the swapped image")
    else:
        content = model.images(images)
        content = to_float(content) if content.dtype == torch.uint8 else content
        grid = rows_grid([content, to_float(swapped.contiguous())])
        save_image(grid, args.out)
        print(f"wrote {args.out}: a grid, top row the {len(images)} content images, bottom row "
              f"their swaps")
    return 0


def cmd_encode(args) -> int:
    model = _load(args)
    images = _read_images(args.images, args.square)
    unknown = model.encode_unknown(images)
    can_read = model.label_encoder is not None and model.embedders is not None
    labels = model.encode_labels(images) if can_read and model.labeled_factors else None
    rows = []
    for i, path in enumerate(args.images):
        row = {"image": path, "unknown_mean": [round(float(v), 5) for v in unknown[i]]}
        if labels is not None:
            row["labels"] = {name: {"id": int(labels[i, k]), "name": model.class_name(name, labels[i, k])}
                             for k, name in enumerate(model.labeled_factors)}
        rows.append(row)
        print(path)
        print("  unknown:", " ".join(f"{v:+.3f}" for v in row["unknown_mean"]) or "(none)")
        if labels is not None:
            print("  labels: ", " ".join(f"{n}={d['name']} ({d['id']})" for n, d in row["labels"].items()))
        elif model.labeled_factors:
            print("  labels:  (this model cannot read labels: it has no labeled encoder S "
                  "or no label embedders)")
    if args.out:
        out = Path(args.out)
        write_text(out, json.dumps({"labeled_factors": model.labeled_factors, "images": rows}, indent=1))
        print(f"wrote {out}")
    return 0


def _evaluation_data(model: DisUnknownModel, data: str | None):
    from dsu_models.data.sources.builtin import BUILTIN
    from dsu_models.data.configured import load_data

    cfg = model.config
    if data is not None:
        if Path(data).is_dir():
            cfg = dataclasses.replace(cfg, data_path=str(Path(data).resolve()))
        elif data in BUILTIN:
            cfg = dataclasses.replace(cfg, dataset=data, data_path=None)
        else:
            raise ValueError(f"--data {data!r}: not a directory and not a built-in dataset "
                             f"({', '.join(BUILTIN)})")
    train, val, test = load_data(cfg)
    names = [f.name for f in train.factors]
    missing = [n for n in model.labeled_factors if n not in names]
    if missing:
        raise ValueError(f"--data {data}: lacks the model's labeled factors {missing} (it has {names})")
    return train, val, test


def cmd_evaluate(args) -> int:
    from dsu_models import evaluation

    model = _load(args)
    train, val, test = _evaluation_data(model, args.data)
    judged = val if args.split == "val" else test
    ecfg = model.config.evaluate
    if args.pairs is not None:
        ecfg = dataclasses.replace(ecfg, pairs=args.pairs)
    cache = Path(args.oracle_cache or Path(os.environ.get("DSU_HOME", "~/.disunknown")) / "oracles")
    oracles = evaluation.load_or_train_oracles(train, test, ecfg, cache.expanduser(),
                                               device=str(model.device))
    metrics = evaluation.evaluate(model, train, judged, ecfg, oracles, log=lambda line: None)
    print(f"on the {args.split} split of {judged.name} ({len(judged)} images)")
    for key in sorted(metrics):
        print(f"{key:28s} {metrics[key]:.4f}")
    if args.out:
        out = Path(args.out)
        write_text(out, json.dumps(metrics, indent=1, sort_keys=True))
        print(f"wrote {out}")
    return 0


def cmd_samples(args) -> int:
    if args.count < 1:
        raise ValueError(f"--count {args.count}: at least 1")
    model = _load(args)
    _, _, test = _evaluation_data(model, args.data)
    out = Path(args.out)
    count = min(args.count, len(test))
    for i in range(count):
        labels = "_".join(f"{f.name}={f.class_names[int(v)] if f.class_names else int(v)}"
                          for f, v in zip(test.factors, test.labels[i]))
        save_png(test.images[i], out / f"{i:03d}_{re.sub(r'[^A-Za-z0-9=_.-]+', '-', labels)}.png")
    print(f"wrote {count} test images of {test.name} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsu_models", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", required=True, help="bundle dir, model.pt, models:/NAME@ALIAS, "
                                                      "models:/NAME/VERSION or runs:/ID/PATH")
        p.add_argument("--device", default="auto", type=_device,
                       help="auto (CUDA when available), cpu, cuda, cuda:N")
        p.add_argument("--tracking-uri", default=None, help="MLflow store for models:/ and runs:/ URIs")

    def square(p):
        p.add_argument("--square", choices=SQUARE_MODES,
                       help="make non-square images square: crop keeps the centred square, pad pads "
                            "the short side with black (default: refuse them)")

    p = sub.add_parser("swap", help="new labels on content images")
    common(p)
    p.add_argument("--content", nargs="+", required=True, help="content image file(s)")
    p.add_argument("--set", action="append", metavar="FACTOR=VALUE",
                   help="class name or id for a labeled factor (repeatable)")
    p.add_argument("--out", required=True, help="the swap (one content) or a 2-row grid (several); "
                                                "the extension picks the format: .png, .jpg, .jpeg, .webp")
    square(p)
    p.set_defaults(func=cmd_swap)

    p = sub.add_parser("encode", help="unknown codes and labels read from images")
    common(p)
    p.add_argument("--images", nargs="+", required=True)
    square(p)
    p.add_argument("--out", help="also write a JSON file")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("evaluate", help="the full metric set (dsu_models.evaluation)")
    common(p)
    p.add_argument("--data", help="prepared data directory or built-in name (default: the model's own)")
    p.add_argument("--pairs", type=int, help="override evaluate.pairs")
    p.add_argument("--split", choices=("val", "test"), default="test",
                   help="the split to judge: val to choose between models, test (default) to report")
    p.add_argument("--oracle-cache", help="oracle cache folder (default $DSU_HOME/oracles or "
                                          "~/.disunknown/oracles)")
    p.add_argument("--out", help="also write the metrics as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("samples", help="test images of the model's data as PNGs, to swap")
    common(p)
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--data", help="prepared data directory or built-in name (default: the model's own)")
    p.set_defaults(func=cmd_samples)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ModelLoadError, ConfigError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
