"""Cross-entropy inside the population graph: K candidates' losses from one runtime call.

On a small head the numpy loss after a population call cost more than the call itself: the
demo's 2 x 32 x 10 logits took ~25 us of numpy calls, and ~20 us more because they ran on
caches the runtime had just filled with its own code and data (`benchmarks/bench_zo_cost.py`,
section overhead). So the population graph gets a float64 tail that computes
`edgelearn.losses.cross_entropy` of every candidate in the same call:

    loss_k = sum_{b, c} w[b, c] * LogSoftmax(float64(logits[k, b, :]))[c],
    w[b, c] = -1 / B at the label of example b, 0 elsewhere

the batch mean of log-sum-exp minus the label's logit, in float64 like the numpy loss (four
nodes: each node is a kernel call, and on the demo head they run on cold caches too). The
runtime's float64 kernels round differently from numpy's (about 1e-15 relative on the demo),
so a run scored this way is close to, not bit-equal with, one scored by single forwards; each
run journals the losses it used, and replay reads them from the journal.

The weights input carries a default (an initializer of the same name, ONNX's optional
inputs), so a call that asks only for the logits feeds nothing new.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: names the tail adds to the graph (a graph already using one gets no tail)
LOSS_OUTPUT = "edgelearn.ce_loss"
WEIGHTS_INPUT = "edgelearn.ce_weights"
_PREFIX = "edgelearn.ce_"
#: class counts above this get no tail (the label weights are [batch, classes] float64; a
#: graph declaring more is refused the shortcut, not trusted with the memory)
MAX_TAIL_CLASSES = 1 << 20


def add_ce_tail(model: Any) -> int | None:
    """Append the cross-entropy tail to a population ModelProto (in place).

    Args:
        model: onnx ModelProto whose first output is float32 logits [K, batch, classes].
    Returns: the number of classes when the tail was added; None when the first output is
        not rank-3 float32 with a fixed class count of at most MAX_TAIL_CLASSES, the graph's
        opset is below 13, or the graph already uses the names.
    """
    from onnx import TensorProto, helper, numpy_helper

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                default=0)
    if opset < 13:  # ReduceSum takes its axes as an input from opset 13 on
        return None
    g = model.graph
    out = g.output[0]
    dims = out.type.tensor_type.shape.dim
    if out.type.tensor_type.elem_type != TensorProto.FLOAT or len(dims) != 3 \
            or not dims[2].HasField("dim_value") \
            or not 1 <= dims[2].dim_value <= MAX_TAIL_CLASSES:
        return None
    names = {*(v.name for v in (*g.input, *g.output, *g.initializer)),
             *(o for n in g.node for o in n.output)}
    if any(n.startswith(_PREFIX) for n in names):
        return None
    classes = int(dims[2].dim_value)
    t = _PREFIX
    g.node.extend([
        helper.make_node("Cast", [out.name], [t + "z"], to=TensorProto.DOUBLE),
        helper.make_node("LogSoftmax", [t + "z"], [t + "logp"], axis=-1),
        helper.make_node("Mul", [t + "logp", WEIGHTS_INPUT], [t + "picked"]),
        helper.make_node("ReduceSum", [t + "picked", t + "axes"], [LOSS_OUTPUT], keepdims=0),
    ])
    g.initializer.extend([
        numpy_helper.from_array(np.array([1, 2], np.int64), t + "axes"),
        numpy_helper.from_array(np.zeros((1, classes)), WEIGHTS_INPUT),  # default: unused
    ])
    g.input.append(
        helper.make_tensor_value_info(WEIGHTS_INPUT, TensorProto.DOUBLE, ["batch", classes]))
    g.output.append(helper.make_tensor_value_info(LOSS_OUTPUT, TensorProto.DOUBLE, ["K"]))
    return classes


class LabelFeeds:
    """The tail's weights input for a batch's labels, kept while the labels stay the same.

    Args:
        classes: the logits' class count.
    """

    def __init__(self, classes: int) -> None:
        self.classes = classes
        self._key: tuple[str, bytes] | None = None
        self._feeds: dict[str, np.ndarray] | None = None

    def feeds(self, y: Any, batch: int) -> dict[str, np.ndarray] | None:
        """{weights: one-hot of y times -1/batch} for labels y, or None when y is not
        `batch` integer labels.

        The one-hot rows are indexed by y as numpy's loss indexes the logits (a label of
        `classes` or more raises IndexError there and here). No [classes, classes] table: a
        vocabulary-sized output would make one of gigabytes.

        Args:
            y: the batch's targets (int [batch] for cross-entropy).
            batch: rows of the data batch.
        """
        y = np.asarray(y)
        if y.shape != (batch,) or y.dtype.kind not in "iu" or batch == 0:
            return None
        key = (y.dtype.str, y.tobytes())
        if key != self._key:
            self._key, self._feeds = None, None
            w = np.zeros((batch, self.classes))  # [batch, classes], as the logits are
            w[np.arange(batch), y] = -1.0 / batch  # numpy's indexing: as the numpy loss
            self._feeds, self._key = {WEIGHTS_INPUT: w}, key
        return self._feeds
