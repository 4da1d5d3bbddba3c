"""Ctrl-C at step boundaries: the first SIGINT only raises a flag, polled between steps.

While training, a step is never cut in half by the first Ctrl-C: the step in flight finishes
and is journaled, the weights and a checkpoint are written, and TrainingInterrupted (a
KeyboardInterrupt) is raised; running the same command again resumes. A second SIGINT
interrupts at once (like a kill: the journal stays valid, resume redoes the step).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run at a step boundary; its weights so far are written.

    Args:
        step: steps the run holds now (running the same command again resumes from here).
    """

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted at step {step}; run the same command again to resume")
        self.step = step


class _State:
    """The deferral state of the process (one SIGINT handler serves every run)."""

    active = False  # a step (or a run) is in flight under `deferred_sigint`
    hit = False  # a SIGINT arrived while active


def _handler(signum: int, frame: Any) -> None:
    """edgelearn's SIGINT handler: the first SIGINT while a step is in flight raises the flag;
    any other one acts as Python's default handler (KeyboardInterrupt at once)."""
    if _State.active and not _State.hit:
        _State.hit = True
        return
    signal.default_int_handler(signum, frame)


def _poll() -> bool:
    return _State.hit


def _never() -> bool:
    return False


class deferred_sigint:  # lower case: used as the function it was (`with deferred_sigint()`)
    """While active, the first SIGINT only raises a flag (the yielded poll returns True); a
    second one interrupts at once.

    Only in the main thread with Python's default handler (or edgelearn's) in place (a program
    that installed its own keeps it); otherwise the flag never rises. The handler is installed
    on entry and put back on exit, unless `keep`: then it stays installed (it acts as the
    default handler between steps) until `release()`, so a stream of `Session.step` calls
    does not swap handlers twice a step.

    Args:
        keep: leave the handler installed on exit.
    """

    def __init__(self, *, keep: bool = False) -> None:
        self.keep = keep
        self._installed = False
        self._on = False

    def __enter__(self) -> Callable[[], bool]:
        if threading.current_thread() is not threading.main_thread():
            return _never
        current = signal.getsignal(signal.SIGINT)
        if current is not _handler:
            if current is not signal.default_int_handler:
                return _never
            signal.signal(signal.SIGINT, _handler)
            self._installed = True
        _State.active, _State.hit, self._on = True, False, True
        return _poll

    def __exit__(self, *exc: object) -> None:
        if self._on:
            _State.active = self._on = False
        if self._installed and not self.keep:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def release() -> None:
    """Put Python's default SIGINT handler back if edgelearn's is installed (`keep`)."""
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is _handler and not _State.active:
        signal.signal(signal.SIGINT, signal.default_int_handler)
