"""Run the stage2 stage alone as a Ray Train job, given its upstream MLflow run ids.

    python pipelines/stage2.py --help
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import stage_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_main("stage2"))
