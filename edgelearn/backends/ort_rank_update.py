"""W += C V^T in place with onnxruntime's Gemm: lozo's update pass at memory speed.

A rank-r update of a large weight in numpy costs 2r elementwise operations per element (row
blocks of outer products, edgelearn/optim/lozo.py `rank_update`: ~6 ms CPU for a 2048 x 2048
weight at r = 2 on the project's 2-core box); onnxruntime's Gemm(C, V^T, W, beta = 1) reads
and writes W once (~2 ms). Its output is bound to W's own memory: the CPU Gemm first copies
its C operand into the output (here onto itself) and then accumulates the product in place,
so no second weight-sized buffer is needed; tests/test_lozo.py checks the result against
numpy on every run of the suite. The float results may differ from numpy's by rounding (FMA
kernels), so the engine is an option a run records (`LOZOOptions.update`) and replay uses the
same one. onnx and onnxruntime are imported lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgelearn.backends.ort_graph import configure, import_ort
from edgelearn.errors import EdgelearnError

_C, _VT, _W, _OUT = "c", "vt", "w", "w_new"


def _gemm_model(a: int, b: int, r: int) -> bytes:
    """ONNX bytes of w_new = c @ vt + w (c [a, r], vt [r, b], w [a, b], float32)."""
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    g = helper.make_graph(
        [helper.make_node("Gemm", [_C, _VT, _W], [_OUT], alpha=1.0, beta=1.0)], "rank_update",
        [helper.make_tensor_value_info(_C, f, [a, r]),
         helper.make_tensor_value_info(_VT, f, [r, b]),
         helper.make_tensor_value_info(_W, f, [a, b])],
        [helper.make_tensor_value_info(_OUT, f, [a, b])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def check_in_place(w: np.ndarray, before: np.ndarray, c: np.ndarray, vt: np.ndarray) -> None:
    """Raise when the in-place Gemm did not give before + c @ vt (an onnxruntime release that
    stops copying C into the output first would read half-written weights).

    Args:
        w: float32 [a, b] after the run; before: its copy from before the run; c [a, r];
            vt [r, b]. Tolerance: float32 rounding of the sum, scaled by its magnitude.
    """
    want = before.astype(np.float64) + c.astype(np.float64) @ vt.astype(np.float64)
    err = float(np.max(np.abs(w - want), initial=0.0))
    bound = 1e-5 * (1.0 + float(np.max(np.abs(want), initial=0.0)))
    if not err <= bound:
        np.copyto(w, before)
        raise EdgelearnError(
            f"onnxruntime's in-place Gemm update is off by {err:.3g} (> {bound:.3g}) on a "
            f"{w.shape[0]}x{w.shape[1]} weight in this onnxruntime release: use the lozo "
            "option update=numpy")


class OrtRankUpdate:
    """In-place w += c @ vt for float32 weights, one onnxruntime session per shape.

    Args:
        threads: intra-op threads (None: onnxruntime's default, one per core).
    """

    def __init__(self, threads: int | None = None,
                 same_as: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None
                 ) -> None:
        self.threads = threads
        #: an in-place w += c @ vt whose bits the engine must give (checked with == on the
        #: first run per weight; None: within rounding, `check_in_place`)
        self.same_as = same_as
        #: why the engine's bits differed from `same_as` (None: they did not)
        self.unequal: str | None = None
        self._sessions: dict[tuple[int, int, int], Any] = {}
        self._bound: dict[tuple[int, tuple[int, ...], int], tuple[Any, ...]] = {}

    def _session(self, a: int, b: int, r: int) -> Any:
        key = (a, b, r)
        if key not in self._sessions:
            ort = import_ort()
            so = ort.SessionOptions()
            if self.threads:
                so.intra_op_num_threads = int(self.threads)
            so.inter_op_num_threads = 1
            so.log_severity_level = 4
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._sessions[key] = ort.InferenceSession(
                _gemm_model(a, b, r), sess_options=configure(so),
                providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def __call__(self, w: np.ndarray, c: np.ndarray, vt: np.ndarray) -> None:
        """w += c @ vt in place. w: float32 [a, b] C-contiguous; c [a, r]; vt [r, b]."""
        a, b = w.shape
        r = c.shape[1]
        key = (w.ctypes.data, w.shape, r)
        bound = self._bound.get(key)
        if bound is None:
            ort = import_ort()
            session = self._session(a, b, r)
            io = session.io_binding()
            ov = ort.OrtValue.ortvalue_from_numpy(w)
            io.bind_ortvalue_input(_W, ov)
            io.bind_output(_OUT, "cpu", 0, np.float32, [a, b], w.ctypes.data)
            bound = self._bound[key] = (session, io, ov, w)
            before = w.copy()  # the first run on this array checks the in-place result
        else:
            before = None
        session, io = bound[0], bound[1]
        io.bind_cpu_input(_C, np.ascontiguousarray(c, np.float32))
        io.bind_cpu_input(_VT, np.ascontiguousarray(vt, np.float32))
        session.run_with_iobinding(io)
        if before is None:
            return
        if self.same_as is None:
            check_in_place(w, before, c, vt)
            return
        self.same_as(before, c, vt)  # the reference bits, computed on the copy
        if not np.array_equal(w, before):
            self.unequal = (f"onnxruntime's Gemm update differs from numpy's bits on a "
                            f"{w.shape[0]}x{w.shape[1]} weight")
            np.copyto(w, before)
