"""PolyStep: polytope probing in a seeded low-rank subspace, softmax assignment, barycentric step.

After the PolyStep optimizer (anindex/polystep v0.7, `_step_monolithic.py`,
`hybrid_subspace.py`, `ask_tell.py`): zeroth-order search where each "particle" is a small
block of subspace coordinates, probed at the vertices of a randomly rotated cross-polytope,
and moved to the barycentre of the vertices weighted by an entropic (softmax) assignment of
their costs. Written from the algorithm's description, not from its code.

One step t, for every trainable weight tensor W (m elements) of the chosen arena:
  * subspace: W = W_t + B^T x with x in R^d, d = min(rank, 8 * ceil(m / 8)); B (d x m) has
    +-1 entries drawn from (seed, t, column) by `edgelearn.rng` and is regenerated, never
    stored (one 8 x m block at a time). x is split into particles of 8 coordinates.
  * particle i: a random rotation R_i in SO(8) (seeded), vertices v_j = +-R_i e_k (16 of them),
    probe points x_i = r_probe * v_j (the other particles at 0): 16 candidate weight sets.
  * costs C_ij = loss of candidate (i, j); normalized per particle to [0, 1] by the row range;
    assignment w_ij = softmax_j(-C_ij / eps_t); step dx_i = r_step * sum_j w_ij v_j.
  * update W <- W_t + B^T dx (all particles at once, the "monolithic" step).
Probe budget (`max_particles`, default 8): a step moves at most that many particles, so its
cost (16 forwards each) stays bounded however many tensors train (unbounded, 16 forwards x
2 particles per tensor: one step on a prepared int8 transformer's 51,770 scales took 240 s,
issue 15). When the model has more particles, each step draws which ones move: a partial
Fisher-Yates shuffle of the particle indices from raw Philox words of (seed, t)
(bit-portable); a particle's rotation and projection are keyed by its index among all
particles, so with a model at or under the budget every step is exactly the unbudgeted one
(journals written before the option replay unchanged).
eps_t and the radii follow cosine schedules from their initial to their final values over
`total_steps` (constant without it). Any non-finite probe loss rejects the step: weights stay
exactly W_t (probes are written from a copy of the probed tensor, so restore is exact).

int8 arenas (weights stored as int8 with exported per-channel scales): the subspace lives in
units of each channel's quantization step, and every candidate and update is rounded onto the
int8 grid (deterministic round-half-even, or stochastic rounding from seeded uniforms) and
saturated at [-127, 127]. The default radius follows the arena (`DEFAULT_RADIUS`): 0.05 weight
units on float32, 2 quantization steps on int8 (the float default would round every move of
an int8 weight to zero); a journal whose header gives a radius replays with that radius.
There is no float shadow copy of the weights: a step keeps an int8 copy of the probed tensor
and float32 temporaries of one tensor's size.

Population batching: all 16 * P candidates of a step are requested as one `Population`, so a
backend with a population graph scores them in one runtime call; otherwise the base class
expands the request into single forwards. The journal record holds the probe losses ("evals")
plus the schedule values and the step taken; replay re-runs the step on the recorded losses.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelearn import portable
from edgelearn.errors import InputError
from edgelearn.optim.base import Optimizer, Population, register
from edgelearn.optim.options import OptimizerOptions, check, meta
from edgelearn.params import ParamStore
from edgelearn.portable import mix, seq_sum
from edgelearn.rng import Noise, philox_key

BLOCK = 8
VERTICES = 2 * BLOCK
ROUNDINGS = ("deterministic", "stochastic")
ARENAS = ("auto", "float32", "int8")
#: the radius (at t = 0) an arena gets when the options leave it null: weight units on float32;
#: quantization steps on int8, where a move below half a step rounds to nothing (measured on
#: the generated int8 MLPs of tests/test_int8_prepare.py, 30 steps: radius 0.05 moved no
#: weight, 0.5-2 lowered the loss on all three forms, 4 raised it on two)
DEFAULT_RADIUS = {"float32": 0.05, "int8": 2.0}
# Probe-index domains inside edgelearn.rng's (seed, step, probe) keys, so projection columns,
# rotations and rounding uniforms never share a stream.
_PROJ, _ROT, _ROUND, _PICK = 1 << 24, 2 << 24, 3 << 24, 4 << 24
_RADEMACHER = Noise("rademacher")
_INV_2_52 = 2.0 ** -52  # 53-bit word / 2^52: uniform in [0, 2), exact
_TRIES = 256  # ball candidates per draw (dimension 8 accepts ~1.6% of cube points)
#: how rotations are drawn; journals of version 1 (LAPACK QR, not bit-portable) are refused
ROTATION_VERSION = 2


def projection_block(seed: int, step: int, particle: int, m: int) -> np.ndarray:
    """The 8 x m block of +-1 projection rows of a particle (float32), one counter stream."""
    out = np.empty(BLOCK * m, np.float32)
    _RADEMACHER.fill(out, run_seed=seed, step=step, probe=_PROJ + particle, start=0)
    return out.reshape(BLOCK, m)


def rotation(seed: int, step: int, particle: int) -> np.ndarray:
    """A random rotation in SO(8) (float64 [8, 8]) for a particle, the same bits on every CPU.

    Stewart's construction (1980, "The efficient generation of random orthogonal matrices"):
    Q = H_8 D_8 H_7 D_7 ... H_2 D_2 D_1, where H_k is the Householder reflection (on the last k
    coordinates) taking e_1 to a uniform random direction of R^k and D_k flips that column's
    sign, is Haar-distributed on O(8); the last column's sign then makes det(Q) = +1. The
    directions come from raw Philox words (uniform in the cube, rejected outside the unit ball:
    uniform on the sphere with no libm call), and everything is computed in Python floats, so no
    LAPACK, BLAS or libm result enters (journal version 2; version 1 used LAPACK QR).
    """
    bits = np.random.Philox(key=philox_key(seed, step, _ROT + particle))
    q = [[1.0 if r == c else 0.0 for c in range(BLOCK)] for r in range(BLOCK)]
    det = 1.0
    for k in range(BLOCK, 1, -1):
        x = _direction(bits, k)
        s = 1.0 if x[0] >= 0 else -1.0
        v = [x[0] + s * math.sqrt(seq_sum([a * a for a in x])), *x[1:]]
        f = 2.0 / seq_sum([a * a for a in v])
        off = BLOCK - k
        for row in q:  # row <- row @ H_k, then the column flip: H_k e_1 = -s x / |x|
            d = f * seq_sum([row[off + i] * v[i] for i in range(k)])
            for i in range(k):
                row[off + i] = row[off + i] - d * v[i]
            row[off] = -s * row[off]
        det = det * s  # det(H_k) = -1 times the flip's -s
    if det < 0:
        for row in q:
            row[BLOCK - 1] = -row[BLOCK - 1]
    return np.array(q, np.float64)


def _direction(bits: np.random.Philox, k: int) -> list[float]:
    """A uniform random point of the unit ball of R^k (nonzero), from raw 64-bit words.

    Candidates come 256 at a time (rows of uniforms in [-1, 1), exact from 53-bit words); the
    first row inside the ball is taken. Squared norms add the columns left to right in
    elementwise float64, so the choice is the same on every CPU.
    """
    while True:
        x = (bits.random_raw(_TRIES * k) >> np.uint64(11)).astype(np.float64)
        x = (x * _INV_2_52 - 1.0).reshape(_TRIES, k)
        r2 = x[:, 0] * x[:, 0]
        for i in range(1, k):
            r2 = r2 + x[:, i] * x[:, i]
        ok = np.flatnonzero((r2 > 1e-12) & (r2 <= 1.0))
        if ok.size:
            return [float(v) for v in x[ok[0]]]


def vertices(rot: np.ndarray) -> np.ndarray:
    """The 16 cross-polytope vertices +-R e_k as rows (float64 [16, 8])."""
    return np.concatenate([rot.T, -rot.T])


def assignment(costs: np.ndarray, eps: float) -> np.ndarray:
    """softmax(-c / eps) of costs normalized to [0, 1] by their range (float64 [16]); plain
    double operations and `edgelearn.portable.exp`, so the same bits on every CPU."""
    c = [float(v) for v in np.asarray(costs, np.float64).ravel()]
    lo, span = min(c), max(c) - min(c)
    w = [portable.exp(-((v - lo) / span) / eps) if span > 0 else 1.0 for v in c]
    total = seq_sum(w)
    return np.array([v / total for v in w], np.float64)


def cosine(t: int, total: int | None, start: float, end: float) -> float:
    """Cosine schedule from `start` (t = 0) to `end` (t >= total); constant without total.

    The cosine is `edgelearn.portable.cos_pi` (not libm), so the schedule is bit-portable.
    """
    if not total:
        return start
    frac = min(t / total, 1.0)
    return end + (start - end) * 0.5 * (1.0 + portable.cos_pi(frac))


@dataclass(frozen=True)
class PolyStepOptions(OptimizerOptions):
    """Options of polystep; the schedule ends left null resolve to a tenth of their start."""

    rank: int = field(default=16, metadata=meta(
        "subspace dimension per weight tensor (a multiple of 8; 8 coordinates = 1 particle)"))
    radius: float | None = field(default=None, metadata=meta(
        "step radius at t = 0, in weight units on a float32 arena, in quantization steps on "
        "an int8 one (null: the arena's default, 0.05 for float32, 2 steps for int8)"))
    radius_final: float | None = field(default=None, metadata=meta(
        "step radius at the end of the cosine schedule (null: radius / 10)"))
    probe_radius: float | None = field(default=None, metadata=meta(
        "probe radius at t = 0, following the same schedule ratio (null: radius)"))
    eps: float = field(default=0.1, metadata=meta(
        "softmax temperature on range-normalized costs at t = 0"))
    eps_final: float | None = field(default=None, metadata=meta(
        "temperature at the end of the schedule (null: eps / 10)"))
    total_steps: int | None = field(default=None, metadata=meta(
        "schedule length (null: constant radii and temperature; train sets it to --steps)"))
    arena: str = field(default="auto", metadata=meta(
        "auto (int8 when the store has trainable int8 weights, else float32), float32 or int8",
        choices=ARENAS))
    rounding: str = field(default="deterministic", metadata=meta(
        "int8 rounding: deterministic (half to even) or stochastic", choices=ROUNDINGS))
    restore: str = field(default="auto", metadata=meta(
        "accepted for the shared CLI: probes always restore exactly from a copy of the probed "
        "tensor, so every value behaves the same", cli="--restore",
        choices=("auto", "copy", "drift")))
    max_particles: int | None = field(default=8, metadata=meta(
        "probe budget: at most this many particles (16 probes each) move per step, drawn "
        "among all tensors' particles (null: every particle, cost grows with the tensors)",
        legacy=None))
    rotation: int = field(default=ROTATION_VERSION, metadata=meta(
        "how particle rotations are drawn: 2 = seeded Householder product in plain float64, "
        "the same bits on every CPU (1 = LAPACK QR, journals before it; refused)", legacy=1))

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.rotation == ROTATION_VERSION,
              f"this polystep run draws its rotations by version {self.rotation!r} (1: LAPACK "
              "QR, which is not bit-portable and no longer implemented); this edgelearn draws "
              f"version {ROTATION_VERSION} and cannot reproduce it: replay or resume it with "
              "the edgelearn that wrote it")
        check(self.rank >= BLOCK and self.rank % BLOCK == 0,
              f"rank must be a positive multiple of {BLOCK}, got {self.rank!r}")
        for nm, v in (("radius", self.radius), ("eps", self.eps),
                      ("radius_final", self.radius_final), ("probe_radius", self.probe_radius),
                      ("eps_final", self.eps_final)):
            check(v is None or (v > 0 and math.isfinite(v)),
                  f"{nm} must be a finite number > 0, got {v!r}")
        check(self.max_particles is None or self.max_particles >= 1,
              f"max_particles must be a positive integer or null, got {self.max_particles!r}")
        check(self.total_steps is None or self.total_steps > 0,
              f"total_steps must be a positive integer, got {self.total_steps!r}")
        # resolved here, so config() (the journal header) holds the values the run uses; with
        # radius null the radii follow the arena (`radii`), which the trainable set fixes
        resolve = [("eps_final", self.eps_final, self.eps / 10)]
        if self.radius is not None:
            resolve += [("radius_final", self.radius_final, self.radius / 10),
                        ("probe_radius", self.probe_radius, self.radius)]
        for nm, v, resolved in resolve:
            if v is None:
                object.__setattr__(self, nm, resolved)

    def radii(self, arena: str) -> tuple[float, float, float]:
        """(radius, radius_final, probe_radius) on `arena` ("float32" or "int8"): the options
        where set, else `DEFAULT_RADIUS[arena]`, a tenth of it, and it."""
        r = self.radius if self.radius is not None else DEFAULT_RADIUS[arena]
        r_final = self.radius_final if self.radius_final is not None else r / 10
        return r, r_final, self.probe_radius if self.probe_radius is not None else r


@register
class PolyStep(Optimizer):
    """PolyStep over the trainable float32 or int8 slice of a ParamStore.

    Args:
        **options: `PolyStepOptions` fields (rank, radius, eps, ..., seed).
    """

    name = "polystep"
    Options = PolyStepOptions
    options: PolyStepOptions

    # -- layout -----------------------------------------------------------------------------
    def dtype_of(self, store: ParamStore) -> str:
        """The arena this optimizer steps on for `store`."""
        if self.options.arena != "auto":
            return self.options.arena
        return "int8" if store.n_trainable("int8") else "float32"

    def particles(self, store: ParamStore) -> list[tuple[int, int]]:
        """(start, stop) inside the trainable slice of the tensor each particle moves."""
        out = []
        for _, a, b in store.segments(self.dtype_of(store)):
            d = min(self.options.rank, BLOCK * -(-(b - a) // BLOCK))
            out += [(a, b)] * (d // BLOCK)
        return out

    def chosen(self, n: int, t: int) -> list[int]:
        """Indices (ascending) of the particles that move at step t, out of `n`."""
        k = self.options.max_particles
        if k is None or n <= k:
            return list(range(n))
        words = np.random.Philox(key=philox_key(self.seed, t, _PICK)).random_raw(k)
        idx = list(range(n))
        for i in range(k):  # partial Fisher-Yates; modulo bias < n / 2^64
            j = i + int(words[i] % np.uint64(n - i))
            idx[i], idx[j] = idx[j], idx[i]
        return sorted(idx[:k])

    def population_size(self, store: ParamStore) -> int:
        """Every vertex of every moving particle: one `Population` per step."""
        return self.probes_per_step(store)

    def probes_per_step(self, store: ParamStore) -> int:
        """Loss evaluations per step (16 per moving particle)."""
        n = len(self.particles(store))
        k = self.options.max_particles
        return VERTICES * (n if k is None else min(n, k))

    def memory_bytes(self, store: ParamStore) -> int:
        """Copy + projection block + temporaries of the largest tensor (population rows not
        included: they belong to the evaluator)."""
        dtype = self.dtype_of(store)
        m = max((b - a for _, a, b in store.segments(dtype)), default=0)
        return m * (np.dtype(dtype).itemsize + 4 * BLOCK + 8)

    def schedule(self, t: int, arena: str = "float32") -> tuple[float, float, float]:
        """(eps, step radius, probe radius) at step t on `arena` (see `PolyStepOptions.radii`)."""
        o = self.options
        r0, r_final, r_probe = o.radii(arena)
        r = cosine(t, o.total_steps, r0, r_final)
        return cosine(t, o.total_steps, o.eps, o.eps_final), r, r_probe * r / r0

    # -- candidates -------------------------------------------------------------------------
    def _round(self, v: np.ndarray, key: int) -> np.ndarray:
        """int8 grid: round (deterministic or stochastic) and saturate at +-127."""
        if self.options.rounding == "stochastic":
            gen = np.random.Generator(np.random.Philox(key=philox_key(self.seed, self.t,
                                                                       _ROUND + key)))
            v = np.floor(v + gen.random(v.size, dtype=np.float32))
        else:
            v = np.rint(v)
        return np.clip(v, -127, 127).astype(np.int8)

    def _candidate(self, base: np.ndarray, delta: np.ndarray, key: int) -> np.ndarray:
        """Tensor values of a candidate: base + delta (float32) or on the int8 grid."""
        if base.dtype == np.int8:
            return self._round(base.astype(np.float32) + delta, key)
        return base + delta

    # -- the step ---------------------------------------------------------------------------
    def _step(self, store: ParamStore, **extra: Any) -> Generator[Any, Any, dict[str, Any]]:
        dtype = self.dtype_of(store)
        theta = store.flat(dtype)
        if theta.size == 0:
            raise InputError(f"polystep needs trainable {dtype} parameters; none are selected")
        t = self.t
        eps, r_step, r_probe = self.schedule(t, dtype)
        every = self.particles(store)
        ids = self.chosen(len(every), t)  # global particle index keys its random streams
        parts = [every[i] for i in ids]
        k_total = VERTICES * len(parts)
        rots = [vertices(rotation(self.seed, t, i)) for i in ids]
        cache: dict[str, Any] = {"i": -1, "block": None, "seg": None, "copy": None}

        def block(i: int) -> np.ndarray:
            if cache["i"] != i:
                a, b = parts[i]
                cache["i"], cache["block"] = i, projection_block(self.seed, t, ids[i], b - a)
            return cache["block"]

        def delta(j: int) -> np.ndarray:
            i, v = divmod(j, VERTICES)
            u = (r_probe * rots[i][v]).astype(np.float32)
            return mix(u, block(i))

        def restore() -> None:
            if cache["seg"] is not None:
                a, b = cache["seg"]
                theta[a:b] = cache["copy"]
                cache["seg"] = None

        def place(j: int) -> None:
            a, b = parts[j // VERTICES]
            if cache["seg"] != (a, b):
                restore()
                cache["seg"], cache["copy"] = (a, b), theta[a:b].copy()
            theta[a:b] = self._candidate(cache["copy"], delta(j), j)

        def fill(out: dict[str, np.ndarray], lo: int, hi: int) -> None:
            rows = out[dtype][: hi - lo]
            rows[...] = theta
            for j in range(lo, hi):
                a, b = parts[j // VERTICES]
                rows[j - lo, a:b] = self._candidate(theta[a:b], delta(j), j)

        losses = yield Population(k_total, place, fill)
        restore()
        finite = all(math.isfinite(v) for v in losses)
        record: dict[str, Any] = {"eps": eps, "radius": r_step, "probe_radius": r_probe,
                                  "accepted": finite}
        if not finite:
            record["dx"] = []
            return record
        dxs = []
        for i in range(len(parts)):
            w = assignment(losses[VERTICES * i: VERTICES * (i + 1)], eps)
            dxs.append((r_step * mix(w, rots[i])).astype(np.float32))
        record["dx"] = [[float(v) for v in dx] for dx in dxs]
        # Monolithic update: every particle of a tensor moves it at once.
        i = 0
        while i < len(parts):
            a, b = parts[i]
            acc = np.zeros(b - a, np.float32)
            while i < len(parts) and parts[i] == (a, b):
                acc += mix(dxs[i], projection_block(self.seed, t, ids[i], b - a))
                i += 1
            theta[a:b] = self._candidate(theta[a:b], acc, k_total + a)
        return record
