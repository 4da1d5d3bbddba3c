"""Ctrl-C at step boundaries: the first SIGINT only raises a flag, polled between steps.

While training, a step is never cut in half by the first Ctrl-C: the step in flight finishes
and is journaled, the weights and a checkpoint are written, and TrainingInterrupted (a
KeyboardInterrupt) is raised; running the same command again resumes. A second SIGINT
interrupts at once (like a kill: the journal stays valid, resume redoes the step).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run at a step boundary; its weights so far are written.

    Args:
        step: steps the run holds now (running the same command again resumes from here).
    """

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted at step {step}; run the same command again to resume")
        self.step = step


@contextlib.contextmanager
def deferred_sigint() -> Iterator[Callable[[], bool]]:
    """While active, the first SIGINT only raises a flag (the yielded poll returns True); a
    second one interrupts at once.

    Only in the main thread with Python's default handler in place (a program that installed
    its own keeps it); otherwise the flag never rises.
    """
    hit: list[bool] = []
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return

    def handler(signum: int, frame: Any) -> None:
        hit.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)
