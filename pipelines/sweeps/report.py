"""Progress and results of a Tune sweep: console lines, the final table, the best config.

- :class:`SweepProgress` (a Tune callback in the driver): one line per trial
  report (trial id, iteration, objective); on completion it closes the trial's
  MLflow run and tags whether ASHA stopped it early.
- :func:`summarise`: the final table, and the best trial -- the best final
  objective among trials that ran every iteration (any reporting trial when
  none did) -- written as ``best_config.yaml`` (user-level: the sweep's base
  config with the best values layered on, loadable by ``load_config`` and
  ``pipelines/full.py --config``) and recorded on the sweep's MLflow run.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import yaml
from ray import tune

from dsu_models.config import layered_dict, read_yaml
from dsu_models.config import load_config
from dsu_models.files import write_text
from pipelines.cluster import storage
from pipelines.sweeps.space import Space
from pipelines.sweeps.trial import BASE_FILE, BEST_FILE, TRIAL_TAG, trial_config

STOPPED_TAG = "dsu.tune.stopped_early"


def _trial_run_id(client, sweep: dict, trial_id: str) -> str | None:
    exp = client.get_run(sweep["sweep_run_id"]).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{sweep['sweep_run_id']}' "
                                                   f"and tags.`{TRIAL_TAG}` = '{trial_id}'")
    return runs[0].info.run_id if runs else None


class SweepProgress(tune.Callback):
    """Driver-side progress lines and MLflow run status of each trial."""

    def __init__(self, sweep: dict):
        self.objective, self.total = sweep["objective"], sweep["iterations"]
        self.sweep = {k: sweep[k] for k in ("sweep_run_id", "tracking_uri")}

    def _client(self):
        from mlflow.tracking import MlflowClient
        return MlflowClient(self.sweep["tracking_uri"])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(f"[tune] trial {trial.trial_id} iteration {result.get('iteration')}/{self.total} "
              f"{self.objective} {result.get(self.objective, math.nan):.4f}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = (trial.last_result or {}).get("iteration", 0)
        early = done < self.total
        print(f"[tune] trial {trial.trial_id} {'stopped early by ASHA' if early else 'finished'} "
              f"at iteration {done}", flush=True)
        client = self._client()
        run_id = _trial_run_id(client, self.sweep, trial.trial_id)
        if run_id:
            client.set_tag(run_id, STOPPED_TAG, str(early).lower())
            client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[tune] trial {trial.trial_id} failed (resume the sweep to continue it)", flush=True)
        client = self._client()
        run_id = _trial_run_id(client, self.sweep, trial.trial_id)
        if run_id:
            client.set_terminated(run_id, "FAILED")


# ----------------------------------------------------------------- results


def trial_runs(client, sweep: dict) -> dict:
    """The sweep's trial runs in MLflow by Tune trial id."""
    exp = client.get_run(sweep["sweep_run_id"]).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{sweep['sweep_run_id']}'")
    return {r.data.tags[TRIAL_TAG]: r for r in runs if TRIAL_TAG in r.data.tags}


def trial_rows(sweep: dict, results, runs: dict) -> list[dict]:
    """One row per trial, best first: id, status, iteration, objective, sampled values.
    Status: ``finished``, ``stopped`` (by ASHA), ``error``, or ``unfinished``
    (the sweep was interrupted); the last two are what ``--resume`` continues."""
    rows = []
    for r in results:
        metrics = r.metrics or {}  # empty (and config None) for a trial that never started
        trial = Path(r.path).name if r.path else "?"
        it = metrics.get("iteration", 0)
        stopped = trial in runs and runs[trial].data.tags.get(STOPPED_TAG) == "true"
        if r.error is not None:
            status = "error"
        elif stopped:
            status = "stopped"
        else:
            status = "finished" if it >= sweep["iterations"] else "unfinished"
        rows.append({"trial": trial, "status": status, "iteration": it,
                     "objective": metrics.get(sweep["objective"], math.nan),
                     "run_id": runs[trial].info.run_id if trial in runs else None,
                     "config": Space.plain(r.config or {})})
    rows.sort(key=lambda row: -row["objective"] if math.isfinite(row["objective"]) else math.inf)
    return rows


def format_table(sweep: dict, rows: list[dict]) -> str:
    keys = sorted({k for row in rows for k in row["config"]})
    head = ["trial", "status", "iteration", sweep["objective"]] + keys
    body = [[row["trial"], row["status"], str(row["iteration"]), f"{row['objective']:.4f}"]
            + [_short(row["config"].get(k)) for k in keys] for row in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_row(rows: list[dict]) -> dict | None:
    """The best final objective among trials that ran every iteration; among
    all that reported when none did."""
    scored = [r for r in rows if r["status"] != "error" and math.isfinite(r["objective"])]
    finished = [r for r in scored if r["status"] == "finished"]
    pool = finished or scored
    return max(pool, key=lambda r: r["objective"]) if pool else None


def without_defaults(raw: dict, defaults: dict) -> dict:
    """``raw`` less every entry equal to the dataset defaults' (they come back
    when the file is layered again), so the file shows what the user chose."""
    out = {}
    for key, value in raw.items():
        if (key in defaults and value == defaults[key]) or value == {}:
            continue
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            value = without_defaults(value, defaults[key])
            if not value:
                continue
        out[key] = value
    return out


def write_best_config(sweep: dict, sampled: dict) -> Path:
    """``best_config.yaml``: the base config with the best values layered on
    (user-level keys, dataset defaults left out), checked to resolve to the best
    trial's config."""
    folder = Path(sweep["folder"])
    base = folder / BASE_FILE
    best = layered_dict(read_yaml(base, "sweep base config"), Space.overrides(sampled))
    best = {"dataset": best["dataset"],
            **without_defaults(best, layered_dict({"dataset": best["dataset"]}))}
    path = folder / BEST_FILE
    write_text(path, f"# Best trial of sweep {sweep['name']} ({sweep['objective']}); "
                     f"python pipelines/full.py --config {path}\n" + yaml.safe_dump(best, sort_keys=False))
    if load_config(str(path), []) != trial_config(str(base), sampled):
        raise RuntimeError(f"{path}: does not reproduce the best trial's config")
    storage.mirror(folder, sweep.get("mirror"))
    return path


def record_best(client, sweep: dict, row: dict, complete: bool, rows: list[dict], path: Path):
    """Best trial on the sweep run: tags and metric always; params (which cannot
    change once logged) only when no trial is left to resume."""
    from mlflow.entities import Metric, Param, RunTag
    now = int(time.time() * 1000)
    tags = [RunTag("dsu.tune.best_trial", row["trial"]), RunTag("dsu.tune.best_run", str(row["run_id"]))]
    tags += [RunTag(f"best.{k}", str(v)) for k, v in row["config"].items()]
    done = sum(r["status"] in ("finished", "stopped") for r in rows)
    metrics = [Metric(f"best_{sweep['objective']}", float(row["objective"]), now, done)]
    params = [Param(f"best.{k}", str(v)) for k, v in row["config"].items()] if complete else []
    client.log_batch(sweep["sweep_run_id"], metrics=metrics, params=params, tags=tags)
    client.log_artifact(sweep["sweep_run_id"], str(path))
    with tempfile.TemporaryDirectory() as tmp:
        trials = Path(tmp) / "trials.json"
        trials.write_text(json.dumps(rows, indent=1, default=str))
        client.log_artifact(sweep["sweep_run_id"], str(trials))


def summarise(sweep: dict, results, client) -> int:
    """Print the table, record the best trial; 0 when every trial is done, else 1."""
    rows = trial_rows(sweep, results, trial_runs(client, sweep))
    print(f"\n[tune] sweep {sweep['name']}: {len(rows)} trials\n{format_table(sweep, rows)}", flush=True)
    left = [r["trial"] for r in rows if r["status"] in ("error", "unfinished")]
    best = best_row(rows)
    if best is not None:
        path = write_best_config(sweep, best["config"])
        record_best(client, sweep, best, not left, rows, path)
        print(f"[tune] best trial {best['trial']}: {sweep['objective']} {best['objective']:.4f} "
              f"{best['config']}\n[tune] best config: {path}\n"
              f"       python pipelines/full.py --config {path}", flush=True)
    if left:
        client.set_terminated(sweep["sweep_run_id"], "FAILED")
        print(f"[tune] {len(left)} trial(s) failed or unfinished: {', '.join(left)}; continue with "
              f"python pipelines/tune.py --resume {sweep['sweep_run_id']}", flush=True)
        return 1
    client.set_terminated(sweep["sweep_run_id"], "FINISHED")
    return 0
