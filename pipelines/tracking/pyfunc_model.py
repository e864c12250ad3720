"""The DisUnknown model as an MLflow pyfunc (models-from-code file; docs/method.md section 11).

:func:`pipelines.tracking.registry.log_and_register` logs THIS FILE as the model's code
(``mlflow.pyfunc.log_model(python_model=<this path>, artifacts={"bundle": DIR})``),
so nothing is pickled; MLflow runs it when the model is loaded and
:func:`mlflow.models.set_model` below names the model object. The bundle
directory (``dsu_models.inference.save_bundle``) travels as the ``bundle``
artifact, and the ``dsu_models`` package travels as the model's code
(``code_paths``), so the loading environment needs only the logged requirements
(torch, numpy, pillow, pyyaml, mlflow).

Served with ``mlflow models serve -m models:/disunknown-<dataset>@champion``, the
``/invocations`` endpoint takes ``{"inputs": {"images": [...], "labels": [...]}}``
(nested lists in the shapes below) and answers ``{"predictions": [...]}``.

``predict(model_input)`` swaps labels onto content images:

- ``model_input["images"]``: uint8 ``(B, S, S, C)`` content images (HWC, the
  layout image libraries use; the logged signature fixes S and C);
- ``model_input["labels"]``: int64 ``(B, K)`` target class ids, columns in the
  model's ``labeled_factors`` order (``factors.json`` in the bundle names the
  classes); ``-1`` keeps the content image's own class as read by the labeled
  encoder S. Optional: without it (or with K = 0) every image is reconstructed.

It returns uint8 ``(B, S, S, C)`` images: each content image's unknown factor
with the target labels, exactly ``DisUnknownModel.swap``. The schema is
uint8-only because MLflow enforces tensor dtypes exactly; send float images
through ``DisUnknownModel`` directly.
"""
from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class DisUnknownPyfunc(PythonModel):
    """Loads the ``bundle`` artifact into a ``DisUnknownModel`` (CUDA when available)."""

    def load_context(self, context):
        from dsu_models.inference import DisUnknownModel

        self.model = DisUnknownModel.load(context.artifacts["bundle"], device="auto")

    def predict(self, context, model_input, params=None) -> np.ndarray:
        from dsu_models.inference import to_hwc_uint8

        if not isinstance(model_input, dict) or "images" not in model_input:
            raise ValueError("DisUnknown pyfunc: input must be {'images': uint8 (B, S, S, C), "
                             "'labels': int64 (B, K)}")
        images = np.asarray(model_input["images"])
        labels = model_input.get("labels")
        if labels is None or not self.model.labeled_factors:
            if self.model.labeled_factors and self.model.label_encoder is None:
                raise ValueError("DisUnknown pyfunc: this model cannot read labels; give 'labels'")
            return to_hwc_uint8(self.model.reconstruct(images))
        return to_hwc_uint8(self.model.swap_labels(images, np.asarray(labels, dtype=np.int64)))


mlflow.models.set_model(DisUnknownPyfunc())
