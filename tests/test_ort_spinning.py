"""onnxruntime worker spinning: off where zo-sgd's threaded passes over a large arena need the
cores between forwards, onnxruntime's default (spin) for small trainable sets, whose forwards
would pay a sleeping worker's wake-up; `spinning=` overrides either way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgelearn as el
from edgelearn.backends import ort
from edgelearn.model import Model

DEMO = Path(el.__file__).resolve().parent / "data" / "demo"


def allow_spinning(model: Model) -> str | None:
    """The session's intra-op spinning entry (None: not set, onnxruntime's default: spin)."""
    so = model.backend.session.get_session_options()
    try:
        return so.get_session_config_entry("session.intra_op.allow_spinning")
    except Exception:  # onnxruntime raises for a key that was never set
        return None


def test_spinning_follows_the_trainable_size_unless_asked(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    bundle = el.load_bundle(DEMO)
    small = Model(bundle, trainable="head.*")  # 650 weights: spin (onnxruntime's default)
    quiet = Model(bundle, trainable="head.*", backend_options={"spinning": False})
    assert allow_spinning(small) is None
    assert allow_spinning(quiet) == "0"
    # the threshold is the kernels' threading threshold; a lower one makes this set "large"
    monkeypatch.setattr(ort, "SPIN_OFF_MIN_TRAINABLE", 600)
    large = Model(bundle, trainable="head.*")
    forced = Model(bundle, trainable="head.*", backend_options={"spinning": True})
    assert allow_spinning(large) == "0"
    assert allow_spinning(forced) is None
    x = np.random.default_rng(0).standard_normal((4, 64), dtype=np.float32)
    for m in (quiet, large, forced):
        np.testing.assert_array_equal(small.predict(x), m.predict(x))


def test_threshold_is_where_the_passes_thread() -> None:
    from edgelearn.optim.kernels import PARALLEL_MIN

    assert ort.SPIN_OFF_MIN_TRAINABLE == PARALLEL_MIN
