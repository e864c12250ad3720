"""Stopping cleanly: SIGTERM (what systemd, Kubernetes and ``ray job stop``
send) stops a command as Ctrl-C does.

:func:`stop_on_sigterm` makes SIGTERM raise :class:`Terminated`, a
``KeyboardInterrupt``, in the main thread, so the code written for Ctrl-C runs
for it too: the pipeline marks its parent run and the running stage's run
KILLED (``pipelines.cli``), the model service shuts Serve and Ray down
(``pipelines/serve.py``), and the pipeline's Ray shuts down as the process
exits (Ray's exit hook, once the console no longer asks it for lines).
``ray.init`` installs a driver handler of Ray's own that calls ``sys.exit``
(none of that cleanup, and a native stack dump and abort on the way out), so
``init_ray`` installs this one again once Ray is up; entry points also install
it first thing, for the seconds before Ray. The handler also records that
SIGTERM came, since a ``ray.get`` it interrupts raises a plain
KeyboardInterrupt. A second SIGTERM while stopping ends the process at once
(the default action), as a second Ctrl-C does.

Exit status of a stopped command: 128 + the signal number, what a shell
reports for a process the signal killed: :data:`EXIT_SIGINT` (130) after
Ctrl-C, :data:`EXIT_SIGTERM` (143) after SIGTERM.
"""
from __future__ import annotations

import signal
import sys
import threading

EXIT_SIGINT = 128 + signal.SIGINT      # 130
EXIT_SIGTERM = 128 + signal.SIGTERM    # 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises KeyboardInterrupt."""


# set by the handler: the exception may reach the entry point as a plain
# KeyboardInterrupt (ray.get, waiting in Ray Train's fit, raises its own)
_TERMINATED = threading.Event()


def _raise_terminated(signum, frame):
    _TERMINATED.set()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)    # a second SIGTERM stops at once
    raise Terminated("SIGTERM")


def stop_on_sigterm() -> bool:
    """SIGTERM raises :class:`Terminated` from now on; False (nothing changed)
    off the main thread, where Python cannot install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _raise_terminated)
    return True


def by_sigterm(exc: KeyboardInterrupt) -> bool:
    """Whether SIGTERM (not Ctrl-C) caused ``exc``."""
    return isinstance(exc, Terminated) or _TERMINATED.is_set()


def interrupt_status(exc: KeyboardInterrupt) -> int:
    """The exit status of a command stopped by ``exc``: 143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_SIGTERM if by_sigterm(exc) else EXIT_SIGINT


def stop_reason(exc: KeyboardInterrupt) -> str:
    return "SIGTERM" if by_sigterm(exc) else "Ctrl-C (SIGINT)"


def shutdown_ray() -> None:
    """Shut Ray down if this process started or joined it (a driver leaving a
    cluster ends its own tasks and actors there)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
