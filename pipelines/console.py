"""What a person at the terminal reads while the pipeline runs.

The project's own lines, with progress and ETAs; Ray's and MLflow's messages
go to a log file, named once at the start (``--verbose`` gives them back):

- **Driver**: :class:`Console` sends the loggers of Ray, Ray Data, Ray Train,
  MLflow and Python's warnings to ``$DSU_HOME/logs/<command>-<time>.log``
  (errors still reach the console), and, when this process's stderr is the
  terminal's, the native (C++) messages written to file descriptor 2 as well.
  Ray starts with ``log_to_driver=False``: what Ray's workers print stays in
  Ray's session logs (their folder is named at start too).
- **Workers**: the Train workers, the evaluation task and the distill job
  send their lines to a small actor (:class:`Board`) through a
  :class:`Reporter`; the driver takes them every half second and prints them.
  A progress report becomes ``[stage2] 400/2000 | losses | 512 img/s | eta 3.1
  min | pipeline ~12 min``: the stage's ETA from its rate, the pipeline's from
  that rate, the stages still to come (their images times each stage class's
  ``relative_cost``) and the other steps' time so far. Bars (evaluation, data
  preparation) are drawn with tqdm on a terminal and written as plain lines
  otherwise.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# loggers whose messages go to the log file instead of the console
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow", "alembic",
                 "py.warnings", "urllib3", "filelock", "asyncio")
QUIET_ENV = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # MLflow's "View run ..." pairs
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}     # and its download bars
POLL_S = 0.5
DEFAULT_STEP_S = 30.0  # a step other than training, before one has been timed in this run


def progress_line(stage: str, iteration: int, total: int, losses: dict, images_per_s: float,
                  stage_eta_s: float, pipeline_eta_s: float | None) -> str:
    """``[stage] it/total | losses | img/s | eta | pipeline``: one report on the console."""
    line = (f"[{stage}] {iteration}/{total} | " + " ".join(f"{k} {v:.4g}" for k, v in losses.items())
            + f" | {images_per_s:.1f} img/s | eta {stage_eta_s / 60:.1f} min")
    if pipeline_eta_s is not None:
        line += f" | pipeline ~{pipeline_eta_s / 60:.0f} min"
    return line


class _LogFile(logging.FileHandler):
    """A log file whose folder is made when the first message comes."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


class Board:
    """Actor: the workers' messages, in the order each sender posted them, until taken."""

    def __init__(self):
        self.messages: list[dict] = []

    def post(self, message: dict):
        self.messages.append(message)

    def take(self) -> list[dict]:
        out, self.messages = self.messages, []
        return out


class Reporter:
    """A worker's side of the console: posts to the driver's :class:`Board`
    (without waiting), or prints to this process's stdout when there is none
    (a Tune trial, a test calling a job directly, ``--verbose``)."""

    def __init__(self, board=None):
        self.board = board

    def _post(self, message: dict, fallback: str):
        if self.board is not None:
            try:
                self.board.post.remote(message)
                return
            except Exception:  # the driver went away: the line still goes somewhere
                self.board = None
        # not print: Ray Train patches print in its workers to log *and* echo
        sys.stdout.write(fallback + "\n")
        sys.stdout.flush()

    def line(self, text: str):
        self._post({"kind": "line", "text": text}, text)

    def progress(self, stage: str, iteration: int, total: int, batch: int, losses: dict,
                 images_per_s: float):
        eta = (total - iteration) * batch / max(images_per_s, 1e-9)
        self._post({"kind": "progress", "stage": stage, "iteration": iteration, "total": total,
                    "batch": batch, "losses": losses, "images_per_s": images_per_s},
                   progress_line(stage, iteration, total, losses, images_per_s, eta, None))

    def bar(self, name: str, done: int, total: int):
        self._post({"kind": "bar", "name": name, "done": done, "total": total},
                   f"[{name}] {done}/{total}")


@dataclass
class PipelineClock:
    """The pipeline's ETA: the work left in each planned step (training stages:
    images times the stage's relative cost per image) and the time the other
    steps took so far."""
    costs: dict[str, float] = field(default_factory=dict)   # train step -> cost units
    others: list[str] = field(default_factory=list)         # the other planned steps, in order
    done: set = field(default_factory=set)
    other_seconds: list[float] = field(default_factory=list)

    def plan(self, cfg, steps: list[str]):
        from dsu_models.stages import stage_class
        from dsu_models.steps import step
        for name in steps:
            if step(name).kind == "train":
                cls = stage_class(name)
                scfg = getattr(cfg, name)
                self.costs[name] = scfg.iterations * scfg.batch_size * cls.relative_cost
            else:
                self.others.append(name)

    def finished(self, name: str, seconds: float):
        self.done.add(name)
        if name in self.others:
            self.other_seconds.append(seconds)

    def eta(self, stage: str, left_images: float, images_per_s: float) -> float | None:
        from dsu_models.stages import stage_class
        if stage not in self.costs:
            return None
        unit_s = 1.0 / (max(images_per_s, 1e-9) * stage_class(stage).relative_cost)
        later = sum(c for s, c in self.costs.items() if s != stage and s not in self.done)
        per_other = (sum(self.other_seconds) / len(self.other_seconds) if self.other_seconds
                     else DEFAULT_STEP_S)
        others = sum(1 for s in self.others if s not in self.done)
        return left_images / max(images_per_s, 1e-9) + later * unit_s + others * per_other


_current: "Console | None" = None


def reporter() -> Reporter:
    """What a job hands its remote workers: the running console's, or one that prints."""
    return _current.reporter() if _current is not None else Reporter(None)


def say(line: str):
    """A line from driver-side code: through the running console, or printed."""
    if _current is not None:
        _current.say(line)
    else:
        print(line, flush=True)


def bar(name: str, done: int, total: int):
    """A progress bar from driver-side code (plain lines outside a console)."""
    if _current is not None:
        _current.bar(name, done, total)
    else:
        print(f"[{name}] {done}/{total}", flush=True)


def connect():
    """After Ray starts: the running console takes the workers' messages (:meth:`Console.connect`)."""
    if _current is not None:
        _current.connect()


def plan(cfg, steps: list[str]):
    """The steps the pipeline ETA counts (``PipelineClock.plan``)."""
    if _current is not None:
        _current.clock.plan(cfg, steps)


def step_finished(name: str, seconds: float):
    if _current is not None:
        _current.clock.finished(name, seconds)


def flush():
    """Print what the workers have posted so far (before a step's closing line)."""
    if _current is not None:
        _current.flush()


class Console:
    """The driver's console for one command (``with Console(...) as console``)."""

    def __init__(self, command: str, verbose: bool = False, home: Path | None = None):
        self.command, self.verbose = command, verbose
        self.home = home
        self.clock = PipelineClock()
        self.log_path: Path | None = None
        self.board = None
        self._saved: list = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._bars: dict = {}
        self._lock = threading.Lock()
        self._taking = threading.Lock()
        self._outer = None

    # ------------------------------------------------------------ set-up

    def __enter__(self) -> "Console":
        global _current
        self._outer, _current = _current, self
        if self.verbose:
            return self
        from pipelines.tracking.runs import dsu_home
        folder = (self.home or dsu_home()) / "logs"  # made on the first message: a refusal writes nothing
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_path = folder / f"{self.command}-{stamp}-{os.getpid()}.log"
        for key, value in QUIET_ENV.items():
            self._saved.append(("env", key, os.environ.get(key)))
            os.environ[key] = value
        self._file_handler = _LogFile(self.log_path, delay=True)
        self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        importlib.import_module("ray")  # it sets up its loggers on import: quiet them after that
        self._quiet_loggers()
        self._saved.append(("warnings", None, None))
        logging.captureWarnings(True)
        return self

    def _quiet_loggers(self):
        """Ray's and MLflow's loggers: everything to the file, errors to the console too.
        Called again after Ray starts (it sets up its loggers on import and start)."""
        errors = logging.StreamHandler(sys.stderr)
        errors.setLevel(logging.ERROR)
        for name in QUIET_LOGGERS:
            logger = logging.getLogger(name)
            if not any(s[0] == "logger" and s[1] == name for s in self._saved):
                self._saved.append(("logger", name, (list(logger.handlers), logger.propagate)))
            logger.handlers = [self._file_handler, errors]
            logger.propagate = False

    def _redirect_native_stderr(self):
        """Native messages (Ray's C++ core worker) written to fd 2 go to the log file;
        Python's sys.stderr keeps the terminal. Only when sys.stderr is fd 2 itself
        (not a test's capture)."""
        try:
            if sys.stderr.fileno() != 2:
                return
        except (AttributeError, OSError, ValueError):
            return
        sys.stderr.flush()
        terminal = os.dup(2)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        old = sys.stderr
        sys.stderr = os.fdopen(terminal, "w", buffering=1)
        self._saved.append(("stderr", old, terminal))

    def ray_init_kwargs(self) -> dict:
        """What ``ray.init`` needs: workers' output stays in Ray's logs unless verbose."""
        return {} if self.verbose else {"log_to_driver": False}

    def connect(self):
        """After Ray is up: Ray's loggers again, Ray Data without its own progress bars
        and plan printing, the board the workers post to, the thread that prints it."""
        import ray
        if not ray.is_initialized():  # a test standing in for Ray: workers print
            return
        if not self.verbose:
            import ray.data
            self._redirect_native_stderr()
            self._quiet_loggers()  # again: Ray sets its loggers up as it starts; errors to the new stderr
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            logs = ray._private.worker._global_node.get_logs_dir_path() if ray._private.worker._global_node else None
            where = f"; Ray's workers: {logs}" if logs else ""
            self.say(f"[console] Ray's and MLflow's messages: {self.log_path}{where} (--verbose shows them here)")
        # on the driver's node: a node that dies (and takes its actors along) must not
        # take the console's messages with it
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.board = ray.remote(num_cpus=0)(Board).options(scheduling_strategy=here).remote()
        self._thread = threading.Thread(target=self._drain, name="dsu-console", daemon=True)
        self._thread.start()

    def reporter(self) -> Reporter:
        """What a job hands its workers (picklable: the board's actor handle)."""
        return Reporter(self.board)

    def __exit__(self, *exc):
        global _current
        _current = self._outer
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self.flush()
        for bar in self._bars.values():
            if bar is not None:
                bar.close()
        for kind, a, b in reversed(self._saved):
            if kind == "env":
                if b is None:
                    os.environ.pop(a, None)
                else:
                    os.environ[a] = b
            elif kind == "logger":
                logger = logging.getLogger(a)
                logger.handlers, logger.propagate = b
            elif kind == "warnings":
                logging.captureWarnings(False)
            elif kind == "stderr":
                sys.stderr.flush()
                os.dup2(b, 2)
                sys.stderr = a
        self._saved = []
        if getattr(self, "_file_handler", None) is not None:
            self._file_handler.close()
        return False

    # ------------------------------------------------------------ output

    def say(self, line: str):
        with self._lock:
            print(line, flush=True)

    def _drain(self):
        while not self._stop.wait(POLL_S):
            self.flush()

    def flush(self):
        """Print every message the workers have posted so far, in order."""
        import ray
        if self.board is None or not ray.is_initialized():  # never start a Ray to ask a gone one
            return
        with self._taking:  # one taker at a time, so the lines keep their order
            try:
                messages = ray.get(self.board.take.remote(), timeout=10)
            except Exception:  # Ray is going down: nothing more will come
                return
            for m in messages:
                self.show(m)

    def show(self, m: dict):
        """Print one message from a worker."""
        if m["kind"] == "line":
            self.say(m["text"])
        elif m["kind"] == "progress":
            left = (m["total"] - m["iteration"]) * m["batch"]
            stage_eta = left / max(m["images_per_s"], 1e-9)
            self.say(progress_line(m["stage"], m["iteration"], m["total"], m["losses"], m["images_per_s"],
                                   stage_eta, self.clock.eta(m["stage"], left, m["images_per_s"])))
        elif m["kind"] == "bar":
            self.bar(m["name"], m["done"], m["total"])

    def bar(self, name: str, done: int, total: int):
        """A progress bar: tqdm on a terminal, else a plain line per update."""
        if not sys.stdout.isatty():
            self.say(f"[{name}] {done}/{total}")
            return
        from tqdm import tqdm
        bar = self._bars.get(name)
        if bar is None:
            bar = self._bars[name] = tqdm(total=total, desc=name, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            self._bars.pop(name, None)
