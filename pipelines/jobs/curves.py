"""Evaluation curves while the Ray pipeline trains (``evaluate.curve_interval``).

Rank 0 of a stage-1 or stage-2 Train worker group hands the model so far (its
hand-off) to a Ray task at each interval and goes on training: the task
evaluates it on the validation split with the sweep's judge
(``pipelines.sweeps.judge.Judge``: stage 1 alone by ``evaluate_stage1``, stage 2
with stage 1 by ``evaluate`` and the cached oracles) and logs the figures to the
stage's MLflow run with ``step = iteration``, so the run shows ``val_*``
curves beside its losses; a line per evaluation reaches the console. The
worker waits for its tasks only when the stage ends, before the stage's run is
marked complete.
"""
from __future__ import annotations

from pipelines.sweeps.judge import JUDGED

HEADLINE = ("swap_acc_mean", "preserve_mean", "content_consistency", "leak_excess_mean",
            "stage1_objective", "recon_psnr", "summary")
_DATA: dict = {}  # per process: (data_path, image_size) -> (train, val, test)


class _Snapshot:
    """What the judge reads of a stage: its hand-off."""

    def __init__(self, handoff: dict):
        self._handoff = handoff

    def handoff(self) -> dict:
        return self._handoff


def _data(cfg):
    from dsu_models.data.configured import load_data
    key = (cfg.data_path, cfg.image_size)
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = load_data(cfg)
    return _DATA[key]


def evaluate_snapshot(cfg_dict: dict, stage: str, iteration: int, handoff: dict, upstream: dict,
                      factors: list[dict], oracle_cache: str, run_id: str, tracking_uri: str,
                      reporter=None) -> dict[str, float]:
    """The body of the curve task: judge ``handoff`` on val, log it at ``iteration``."""
    import torch
    from mlflow.tracking import MlflowClient

    from dsu_models.config import config_from_dict
    from dsu_models.data.base import FactorInfo
    from pipelines.console import Reporter
    from pipelines.sweeps.judge import Judge
    from pipelines.tracking import runs as tracking

    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_dict)
    train, val, test = _data(cfg)
    if len(val) == 0:
        return {}
    judge = Judge({"stage": stage, "upstream": upstream, "oracle_cache": oracle_cache}, cfg, train, val, test,
                  [FactorInfo.from_dict(d) for d in factors], "cpu")
    metrics = judge(_Snapshot(handoff))
    tracking.log_metrics(MlflowClient(tracking_uri), run_id, metrics, iteration)
    shown = [f"{k} {metrics['val_' + k]:.3f}" for k in HEADLINE if "val_" + k in metrics]
    (reporter or Reporter()).line(f"[{stage}] val at {iteration}: " + ", ".join(shown))
    return metrics


class Curves:
    """Rank 0's side: ``maybe(stage)`` after each report starts a task when an
    interval was crossed (or the stage is done); ``wait()`` at the stage's end."""

    def __init__(self, cfg, stage: str, upstream: dict, factors: list[dict], oracle_cache: str, run_id: str,
                 tracking_uri: str, reporter=None):
        self.interval = cfg.evaluate.curve_interval if stage in JUDGED else 0
        self.cfg_dict, self.stage = cfg.to_dict(), stage
        self.factors, self.oracle_cache, self.run_id = factors, oracle_cache, run_id
        self.tracking_uri, self.reporter = tracking_uri, reporter
        # what the judge needs of the stages before (stage 1's hand-off, the code statistics)
        self.upstream = {k: upstream.get(k) for k in ("stage1", "code_stats")} if self.interval else {}
        self.upstream_ref = self.task = None
        self.last = 0
        self.pending: list = []

    def maybe(self, stage) -> None:
        if not self.interval:
            return
        it = stage.iteration
        if it // self.interval == self.last // self.interval and not stage.done:
            return
        self.last = it
        import ray
        if self.upstream_ref is None:  # once, not per point: stage 1's hand-off and the remote function
            self.upstream_ref = ray.put(self.upstream)
            self.task = ray.remote(num_cpus=1, max_retries=0)(evaluate_snapshot)
        self.pending.append(self.task.remote(self.cfg_dict, self.stage, it, stage.handoff(), self.upstream_ref,
                                        self.factors, self.oracle_cache, self.run_id, self.tracking_uri,
                                        self.reporter))

    def wait(self) -> None:
        """Wait for the evaluations still running (a failed one is reported, not raised)."""
        import ray
        for ref in self.pending:
            try:
                ray.get(ref)
            except Exception as exc:  # a curve point is not worth failing the stage for
                if self.reporter is not None:
                    self.reporter.line(f"[{self.stage}] a validation curve point failed: {type(exc).__name__}")
        self.pending = []
