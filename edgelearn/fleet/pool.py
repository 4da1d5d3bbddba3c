"""FedKSeed's shared finite seed pool and the model it defines (Qin et al. 2024, arXiv 2312.06353).

Qin, Chen, Yao, Li, Ding, Zhou, Li 2024, "Federated Full-Parameter Tuning of Billion-Sized
Language Models with Communication Cost under 18 Kilobytes" (FedKSeed; reference code
zhenqincn/FedKSeed). Every node agrees on K perturbation directions z_j; a client's local
zeroth-order steps each use one of them and produce one scalar, and the server keeps, per
direction, the accumulated (learning-rate scaled, client-averaged) scalar A_j. The global model is
then a function of the base weights and those K scalars:

    theta = theta_0 + sum_{j in 0..K-1, A_j != 0} float32(A_j) * z_j      (j in increasing order)

so any node, including one that joins late, rebuilds it bit-exactly from the bundle and A.

Our pool: `rows` run seeds, `steps` keys each. Key j = (row r, step t) is the edgelearn noise key
(seed + r, t, 0): exactly the direction step t of a zo-sgd run seeded `seed + r` perturbs, so a
client that trains a round with run seed `seed + r` walks the pool's row r (K = rows * steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgelearn.errors import InputError
from edgelearn.rng import noise_chunks, rademacher_bytes, sign_table


@dataclass(frozen=True)
class SeedPool:
    """K = rows * steps shared directions (Rademacher, edgelearn's portable noise).

    Args:
        seed: the fleet's base run seed (row r trains with run seed `seed + r`).
        rows: run seeds in the pool.
        steps: local steps per round (keys per row).
    """

    seed: int
    rows: int
    steps: int

    def __post_init__(self) -> None:
        for name in ("rows", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
                raise InputError(f"pool {name} must be an integer in 1..65535, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"pool seed must be a non-negative integer, got {self.seed!r}")

    @property
    def size(self) -> int:
        """K, the number of directions."""
        return self.rows * self.steps

    def run_seed(self, row: int) -> int:
        """The zo-sgd run seed of a client assigned `row`."""
        return self.seed + row

    def key(self, j: int) -> tuple[int, int, int]:
        """The noise key (run seed, step, probe) of direction j."""
        return (self.run_seed(j // self.steps), j % self.steps, 0)


def apply_coefficients(theta: np.ndarray, coef: np.ndarray, pool: SeedPool,
                       chunk: int = 1 << 16) -> None:
    """theta += sum_j float32(coef[j]) * z_j, in place, j increasing, zero coefficients skipped.

    The same float32 operations in the same order on every node, so equal inputs give
    bit-identical weights.

    Args:
        theta: float32 [n], the trainable slice (modified in place).
        coef: float64 [K], one coefficient per pool direction.
        pool: the seed pool the coefficients index.
        chunk: elements per pass (a multiple of 8; the result does not depend on it).
    """
    if coef.shape != (pool.size,):
        raise InputError(f"{coef.shape[0] if coef.ndim == 1 else coef.shape} pool coefficients "
                         f"for a pool of {pool.size}")
    n = theta.size
    buf = np.empty(-(-min(chunk, n) // 8) * 8, np.float32).reshape(-1, 8)
    for j in np.flatnonzero(coef):
        signs = rademacher_bytes(*pool.key(int(j)), n=n)
        table = sign_table(np.float32(coef[j]))
        for a, b in noise_chunks(n, chunk):
            k = -(-(b - a) // 8)
            np.take(table, signs[a // 8: a // 8 + k], axis=0, out=buf[:k])
            np.add(theta[a:b], buf.reshape(-1)[: b - a], out=theta[a:b])
