"""Fast ZO kernels and batched probes: same bits as the reference paths, for any thread count.

Torch-free: numpy problems, and the shipped demo bundle (it carries a population graph).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgelearn as el
from edgelearn.losses import cross_entropy, mse, row_losses
from edgelearn.model import Model
from edgelearn.optim import Population, kernels, make_optimizer
from edgelearn.optim.kernels import PARALLEL_MIN, SignPass, draw_signs, signed_rows
from edgelearn.params import ParamSpec, ParamStore
from edgelearn.rng import Noise, rademacher_bytes

DEMO = Path(el.__file__).resolve().parent / "data" / "demo"


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, np.float32).view(np.uint32).tobytes()


def reference_pass(src: np.ndarray, coefs: list[np.float32],
                   keys: list[tuple[int, int, int]]) -> np.ndarray:
    """src + sum_k c_k z_k with z from `Noise.fill` (acc = c_0 z_0, acc += c_k z_k, src + acc)."""
    noise, acc = Noise("rademacher"), None
    for c, (seed, step, probe) in zip(coefs, keys, strict=True):
        z = noise.fill(np.empty(src.size, np.float32), run_seed=seed, step=step, probe=probe,
                       start=0)
        term = (z * c).astype(np.float32)
        acc = term if acc is None else (acc + term).astype(np.float32)
    return (src + acc).astype(np.float32)


@pytest.mark.parametrize("n", [1, 13, 650, PARALLEL_MIN + 13])
def test_sign_pass_matches_noise_for_any_threads_and_chunk(n: int) -> None:
    rng = np.random.default_rng(n)
    src = rng.standard_normal(n, dtype=np.float32)
    keys = [(3, 5, 0), (3, 5, 1), (3, 5, 2)]
    coefs = [np.float32(1e-3), np.float32(-2.7e-4), np.float32(5e-5)]
    ref = reference_pass(src, coefs, keys)
    for threads in (1, 2, 3):
        signs = [draw_signs(*k, n, threads=threads) for k in keys]
        for sig, k in zip(signs, keys, strict=True):
            assert sig.tobytes() == rademacher_bytes(*k, n).tobytes()
        for chunk in (8, 1 << 16):
            out = np.empty_like(src)
            SignPass(chunk, threads).run(out, src, coefs, signs)
            assert bits(out) == bits(ref), (threads, chunk)
    inplace = src.copy()  # dst is src: the pass runs in place
    SignPass(threads=2).run(inplace, inplace, coefs, [draw_signs(*k, n) for k in keys])
    assert bits(inplace) == bits(ref)


def test_signed_rows_equal_single_passes() -> None:
    rng = np.random.default_rng(1)
    src = rng.standard_normal(650, dtype=np.float32)
    coefs = [np.float32(1e-3), np.float32(-1e-3), np.float32(0.25)]
    signs = [draw_signs(0, 9, k, src.size) for k in range(3)]
    rows = np.empty((4, src.size), np.float32)
    signed_rows(rows, src, coefs, signs)
    for j in range(3):
        one = np.empty_like(src)
        SignPass().run(one, src, [coefs[j]], [signs[j]])
        assert bits(rows[j]) == bits(one)


@pytest.mark.parametrize("block_bytes", [1 << 12, 4 << 20])
def test_signed_rows_of_a_large_slice_equal_single_passes(
        monkeypatch: pytest.MonkeyPatch, block_bytes: int) -> None:
    """Above SMALL_MAX the rows are gathered a block of columns at a time (many blocks, a
    slice that is not a multiple of 8): the same bits as one pass per row."""
    monkeypatch.setattr(kernels, "ROWS_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(3)
    src = rng.standard_normal(kernels.SMALL_MAX + 1003, dtype=np.float32)
    coefs = [np.float32(1e-3), np.float32(-1e-3), np.float32(0.25), np.float32(1e-3)]
    signs = [draw_signs(0, 11, k, src.size) for k in range(4)]
    rows = np.full((5, src.size), np.nan, np.float32)
    signed_rows(rows, src, coefs, signs)
    for j in range(4):
        one = np.empty_like(src)
        SignPass().run(one, src, [coefs[j]], [signs[j]])
        assert bits(rows[j]) == bits(one)
    assert np.isnan(rows[4]).all()  # rows past K untouched


def test_row_losses_equal_per_row_losses() -> None:
    rng = np.random.default_rng(2)
    out = (5 * rng.standard_normal((8, 33, 10))).astype(np.float32)
    y = rng.integers(0, 10, 33)
    assert row_losses(cross_entropy, out, y) == [cross_entropy(o, y) for o in out]
    t = rng.standard_normal((33, 10)).astype(np.float32)
    assert row_losses(mse, out, t) == [mse(o, t) for o in out]


def lsq(n: int = 40, seed: int = 0, rows: int = 16) -> tuple[ParamStore, np.ndarray, np.ndarray]:
    """A least-squares problem over one trainable vector of n elements."""
    rng = np.random.default_rng(seed)
    store = ParamStore([ParamSpec("w", (n,), "float32", True)],
                       values={"w": 0.1 * rng.standard_normal(n).astype(np.float32)})
    return store, rng.standard_normal((rows, n)).astype(np.float32), rng.standard_normal(rows)


def lsq_loss(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    d = x.astype(np.float64) @ w.astype(np.float64) - y
    return float(np.mean(d * d))


def lsq_scale(n: int = 40) -> tuple[ParamStore, np.ndarray, np.ndarray]:
    """`lsq` whose vector is a quantization scale (zo-scale's relative steps apply to it)."""
    plain, x, y = lsq(n)
    spec = ParamSpec("w", (n,), "float32", True, quant={"role": "scale"})
    return ParamStore([spec], values={"w": np.abs(plain["w"]) + 0.05}), x, y


# zo-sgd with and without parameter groups (per-tensor multipliers between the noise and the
# weights), and zo-scale's relative steps (each probe scaled by |scale|): the rows written
# from `fill` must carry the same multipliers as the probes placed one by one
BATCHED = [("zo-sgd", {}, lsq), ("zo-sgd", {"groups": "w:lr=2,eps=rms*0.01"}, lsq),
           ("zo-scale", {"relative": True}, lsq_scale)]


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
@pytest.mark.parametrize(("name", "extra", "problem"), BATCHED)
def test_batched_probes_equal_one_call_per_probe(noise: str, name: str, extra: dict,
                                                 problem) -> None:
    """zo-sgd (copy policy) asks its 2q probes as one Population: scored in one go from
    `fill` rows, the records and weights are bit-identical to the probes placed one by one."""
    a, x, y = problem()
    b = a.copy()
    kw = {"lr": 0.05, "eps": 1e-3, "probes": 3, "noise": noise, "seed": 5, "restore": "copy",
          **extra}
    opt_a, opt_b = make_optimizer(name, **kw), make_optimizer(name, **kw)
    sizes = []

    def batched(pop: Population) -> list[float]:
        sizes.append(pop.size)
        rows = {"float32": np.empty((pop.size, b.n_trainable()), np.float32)}
        assert pop.fill is not None
        pop.fill(rows, 0, pop.size)
        return [lsq_loss(r, x, y) for r in rows["float32"]]

    for _ in range(5):
        opt_a.step(a, lambda: lsq_loss(a["w"], x, y))
        opt_b.step(b, None, batched)
        assert opt_a.last_info.record == opt_b.last_info.record
        assert a.digest() == b.digest()
    assert sizes == [6] * 5


def test_full_step_independent_of_threads() -> None:
    """A drift-policy step over > PARALLEL_MIN elements: same bits on 1 and 3 threads."""
    digests = []
    for threads in (1, 3):
        store, x, y = lsq(PARALLEL_MIN + 77, seed=3, rows=2)
        opt = make_optimizer("zo-sgd", lr=1e-3, eps=1e-3, probes=2, seed=1, threads=threads,
                             restore="drift")
        for _ in range(2):
            opt.step(store, lambda s=store, x=x, y=y: lsq_loss(s["w"], x, y))
        assert opt.policy == "drift"
        digests.append(store.digest())
    assert digests[0] == digests[1]


def test_demo_population_run_replays_bit_exact(tmp_path: Path) -> None:
    """The demo head trained with batched probes (population graph): replay sha256 ==
    trained, and the population's losses are those of single forwards (to rounding)."""
    from edgelearn.demo import demo_data

    train = demo_data()[0]
    cfg = el.TrainConfig(optimizer="zo-sgd", trainable="head.*",
                         options={"lr": 0.01, "eps": 1e-3, "probes": 4})
    with el.Session(DEMO, tmp_path / "r", cfg) as s:
        assert s.evaluator.population_graph
        s.run(train, 30)
        digest = s.digest()
        assert s.timers.population.median_ms() is not None  # the steps used the graph
        x, yb = train.x[:32], train.y[:32]
        fw = s.evaluator.forwards(x, yb)
        theta = s.store.flat().copy()
        z = np.where(np.arange(theta.size) % 2, 1e-3, -1e-3).astype(np.float32)

        def fill(out: dict[str, np.ndarray], lo: int, hi: int) -> None:
            for j in range(lo, hi):
                out["float32"][j - lo] = theta + (j + 1) * z

        assert fw.population is not None
        batched = fw.population(Population(3, lambda j: None, fill))
        singles = []
        for j in range(3):
            s.store.flat()[...] = theta + (j + 1) * z
            singles.append(fw.evaluate())
        s.store.flat()[...] = theta
        np.testing.assert_allclose(batched, singles, rtol=1e-6, atol=1e-6)
    replayed = el.replay(el.load_bundle(DEMO), tmp_path / "r" / "journal.bin")
    assert replayed.sha256 == digest


@pytest.mark.parametrize("n", [1, 13, 650, 4096 + 5])
def test_small_slice_path_equals_table_path(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices of at most SMALL_MAX elements expand the signs to +-1 and multiply: the same bits
    as the table gathers (forced here with SMALL_MAX = 0), for rows and for passes, including
    rows that share sign arrays (+eps / -eps probe pairs), zero and negative coefs."""
    rng = np.random.default_rng(n)
    src = rng.standard_normal(n, dtype=np.float32)
    signs = [draw_signs(4, 2, k, n) for k in range(3)]
    coefs = [np.float32(1e-3), np.float32(-1e-3), np.float32(0.0), np.float32(-0.0),
             np.float32(-3.5e-4), np.float32(7.0)]
    rows_signs = [signs[0], signs[0], signs[1], signs[1], signs[2], signs[0]]
    got: list[bytes] = []
    for small in (kernels.SMALL_MAX, 0):
        monkeypatch.setattr(kernels, "SMALL_MAX", small)
        rows = np.full((8, n + 3), np.nan, np.float32)
        signed_rows(rows, src, coefs, rows_signs)
        pair = np.full((2, n), np.nan, np.float32)  # one probe: +eps and -eps over one array
        signed_rows(pair, src, coefs[:2], [signs[1], signs[1]])
        distinct = np.full((3, n), np.nan, np.float32)
        signed_rows(distinct, src, coefs[2:5], signs)
        passes = []
        for k in range(1, 4):
            dst = np.empty_like(src)
            SignPass(chunk=64).run(dst, src, coefs[-k:], rows_signs[-k:])
            passes.append(bits(dst))
        inplace = src.copy()
        SignPass().run(inplace, inplace, coefs[:2], rows_signs[2:4])
        one_term = src.copy()  # one term in place (the product cannot land in dst first)
        SignPass().run(one_term, one_term, coefs[4:5], signs[2:3])
        distinct_pair = np.full((2, n), np.nan, np.float32)  # two rows over two arrays
        signed_rows(distinct_pair, src, coefs[4:6], signs[1:3])
        got.append(bits(rows[:6, :n]) + bits(pair) + bits(distinct) + b"".join(passes)
                   + bits(inplace) + bits(one_term) + bits(distinct_pair))
    assert got[0] == got[1]


def test_cross_entropy_rows_equal_cross_entropy_any_shape() -> None:
    """Row losses == `cross_entropy` of each row, bit for bit, over random shapes and scales."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        k, b, c = (int(v) for v in rng.integers(1, [9, 70, 20]))
        c = max(c, 2)
        out = (rng.standard_normal((k, b, c)) * rng.choice([0.1, 5.0, 80.0])).astype(np.float32)
        y = rng.integers(0, c, b)
        assert row_losses(cross_entropy, out, y) == [cross_entropy(o, y) for o in out]


def test_population_scorer_rows_are_read_at_each_call() -> None:
    """The scorer feeds cached views of its rows buffer: later calls (other candidates, other
    chunk sizes) give the outputs of contiguous copies, exactly."""
    bundle = el.load_bundle(DEMO)
    model = Model(bundle, trainable="head.*")
    scorer = model.backend.population_scorer(max_population=3)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, *bundle.inputs[0].shape[1:])).astype(np.float32)
    n = model.store.n_trainable("float32")
    for size in (3, 2, 5, 3):
        cand = rng.standard_normal((size, n)).astype(np.float32)

        def fill(out: dict[str, np.ndarray], lo: int, hi: int, cand: np.ndarray = cand) -> None:
            out["float32"][: hi - lo] = cand[lo:hi]

        got = scorer.forward(Population(size, lambda j: None, fill), x)
        for j in range(size):
            feeds = {bundle.inputs[0].name: x}
            for name, s, e in model.store.segments("float32"):
                feeds[name] = np.ascontiguousarray(cand[j:j + 1, s:e]).reshape(
                    1, *model.store[name].shape)
            want = scorer.session.run([bundle.outputs[0].name], feeds)[0][0]
            assert np.array_equal(got[j], want)
    scorer.close()


def test_small_rows_in_any_order_and_writable_signs_never_served_stale() -> None:
    """Rows over repeated, reordered sign arrays (and rows narrower than the buffer) equal
    single passes; a writable sign array changed between calls is expanded afresh."""
    rng = np.random.default_rng(4)
    n = 650
    src = rng.standard_normal(n, dtype=np.float32)
    s = [draw_signs(0, 4, k, n) for k in range(3)]
    coefs = [np.float32(v) for v in (1e-3, 2e-3, -1e-3, 5e-4, 7e-4)]
    order = [s[0], s[2], s[1], s[0], s[2]]
    rows = np.zeros((5, n + 50), np.float32)  # rows[:, :n] is not contiguous
    signed_rows(rows, src, coefs, order)
    for j in range(5):
        one = np.empty_like(src)
        SignPass().run(one, src, [coefs[j]], [order[j]])
        assert bits(rows[j, :n]) == bits(one)
    packed = np.array(s[0])  # writable
    first = np.empty_like(src)
    SignPass().run(first, src, [coefs[0]], [packed])
    packed ^= 0xFF  # every sign flips
    again = np.empty_like(src)
    SignPass().run(again, src, [coefs[0]], [packed])
    fresh = np.empty_like(src)
    SignPass().run(fresh, src, [coefs[0]], [packed.copy()])
    assert bits(again) == bits(fresh)
    assert bits(again) != bits(first)
    view = packed.view()  # read-only, but the memory it views is not
    view.flags.writeable = False
    SignPass().run(first, src, [coefs[0]], [view])
    packed ^= 0xFF
    SignPass().run(again, src, [coefs[0]], [view])
    SignPass().run(fresh, src, [coefs[0]], [packed.copy()])
    assert bits(again) == bits(fresh)
    assert bits(again) != bits(first)


def test_sign_pass_post_changes_the_sum_before_src_on_any_thread_count() -> None:
    """`post` scales each range's sum of terms before src is added (zo-sgd's group
    multipliers): the same bits on one and two threads, and as numpy's sum-then-scale."""
    n = PARALLEL_MIN + 1000
    rng = np.random.default_rng(4)
    src = rng.standard_normal(n, dtype=np.float32)
    coefs = [np.float32(0.01), np.float32(-0.003)]
    signs = [draw_signs(2, 5, k, n) for k in range(2)]
    m = np.where(np.arange(n) < n // 3, np.float32(0.5), np.float32(3.0)).astype(np.float32)

    def post(acc: np.ndarray, a: int, b: int) -> None:
        np.multiply(acc, m[a:b], out=acc)

    outs = []
    for threads in (1, 2):
        dst = np.empty_like(src)
        SignPass(threads=threads).run(dst, src, coefs, signs, post=post)
        outs.append(dst)
    z = [np.where(np.unpackbits(s[: -(-n // 8)], bitorder="little")[:n], 1.0, -1.0)
         .astype(np.float32) for s in signs]
    want = src + (coefs[0] * z[0] + coefs[1] * z[1]) * m
    assert bits(outs[0]) == bits(outs[1]) == bits(want)
