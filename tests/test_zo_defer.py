"""zo-sgd's deferred update (drift): the same bits as undeferred steps, clean weights whenever
anything reads them between steps, replay sha256 == trained.

Torch-free: numpy problems and the shipped demo bundle.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edgelearn as el
from edgelearn.optim import make_optimizer
from edgelearn.optim.kernels import PARALLEL_MIN, SignPass, draw_signs
from edgelearn.optim.zo_sgd import ZOSGD
from edgelearn.params import ParamSpec, ParamStore

DEMO = Path(el.__file__).resolve().parent / "data" / "demo"


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, np.float32).view(np.uint32).tobytes()


@pytest.mark.parametrize("n", [13, 650, PARALLEL_MIN + 13])
def test_run_stages_equal_passes_one_after_the_other(n: int) -> None:
    rng = np.random.default_rng(n)
    src = rng.standard_normal(n, dtype=np.float32)
    stages = [([np.float32(1e-3), np.float32(-3e-4)], [draw_signs(1, 0, k, n) for k in (0, 1)]),
              ([np.float32(-2e-3)], [draw_signs(1, 1, 0, n)]),
              ([np.float32(7e-4)], [draw_signs(1, 2, 0, n)])]
    ref = src.copy()
    for coefs, signs in stages:
        SignPass(threads=1).run(ref, ref, coefs, signs)
    assert bits(ref) != bits(src)
    for threads in (1, 3):
        for chunk in (8 if n < PARALLEL_MIN else 1 << 12, 1 << 16):
            out = np.empty_like(src)
            SignPass(chunk, threads).run_stages(out, src, stages)
            assert bits(out) == bits(ref), (threads, chunk)
    inplace = src.copy()
    SignPass(threads=2).run_stages(inplace, inplace, stages)
    assert bits(inplace) == bits(ref)


def problem(seed: int = 0) -> tuple[ParamStore, Any]:
    """A two-tensor least-squares problem and its loss (nan on the calls listed in `nan_at`)."""
    rng = np.random.default_rng(seed)
    store = ParamStore([ParamSpec("w", (90, 7)), ParamSpec("b", (7,))],
                       values={"w": 0.1 * rng.standard_normal((90, 7)).astype(np.float32),
                               "b": np.zeros(7, np.float32)})
    x, y = rng.standard_normal((16, 90)).astype(np.float32), rng.standard_normal((16, 7))

    def loss(nan: bool = False) -> float:
        d = x.astype(np.float64) @ store["w"].astype(np.float64) + store["b"] - y
        return math.nan if nan else float(np.mean(d * d))

    return store, loss


@pytest.mark.parametrize("extra", [{"probes": 1}, {"probes": 3, "clip": 5.0},
                                   {"schedule": "cosine", "total_steps": 6, "sign": True}])
def test_deferred_steps_equal_undeferred(extra: dict[str, Any]) -> None:
    """Step by step the records (so the probed weights' losses) are equal; flushed at any
    step the weights are bit-identical; a rejected step (nan loss) in the middle too."""
    (a, loss_a), (b, loss_b) = problem(), problem()
    kw = {"lr": 0.05, "eps": 1e-3, "seed": 4, "restore": "drift", **extra}
    oa, ob = make_optimizer("zo-sgd", **kw), make_optimizer("zo-sgd", **kw)
    for t in range(6):
        nan = t == 3
        ra = oa.step(a, lambda nan=nan: loss_a(nan)).record
        rb = ob.step(b, lambda nan=nan: loss_b(nan), defer=True).record
        assert ra == rb
        assert ob.pending == (not nan)  # a rejected step leaves nothing pending
        if t in (1, 4):
            assert a.digest() != b.digest()  # pending: the flush below is not vacuous
            ob.flush()
            assert not ob.pending
        assert bits(a.flat()) == bits(b.flat()) or ob.pending
    ob.flush()
    assert a.digest() == b.digest()


class Wrapped(ZOSGD):
    """A subclass that overrides the step (as zo-scale does): never deferred."""

    def _step(self, store: ParamStore, **extra: Any):  # type: ignore[override]
        return (yield from super()._step(store, **extra))


@pytest.mark.parametrize("kw", [{"restore": "copy"}, {"weight_decay": 0.1},
                                {"conservative": True}, {"noise": "gaussian"},
                                {"groups": "w:lr=2"}, {"subclass": True}])
def test_not_deferred_where_something_sits_between_update_and_probe(kw: dict[str, Any]
                                                                    ) -> None:
    (a, loss_a), (b, loss_b) = problem(1), problem(1)
    kw = {"lr": 0.05, "eps": 1e-3, "seed": 2, "restore": "drift", **kw}
    cls = Wrapped if kw.pop("subclass", False) else ZOSGD
    oa, ob = cls(**kw), cls(**kw)
    for _ in range(3):
        oa.step(a, loss_a)
        ob.step(b, loss_b, defer=True)
        assert not ob.pending
        assert a.digest() == b.digest()


class Watch(el.Callback):
    """Reads the weights (digest) at the steps in `reads`, notes `pending` at every step;
    presses Ctrl-C after step `stop_at`."""

    def __init__(self, reads: set[int], stop_at: int | None = None) -> None:
        self.reads, self.stop_at, self.digests, self.pending = reads, stop_at, {}, []

    def reads_weights(self, step: int) -> bool:
        return step in self.reads

    def on_step(self, session: Any, result: Any) -> None:
        self.pending.append(session.optimizer.pending)
        if result.step in self.reads:
            self.digests[result.step] = session.digest()
        if result.step == self.stop_at:
            signal.raise_signal(signal.SIGINT)  # the run stops before the next step


def test_session_run_defers_and_weights_read_between_steps_are_clean(tmp_path: Path) -> None:
    """Session.run on the demo bundle (every weight, drift): steps whose weights nobody reads
    leave their update pending; a callback reading them, a checkpoint, Ctrl-C's weights and
    checkpoint, the run's end see the weights of an undeferred run (a callback reading every
    step forbids deferral); the resumed run ends on them too; replay sha256 == trained."""
    from edgelearn.demo import demo_data

    train = demo_data()[0]
    cfg = el.TrainConfig(optimizer="zo-sgd", trainable="*", checkpoint_every=5,
                         options={"lr": 0.01, "eps": 1e-3, "restore": "drift", "seed": 1})
    steps = 14
    ref = Watch(set(range(steps)))
    with el.Session(DEMO, tmp_path / "ref", cfg) as s:
        s.run(train, steps, callbacks=[ref])
        final = s.digest()
    assert not any(ref.pending)
    lazy = Watch({2, 7}, stop_at=10)
    with el.Session(DEMO, tmp_path / "lazy", cfg) as s:
        with pytest.raises(el.TrainingInterrupted):
            s.run(train, steps, callbacks=[lazy])
        assert not s.optimizer.pending
        written = el.load_bundle(DEMO).load_store(weights=s.weights_path).digest()
    assert written == ref.digests[10]
    # pending after the steps nobody reads; not before a checkpoint (4, 9)
    assert lazy.pending == [t not in {2, 4, 7, 9} for t in range(11)]
    assert lazy.digests == {t: ref.digests[t] for t in (2, 7)}
    with el.Session.resume(tmp_path / "lazy") as s:  # from Ctrl-C's checkpoint
        s.run(train, steps, callbacks=[lazy])
        assert lazy.pending[11:] == [True, True, False]  # the last step of a run: flushed
        assert s.digest() == final
    replayed = el.replay(el.load_bundle(DEMO), tmp_path / "lazy" / "journal.bin")
    assert replayed.sha256 == final
