"""onnxruntime sessions do not busy-wait between runs unless asked (`spinning=True`): the
workers would otherwise hold the cores a ZO step's numpy passes need after each forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import edgelearn as el
from edgelearn.model import Model

DEMO = Path(el.__file__).resolve().parent / "data" / "demo"


def allow_spinning(model: Model) -> str | None:
    """The session's intra-op spinning entry (None: not set, onnxruntime's default: spin)."""
    so = model.backend.session.get_session_options()
    try:
        return so.get_session_config_entry("session.intra_op.allow_spinning")
    except Exception:  # onnxruntime raises for a key that was never set
        return None


def test_sessions_do_not_spin_unless_asked() -> None:
    bundle = el.load_bundle(DEMO)
    quiet, spinning = Model(bundle), Model(bundle, backend_options={"spinning": True})
    assert allow_spinning(quiet) == "0"
    assert allow_spinning(spinning) is None
    x = np.random.default_rng(0).standard_normal((4, 64), dtype=np.float32)
    np.testing.assert_array_equal(quiet.predict(x), spinning.predict(x))
