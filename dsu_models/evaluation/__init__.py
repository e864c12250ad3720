"""Evaluation of a finished model (docs/method.md section 11): oracles trained on real
images read generated swaps, a probe measures label leakage into the unknown
code, plus reconstruction, labeled-encoder accuracy and a Frechet distance.

- :mod:`.oracles` — the oracle network, training, content-hash cache;
- :mod:`.metrics` — metric arithmetic, the summary score and stage-1 objective;
- :mod:`.consistency` — content preservation without labels of the hidden factors;
- :mod:`.evaluate` — runs a model (duck-typed ``DisUnknownModel``) through them.
"""
from .evaluate import Evaluation, evaluate, evaluate_in_full, evaluate_stage1, model_columns
from .metrics import frechet_distance, probe_leakage, stage1_objective, summary_score
from .oracles import (OracleNet, OracleSet, OracleWarning, load_or_train_oracles, oracle_key,
                      train_oracles)

__all__ = ["Evaluation", "evaluate", "evaluate_in_full", "evaluate_stage1", "model_columns",
           "frechet_distance", "probe_leakage", "stage1_objective", "summary_score", "OracleNet", "OracleSet", "OracleWarning",
           "load_or_train_oracles", "oracle_key", "train_oracles"]
