"""ProbeArena.population (fzoo, adamezo): `fill` rows == what `place` writes, bit for bit,
for mixed candidates (no term, one term, several) on small and large slices."""

from __future__ import annotations

import numpy as np
import pytest

from edgelearn.optim.kernels import SMALL_MAX
from edgelearn.optim.zo_probe import ProbeArena
from edgelearn.params import ParamSpec, ParamStore
from edgelearn.rng import Noise


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
