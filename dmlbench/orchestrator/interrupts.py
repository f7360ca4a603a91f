"""Ctrl-C for a whole sweep (DESIGN §5): the first one stops the sweep, a second one exits at once.

On its own, Ray Tune handles SIGINT per experiment: the experiment running in the main thread stops
gracefully (a final save of the experiment state, in which the running trials stay unfinished, so a
rerun continues them from their last checkpoint) and ``Tuner.fit`` returns, after which a driver
would go on to whatever comes next. This module turns the first Ctrl-C into a stop of the *sweep*:

* :func:`handling` (entered by the sweep driver, main thread) installs the sweep's SIGINT handler.
  Outside a Tune experiment (joining the cluster, writing the leaderboard) the first
  Ctrl-C records the stop request (:func:`requested`) and raises ``KeyboardInterrupt`` where the
  driver is; any later one ends the process at once with exit status 130 (what was saved stays).
* :class:`StopCallback` (the sweep's experiment gets one) chains onto Tune's own SIGINT
  handler when the experiment runs in the main thread: the first Ctrl-C records the request and lets
  Tune stop gracefully, and Tune then puts the sweep's handler back, so the second Ctrl-C exits at
  once. An experiment running in another thread (Tune installs no handler there), or whose sweep's
  stop event is set (:func:`stop_on`), is ended by the callback with ``SweepInterrupted`` at a
  step. Raised there, Tune skips its final save, so a rerun restores the last periodic save
  (``TUNE_GLOBAL_CHECKPOINT_S``): the callback therefore raises only once that saved state has
  every trial that ended as ended (or after :data:`STATE_WAIT_S`), else a trial that ended just
  before the stop would run again.

Callers check :func:`raise_if_requested` before starting new work (the experiment), so nothing new
starts after the first Ctrl-C, whatever the scheduler.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from ray import tune

from dmlbench.errors import SweepInterrupted

#: exit status of a process ended by the second Ctrl-C (the shell's code for SIGINT)
EXIT_INTERRUPTED = 130
#: longest wait (s) of a stopping experiment for Tune's saved state to show its ended trials
STATE_WAIT_S = 30.0
#: Tune's statuses of a trial that has ended (a restored experiment runs it no more)
ENDED_STATUSES = ("TERMINATED", "ERROR")

_stop = threading.Event()
_active = threading.Event()  # set while :func:`handling` is in effect

FIRST = (
    "\nCtrl-C: stopping the sweep: no new trials or cells start, running trials keep their last checkpoint "
    "(rerun the same command to continue); press Ctrl-C again to quit at once.\n"
)
SECOND = "\nCtrl-C again: quitting now; rerun the same command to continue from the last saved state.\n"


def requested() -> bool:
    """Whether a stop of the sweep was requested (first Ctrl-C) since :func:`handling` was entered."""
    return _stop.is_set()


def request() -> None:
    """Ask the sweep to stop, as the first Ctrl-C does (for a scheduler or a test; prints nothing)."""
    _stop.set()


#: sweep id → the event that stops its experiments (:func:`stop_on`). Process-local on purpose:
#: Tune restores a callback from its own pickle, so a restored :class:`StopCallback` can reach a live
#: event only through the sweep id it holds.
_STOPS: dict[str, threading.Event] = {}


@contextmanager
def stop_on(sweep_id: str, event: threading.Event) -> Iterator[None]:
    """While inside, setting ``event`` stops the sweep's experiment (run in a driver thread: its
    :class:`StopCallback` ends it, its state saved)."""
    _STOPS[sweep_id] = event
    try:
        yield
    finally:
        _STOPS.pop(sweep_id, None)


def stop_requested(sweep_id: str | None) -> bool:
    """Whether the stop event of ``sweep_id`` (:func:`stop_on`) is set."""
    ev = _STOPS.get(sweep_id) if sweep_id is not None else None
    return ev is not None and ev.is_set()


def raise_if_requested(what: str) -> None:
    """Raise :class:`SweepInterrupted` when a stop was requested, instead of starting ``what``."""
    if _stop.is_set():
        raise SweepInterrupted(f"sweep stopped by Ctrl-C before {what}; rerun the same command to continue.")


def _say(text: str) -> None:
    # os.write, not print: a signal handler may run in the middle of a print to the same stream
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def _first() -> None:
    _stop.set()
    _say(FIRST)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    """The sweep's SIGINT handler: first → stop request + KeyboardInterrupt; again → exit 130 now."""
    if _stop.is_set():
        _say(SECOND)
        os._exit(EXIT_INTERRUPTED)
    _first()
    raise KeyboardInterrupt


@contextmanager
def handling() -> Iterator[None]:
    """Install the sweep's SIGINT handler for the ``with`` block (main thread only; a no-op elsewhere,
    where Python cannot install handlers). The previous handler is restored on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    _stop.clear()
    signal.signal(signal.SIGINT, _on_sigint)
    _active.set()
    try:
        yield
    finally:
        _active.clear()
        signal.signal(signal.SIGINT, previous)


def _chained(tune_handler: Any) -> Any:
    def handler(signum: int, frame: FrameType | None) -> None:
        if _stop.is_set():  # a stop is already under way: this is the second Ctrl-C
            _on_sigint(signum, frame)
        _first()
        tune_handler(signum, frame)  # Tune stops gracefully and puts the previous handler back

    handler.dmlbench_chained = True  # type: ignore[attr-defined]
    return handler


class StopCallback(tune.Callback):  # type: ignore[misc]
    """Makes a Tune experiment part of the sweep's stop handling (see the module docstring).

    Args:
        sweep_id: the sweep whose stop event (:func:`stop_on`) ends this experiment too.
        experiment_path: where Tune saves this experiment's state (the storage URI of the
            experiment); without it a stop raises at once, whatever that state holds.

    Only plain data survives Tune's pickle of the experiment; the signal handlers live in this module.
    """

    def __init__(self, sweep_id: str | None = None, experiment_path: str | None = None):
        self.sweep_id = sweep_id
        self.experiment_path = experiment_path
        self._reset()

    def _reset(self) -> None:
        self._ended: set[str] = set()  # trials that ended in this run of the experiment
        self._stop_seen: float | None = None
        self._probed = float("-inf")

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.sweep_id = state.get("sweep_id")
        self.experiment_path = state.get("experiment_path")
        self._reset()

    def setup(self, **info: Any) -> None:
        if not _active.is_set() or threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGINT)
        # Tune installs its handler when the experiment starts, before callbacks are set up; with
        # TUNE_DISABLE_SIGINT_HANDLER=1 the sweep's own handler is still there and stays
        if callable(current) and current is not _on_sigint and not getattr(current, "dmlbench_chained", False):
            signal.signal(signal.SIGINT, _chained(current))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended.add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended.add(trial.trial_id)

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        by_event = stop_requested(self.sweep_id)
        if not by_event and not (_stop.is_set() and threading.current_thread() is not threading.main_thread()):
            return
        now = time.monotonic()
        if self._stop_seen is None:
            self._stop_seen = now
        if now - self._stop_seen < STATE_WAIT_S and not self._state_saved(now):
            return  # Tune saves its state at its next steps; raising now would lose the trials that just ended
        name = (self.experiment_path or "").rstrip("/").rsplit("/", 1)[-1] or "the experiment"
        if by_event:
            raise SweepInterrupted(f"{name} stopped on request")
        raise SweepInterrupted("sweep stopped by Ctrl-C; rerun the same command to continue.")

    def _state_saved(self, now: float) -> bool:
        """Whether the experiment state Tune saved has every trial that ended here as ended (read
        at most twice a second)."""
        if not self._ended or self.experiment_path is None:
            return True
        if now - self._probed < 0.5:
            return False
        self._probed = now
        try:
            saved = tune.ExperimentAnalysis(self.experiment_path).trials
        except Exception:  # not written yet, or caught mid-write: read again at a later step
            return False
        return self._ended <= {t.trial_id for t in saved if t.status in ENDED_STATUSES}

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Tune leaves its handler installed after an experiment that ended normally; put the
        # sweep's back, so a Ctrl-C between experiments stops the sweep where it is
        if threading.current_thread() is threading.main_thread() and getattr(
            signal.getsignal(signal.SIGINT), "dmlbench_chained", False
        ):
            signal.signal(signal.SIGINT, _on_sigint)
