"""The cheap paths of a cached head-only tpSGD step compute exactly what the plain ones do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from backbone_models import mobilenet_onnx

import edgelearn as el
from edgelearn.optim import tpsgd as tpsgd_mod
from edgelearn.optim.tpsgd import head_grad
from edgelearn.prefix_cache import FeatureCache

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def textbook_head_grad(out: np.ndarray, y: np.ndarray, loss: str) -> tuple[float, np.ndarray]:
    """head_grad as first written (journals of earlier runs hold its floats)."""
    if loss == "cross-entropy":
        z = out.astype(np.float64) - out.max(axis=1, keepdims=True)
        e = np.exp(z)
        p = e / e.sum(axis=1, keepdims=True)
        idx = np.arange(len(y))
        value = float(np.mean(np.log(e.sum(axis=1)) - z[idx, y]))
        p[idx, y] -= 1.0
        return value, (p / len(y)).astype(np.float32)
    d = out.astype(np.float64) - np.asarray(y, np.float64).reshape(out.shape)
    return float(np.mean(d * d)), (2.0 * d / d.size).astype(np.float32)


def same_bits(a: tuple[float, np.ndarray], b: tuple[float, np.ndarray]) -> bool:
    return (np.float64(a[0]).tobytes() == np.float64(b[0]).tobytes()
            and a[1].dtype == b[1].dtype and a[1].shape == b[1].shape
            and a[1].tobytes() == b[1].tobytes())


@pytest.mark.parametrize("loss", ["cross-entropy", "mse"])
def test_head_grad_keeps_the_textbook_bits(loss: str) -> None:
    rng = np.random.default_rng(3)
    for trial in range(300):
        n, k = int(rng.integers(1, 80)), int(rng.integers(1, 6))
        dtype = np.float64 if trial % 7 == 0 else np.float32
        out = (rng.standard_normal((n, k)) * 10.0 ** rng.uniform(-4, 4)).astype(dtype)
        if loss == "cross-entropy":
            y = rng.integers(0, k, n)
        else:
            y = [rng.standard_normal((n, k)).astype(np.float32), rng.integers(0, 2, (n, k)),
                 rng.standard_normal(n * k)][trial % 3]
        assert same_bits(head_grad(out, y, loss), textbook_head_grad(out, y, loss))
    # a hybrid probe's logits may overflow (it scores them under errstate)
    out = np.array([[0.0, -np.inf], [np.inf, 1.0], [np.nan, 0.0]], np.float32)
    with np.errstate(all="ignore"):
        y = np.array([0, 1, 1]) if loss == "cross-entropy" else np.zeros((3, 2))
        assert same_bits(head_grad(out, y, loss), textbook_head_grad(out, y, loss))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cnn")
    src = mobilenet_onnx(d / "cnn.onnx", size=32, blocks=((1, 16, 1), (6, 24, 2)),
                         features=64)
    el.tools.prepare(src, d / "bundle", new_head="features:3")
    return d / "bundle"


def cached_session(bundle: Path, out: Path) -> el.Session:
    return el.Session(bundle, out, el.TrainConfig(optimizer="tpsgd", batch_size=8),
                      el.RuntimeConfig(backend="onnxruntime", device=None, prefix_cache=True))


def test_suffix_writes_into_kept_outputs_and_sees_bound_inputs(cnn: Path,
                                                                tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    with cached_session(cnn, tmp_path / "r") as s:
        ev = s.evaluator  # Unstable internals: a CachedTapsEvaluator here
        weights = {n: s.store[n] for n in ev.split.trainable}

        def reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            got = ev.suffix.session.run(None, {**feeds, **weights})
            return dict(zip(ev.suffix.outputs, got, strict=True))

        feeds = ev.run_prefix(x)
        first = {k: v.copy() for k, v in ev.suffix.run_all(feeds).items()}
        again = ev.suffix.run_all(feeds)
        assert all(np.array_equal(again[k], first[k]) for k in first)
        kept = dict(again)
        for arr in feeds.values():
            arr *= 2  # the same bound object, changed in place: the next run reads it
        doubled = ev.suffix.run_all(feeds)
        assert all(doubled[k] is kept[k] for k in kept)  # written in place
        want = reference(feeds)
        assert all(np.array_equal(doubled[k], want[k]) for k in want)
        small = ev.run_prefix(x[:3])  # another batch size: outputs re-bound
        got, want = ev.suffix.run_all(small), reference(small)
        assert all(np.array_equal(got[k], want[k]) for k in want)
        assert ev.suffix.run(feeds).shape[0] == 8  # the loss path re-binds its own output
        got, want = ev.suffix.run_all(feeds), reference(feeds)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_feature_cache_fills_given_arrays(cnn: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((6, 3, 32, 32)).astype(np.float32)
    with cached_session(cnn, tmp_path / "r") as s:
        cut, compute = s.evaluator.split.cut, s.evaluator.run_prefix
        want = compute(x)
        cache = FeatureCache(cut, capacity=4 * cut.row_bytes)  # 2 of 6 rows recomputed
        out = {t: np.full((6, *sh), np.nan, d) for t, (sh, d) in cut.row_shapes.items()}
        for _ in range(2):  # misses, then hits and recomputes
            got = cache.features(list(range(6)), x, compute, out=out)
            assert got is out
            assert all(np.array_equal(out[t], want[t]) for t in want)
        warm = {t: np.zeros((4, *sh), d) for t, (sh, d) in cut.row_shapes.items()}
        got = cache.features([3, 1, 0, 2], x[[3, 1, 0, 2]], compute, out=warm)
        assert got is warm
        assert all(np.array_equal(warm[t], want[t][[3, 1, 0, 2]]) for t in want)


def test_update_runs_blas_on_one_thread_and_restores(cnn: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    threadpoolctl = pytest.importorskip("threadpoolctl")
    libs = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
    if not libs:
        pytest.skip("no BLAS library that threadpoolctl can see")
    seen: list[list[int]] = []
    real = tpsgd_mod.linear_grads

    def spy(x: np.ndarray, d_z: np.ndarray) -> dict[str, np.ndarray]:
        seen.append([lib.get_num_threads() for lib in libs])
        return real(x, d_z)

    monkeypatch.setattr(tpsgd_mod, "linear_grads", spy)
    data = el.Dataset(np.random.default_rng(2).standard_normal((16, 3, 32, 32))
                      .astype(np.float32), np.arange(16) % 3)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = [lib.get_num_threads() for lib in libs]
        with cached_session(cnn, tmp_path / "r") as s:
            s.run(data, 3)
        after = [lib.get_num_threads() for lib in libs]
    assert len(seen) == 3
    assert all(n == [1] * len(libs) for n in seen)
    assert after == before
