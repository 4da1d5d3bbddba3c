"""ProbeArena.population (fzoo, adamezo): `fill` rows == what `place` writes, bit for bit,
for mixed candidates (no term, one term, several) on small and large slices; a lean arena's
segment-drawn passes (zo-gn under drift) == the kept-signs passes."""

from __future__ import annotations

import numpy as np
import pytest

from edgelearn.optim.kernels import SMALL_MAX, draw_sign_range
from edgelearn.optim.zo_probe import SEGMENT, ProbeArena
from edgelearn.params import ParamSpec, ParamStore
from edgelearn.rng import Noise, rademacher_bytes


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
@pytest.mark.parametrize("n", [650, SMALL_MAX + 13])
def test_fill_rows_equal_placed(noise: str, n: int) -> None:
    rng = np.random.default_rng(3)
    store = ParamStore([ParamSpec("w", (n,), "float32", True)],
                       values={"w": rng.standard_normal(n).astype(np.float32)})
    arena = ProbeArena(Noise(noise), 1 << 12, "test")
    theta = arena.begin(store)
    e = np.float32(1e-2)
    keys = [(7, 3, k) for k in range(3)]
    cands = [[], [(e, keys[0])], [(-e, keys[0])], [(e, keys[1])], [(e, keys[1]), (-e, keys[2])],
             [(np.float32(0.5) * e, keys[2])], []]
    pop = arena.population(theta, cands)
    rows = np.empty((len(cands), n), np.float32)
    half = 3  # in two chunks, as an evaluator may fill them
    pop.fill({"float32": rows}, 0, half)
    tail = np.empty((len(cands) - half, n), np.float32)
    pop.fill({"float32": tail}, half, len(cands))
    rows[half:] = tail
    for j in range(len(cands)):
        pop.place(j)
        np.testing.assert_array_equal(theta, rows[j])
        assert theta.tobytes() == rows[j].tobytes()


@pytest.mark.parametrize("n", [SEGMENT + 1000, 2 * SEGMENT + 8 * 1024 + 5])
def test_a_lean_arena_draws_segments_to_the_same_bits(n: int) -> None:
    """lean=True (zo-gn under drift) keeps no packed signs and draws each pass's signs per
    segment: the weights equal the kept-signs pass bit for bit, in place and from a source,
    and the last segment may be short (the small-slice path)."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal(n).astype(np.float32)
    terms = [(np.float32(-1e-3), (4, 2, 0)), (np.float32(2.5e-4), (4, 2, 1)),
             (np.float32(-7e-5), (4, 2, 2))]
    out = {}
    for lean in (False, True):
        store = ParamStore([ParamSpec("w", (n,), "float32", True)], values={"w": base})
        arena = ProbeArena(Noise("rademacher"), 1 << 16, "test", lean=lean)
        theta = arena.begin(store, copy=False)
        assert arena.copy is None
        arena.combine(theta, theta, terms)
        dst = np.empty_like(theta)
        arena.combine(dst, theta, terms[:1])
        out[lean] = (theta.copy(), dst, arena.kept_sign_bytes)
    assert out[True][0].tobytes() == out[False][0].tobytes()
    assert out[True][1].tobytes() == out[False][1].tobytes()
    assert out[True][2] == 0
    assert out[False][2] == 3 * (-(-n // 64) * 8)


def test_sign_ranges_are_the_streams_bytes() -> None:
    """draw_sign_range(start, stop) == rademacher_bytes' bytes from start // 8, threaded or
    not; a start off a Philox block is refused."""
    n = (1 << 21) + 300
    whole = rademacher_bytes(9, 1, 2, n)
    for start, stop, threads in [(0, n, 2), (256, 4096 + 7, 1), (1 << 20, n, 2),
                                 (1 << 20, n, 1)]:
        part = draw_sign_range(9, 1, 2, start, stop, threads=threads)
        assert part.tobytes() == whole[start // 8: start // 8 + len(part)].tobytes()
    with pytest.raises(ValueError, match="256"):
        draw_sign_range(9, 1, 2, 64, 1000)
