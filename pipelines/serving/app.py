"""The Ray Serve application: one deployment that loads a model and answers
HTTP (docs/serving.md).

``SwapService`` loads its default model (a registry name/alias, a run URI or a
bundle directory) when its replica starts; a model that cannot be loaded fails
the replica, and so the deployment, with the loader's error. A request may
choose another model with Ray Serve's multiplexing header
(``serve_multiplexed_model_id: models:/NAME@ALIAS``): the id is checked against
:class:`protocol.ModelChoice` first, then loaded on first use by a
``@serve.multiplexed`` loader that keeps ``max_models`` of them per replica
(least recently used evicted; the default stays loaded besides them). A model
that fails to load is refused with one line (404 for the loader's
``ModelLoadError``) and leaves the others alone. Its FastAPI routes:

- ``GET /``: the swap explorer page (``explorer.html``, no external resources);
- ``GET /info``: the chosen model's factors, class names, image size, registry
  version and evaluation summary, example images; the request limits; and
  ``models``: the default, the allowed ids and those loaded on this replica;
- ``GET /examples/{i}.png``: one of the held-out images the chosen model carries;
- ``POST /swap``, ``POST /encode``, ``POST /generate``: see
  :mod:`pipelines.serving.protocol`.

The three POST routes check their request, then wait in a ``@serve.batch``
queue, so that concurrent callers share one forward pass; the networks run in
a worker thread, keeping the replica's event loop free to accept requests.
``build`` is the application builder for ``serve run`` and YAML configs
(``serve run pipelines.serving.app:build model=models:/...``).
"""

import asyncio
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from dsu_models.allocator import retain_freed_memory
from dsu_models.data.codec import encode_png
from dsu_models.inference import DisUnknownModel, ModelLoadError, to_hwc_uint8
from pipelines.serving import protocol as p

PAGE = Path(__file__).with_name("explorer.html")
api = FastAPI(title="DisUnknown", docs_url=None, redoc_url=None)


@api.exception_handler(p.BadRequest)
async def _refused(request: Request, exc: p.BadRequest):
    return JSONResponse({"error": exc.message}, status_code=exc.status)


def registry_facts(uri: str, tracking_uri: str | None) -> dict:
    """Name, version, run and evaluation summary of a ``models:/`` URI (empty otherwise)."""
    if not uri.startswith("models:/"):
        return {}
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.registry import SUMMARY_TAG

    name, _, ref = uri[len("models:/"):].partition("@")
    client = MlflowClient(tracking_uri)
    if ref:
        version = client.get_model_version_by_alias(name, ref)
    else:
        name, _, number = name.partition("/")
        if not number.isdigit():
            return {"name": name}
        version = client.get_model_version(name, number)
    summary = (version.tags or {}).get(SUMMARY_TAG)
    return {"name": name, "version": str(version.version), "alias": ref or None,
            "run_id": version.run_id, "summary": float(summary) if summary is not None else None}


def describe(uri: str, m: DisUnknownModel, facts: dict, limits: p.Limits) -> dict:
    """What ``GET /info`` says of the model (all but the request counts)."""
    hidden = [f.name for f in m.all_factors if f.name not in m.labeled_factors]
    examples = []
    if m.examples is not None:
        examples = [{f.name: f.names()[v] for f, v in zip(m.all_factors, row)}
                    for row in m.examples["labels"].tolist()]
    return {"model": uri, **facts,
            "factors": [{"name": f.name, "classes": f.classes, "class_names": list(f.names())}
                        for f in m.factors],
            "unknown_factors": hidden, "unknown_size": m.unknown_size,
            "image_size": m.config.image_size, "channels": m.config.image_channels,
            "can_set_labels": m.embedders is not None, "can_read_labels": m.label_encoder is not None,
            "examples": examples, "device": str(m.device), "limits": asdict(limits)}


@dataclass
class Served:
    """A loaded model, its URI and what ``GET /info`` says of it."""

    uri: str
    model: DisUnknownModel
    description: dict


def load_served(uri: str, device: str, tracking_uri: str | None, limits: p.Limits) -> Served:
    model = DisUnknownModel.load(uri, device=device, tracking_uri=tracking_uri)
    return Served(uri, model, describe(uri, model, registry_facts(uri, tracking_uri), limits))


def load_chosen(uri: str, device: str, tracking_uri: str | None, limits: p.Limits) -> Served:
    """:func:`load_served` for a model a request chose: a failure becomes one line,
    404 when the loader could not find or read it, 500 for anything else."""
    try:
        return load_served(uri, device, tracking_uri, limits)
    except ModelLoadError as exc:
        raise p.BadRequest(f"model {uri!r} could not be loaded: {_first_line(exc)}", 404) from None
    except Exception as exc:  # a broken bundle may fail anywhere; the caller needs one line
        raise p.BadRequest(f"model {uri!r} failed to load: {type(exc).__name__}: {_first_line(exc)}",
                           500) from None


def check_registered(uri: str, tracking_uri: str | None):
    """Refuse (404, one line) a ``models:/`` URI that names no version of the store."""
    try:
        registry_facts(uri, tracking_uri)
    except Exception as exc:  # MLflow's own error types; the caller needs one line
        raise p.BadRequest(f"model {uri!r} could not be loaded: {_first_line(exc)}", 404) from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _split(array, sizes: list[int]) -> list:
    out, start = [], 0
    for n in sizes:
        out.append(array[start:start + n])
        start += n
    return out


@serve.deployment(name="disunknown", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1},
                  logging_config={"enable_access_log": False, "log_level": "WARNING"})
@serve.ingress(api)
class SwapService:
    """See the module docstring. ``limits``: :class:`protocol.Limits` fields;
    ``threads``: torch threads (default: the replica's CPUs); ``models``,
    ``allow_registry``, ``max_models``: which models requests may choose and how
    many a replica keeps (:class:`protocol.ModelChoice`)."""

    def __init__(self, model: str, tracking_uri: str | None = None, device: str = "auto",
                 limits: dict | None = None, max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.004, threads: int | None = None,
                 models: list[str] | tuple[str, ...] = p.ModelChoice.models,
                 allow_registry: bool = p.ModelChoice.allow_registry,
                 max_models: int = p.ModelChoice.max_models):
        torch.set_num_threads(threads or 1)
        # the networks run in a worker thread, whose glibc arena would give freed
        # activations back to the kernel after every pass (dsu_models.allocator)
        retain_freed_memory()
        self.limits = p.Limits(**(limits or {}))
        self.choice = p.ModelChoice(str(model), models, allow_registry, max_models)
        self.tracking_uri = tracking_uri
        self.default = load_served(self.choice.default, device, tracking_uri, self.limits)
        self.loads = 0   # chosen models loaded; minus those still cached: the evicted ones

        async def load(model_id: str) -> Served:
            served = await asyncio.to_thread(load_chosen, model_id, device, tracking_uri, self.limits)
            self.loads += 1   # no await between here and Ray caching it, so /info stays exact
            return served

        # a closure, not a decorated method, so that the limit can come from the args
        self._loader = load
        self._chosen = serve.multiplexed(max_num_models_per_replica=self.choice.max_models)(load)
        for method in (self._swap_batch, self._encode_batch, self._generate_batch):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.page = PAGE.read_text(encoding="utf-8")
        self.served = {"requests": 0, "forward_passes": 0}   # batching at work: passes < requests

    async def _model(self) -> Served:
        """The model this request chose (the default when it names none)."""
        model_id = serve.get_multiplexed_model_id()
        if not model_id or model_id == self.choice.default:
            return self.default
        model_id = self.choice.check(model_id)
        cached = self._cached()
        if p.REGISTRY_ID.fullmatch(model_id) and model_id not in (cached or ()):
            # Ray evicts before it loads: a registry id that names nothing must fail
            # here, on one query, rather than cost a loaded model its place
            await asyncio.to_thread(check_registered, model_id, self.tracking_uri)
        return await self._chosen(model_id)

    def _cached(self) -> list[str] | None:
        """Chosen models loaded on this replica, least recently used first. Ray keeps
        its LRU cache on the loader function (module ray.serve.multiplex in Ray 2.60:
        ``_ModelMultiplexWrapper.models``, made on the first load); None if that moves."""
        cache = getattr(self._loader, "__serve_multiplex_wrapper", None)
        if cache is None:
            return []   # no model chosen yet
        models = getattr(cache, "models", None)
        return None if models is None else list(models)

    def _models_info(self) -> dict:
        cached = self._cached()
        return {"default": self.choice.default, "listed": list(self.choice.models),
                "allow_registry": self.choice.allow_registry, "max_models": self.choice.max_models,
                "loaded": cached, "loads": self.loads,
                "evictions": None if cached is None else self.loads - len(cached)}

    async def _per_model(self, items: list[tuple[DisUnknownModel, object]], run) -> list:
        """``run(model, payloads) -> one result per payload`` in a worker thread, once
        per model in the batch. Serve already splits a batch by multiplexed model id
        (ray.serve.batching), so this is one pass unless an evicted model was reloaded
        while its requests queued; grouping keeps the answer right either way."""
        groups: dict[int, list[int]] = {}
        for i, (model, _) in enumerate(items):
            groups.setdefault(id(model), []).append(i)
        out: list = [None] * len(items)
        for members in groups.values():
            self.served["requests"] += len(members)
            self.served["forward_passes"] += 1
            model = items[members[0]][0]
            results = await asyncio.to_thread(run, model, [items[i][1] for i in members])
            for i, result in zip(members, results):
                out[i] = result
        return out

    # -------------------------------------------------------------- batches

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.004)
    async def _swap_batch(self, items: list[tuple[DisUnknownModel, p.SwapJob]]) -> list[np.ndarray]:
        def run(model: DisUnknownModel, jobs: list[p.SwapJob]) -> list[np.ndarray]:
            images = torch.cat([j.images for j in jobs])
            labels = torch.cat([j.labels for j in jobs])
            return _split(to_hwc_uint8(model.swap_labels(images, labels)), [j.images.shape[0] for j in jobs])

        return await self._per_model(items, run)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.004)
    async def _encode_batch(self, items: list[tuple[DisUnknownModel, torch.Tensor]]) -> list[dict]:
        def run(model: DisUnknownModel, batches: list[torch.Tensor]) -> list[dict]:
            images = torch.cat(batches)
            unknown = model.encode_unknown(images)
            labels = (model.encode_labels(images) if model.embedders is not None
                      and model.label_encoder is not None else None)
            sizes = [b.shape[0] for b in batches]
            label_parts = _split(labels, sizes) if labels is not None else [None] * len(batches)
            return [{"unknown": u, "labels": y} for u, y in zip(_split(unknown, sizes), label_parts)]

        return await self._per_model(items, run)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.004)
    async def _generate_batch(self, items: list[tuple[DisUnknownModel, p.GenerateJob]]) -> list[np.ndarray]:
        def run(model: DisUnknownModel, jobs: list[p.GenerateJob]) -> list[np.ndarray]:
            unknown = torch.cat([j.unknown for j in jobs])
            labels = torch.cat([j.labels for j in jobs])
            u = unknown if model.unknown_size else None
            out = to_hwc_uint8(model.generate(u, model.embed_labels(labels)))
            return _split(out, [j.unknown.shape[0] for j in jobs])

        return await self._per_model(items, run)

    # -------------------------------------------------------------- requests

    async def _body(self, request: Request) -> bytes:
        p.check_size(request.headers.get("content-length"), self.limits)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limits.max_body_bytes:
                raise p.BadRequest(f"request body over the limit of {self.limits.max_body_bytes} bytes", 413)
        return bytes(body)

    async def _json_or_image(self, request: Request, endpoint: str) -> tuple[dict | None, bytes]:
        kind = p.media_type(request.headers.get("content-type"))
        body = await self._body(request)
        if kind in p.JSON_TYPES:
            return p.read_json(body, self.limits), body
        if kind in p.IMAGE_TYPES or kind.startswith("image/"):
            return None, body
        raise p.BadRequest(f"{endpoint}: send application/json or an image (Content-Type image/png), "
                           f"not {kind or 'no Content-Type'}", 415)

    @staticmethod
    def _labels_out(model: DisUnknownModel, labels: torch.Tensor) -> list[dict]:
        return [{name: model.class_name(name, int(v)) for name, v in zip(model.labeled_factors, row)}
                for row in labels.tolist()]

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/info")
    async def info(self) -> dict:
        served = await self._model()
        return {**served.description, "served": dict(self.served), "models": self._models_info()}

    @api.get("/examples/{index}.png")
    async def example(self, index: int) -> Response:
        stored = (await self._model()).model.examples
        count = 0 if stored is None else stored["images"].shape[0]
        if not 0 <= index < count:
            raise p.BadRequest(f"no example image {index}; this model has {count}", 404)
        image = stored["images"][index].permute(1, 2, 0).numpy()
        return Response(encode_png(image), media_type="image/png")

    @api.post("/swap")
    async def swap(self, request: Request) -> Response:
        model = (await self._model()).model
        data, body = await self._json_or_image(request, "swap")
        if data is None:   # one raw image, factor settings in the query string
            query = dict(request.query_params)
            image = p.decode_image(body, model)[None]
            job = p.swap_job(model, image, p.query_settings(query), query.get("sweep"), self.limits)
            out = await self._swap_batch((model, job))
            return Response(p.grid_png(out, job.rows, job.cols), media_type="image/png")
        job = p.parse_swap(model, data, self.limits)
        out = await self._swap_batch((model, job))
        return JSONResponse({"images": p.png_base64(out), "rows": job.rows, "cols": job.cols,
                             "labels": job.labels.tolist()})

    @api.post("/encode")
    async def encode(self, request: Request) -> dict:
        model = (await self._model()).model
        data, body = await self._json_or_image(request, "encode")
        images = (p.decode_image(body, model)[None] if data is None
                  else p.parse_encode(model, data, self.limits))
        out = await self._encode_batch((model, images))
        reply = {"unknown": out["unknown"].tolist()}
        if out["labels"] is not None:
            reply["labels"] = out["labels"].tolist()
            reply["classes"] = self._labels_out(model, out["labels"])
        return reply

    @api.post("/generate")
    async def generate(self, request: Request) -> dict:
        model = (await self._model()).model
        kind = p.media_type(request.headers.get("content-type"))
        if kind not in p.JSON_TYPES:
            raise p.BadRequest(f"generate: send application/json, not {kind or 'no Content-Type'}", 415)
        job = p.parse_generate(model, p.read_json(await self._body(request), self.limits), self.limits)
        out = await self._generate_batch((model, job))
        return {"images": p.png_base64(out)}


# ------------------------------------------------------------------ builders

CHOICE_KEYS = ("models", "allow_registry", "max_models")   # protocol.ModelChoice's, besides the default
BUILD_KEYS = ("model", "tracking_uri", "device", "limits", "max_batch_size", "batch_wait_timeout_s",
              "threads", "num_cpus", "num_gpus", "replicas", "autoscaling", *CHOICE_KEYS)


def build(args: dict):
    """The application for ``serve run pipelines.serving.app:build model=URI ...`` or
    a Serve YAML config's ``args``: the keys of :data:`BUILD_KEYS`. ``replicas``: a
    fixed count; ``autoscaling``: Ray Serve's ``autoscaling_config`` dict
    (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ...);
    ``models``: more models requests may choose (a list, or comma-separated);
    ``allow_registry``: whether any ``models:/`` URI of the store may be chosen
    too (default true); ``max_models``: chosen models kept per replica (default 3)."""
    args = dict(args)
    unknown = sorted(set(args) - set(BUILD_KEYS))
    if unknown:
        raise ValueError(f"serve args: unknown key(s) {unknown}; keys are {list(BUILD_KEYS)}")
    if not args.get("model"):
        raise ValueError("serve args: 'model' is required (models:/NAME@ALIAS, runs:/..., or a directory)")
    options: dict = {"ray_actor_options": {"num_cpus": float(args.pop("num_cpus", 1)),
                                           "num_gpus": float(args.pop("num_gpus", 0))}}
    replicas, autoscaling = args.pop("replicas", None), args.pop("autoscaling", None)
    if replicas is not None and autoscaling is not None:
        raise ValueError("serve args: give 'replicas' or 'autoscaling', not both")
    if autoscaling is not None:
        options["autoscaling_config"] = dict(autoscaling)
    else:
        options["num_replicas"] = int(replicas or 1)
    if "models" in args and args["models"] is None:   # an empty `models:` in YAML
        del args["models"]
    if isinstance(args.get("models"), str):   # `serve run ... models=a,b`
        args["models"] = [m.strip() for m in args["models"].split(",") if m.strip()]
    if "allow_registry" in args:
        args["allow_registry"] = _flag("allow_registry", args["allow_registry"])
    for key in ("max_batch_size", "threads", "max_models"):   # `serve run ... key=value` passes strings
        if args.get(key) is not None:
            args[key] = int(args[key])
    if "batch_wait_timeout_s" in args:
        args["batch_wait_timeout_s"] = float(args["batch_wait_timeout_s"])
    args["threads"] = args.get("threads") or max(1, int(options["ray_actor_options"]["num_cpus"]))
    if not args.get("tracking_uri"):
        from pipelines.tracking.runs import default_tracking_uri
        args["tracking_uri"] = default_tracking_uri()
    # refuse a bad choice here rather than in every replica
    p.ModelChoice(args["model"], **{k: args[k] for k in CHOICE_KEYS if k in args})
    return SwapService.options(**options).bind(**args)


def _flag(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"serve args: {key}={value!r}: true or false")
