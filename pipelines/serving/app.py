"""The Ray Serve application: one deployment that loads a model and answers
HTTP (docs/serving.md).

``SwapService`` loads a model (a registry name/alias, a run URI or a bundle
directory) when its replica starts; a model that cannot be loaded fails the
replica, and so the deployment, with the loader's error. Its FastAPI routes:

- ``GET /``: the swap explorer page (``explorer.html``, no external resources);
- ``GET /info``: factors, class names, image size, the registry version and
  its evaluation summary, the example images and the request limits;
- ``GET /examples/{i}.png``: one of the held-out images the model carries;
- ``POST /swap``, ``POST /encode``, ``POST /generate``: see
  :mod:`pipelines.serving.protocol`.

The three POST routes check their request, then wait in a ``@serve.batch``
queue, so that concurrent callers share one forward pass; the networks run in
a worker thread, keeping the replica's event loop free to accept requests.
``build`` is the application builder for ``serve run`` and YAML configs
(``serve run pipelines.serving.app:build model=models:/...``).
"""

import asyncio
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from dsu_models.allocator import retain_freed_memory
from dsu_models.data.codec import encode_png
from dsu_models.inference import DisUnknownModel, to_hwc_uint8
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
    ``threads``: torch threads (default: the replica's CPUs)."""

    def __init__(self, model: str, tracking_uri: str | None = None, device: str = "auto",
                 limits: dict | None = None, max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.004, threads: int | None = None):
        torch.set_num_threads(threads or 1)
        # the networks run in a worker thread, whose glibc arena would give freed
        # activations back to the kernel after every pass (dsu_models.allocator)
        retain_freed_memory()
        self.uri = str(model)
        self.limits = p.Limits(**(limits or {}))
        self.model = DisUnknownModel.load(self.uri, device=device, tracking_uri=tracking_uri)
        self.description = describe(self.uri, self.model, registry_facts(self.uri, tracking_uri),
                                    self.limits)
        for method in (self._swap_batch, self._encode_batch, self._generate_batch):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.page = PAGE.read_text(encoding="utf-8")
        self.served = {"requests": 0, "forward_passes": 0}   # batching at work: passes < requests

    def _count(self, requests: int):
        self.served["requests"] += requests
        self.served["forward_passes"] += 1

    # -------------------------------------------------------------- batches

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.004)
    async def _swap_batch(self, jobs: list[p.SwapJob]) -> list[np.ndarray]:
        self._count(len(jobs))
        images = torch.cat([j.images for j in jobs])
        labels = torch.cat([j.labels for j in jobs])
        out = await asyncio.to_thread(lambda: to_hwc_uint8(self.model.swap_labels(images, labels)))
        return _split(out, [j.images.shape[0] for j in jobs])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.004)
    async def _encode_batch(self, batches: list[torch.Tensor]) -> list[dict]:
        self._count(len(batches))
        images = torch.cat(batches)

        def run():
            unknown = self.model.encode_unknown(images)
            labels = (self.model.encode_labels(images) if self.model.embedders is not None
                      and self.model.label_encoder is not None else None)
            return unknown, labels

        unknown, labels = await asyncio.to_thread(run)
        sizes = [b.shape[0] for b in batches]
        label_parts = _split(labels, sizes) if labels is not None else [None] * len(batches)
        return [{"unknown": u, "labels": y} for u, y in zip(_split(unknown, sizes), label_parts)]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.004)
    async def _generate_batch(self, jobs: list[p.GenerateJob]) -> list[np.ndarray]:
        self._count(len(jobs))
        unknown = torch.cat([j.unknown for j in jobs])
        labels = torch.cat([j.labels for j in jobs])

        def run():
            u = unknown if self.model.unknown_size else None
            return to_hwc_uint8(self.model.generate(u, self.model.embed_labels(labels)))

        out = await asyncio.to_thread(run)
        return _split(out, [j.unknown.shape[0] for j in jobs])

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

    def _labels_out(self, labels: torch.Tensor) -> list[dict]:
        return [{name: self.model.class_name(name, int(v)) for name, v in zip(self.model.labeled_factors, row)}
                for row in labels.tolist()]

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/info")
    async def info(self) -> dict:
        return {**self.description, "served": dict(self.served)}

    @api.get("/examples/{index}.png")
    async def example(self, index: int) -> Response:
        stored = self.model.examples
        count = 0 if stored is None else stored["images"].shape[0]
        if not 0 <= index < count:
            raise p.BadRequest(f"no example image {index}; this model has {count}", 404)
        image = stored["images"][index].permute(1, 2, 0).numpy()
        return Response(encode_png(image), media_type="image/png")

    @api.post("/swap")
    async def swap(self, request: Request) -> Response:
        data, body = await self._json_or_image(request, "swap")
        if data is None:   # one raw image, factor settings in the query string
            query = dict(request.query_params)
            image = p.decode_image(body, self.model)[None]
            job = p.swap_job(self.model, image, p.query_settings(query), query.get("sweep"), self.limits)
            out = await self._swap_batch(job)
            return Response(p.grid_png(out, job.rows, job.cols), media_type="image/png")
        job = p.parse_swap(self.model, data, self.limits)
        out = await self._swap_batch(job)
        return JSONResponse({"images": p.png_base64(out), "rows": job.rows, "cols": job.cols,
                             "labels": job.labels.tolist()})

    @api.post("/encode")
    async def encode(self, request: Request) -> dict:
        data, body = await self._json_or_image(request, "encode")
        images = (p.decode_image(body, self.model)[None] if data is None
                  else p.parse_encode(self.model, data, self.limits))
        out = await self._encode_batch(images)
        reply = {"unknown": out["unknown"].tolist()}
        if out["labels"] is not None:
            reply["labels"] = out["labels"].tolist()
            reply["classes"] = self._labels_out(out["labels"])
        return reply

    @api.post("/generate")
    async def generate(self, request: Request) -> dict:
        kind = p.media_type(request.headers.get("content-type"))
        if kind not in p.JSON_TYPES:
            raise p.BadRequest(f"generate: send application/json, not {kind or 'no Content-Type'}", 415)
        job = p.parse_generate(self.model, p.read_json(await self._body(request), self.limits), self.limits)
        out = await self._generate_batch(job)
        return {"images": p.png_base64(out)}


# ------------------------------------------------------------------ builders

BUILD_KEYS = ("model", "tracking_uri", "device", "limits", "max_batch_size", "batch_wait_timeout_s",
              "threads", "num_cpus", "num_gpus", "replicas", "autoscaling")


def build(args: dict):
    """The application for ``serve run pipelines.serving.app:build model=URI ...`` or
    a Serve YAML config's ``args``: the keys of :data:`BUILD_KEYS`. ``replicas``: a
    fixed count; ``autoscaling``: Ray Serve's ``autoscaling_config`` dict
    (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ...)."""
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
    for key in ("max_batch_size", "threads"):   # `serve run ... key=value` passes strings
        if args.get(key) is not None:
            args[key] = int(args[key])
    if "batch_wait_timeout_s" in args:
        args["batch_wait_timeout_s"] = float(args["batch_wait_timeout_s"])
    args["threads"] = args.get("threads") or max(1, int(options["ray_actor_options"]["num_cpus"]))
    if not args.get("tracking_uri"):
        from pipelines.tracking.runs import default_tracking_uri
        args["tracking_uri"] = default_tracking_uri()
    return SwapService.options(**options).bind(**args)
