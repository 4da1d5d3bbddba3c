"""LOZO: zeroth-order steps along low-rank directions, probed inside the runtime's graph.

Chen et al. 2025, "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank
Structures" (LOZO, ICLR 2025, arXiv 2410.07698; reference code optsuite/LOZO, read, not
copied). Each 2-D float32 weight W [a, b] is perturbed along Z = U V^T, U [a, r] drawn afresh
every step, V [b, r] every `nu` steps (lazy); every other trainable float32 tensor (biases,
norms, convolution kernels) along a dense z, as in MeZO. For step t (one probe):

    L+ = L(theta + eps Z),  L- = L(theta - eps Z),  g = (L+ - L-) / (2 eps)
    W <- W - lr g U V^T (2-D weights),   p <- p - lr g z (the rest)

With noise "rademacher" (the default: the same bits on every CPU) U has entries +-1/sqrt(r)
and V +-1, so Z's entries have unit variance for any rank and lr and eps mean what they mean
for zo-sgd; "gaussian" (the paper's) draws N(0, 1/r) and N(0, 1) instead. U comes from the
stream (seed, t, 0), V from (seed, t_v, 1) with t_v = nu * floor(t / nu), z from
(seed, t, 2) (`edgelearn.rng.Noise`, tensors laid end to end).

Why it is cheap: X @ (W + s U V^T) = X @ W + s (X @ U) V^T, so an evaluator with the rewritten
graph (edgelearn/lowrank_graph.py, edgelearn/training/lowrank_evaluator.py) scores both
probes with the weights untouched, fed U, V and s: the step yields a `LowRankPopulation`,
whose `prepare(j)` writes only the small dense part of candidate j (or, for a stacked graph,
whose `dense` z the graph adds itself: both probes in one run). Any other evaluator
(LiteRT, a cached prefix, ask/tell, a plain `evaluate`) expands it with `place(j)`, which
writes W + s U V^T densely from a copy of the 2-D weights (allocated on first use): the
losses differ by float rounding, the update does not depend on how they were obtained, so the
weights after a step, the journal and replay are bit-identical either way for the same losses.
The update is the only pass over W (every step, or once a period: deferred, below), by
the engine option `update`: "numpy", row blocks of
W += (c U) V^T with a cache-sized temporary, split over a few threads (each element's float
operations are fixed, so results do not depend on the thread count; with Rademacher factors
of rank <= 2 every product and partial sum is exact, so BLAS computes the block's products
and only the add rounds: the same bits, ~3x faster); "onnxruntime", its Gemm in place
(edgelearn/backends/ort_rank_update.py; memory-bound; with other factors its floats may
differ from numpy's and between CPUs, so a run's engine is recorded and replay uses it);
"auto" (the default), onnxruntime's Gemm where the products are exact, since it then adds
C once to the exact product, as numpy does: each weight's first update is compared with
numpy's bits (==), and any difference sends the run to numpy; so "auto" gives numpy's
weights on every CPU, faster where onnxruntime is installed.
Deferred update (ours; LOZO's lazy V makes it possible): while V stays the same, the updates of
consecutive steps share it, sum_t c_t U_t V^T = P V^T, so a step called with defer=True
(every `Session` run) adds c U to the pending sum P [a, r] instead of passing over W, and the
probes score W + (P + s U) V^T: the graph takes [P | U] and [V | V]
(`lowrank_graph.rewrite(pending=True)`); the dense fallback writes it. P goes into W
(`settle`, one pass) when V changes, and when something else reads the weights: `Session`
reads settle, or read inside `settled` (copy, add, read, copy back: the run's bits do not
change). A 12.6M MLP's step then passes over W once per `nu` steps instead of every step.
Without defer (direct `step` callers, ask/tell) every step settles at once, with the bits of
W += (c U) V^T. The float rounding differs from settling every step (P sums before it adds),
so each record whose step began with a sum pending says since when ("from": that step), and
replay adds P where the journal says; the optimizer's state holds P (checkpoints, rollbacks).
Record: (seeds [seed, t, t_v], g, lr, eps, accepted, losses[, from]).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelearn.errors import InputError
from edgelearn.optim.base import Optimizer, Population, register
from edgelearn.optim.kernels import PARALLEL_MIN, default_threads
from edgelearn.optim.options import OptimizerOptions, check, meta
from edgelearn.optim.zo_fields import check_lr_eps
from edgelearn.optim.zo_probe import decode_array, encode_array
from edgelearn.params import ParamStore
from edgelearn.rng import Noise

LOZO_NOISE = ("gaussian", "rademacher")
LOZO_UPDATES = ("auto", "numpy", "onnxruntime")
#: elements of the update's per-thread temporary (a row block of U V^T; stays in cache)
BLOCK = 1 << 15
_pools: dict[int, ThreadPoolExecutor] = {}


@dataclass(frozen=True)
class LOZOOptions(OptimizerOptions):
    """Options of lozo (the update rule is in the module docstring)."""

    lr: float = field(default=1e-3, metadata=meta("learning rate", cli="--lr"))
    eps: float = field(default=1e-3, metadata=meta(
        "perturbation scale (units of the weights)", cli="--eps"))
    rank: int = field(default=2, metadata=meta(
        "lozo: rank r of each 2-D weight's perturbation U V^T", cli="--rank"))
    nu: int = field(default=50, metadata=meta(
        "lozo: steps between fresh draws of V (the lazy factor); a run passes over the "
        "2-D weights once per nu steps (its update waits in a low-rank sum meanwhile)",
        cli="--nu"))
    # rademacher by default, as every ZO optimizer here: its draws are the same bits on
    # every CPU (gaussian goes through libm / SIMD transcendental functions)
    noise: str = field(default="rademacher", metadata=meta(
        "rademacher (bit-portable; the default) or gaussian (as in LOZO)", cli="--noise",
        choices=LOZO_NOISE))
    restore: str = field(default="auto", metadata=meta(
        "accepted for the shared CLI: lozo restores the dense part from a copy and never "
        "perturbs the 2-D weights in its graph probes, so every value behaves the same",
        cli="--restore", choices=("auto", "copy", "drift")))
    update: str = field(default="auto", metadata=meta(
        "engine of the W += c U V^T pass: auto (onnxruntime's Gemm where it gives numpy's bits, "
        "checked on each weight's first update: Rademacher factors of rank <= 2; else numpy), "
        "numpy (row blocks; no runtime needed; the same bits on every CPU) or onnxruntime (its "
        "Gemm, in place, whatever the factors: replay then needs the same kind of CPU)",
        cli="--update-engine", choices=LOZO_UPDATES))
    threads: int | None = field(default=None, metadata=meta(
        "threads of the update pass over large weights (null: the usable cores, at most 4; "
        "results do not depend on it)", record="never"))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lr_eps(self.lr, self.eps)
        check(self.rank >= 1, f"rank must be an integer >= 1, got {self.rank!r}")
        check(self.nu >= 1, f"nu must be an integer >= 1, got {self.nu!r}")
        check(self.threads is None or self.threads >= 1,
              f"threads must be an integer >= 1, got {self.threads!r}")


@dataclass(frozen=True)
class LowRankPopulation(Population):
    """Candidates theta + s_j Z that an evaluator with the low-rank graph scores directly.

    Args (besides Population's size, place, fill):
        factors: 2-D weight name -> ([P | U] [a, 2r], [V | V] [b, 2r]) float32 of this
            step: P the pending sum of earlier steps' updates (zeros when none is pending),
            which every candidate carries unscaled (`lowrank_graph.rewrite(pending=True)`).
        dense: every other tensor's name -> its z (float32, flat): candidate j is that
            tensor + s_j z (for a graph that perturbs them itself: stacked probes).
        scales: s_j of each candidate (float32 values): the graph's scale input.
        prepare: prepare(j) writes candidate j's dense part (non-2-D tensors) into the
            store and leaves the 2-D weights at their values (the graph adds
            (P + s_j U) V^T).
    """

    factors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict,
                                                              repr=False)
    dense: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    scales: tuple[float, ...] = ()
    prepare: Callable[[int], None] | None = field(default=None, repr=False)


def rank_update(w: np.ndarray, cu: np.ndarray, vt: np.ndarray, src: np.ndarray | None = None,
                threads: int = 1, exact: bool = False) -> None:
    """w = src + cu @ vt by row blocks, each element as (cu_0 v_0 + cu_1 v_1 + ...) in float32.

    Args:
        w: float32 [a, b], written. cu: float32 [a, r]. vt: float32 [r, b] (C-contiguous).
        src: float32 [a, b] (None: w itself, in place). threads: row ranges run in parallel.
        exact: every product and partial sum of cu @ vt is exact in float32 (`exact_factors`),
            so the block's products may come from BLAS (any order, FMA or not: the same bits)
            and only the add to src rounds; about 3x faster than elementwise products.
    """
    src = w if src is None else src
    a, b = w.shape
    rows = max(1, BLOCK // max(b, 1))
    parts = threads if threads > 1 and w.size >= PARALLEL_MIN else 1
    edges = [a * i // parts for i in range(parts + 1)]

    def run(lo: int, hi: int) -> None:
        tmp = np.empty((2, rows, b), np.float32)
        for i in range(lo, hi, rows):
            j = min(i + rows, hi)
            t, t2 = tmp[0, : j - i], tmp[1, : j - i]
            if exact:
                np.matmul(cu[i:j], vt, out=t)
            else:
                np.multiply(cu[i:j, 0:1], vt[0], out=t)
                for k in range(1, cu.shape[1]):
                    np.multiply(cu[i:j, k : k + 1], vt[k], out=t2)
                    np.add(t, t2, out=t)
            np.add(src[i:j], t, out=w[i:j])

    if parts == 1:
        run(0, a)
        return
    pool = _pools.get(parts) or _pools.setdefault(parts, ThreadPoolExecutor(parts))
    for f in [pool.submit(run, edges[i], edges[i + 1]) for i in range(parts)]:
        f.result()


def side_by_side(left: np.ndarray | None, right: np.ndarray, rows: list[int], r: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Blocks [left_i | right_i] [rows_i, 2r] end to end, from flat blocks [rows_i, r].

    Args:
        left, right: float32, blocks [rows_i, r] end to end (left None: zeros).
        rows: rows_i of each block. out: float32 [2 * right.size], written (None: new).
    """
    out = np.empty(2 * right.size, np.float32) if out is None else out
    i = 0
    for n in rows:
        o = out[2 * i : 2 * (i + n * r)].reshape(n, 2 * r)
        o[:, :r] = 0.0 if left is None else left[i : i + n * r].reshape(n, r)
        o[:, r:] = right[i : i + n * r].reshape(n, r)
        i += n * r
    return out


def exact_factors(noise: str, rank: int) -> bool:
    """Whether P V^T has the same bits in any summation order, FMA or not: Rademacher V has
    entries +-1, so every product p_k v_k is exact, and a sum of rank <= 2 of them rounds once
    (the first partial sum is exact); a third term would round twice, order-dependent. (With
    P = c U, the sum is even exact: 0, +-m or +-2m.)"""
    return noise == "rademacher" and rank <= 2


@register
class LOZO(Optimizer):
    """LOZO over the trainable float32 tensors of a ParamStore (low rank on 2-D weights).

    Args:
        **options: `LOZOOptions` fields (lr, eps, rank, nu, noise, ..., seed).
    """

    name = "lozo"
    Options = LOZOOptions
    supports_lr_scale = True
    probe_graph = "lowrank"
    options: LOZOOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.noise = Noise(self.options.noise)
        self.threads = self.options.threads or default_threads()
        self._shapes: dict[str, tuple[int, int]] | None = None
        self._dense: list[tuple[int, int]] = []  # (start, end) in the float32 slice
        self._dense_names: list[str] = []
        self._dcopy = np.empty(0, np.float32)
        self._wcopy: dict[str, np.ndarray] = {}  # dense-probe fallback only
        self._placed = False
        self._v: tuple[int, np.ndarray] | None = None  # (t_v, every V) of the current period
        self._engine: Any = None  # OrtRankUpdate; False: onnxruntime is not installed
        self._exact = exact_factors(self.options.noise, self.options.rank)
        self._acc = np.empty(0, np.float32)  # P of every 2-D weight, laid out as U
        self._from: int | None = None  # the step P began at (None: nothing pending)
        self._pu = np.empty(0, np.float32)  # [P | U] of every 2-D weight (graph factors)
        self._vv: tuple[int, np.ndarray] | None = None  # (t_v, [V | V] of every weight)

    def _prepare(self, store: ParamStore) -> np.ndarray:
        """The trainable float32 slice; splits it into 2-D weights and the dense rest once."""
        theta = store.flat("float32")
        if theta.size == 0:
            raise InputError("lozo needs trainable float32 parameters; none are selected")
        segs = store.segments("float32")
        shapes = {n: store[n].shape for n, _, _ in segs if store[n].ndim == 2}
        if self._shapes is None:
            self._shapes = shapes
            self._dense = [(a, b) for n, a, b in segs if n not in shapes]
            self._dense_names = [n for n, _, _ in segs if n not in shapes]
            self._dcopy = np.empty(sum(b - a for a, b in self._dense), np.float32)
            n_u = sum(a for a, _ in shapes.values()) * self.options.rank
            self._pu = np.empty(2 * n_u, np.float32)
            if self._from is None:
                self._acc = np.empty(n_u, np.float32)
            elif self._acc.size != n_u:  # a pending sum loaded with the optimizer's state
                raise InputError(f"lozo state holds a pending sum of {self._acc.size} values; "
                                 f"the store's 2-D weights need {n_u}")
        elif shapes != self._shapes:
            raise InputError("the store's 2-D trainable weights differ from those this "
                             "optimizer was set up for")
        return theta

    def memory_bytes(self, store: ParamStore) -> int:
        """Dense part: copy + z; U and V, the pending sum P and the graph's [P | U] and
        [V | V] (5x the factors); update temporaries; the copy of the 2-D weights (allocated
        by the dense-probe fallback, or by a read inside `settled` while a sum is pending)."""
        r = self.options.rank
        two_d = [store[n] for n in store.trainable_names
                 if store[n].dtype == np.float32 and store[n].ndim == 2]
        dense = store.n_trainable("float32") - sum(w.size for w in two_d)
        factors = sum(4 * r * (w.shape[0] + w.shape[1]) for w in two_d)
        return 8 * dense + 5 * factors + 4 * BLOCK * self.threads + 4 * sum(w.size
                                                                            for w in two_d)

    def population_size(self, store: ParamStore) -> int:
        """Its two probes (the low-rank graph stacks them in one call)."""
        return 2

    def lr_at(self, t: int) -> float:
        """Learning rate of step t, times `lr_scale` (divergence rollback)."""
        return self.options.lr * self.lr_scale

    def factors(self, t: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Name -> (U [a, r], V [b, r]) float32 of step t (module docstring)."""
        return self._views(*self._draw(t), self.options.rank)

    def _period(self, t: int) -> int:
        """t_v: the step whose V step t uses (V is drawn every `nu` steps)."""
        return self.options.nu * (t // self.options.nu)

    def _draw(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(every U, every V) of step t, flat, the 2-D weights' blocks end to end."""
        assert self._shapes is not None
        r = self.options.rank
        n_u = sum(a * r for a, _ in self._shapes.values())
        u_all = self.noise.fill(np.empty(n_u, np.float32), run_seed=self.seed, step=t,
                                probe=0, start=0)
        u_all *= np.float32(1.0 / math.sqrt(r))
        return u_all, self._v_all(self._period(t))

    def _v_all(self, tv: int) -> np.ndarray:
        """Every V of period t_v (drawn once per period)."""
        assert self._shapes is not None
        if self._v is None or self._v[0] != tv:
            n_v = sum(b * self.options.rank for _, b in self._shapes.values())
            self._v = (tv, self.noise.fill(np.empty(n_v, np.float32), run_seed=self.seed,
                                           step=tv, probe=1, start=0))
        return self._v[1]

    def _views(self, u_all: np.ndarray, v_all: np.ndarray, cols: int
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Name -> (u [a, cols], v [b, cols]) views of flat blocks laid end to end."""
        assert self._shapes is not None
        out, iu, iv = {}, 0, 0
        for name, (a, b) in self._shapes.items():
            out[name] = (u_all[iu : iu + a * cols].reshape(a, cols),
                         v_all[iv : iv + b * cols].reshape(b, cols))
            iu, iv = iu + a * cols, iv + b * cols
        return out

    def _graph_factors(self, u_all: np.ndarray, v_all: np.ndarray, tv: int
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Name -> ([P | U] [a, 2r], [V | V] [b, 2r]) of this step (P: zeros when nothing
        is pending); [V | V] is built once per period."""
        assert self._shapes is not None
        r = self.options.rank
        if self._vv is None or self._vv[0] != tv:
            self._vv = (tv, side_by_side(v_all, v_all, [b for _, b in self._shapes.values()],
                                         r))
        pending = self._acc if self._from is not None else None
        side_by_side(pending, u_all, [a for a, _ in self._shapes.values()], r, out=self._pu)
        return self._views(self._pu, self._vv[1], 2 * r)

    @contextmanager
    def settled(self, store: ParamStore) -> Iterator[None]:
        """`Optimizer.settled`: the 2-D weights are copied (the dense fallback's copy), P V^T
        is added as `settle` adds it, and the copy is put back after the block."""
        if self._from is None:
            yield
            return
        self._prepare(store)
        for name in self._shapes or {}:
            copy = self._wcopy.get(name)
            if copy is None:
                copy = self._wcopy[name] = np.empty_like(store[name])
            np.copyto(copy, store[name])
        start = self._from
        try:
            self.settle(store)
            yield
        finally:
            for name in self._shapes or {}:
                np.copyto(store[name], self._wcopy[name])
            self._from = start

    def settle(self, store: ParamStore) -> None:
        """Add the pending sum into the 2-D weights, W += P V^T (one pass over each).

        The next step's record says where its pending sum began ("from"), so replay adds P
        at the same points and gives the same bits."""
        if self._from is None:
            return
        self._prepare(store)
        v_all = self._v_all(self._period(self._from))
        for name, (p, v) in self._views(self._acc, v_all, self.options.rank).items():
            self._update(store[name], p, v)
        self._from = None

    def _update(self, w: np.ndarray, cu: np.ndarray, v: np.ndarray) -> None:
        """w += cu V^T in place with the configured engine."""
        vt = np.ascontiguousarray(v.T)
        engine = self.update_engine()
        if engine is None:
            rank_update(w, cu, vt, threads=self.threads, exact=self._exact)
        else:
            engine(w, cu, vt)

    def update_engine(self) -> Any:
        """The onnxruntime engine the `update` option asks for, or None for numpy's.

        "auto" takes it only where its bits are numpy's (exact factors; each weight's first
        update is compared with ==, and a difference sends every later update to numpy)."""
        mode = self.options.update
        if mode == "numpy" or (mode == "auto" and not self._exact):
            return None
        if self._engine is None:
            from edgelearn.backends.ort_rank_update import OrtRankUpdate

            installed = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
            self._engine = OrtRankUpdate(self.options.threads, same_as=(
                self._numpy_update if mode == "auto" else None)) if (
                installed or mode == "onnxruntime") else False  # auto on LiteRT-only devices
        if self._engine is False or self._engine.unequal:
            return None
        return self._engine

    def _numpy_update(self, w: np.ndarray, cu: np.ndarray, vt: np.ndarray) -> None:
        rank_update(w, cu, vt, threads=self.threads, exact=self._exact)

    def _write_dense(self, theta: np.ndarray, z: np.ndarray, coef: np.float32) -> None:
        """The dense part of theta = its pre-step copy + coef z."""
        o = 0
        for a, b in self._dense:
            n = b - a
            np.add(self._dcopy[o : o + n], coef * z[o : o + n], out=theta[a:b])
            o += n

    def _population(self, store: ParamStore, theta: np.ndarray, z: np.ndarray,
                    factors: dict[str, tuple[np.ndarray, np.ndarray]]) -> LowRankPopulation:
        """The two probes theta +- eps Z (order +, -), on top of the pending sum."""
        e32, r = np.float32(self.options.eps), self.options.rank
        scales = (e32, -e32)

        def prepare(j: int) -> None:
            self._write_dense(theta, z, scales[j])

        def place(j: int) -> None:  # dense fallback: W = copy + (P + s U) V^T in numpy
            prepare(j)
            if not self._placed:
                for name in factors:
                    copy = self._wcopy.get(name)
                    if copy is None:
                        copy = self._wcopy[name] = np.empty_like(store[name])
                    np.copyto(copy, store[name])
                self._placed = True
            for name, (pu, vv) in factors.items():
                u = pu[:, r:] * scales[j] + pu[:, :r]
                rank_update(store[name], u, np.ascontiguousarray(vv[:, :r].T),
                            self._wcopy[name], self.threads, self._exact)

        def fill(out: dict[str, np.ndarray], lo: int, hi: int) -> None:
            for j in range(lo, hi):
                place(j)
                out["float32"][j - lo, : theta.size] = theta

        zs, o = {}, 0
        for name, (a, b) in zip(self._dense_names, self._dense, strict=True):
            zs[name], o = z[o : o + b - a], o + b - a
        return LowRankPopulation(2, place, fill, factors=factors, dense=zs,
                                 scales=tuple(float(s) for s in scales), prepare=prepare)

    def _step(self, store: ParamStore, *, defer: bool = False,
              **extra: Any) -> Generator[Any, Any, dict[str, Any]]:
        """One step (module docstring). `defer`: leave W += c U V^T in the pending sum P
        (the caller calls `settle` before anything else reads the weights)."""
        theta = self._prepare(store)
        t, eps = self.t, self.options.eps
        tv = self._period(t)
        if self._from is not None and self._period(self._from) != tv:
            self.settle(store)  # V changes: the period's sum goes into the weights first
        start = t if self._from is None else self._from
        u_all, v_all = self._draw(t)
        factors = self._graph_factors(u_all, v_all, tv)
        z = self.noise.fill(np.empty(self._dcopy.size, np.float32), run_seed=self.seed,
                            step=t, probe=2, start=0)
        o = 0
        for a, b in self._dense:
            self._dcopy[o : o + b - a] = theta[a:b]
            o += b - a
        self._placed = False
        lp, lm = yield self._population(store, theta, z, factors)
        o = 0
        for a, b in self._dense:  # the dense part back exactly
            theta[a:b] = self._dcopy[o : o + b - a]
            o += b - a
        if self._placed:
            for name in factors:
                np.copyto(store[name], self._wcopy[name])
        finite = math.isfinite(lp) and math.isfinite(lm)
        g = (lp - lm) / (2.0 * eps) if finite else 0.0
        lr = self.lr_at(t)
        record: dict[str, Any] = {"seeds": [self.seed, t, tv], "g": g, "lr": lr, "eps": eps,
                                  "accepted": finite}
        if start != t:
            record["from"] = start
        if finite:
            c = np.float32(-(lr * g))
            self._write_dense(theta, z, c)
            if self._from is None:  # P = c U: settled at once, the bits of W += (c U) V^T
                np.multiply(u_all, c, out=self._acc)
            else:
                self._acc += c * u_all
            self._from = start
        if not defer:
            self.settle(store)
        return record

    def replay(self, store: ParamStore, record: dict[str, Any], **extra: Any) -> None:
        """`Optimizer.replay`; the pending sum goes into the weights where training put it
        (before a record whose "from" differs from it). With defer=True (a journal's
        replay) the last step's sum may stay pending: call `settle` before reading."""
        step = record.get("step")
        if self._from is not None and record.get("from", step) != self._from:
            self.settle(store)
        super().replay(store, record, **extra)

    def state_dict(self) -> dict[str, Any]:
        """Counters, and the pending sum with the step it began at (when one is pending)."""
        state = super().state_dict()
        if self._from is not None:
            state["pending_from"] = self._from
            state["pending"] = encode_array(self._acc)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output (a pending sum is checked against the store at the
        next step or settle)."""
        super().load_state_dict(state)
        start = state.get("pending_from")
        if start is None:
            self._from = None
            return
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < self.t:
            raise InputError(f"bad pending_from in lozo state: {start!r}")
        acc = decode_array(state.get("pending"), "lozo pending sum")
        if not np.isfinite(acc).all():
            raise InputError("lozo state holds a non-finite pending sum")
        self._acc, self._from = acc, start
