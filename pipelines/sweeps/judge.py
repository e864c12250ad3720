"""A Tune trial's judge: the stage so far evaluated as a model on the validation split
(docs/method.md section 11). Used in-process by ``pipelines.sweeps.trial`` and on rank 0
of a trainer-backed trial by ``pipelines.jobs.worker``; it imports neither, so the two
runners and the judge form no import circle.
"""
from __future__ import annotations

import warnings

from dsu_models.config import Config
from dsu_models.evaluation.metrics import on_split


JUDGED = ("stage1", "stage2")  # the stages a judge evaluates as a model (stage 1 alone, or the whole)


class Judge:
    """``judge(stage) -> metrics``: the finished-model metrics of the stage so far on the
    validation split ``val``, named ``val_<metric>`` (``test`` only keys the oracle cache)."""

    def __init__(self, ctx: dict, cfg: Config, train, val, test, factors, device):
        self.stage_name, self.cfg, self.train, self.val = ctx["stage"], cfg, train, val
        self.factors, self.device, self.upstream = factors, device, ctx.get("upstream") or {}
        self.oracles = None
        if self.stage_name == "stage2":
            from dsu_models.evaluation import OracleWarning, load_or_train_oracles
            # The driver trained them before the trials started (and warned if they are
            # weak): this is a cache hit.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OracleWarning)
                self.oracles = load_or_train_oracles(train, test, cfg.evaluate, ctx["oracle_cache"],
                                                     device=device, log=_quiet)

    def __call__(self, stage) -> dict[str, float]:
        from dsu_models import evaluation
        from dsu_models.inference import DisUnknownModel
        common = {"factors": self.factors, "all_factors": list(self.train.factors), "device": self.device}
        if self.stage_name == "stage1":
            model = DisUnknownModel.from_handoffs(stage1=stage.handoff(), **common)
            metrics = evaluation.evaluate_stage1(model, self.train, self.val, self.cfg.evaluate, log=_quiet)
        else:
            model = DisUnknownModel.from_handoffs(stage1=self.upstream["stage1"], stage2=stage.handoff(),
                                                  code_stats=self.upstream["code_stats"], **common)
            metrics = evaluation.evaluate(model, self.train, self.val, self.cfg.evaluate, self.oracles,
                                          log=_quiet)
        return on_split("val", {k: float(v) for k, v in metrics.items()})


def _quiet(*_args, **_kwargs):
    """Evaluation chatter stays out of the sweep's one-line-per-report output."""
