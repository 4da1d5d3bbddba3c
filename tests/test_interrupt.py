"""Ctrl-C at step boundaries (edgelearn.training.interrupt): the deferral, its handler kept
installed between `Session.step` calls (acting as Python's default one) until close."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import edgelearn as el
from edgelearn.demo import demo_data
from edgelearn.training.interrupt import TrainingInterrupted, deferred_sigint, release

DEMO = Path(el.__file__).resolve().parent / "data" / "demo"


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(autouse=True)
def _default_handler():
    """Every test starts and ends with Python's default SIGINT handler."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_first_sigint_is_deferred_second_interrupts() -> None:
    with deferred_sigint() as interrupted:
        assert not interrupted()
        _sigint()
        assert interrupted()
        with pytest.raises(KeyboardInterrupt):
            _sigint()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_kept_handler_acts_as_default_between_steps() -> None:
    for _ in range(3):
        with deferred_sigint(keep=True) as interrupted:
            assert not interrupted()  # the flag of an earlier step does not carry over
            _sigint()
            assert interrupted()
    kept = signal.getsignal(signal.SIGINT)
    assert kept is not signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):  # outside a step: at once, as the default does
        _sigint()
    with deferred_sigint() as interrupted:  # a run after live steps still defers
        _sigint()
        assert interrupted()
    assert signal.getsignal(signal.SIGINT) is kept  # not removed by the run: `step` keeps it
    release()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_program_handler_is_left_alone() -> None:
    seen: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    with deferred_sigint(keep=True) as interrupted:
        _sigint()
        assert not interrupted()
    assert seen == [signal.SIGINT]
    release()
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler


def test_session_step_interrupted_after_journaling_and_close_releases(tmp_path) -> None:
    train = demo_data(0)[0]
    cfg = el.TrainConfig(optimizer="zo-sgd", trainable="head.*", seed=3)

    class CtrlC(el.Callback):
        def on_step(self, session: el.Session, result: object) -> None:
            if session.steps_done == 3:
                _sigint()

    s = el.Session(DEMO, tmp_path / "run", cfg, el.RuntimeConfig(threads=1),
                   callbacks=[CtrlC()])
    for i in range(2):
        s.step((train.x[i], train.y[i]))
    with pytest.raises(TrainingInterrupted):
        s.step((train.x[2], train.y[2]))
    assert s.steps_done == 3  # the interrupted step was journaled
    with pytest.raises(el.InputError, match="labels go up to"):  # labels of every batch
        s.step((train.x[3], 99))
    s.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
