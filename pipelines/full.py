"""The whole DisUnknown pipeline on Ray, tracked in MLflow.

    python pipelines/full.py                       # embedded default: built-in shapes3d, quick preset
    python pipelines/full.py --config my.yaml stage1.cla1_weight=0.3 --workers 2
    python pipelines/full.py --resume PARENT_RUN_ID
    ray job submit --working-dir . -- python pipelines/full.py --tracking-uri http://HEAD:5000 --gpu

Stages: prepare (or reuse) the data -> stage1 -> distill -> classifier ->
stage2 -> lenc, each a Ray job and a nested MLflow run. See pipelines/cli.py.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import full_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(full_main())
