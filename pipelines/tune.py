"""Ray Tune sweeps of the loss weights, tracked in MLflow (``disunknown-tune``).

    python pipelines/tune.py --space tune_spaces/stage1.yaml --samples 16 --config quick
    python pipelines/tune.py --space tune_spaces/stage2.yaml --samples 16 --pipeline-run PARENT_RUN_ID
    python pipelines/tune.py --resume SWEEP_RUN_ID

See ``pipelines.sweeps.driver``.
"""
import sys

# the driver module, not this script, defines what Tune pickles (callbacks)
from pipelines.sweeps.driver import main

if __name__ == "__main__":
    sys.exit(main())
