"""Cross-entropy inside the population graph (edgelearn/backends/ort_pop_loss.py): K losses
from the same runtime call as the logits, close to numpy's loss of those logits; other losses
and labels the tail cannot take go through numpy as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgelearn as el
from edgelearn.losses import cross_entropy, mse, row_losses
from edgelearn.optim.base import Population

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edgelearn.backends.ort_pop_loss import LOSS_OUTPUT, LabelFeeds, add_ce_tail  # noqa: E402
from edgelearn.backends.ort_population import OrtPopulation  # noqa: E402

DEMO = Path(el.__file__).resolve().parent / "data" / "demo"


def scorer(max_population: int = 64) -> tuple[OrtPopulation, np.ndarray]:
    """The demo's population scorer over its head, and the head's flat weights."""
    bundle = el.load_bundle(DEMO)
    store = bundle.load_store(trainable="head.*")
    return OrtPopulation(bundle, store, max_population=max_population), \
        store.flat("float32").copy()


def population(theta: np.ndarray, k: int, seed: int = 0) -> Population:
    """k candidates theta + 0.1 * noise (row j from its own seed)."""
    rows = [theta + 0.1 * np.random.default_rng([seed, j]).standard_normal(theta.size,
                                                                           np.float32)
            for j in range(k)]

    def fill(out: dict[str, np.ndarray], lo: int, hi: int) -> None:
        out["float32"][: hi - lo, : theta.size] = rows[lo:hi]

    return Population(k, lambda j: None, fill)


def batch(n: int = 32, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 64), np.float32), rng.integers(0, 10, n)


def test_graph_losses_are_numpy_cross_entropy_of_the_same_logits() -> None:
    pe, theta = scorer()
    assert pe.loss_in_graph
    x, y = batch()
    pop = population(theta, 5)
    logits = pe.forward(pop, x)
    ref = [cross_entropy(o, y) for o in logits]
    got = pe.losses(pop, x, y, cross_entropy)
    assert isinstance(got, list)
    assert all(isinstance(v, float) for v in got)
    # float64 in both; the runtime's exp / log round differently from numpy's
    assert np.allclose(got, ref, rtol=1e-12, atol=0.0), (got, ref)
    assert len(set(got)) == 5  # every candidate scored, in order
    x2, y2 = batch(seed=2)  # another batch: the label inputs follow
    assert np.allclose(pe.losses(pop, x2, y2, cross_entropy),
                       [cross_entropy(o, y2) for o in pe.forward(pop, x2)], rtol=1e-12)


def test_chunked_population_gives_the_same_losses() -> None:
    x, y = batch()
    one, theta = scorer()
    split, _ = scorer(max_population=2)
    pop = population(theta, 5)
    assert split.losses(pop, x, y, cross_entropy) == one.losses(pop, x, y, cross_entropy)


def test_other_losses_and_labels_the_tail_cannot_take_go_through_numpy() -> None:
    pe, theta = scorer()
    x, y = batch()
    pop = population(theta, 3)
    logits = pe.forward(pop, x)
    target = np.zeros_like(logits[0])
    assert pe.losses(pop, x, target, mse) == row_losses(mse, logits, target)
    bad = y.copy()
    bad[0] = 10  # no such class: numpy's loss reports it, as before
    with pytest.raises(IndexError):
        pe.losses(pop, x, bad, cross_entropy)
    with pytest.raises(IndexError):  # not integer labels: numpy's error, as before
        pe.losses(pop, x, y.astype(np.float32), cross_entropy)


def test_label_feeds_are_kept_while_the_labels_stay_the_same() -> None:
    lf = LabelFeeds(4)
    a = lf.feeds(np.array([0, 3, 1]), 3)
    assert a is not None
    w = -1 / 3
    assert a["edgelearn.ce_weights"].tolist() == [[w, 0, 0, 0], [0, 0, 0, w], [0, w, 0, 0]]
    assert lf.feeds(np.array([0, 3, 1]), 3) is a  # equal labels in a new array
    assert lf.feeds(np.array([0, 3, 2]), 3) is not a
    with pytest.raises(IndexError):  # no class 4: numpy's loss raises the same
        lf.feeds(np.array([0, 4, 1]), 3)
    assert lf.feeds(np.array([0.0, 1.0, 1.0]), 3) is None  # not integer labels
    assert lf.feeds(np.array([0, 1]), 3) is None  # not one label per row
    assert lf.feeds(np.array([[0], [1], [2]]), 3) is None


def _graph(out_shape: list[int | str], out_name: str = "y", opset: int = 17) -> object:
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], [out_name])
    g = helper.make_graph([node], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, out_shape)],
                          [helper.make_tensor_value_info(out_name, TensorProto.FLOAT,
                                                         out_shape)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_the_tail_is_added_only_to_rank3_logits_with_a_class_count() -> None:
    import onnxruntime as ort

    assert add_ce_tail(_graph(["K", "B"])) is None
    assert add_ce_tail(_graph(["K", "B", "C"])) is None  # class count unknown
    assert add_ce_tail(_graph(["K", "B", 3], out_name="edgelearn.ce_z")) is None  # name taken
    assert add_ce_tail(_graph(["K", "B", 10**12])) is None  # not trusted with the memory
    assert add_ce_tail(_graph(["K", "B", 3], opset=12)) is None  # ReduceSum's axes attribute
    m = _graph(["K", "B", 3])
    assert add_ce_tail(m) == 3
    onnx.checker.check_model(m)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    z = np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]]], np.float32)
    feeds = LabelFeeds(3).feeds(np.array([2, 0]), 2)
    assert feeds is not None
    got = s.run([LOSS_OUTPUT], {"x": z, **feeds})[0]
    assert got.shape == (1,)
    assert got[0] == pytest.approx(cross_entropy(z[0], np.array([2, 0])), rel=1e-12)
    assert np.array_equal(s.run(["y"], {"x": z})[0], z)  # logits alone: nothing new fed


def test_label_feeds_of_a_vocabulary_sized_output_stay_batch_sized() -> None:
    lf = LabelFeeds(200_000)  # a [classes, classes] table would take 320 GB
    w = lf.feeds(np.array([5, 199_999]), 2)
    assert w is not None
    weights = w["edgelearn.ce_weights"]
    assert weights.shape == (2, 200_000)
    assert np.flatnonzero(weights).tolist() == [5, 200_000 + 199_999]


def test_the_scorer_keeps_no_batch_alive() -> None:
    import gc
    import weakref

    pe, theta = scorer()
    x, y = batch()
    ref = weakref.ref(x)
    pe.losses(population(theta, 2), x, y, cross_entropy)
    del x
    gc.collect()
    assert ref() is None
