"""The whole DisUnknown pipeline on Ray, tracked in MLflow (``disunknown-pipeline``).

    python pipelines/full.py                       # embedded default: built-in shapes3d, the default
                                                   # recipe for budget_minutes (30; e.g. budget_minutes=10)
    python pipelines/full.py --config my.yaml stage1.cla1_weight=0.3 --workers 2
    python pipelines/full.py --resume PARENT_RUN_ID
    ray job submit --working-dir . -- python pipelines/full.py --tracking-uri http://HEAD:5000 --gpu

Steps: prepare (or reuse) the data -> stage1 -> distill -> classifier ->
stage2 -> lenc -> evaluate -> register, each a Ray job and a nested MLflow run
(the table of steps is ``dsu_models.steps.STEPS``; how Ray runs each kind,
``pipelines.cli.RUNNERS``).

Exit status: 0 done; 2 refused before anything ran (config, data, flags); 1
failed after it started (runs FAILED); 130 after Ctrl-C and 143 after SIGTERM
(systemd, Kubernetes, ``ray job stop``): the parent run and the running
stage's run KILLED, Ray shut down (``pipelines.cluster.stopping``). After 1,
130 and 143 the last line names the ``--resume PARENT_RUN_ID`` that continues
it, once its parent run exists.
"""
import sys

from pipelines.cli import full_main

if __name__ == "__main__":
    sys.exit(full_main())
