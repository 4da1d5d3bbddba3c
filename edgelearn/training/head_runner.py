"""tpSGD's head update graph (form 2, `edgelearn.graph_update`) run with every array bound once.

A head-only tpSGD step on cached frozen-prefix features (`edgelearn.training.cached_taps`,
`head_update="graph"`) is one onnxruntime call: the suffix with the head's exact update
appended. Its cost is then mostly what surrounds the call, so everything the call reads or
writes lives in arrays made once per batch size and bound to the IOBinding once: the cut
tensors (the feature cache's lookup writes the batch's rows into the same arrays every step),
the trainable weights (zero-copy views of the arena), the one-hot rows (gathered in place
from the batch's labels), the scale, a row of ones, and the outputs (logits, loss and the
updated weights, written by the runtime straight into kept arrays that tpSGD copies into the
arena). A step binds nothing unless the batch size or a fed array changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgelearn import graph_update
from edgelearn.backends.ort_graph import run_errors

#: batch sizes whose bound arrays are kept (run batches, a short last batch, live samples)
KEEP_SIZES = 4


class _Bound:
    """The arrays one batch size `n` binds: fed constants, targets and outputs."""

    def __init__(self, n: int, loss: str, lr: float, classes: int,
                 shapes: dict[str, tuple[tuple[int, ...], bool]]) -> None:
        self.n = n
        self.inputs = {graph_update.S: graph_update.scale(loss, lr, n, classes),
                       graph_update.ONES: np.ones((1, n), np.float32)}
        #: targets: one-hot rows and -onehot/N (cross-entropy, gathered from `tables` by
        #: label), or the targets shaped like the logits (mse)
        self.targets: list[np.ndarray] = []
        self.tables: list[np.ndarray] = []
        if loss == "cross-entropy":
            eye = np.eye(classes, dtype=np.float32)
            self.tables = [eye, eye * graph_update.neg_mean(n)]
            self.targets = [np.zeros((n, classes), np.float32) for _ in self.tables]
            self.inputs[graph_update.T], self.inputs[graph_update.TN] = self.targets
        else:
            self.targets = [np.zeros((n, classes), np.float32)]
            self.inputs[graph_update.Y] = self.targets[0]
            self.inputs[graph_update.SIZE] = np.asarray(n * classes, np.float32)
        #: name -> (the array returned, the shape the graph writes into its memory: a bias
        #: [1, out] lands in an array shaped like the parameter [out])
        self.bind = {name: (np.zeros(shape[1:] if bias else shape, np.float32), shape)
                     for name, (shape, bias) in shapes.items()}
        self.outputs = {name: arr for name, (arr, _) in self.bind.items()}


class HeadRunner:
    """Runs a form-2 head update graph (see the module docstring).

    Args:
        suffix: a `SuffixRunner` of the graph (`graph_update.build(..., version=2)`): its
            session and IOBinding, the arena's trainable views already bound.
        head_logits: the logits' output name. loss: "cross-entropy" or "mse".
        lr: the head's learning rate. classes: the logits' width.
        params: output name -> shape of each updated parameter (`graph_update.output_name`).
    """

    def __init__(self, suffix: Any, *, head_logits: str, loss: str, lr: float, classes: int,
                 params: dict[str, tuple[int, ...]]) -> None:
        self.session, self.io = suffix.session, suffix.io
        self.keep = suffix  # owns the arena views the binding reads
        self.logits, self.loss, self.lr, self.classes = head_logits, loss, lr, classes
        self.params = params
        self._sizes: dict[int, _Bound] = {}
        self._current: _Bound | None = None
        self._fed: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (given, bound)

    def _bound(self, n: int) -> _Bound:
        """The arrays of batch size `n`, bound to the IOBinding (inputs and outputs)."""
        b = self._sizes.get(n)
        if b is None:
            if len(self._sizes) >= KEEP_SIZES:
                self._sizes.clear()
            bias = graph_update.output_name("bias")
            shapes = {self.logits: ((n, self.classes), False), graph_update.LOSS: ((), False),
                      **{k: (v, k == bias) for k, v in self.params.items()}}
            b = self._sizes[n] = _Bound(n, self.loss, self.lr, self.classes, shapes)
        io = self.io
        for name, arr in b.inputs.items():
            io.bind_cpu_input(name, arr)
        io.clear_binding_outputs()
        for name, (arr, shape) in b.bind.items():
            io.bind_output(name, "cpu", 0, arr.dtype.type, list(shape), arr.ctypes.data)
        self._current = b
        return b

    def _targets(self, b: _Bound, y: np.ndarray) -> None:
        """Fill batch `b`'s targets from `y` in place."""
        if not b.tables:  # mse: targets shaped like the logits
            np.copyto(b.targets[0], np.reshape(y, b.targets[0].shape), casting="unsafe")
            return
        # "clip": labels are in range (`Model.check_data`, for every Session run and step);
        # the method with positional arguments (np.take's keyword dispatch costs more)
        for table, out in zip(b.tables, b.targets, strict=True):
            table.take(y, 0, out, "clip")

    def run(self, feeds: dict[str, np.ndarray], y: np.ndarray) -> dict[str, np.ndarray]:
        """The logits, loss and updated parameters of one step on cut tensors `feeds` (and
        passthrough inputs) with targets `y` [N] (labels) or [N, classes] (mse).

        Returns arrays kept per batch size (each updated parameter shaped like it),
        overwritten by the next run of that size.
        """
        n = len(y)
        b = self._current
        if b is None or b.n != n:
            b = self._bound(n)
        fed, io = self._fed, self.io
        for name, arr in feeds.items():  # the cache's row arrays: the same objects each step
            held = fed.get(name)
            if held is None or held[0] is not arr:
                bound = np.ascontiguousarray(arr)
                io.bind_cpu_input(name, bound)
                fed[name] = (arr, bound)  # keeps the bound memory alive
        self._targets(b, y)
        try:
            self.session.run_with_iobinding(io)
        except Exception:
            with run_errors("the head update graph"):
                raise
        return b.outputs


def head_runner(suffix: Any, head: Any, trainable: Sequence[str], store: Any, *, loss: str,
                lr: float) -> HeadRunner:
    """A HeadRunner over `suffix` (a `SuffixRunner` of a form-2 graph) for linear layer
    `head` with trainable parameters `trainable` of `store`.

    Raises: ValueError when the logits are not float32 [N, classes] with a known width.
    """
    outs = {o.name: o for o in suffix.session.get_outputs()}
    logits = outs.get(head.preact)
    w = store[head.params["weight"]] if "weight" in head.params else None
    classes = (w.shape[0] if head.weight_layout == "out_in" else w.shape[1]) if w is not None \
        else store[head.params["bias"]].shape[-1]
    if logits is None or logits.type != "tensor(float)" or len(logits.shape) != 2:
        raise ValueError(f"the head's logits {head.preact!r} are not a float32 [N, classes] "
                         "output of the graph")
    params: dict[str, tuple[int, ...]] = {}
    for role, name in head.params.items():
        if name in trainable:
            params[graph_update.output_name(role)] = (
                tuple(store[name].shape) if role == "weight" else (1, classes))
    return HeadRunner(suffix, head_logits=head.preact, loss=loss, lr=lr, classes=int(classes),
                      params=params)
