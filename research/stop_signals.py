"""The command-line tools stop on SIGTERM and SIGHUP as they do on Ctrl-C.

By default those two signals end a process at once. A merge or an export
would leave its temporary output behind, and a training run would lose every
step since its last save. That is what happens on ``kill``, at a batch
system's time limit (Slurm sends SIGTERM first), when a preemptible VM is
reclaimed, or when the terminal closes. Instead:

* ``raising()``: in a block, SIGTERM and SIGHUP raise ``Stopped``, a
  ``KeyboardInterrupt``. The stack unwinds as on Ctrl-C, so temporaries are
  removed and locks released (``research-merge``, ``research.export``).
* ``Stopped(signum)`` carries the signal. ``exit_code`` is ``128 + signum``,
  the status a shell reports for a process the signal ended; ``report``
  prints a command's one line and returns it.

The training loop defers all three signals to its next step boundary and
saves there (``training.trainer``). SIGKILL cannot be caught; the merge CLI
removes a killed run's leftovers on its next start.

A signal the process was started ignoring stays ignored, as Python leaves an
ignored SIGINT: ``nohup`` ignores SIGHUP so that a run outlives its terminal,
and a shell starts background jobs ignoring SIGINT.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

CAUGHT = (signal.SIGTERM, signal.SIGHUP)  # raised as ``Stopped``; SIGINT is Python's KeyboardInterrupt already


class Stopped(KeyboardInterrupt):
    """A stop asked for by signal ``signum``: unwinds like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def signum(stop: KeyboardInterrupt) -> int:
    """The signal behind ``stop``: its own for ``Stopped``, else SIGINT (Ctrl-C)."""
    return getattr(stop, "signum", int(signal.SIGINT))


def name(stop: KeyboardInterrupt) -> str:
    return signal.Signals(signum(stop)).name


def exit_code(stop: KeyboardInterrupt) -> int:
    return 128 + signum(stop)


def report(stop: KeyboardInterrupt) -> int:
    """A command's one line for ``stop``, on stderr, once its temporary output is gone;
    returns its exit status."""
    print(f"\nerror: stopped by {name(stop)}; no partial output is left", file=sys.stderr)
    return exit_code(stop)


def _raise(sig, frame):
    raise Stopped(sig)


@contextlib.contextmanager
def handled(handler, signals=CAUGHT):
    """``handler`` installed for each of ``signals`` that is not ignored (``SIG_IGN``)
    while the block runs, the previous handlers restored after it. Off the
    main thread (where Python cannot set handlers) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def raising():
    """SIGTERM and SIGHUP raise ``Stopped`` in the main thread while the block runs."""
    return handled(_raise)
