"""The distill step (``dsu_models.distill``) as a Ray Data batch-inference job.

    python pipelines/stage.py distill --parent RUN_ID --stage1-run RUN_ID [--data DIR] [options]

An actor pool (GPU when asked for) encodes every train and test image with
stage 1's encoder E and writes ``(id, mu, sigma)`` as Parquet under the
storage root (``<storage>/codes/<run id>``, reached by every node); the driver then
streams the train codes through ``CodeStatsAccumulator`` to get the float64
code statistics (docs/method.md section 7). Both are logged to the ``distill``
MLflow run as ``codes/<split>/*.parquet`` and ``stats.pt``; stage 2 joins the
codes to images by ``id``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from dsu_models.codes import CodeStatsAccumulator, code_statistics
from dsu_models.config import Config, config_from_dict
from dsu_models.distill import distill_batch_size, encode_images, stage1_encoder
from dsu_models.files import load_torch
from pipelines.cluster import storage
from pipelines.tracking import runs as tracking


class EncodeUnknown:
    """Actor: image batch -> ``id``, ``mu``, ``sigma`` (fixed-size float32 lists),
    encoded by ``dsu_models.distill.encode_images`` as the single-process runner does."""

    def __init__(self, cfg: dict, weights: dict, use_gpu: bool):
        config = config_from_dict(cfg)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if not isinstance(weights, dict):  # an ObjectRef: the weights are shared, not copied per actor
            import ray
            weights = ray.get(weights)
        self.encoder = stage1_encoder(config, {"weights": {"encoder": weights}}, self.device)
        self.batch_size = distill_batch_size(config)
        self.size = config.unknown_size

    def __call__(self, batch: dict) -> pa.Table:
        images = torch.from_numpy(np.ascontiguousarray(batch["image"]))  # uint8, converted on the device
        mu, sigma = encode_images(self.encoder, images, self.batch_size, self.device)

        def column(t: torch.Tensor):
            return pa.FixedSizeListArray.from_arrays(pa.array(t.numpy().ravel()), self.size)

        return pa.table({"id": pa.array(batch["id"], pa.int64()), "mu": column(mu), "sigma": column(sigma)})


def code_stats_from_parquet(directory: Path, size: int) -> dict:
    """Float64 statistics of the codes in ``directory``, streamed batch by batch."""
    acc = CodeStatsAccumulator()
    for path in sorted(Path(directory).glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=["mu", "sigma"]):
            # pyarrow's zero-copy arrays are read-only; torch.tensor copies them
            mu = torch.tensor(batch.column(0).flatten().to_numpy().reshape(-1, size))
            sigma = torch.tensor(batch.column(1).flatten().to_numpy().reshape(-1, size))
            acc.update(mu, sigma)
    return acc.finalize()


def run_distill(cfg: Config, data_dir: str, stage1_run: str, run_id: str, tracking_uri: str,
                use_gpu: bool = False, actors: int = 1) -> dict:
    """Encode every image, log codes and statistics to ``run_id``; returns the statistics."""
    import ray
    from mlflow.tracking import MlflowClient

    from pipelines.data.loading import train_dataset

    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if cfg.unknown_size == 0:
            stats = code_statistics(torch.zeros(1, 0), torch.zeros(1, 0))  # nothing unknown
        else:
            handoff = load_torch(tracking.download(stage1_run, "handoff.pt", tracking_uri, tmp / "in"))
            weights = ray.put(handoff["weights"]["encoder"])
            # the write tasks run on any node: they write under the shared storage,
            # and the driver copies the result into MLflow, then removes it
            staged = storage.join(storage.resolve_root(cfg.storage), "codes", run_id)
            fs, staged_path = storage.filesystem(staged)
            fs.delete_dir_contents(staged_path, missing_dir_ok=True)  # a retried distill's leftovers
            try:
                for split in ("train", "test"):
                    ds = train_dataset(data_dir, split, cfg.image_size, shuffle_blocks=False)
                    codes = ds.map_batches(
                        EncodeUnknown, batch_size=distill_batch_size(cfg), batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        # half a CPU per actor leaves room for the read/decode tasks
                        num_gpus=1 if use_gpu else 0, num_cpus=0.5,
                        fn_constructor_kwargs={"cfg": cfg.to_dict(), "weights": weights,
                                               "use_gpu": use_gpu})
                    codes.write_parquet(storage.join(staged, split))
                pafs.copy_files(staged_path, str(tmp / "codes"), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
            finally:
                if fs.get_file_info(staged_path).type != pafs.FileType.NotFound:
                    fs.delete_dir(staged_path)
            stats = code_stats_from_parquet(tmp / "codes" / "train", cfg.unknown_size)
            client.log_artifacts(run_id, str(tmp / "codes"), artifact_path="codes")
        torch.save(stats, tmp / "stats.pt")
        client.log_artifact(run_id, str(tmp / "stats.pt"))
        if cfg.unknown_size:
            tracking.log_metrics(client, run_id, {f"variance_ratio_{j}": float(v)
                                                  for j, v in enumerate(stats["variance_ratio"])}, 0)
    return stats

