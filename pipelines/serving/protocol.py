"""What the HTTP API accepts and answers (docs/serving.md), with no Ray in it.

Every request is parsed and checked here, against the model, before it joins a
batch: a bad request is refused with :class:`BadRequest` (an HTTP status and
one line saying what is wrong) and never reaches the networks, so one caller's
mistake cannot fail the other requests of its batch.

Images travel as PNG (or any format Pillow reads): the raw request body
(``Content-Type: image/png``) for one image, or base64 strings in JSON
(``{"images": ["iVBOR...", ...]}``; a ``data:image/png;base64,`` prefix is
allowed). They must already be the model's size: the service does not resize.
Factor settings name a labeled factor and a class, by name or id.

A request chooses its model with Ray Serve's multiplexing header
(:data:`MODEL_HEADER`); :class:`ModelChoice` says which ids are allowed, so a
request cannot make the service read a path it was not given.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dsu_models.inference import DisUnknownModel
from dsu_models.data.codec import encode_png

JSON_TYPES = ("application/json",)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "application/octet-stream")


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_body_bytes: int = 4 << 20   # refused with 413 above this
    max_images: int = 64            # content images (or codes) per request
    max_outputs: int = 256          # images one request may ask for (a sweep multiplies)

    def __post_init__(self):
        for name in ("max_body_bytes", "max_images", "max_outputs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"serving limit {name}={value!r}: a positive integer")


class BadRequest(Exception):
    """A request the service refuses: ``status`` (4xx) and a one-line ``message``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status, self.message = status, message


# ------------------------------------------------------------------ model choice

MODEL_HEADER = "serve_multiplexed_model_id"   # Ray Serve's; "serve-multiplexed-model-id" works too
# a registry URI and nothing else: a name (no slash, no "..") then @alias or /version
REGISTRY_ID = re.compile(r"models:/[A-Za-z0-9][A-Za-z0-9_.-]{0,199}(@[A-Za-z0-9_-]{1,100}|/[1-9][0-9]{0,8})")


@dataclass(frozen=True)
class ModelChoice:
    """The models a request may name. ``default``: the one the service started with,
    answering requests that name none (it stays loaded); ``models``: more model URIs
    or bundle folders named at start, matched exactly; ``allow_registry``: also any
    ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` of the service's MLflow store;
    ``max_models``: chosen models one replica keeps besides the default (the least
    recently used is evicted beyond it)."""

    default: str
    models: tuple[str, ...] = ()
    allow_registry: bool = True
    max_models: int = 3

    def __post_init__(self):
        if not isinstance(self.models, (list, tuple)) or not all(isinstance(m, str) and m.strip()
                                                                 for m in self.models):
            raise ValueError(f"models={self.models!r}: a list of model URIs or bundle folders")
        object.__setattr__(self, "models", tuple(self.models))
        if not isinstance(self.allow_registry, bool):
            raise ValueError(f"allow_registry={self.allow_registry!r}: true or false")
        if not isinstance(self.max_models, int) or isinstance(self.max_models, bool) or self.max_models < 1:
            raise ValueError(f"max_models={self.max_models!r}: a positive integer")

    def check(self, model_id: str) -> str:
        """``model_id`` if a request may choose it, else :class:`BadRequest` (400)."""
        if model_id == self.default or model_id in self.models:
            return model_id
        if self.allow_registry and REGISTRY_ID.fullmatch(model_id):
            return model_id
        shown = model_id if len(model_id) <= 120 else model_id[:117] + "..."
        allowed = "models:/NAME@ALIAS, models:/NAME/VERSION or " if self.allow_registry else ""
        raise BadRequest(f"model {shown!r} is not one this service may load; choose {allowed}"
                         f"one of the models GET /info lists")


@dataclass
class SwapJob:
    """Content images ``(N, C, S, S)`` uint8 and target labels ``(N, K)`` (-1: keep)."""

    images: torch.Tensor
    labels: torch.Tensor
    rows: int          # result grid: rows x cols == N (a sweep: content images x classes)
    cols: int


@dataclass
class GenerateJob:
    unknown: torch.Tensor   # (N, m_u) float32
    labels: torch.Tensor    # (N, K) int64, every factor set


# ------------------------------------------------------------------ bodies


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def check_size(declared: str | None, limits: Limits):
    """Refuse a body whose declared length is over the limit before reading it."""
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise BadRequest(f"Content-Length {declared!r} is not a number") from None
    if length > limits.max_body_bytes:
        raise BadRequest(f"request body of {length} bytes; the limit is {limits.max_body_bytes}", 413)


def read_json(body: bytes, limits: Limits) -> dict:
    if len(body) > limits.max_body_bytes:
        raise BadRequest(f"request body of {len(body)} bytes; the limit is {limits.max_body_bytes}", 413)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadRequest(f"body must be a JSON object, got {type(data).__name__}")
    return data


def _allowed(data: dict, keys: tuple[str, ...], endpoint: str):
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise BadRequest(f"{endpoint}: unknown field(s) {unknown}; fields are {list(keys)}")


# ------------------------------------------------------------------ images


def decode_image(data: bytes, model: DisUnknownModel, what: str = "image") -> torch.Tensor:
    """One encoded image -> uint8 ``(C, S, S)`` in the model's mode; refuses other sizes."""
    size, channels = model.config.image_size, model.config.image_channels
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if (width, height) != (size, size):
            raise BadRequest(f"{what} is {width}x{height} pixels; this model takes {size}x{size} images")
        image = image.convert("RGB" if channels == 3 else "L")
    except BadRequest:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise BadRequest(f"{what}: not an image Pillow can read (send PNG)") from None
    array = np.asarray(image, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def decode_base64_image(text, model: DisUnknownModel, what: str) -> torch.Tensor:
    if not isinstance(text, str):
        raise BadRequest(f"{what}: expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what}: not valid base64") from None
    return decode_image(raw, model, what)


def png_base64(images: np.ndarray) -> list[str]:
    return [base64.b64encode(encode_png(im)).decode("ascii") for im in images]


def grid_png(images: np.ndarray, rows: int, cols: int) -> bytes:
    """``rows * cols`` uint8 ``(H, W, C)`` images as one PNG, row-major, 2 px gaps."""
    n, h, w, c = images.shape
    gap = 2
    canvas = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[r * (h + gap):r * (h + gap) + h, q * (w + gap):q * (w + gap) + w] = images[i]
    return encode_png(canvas)


def content_images(data: dict, model: DisUnknownModel, limits: Limits, endpoint: str) -> torch.Tensor:
    """``images`` (base64 list) and/or ``examples`` (indices into the model's examples)."""
    given = data.get("images", [])
    picks = data.get("examples", [])
    if not isinstance(given, list) or not isinstance(picks, list):
        raise BadRequest(f"{endpoint}: 'images' and 'examples' must be lists")
    if not given and not picks:
        raise BadRequest(f"{endpoint}: give 'images' (base64 PNG strings) or 'examples' (indices)")
    if len(given) + len(picks) > limits.max_images:
        raise BadRequest(f"{endpoint}: {len(given) + len(picks)} images; at most {limits.max_images} "
                         f"per request")
    parts = [decode_base64_image(t, model, f"images[{i}]") for i, t in enumerate(given)]
    stored = model.examples["images"] if model.examples is not None else None
    count = 0 if stored is None else stored.shape[0]
    for i, pick in enumerate(picks):
        if not isinstance(pick, int) or isinstance(pick, bool) or not 0 <= pick < count:
            raise BadRequest(f"{endpoint}: examples[{i}] = {pick!r}; this model has {count} example "
                             f"images (0..{count - 1})" if count else
                             f"{endpoint}: this model carries no example images; send 'images'")
        parts.append(stored[pick])
    return torch.stack(parts)


# ------------------------------------------------------------------ labels


def _settings(value, endpoint: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{endpoint}: 'set' must be an object {{factor: class name or id}}")
    return value


def _label_matrix(model: DisUnknownModel, settings: dict, batch: int, endpoint: str) -> torch.Tensor:
    if settings and model.embedders is None:
        raise BadRequest(f"{endpoint}: this model has no label embedders, so classes cannot be set")
    try:
        return model.label_matrix(settings, batch)
    except ValueError as exc:
        raise BadRequest(f"{endpoint}: {exc}") from None


def _sweep_factor(model: DisUnknownModel, name, endpoint: str) -> int:
    if not isinstance(name, str):
        raise BadRequest(f"{endpoint}: 'sweep' names one labeled factor")
    try:
        return model.factor_index(name)
    except ValueError as exc:
        raise BadRequest(f"{endpoint}: sweep: {exc}") from None


def swap_job(model: DisUnknownModel, images: torch.Tensor, settings, sweep, limits: Limits,
             endpoint: str = "swap") -> SwapJob:
    """Every content image with ``settings``; with ``sweep`` (a factor), each content
    image once per class of that factor (a row per image)."""
    settings = _settings(settings, endpoint)
    n = images.shape[0]
    if sweep is None:
        return SwapJob(images, _label_matrix(model, settings, n, endpoint), n, 1)
    k = _sweep_factor(model, sweep, endpoint)
    if sweep in settings:
        raise BadRequest(f"{endpoint}: factor {sweep!r} is both swept and set")
    classes = model.factors[k].classes
    if n * classes > limits.max_outputs:
        raise BadRequest(f"{endpoint}: {n} images x {classes} classes of {sweep!r} = {n * classes} "
                         f"results; at most {limits.max_outputs} per request")
    labels = _label_matrix(model, settings, n, endpoint).repeat_interleave(classes, dim=0)
    labels[:, k] = torch.arange(classes).repeat(n)
    return SwapJob(images.repeat_interleave(classes, dim=0), labels, n, classes)


def query_settings(params: dict, reserved: tuple[str, ...] = ("sweep", "format")) -> dict:
    """Factor settings from URL query parameters (``?shape=sphere&object_hue=3``)."""
    return {k: v for k, v in params.items() if k not in reserved}


def parse_swap(model: DisUnknownModel, data: dict, limits: Limits) -> SwapJob:
    _allowed(data, ("images", "examples", "set", "sweep"), "swap")
    images = content_images(data, model, limits, "swap")
    return swap_job(model, images, data.get("set"), data.get("sweep"), limits)


def parse_encode(model: DisUnknownModel, data: dict, limits: Limits) -> torch.Tensor:
    _allowed(data, ("images", "examples"), "encode")
    return content_images(data, model, limits, "encode")


def parse_generate(model: DisUnknownModel, data: dict, limits: Limits) -> GenerateJob:
    """``unknown``: ``(N, m_u)`` codes (numbers); ``set``: every labeled factor's class
    (one value, or a list of N)."""
    _allowed(data, ("unknown", "set"), "generate")
    codes = data.get("unknown")
    m = model.unknown_size
    if not isinstance(codes, list) or not codes or not all(isinstance(r, list) for r in codes):
        raise BadRequest(f"generate: 'unknown' must be a non-empty list of codes, each a list of {m} numbers")
    if len(codes) > limits.max_images:
        raise BadRequest(f"generate: {len(codes)} codes; at most {limits.max_images} per request")
    for i, row in enumerate(codes):
        if len(row) != m or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                    and math.isfinite(v) for v in row):
            raise BadRequest(f"generate: unknown[{i}] must be {m} finite numbers")
    unknown = torch.tensor(codes, dtype=torch.float32).reshape(len(codes), m)
    settings = _settings(data.get("set"), "generate")
    labels = _label_matrix(model, settings, unknown.shape[0], "generate")
    missing = [name for j, name in enumerate(model.labeled_factors) if bool((labels[:, j] < 0).any())]
    if missing:
        raise BadRequest(f"generate: set every labeled factor; missing {missing}")
    return GenerateJob(unknown, labels)
