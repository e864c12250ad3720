"""One pipeline step alone under a pipeline run, given its upstream MLflow run ids
(``disunknown-stage``), e.g. re-run stage 2 with other weights:

    python pipelines/stage.py stage2 --stage1-run ID --classifier-run ID --distill-run ID stage2.dis_weight=2
    python pipelines/stage.py STAGE --help
"""
import sys

from pipelines.cli import stage_entry

if __name__ == "__main__":
    sys.exit(stage_entry())
