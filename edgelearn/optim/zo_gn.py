"""zo-gn: forward-only Gauss-Newton steps in a random subspace, from finite differences of the
model's outputs.

Cartis & Roberts 2023, "Scalable subspace methods for derivative-free nonlinear least-squares
optimization" (Math. Programming; DFBGN: Gauss-Newton in random subspaces from a
derivative-free Jacobian model); Schraudolph 2002, "Fast curvature matrix-vector products for
second-order gradient descent" (the generalized Gauss-Newton matrix of a loss over outputs);
Gower et al. 2019, "RSN: Randomized Subspace Newton" (NeurIPS; Newton steps in sketched
subspaces); Marquardt 1963, "An algorithm for least-squares estimation of nonlinear
parameters" (SIAM J. Appl. Math.; the damping scaled by the curvature's diagonal). A ZO-SGD
probe keeps one number of each forward (the loss); this keeps the model's outputs (logits
[batch, classes]), which carry batch x classes numbers per forward: enough to build the
curvature of the loss in the probed subspace as well as its gradient.

Per step t, with K probes z_k = z(seed, t, k) (Rademacher +-1 by default, `edgelearn.rng`)
and outputs f(theta) on the step's batch (loss l(f), cross-entropy, mse or bce; for bce the
outputs are sigmoid probabilities, taken to logits log(p / (1 - p)) after bce's clipping,
where bce is two-class cross-entropy):
    J_k = (f(theta + eps z_k) - f(theta)) / eps        the Jacobian along z_k (forward diff.)
    g_k = <J_k, dl/df>,  G_kj = <J_k, H J_j>  (H = d2l/df2: softmax covariance for
                                                cross-entropy, p (1 - p) for bce, 2/m I
                                                for mse)
    a = solve(G + lambda_t D, g),  D = diag(max(G_kk, c tr(G) / K))   (c = 1e-3)
    a <- a min(1, trust / r),  r = RMS over the batch's outputs of sum_k a_k J_k
                                   (mse: over the RMS of the outputs' error)
    theta' = theta - lr_t sum_k a_k z_k
then one forward more, l(f(theta')) on the same batch: the step is kept when it is not worse
than l(f(theta)), else undone (weights restored exactly). lambda_t is the Levenberg-Marquardt
damping: `damping` at first, x4 after an undone step, halved back towards `damping` after a
kept one (never below it: on minibatches a smaller damping fits the batch instead of the
task). D is Marquardt's scaling: each direction is damped in proportion to its own curvature
(floored at c times the mean, so a direction the outputs barely see is not divided by ~0), so
lambda is scale-free: the same value suits a 650-weight head (curvature ~0.06 per weight) and
a 4.35M-weight MLP (~1e-4), where a damping per unit-norm direction (D = n I, n trainable
weights: |z_k|^2 = n; `damping_scale` "weights", the first version's) wants values 100x
apart (benchmarks/bench_zo_gn_scale.py). The trust region bounds the step's predicted change
of the outputs (Conn, Gould & Toint 2000, "Trust-Region Methods"; here in output space, as
TRPO bounds a policy's change, Schulman et al. 2015): the softmax covariance vanishes on an
example the model gets confidently wrong, so G and D vanish while g does not, and the damped
step alone would move the logits without limit: fed one sample at a time (batch 1) such a
step fitted the sample and wrecked the model (held-out accuracy 0.43 -> 0.09 on the demo).
A step costs K + 2 forwards; the K + 1 candidates theta and theta + eps z_k are one
`Population` request, so a backend with a population graph computes their outputs in ONE
runtime call.

Restore (`restore`): "copy" ("auto") keeps the unperturbed slice in a copy and writes the
candidates and the update from it, so the weights after a step are exactly the update applied
in float32. "drift" keeps no copy, for slices too large to hold twice (memory about the
inference's; `train` picks it above 64 MiB): as MeZO (Malladi et al. 2023) it moves the
weights in place, theta + eps z_0, then from each probe to the next (-eps z_k + eps z_{k+1},
one pass), and after the solve back by -eps z_{K-1} fused with the update in one pass (an
undone step: its terms negated, one pass more). float32 does not give theta back exactly
after +eps z - eps z; replay repeats the same passes, so the drift is reproduced bit-exactly.
Each candidate is then one forward of the model (no population graph: its rows would be a
copy).

In float64 numpy from the float32 outputs. The journal record holds (seeds, a, lr, eps,
damping, loss, accepted) and the check's loss under "evals"; replay applies the recorded a
with the same float32 operations as training (no data, no forwards: the solve is not
repeated), bit-exact, and re-derives lambda_t from the records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelearn.errors import EdgelearnError, InputError
from edgelearn.losses import BCE_EPS, binary_cross_entropy, cross_entropy, mse
from edgelearn.optim.base import Forward, Optimizer, Population, register
from edgelearn.optim.options import OptimizerOptions, check, meta
from edgelearn.optim.zo_fields import (
    check_lr_eps,
    check_noise_fields,
    check_trust,
    chunk_field,
    pool_size_field,
    scaled_lr,
    schedule_field,
    total_steps_field,
    trust_field,
)
from edgelearn.optim.zo_probe import ProbeArena, Term
from edgelearn.params import ParamStore
from edgelearn.rng import NOISE_KINDS, Noise

#: damping factor after an undone step (Levenberg-Marquardt's usual increase)
DAMPING_UP = 4.0
#: what the damping multiplies (module docstring)
DAMPING_SCALES = ("curvature", "weights")
#: a direction's curvature counts as at least this fraction of the mean (Marquardt's scaling)
CURVATURE_FLOOR = 1e-3
#: the objectives (loss names) whose Gauss-Newton system `loss_derivatives` builds
OBJECTIVES = ("cross-entropy", "mse", "bce")
#: restore policies (module docstring); "auto" is "copy"
RESTORES = ("auto", "copy", "drift")


@dataclass(frozen=True)
class ZOGNOptions(OptimizerOptions):
    """Options of zo-gn (the update rule is in the module docstring)."""

    lr: float = field(default=1.0, metadata=meta(
        "fraction of the damped Gauss-Newton step taken", cli="--lr"))
    eps: float = field(default=1e-3, metadata=meta(
        "finite-difference step along each probe (units of the weights)", cli="--eps"))
    probes: int = field(default=16, metadata=meta(
        "directions K of the subspace per step; a step costs K + 2 forwards",
        cli="--probes"))
    damping: float = field(default=3.0, metadata=meta(
        "Levenberg-Marquardt damping relative to each direction's curvature (its floor: "
        "raised x4 after an undone step)", cli="--damping"))
    trust: float | None = trust_field()
    damping_scale: str = field(default="curvature", metadata=meta(
        "what the damping multiplies: curvature (Marquardt: each direction's own) or "
        "weights (the trainable count: per unit-norm direction)", choices=DAMPING_SCALES,
        legacy="weights"))
    noise: str = field(default="rademacher", metadata=meta(
        "rademacher, gaussian or pool", cli="--noise", choices=NOISE_KINDS))
    schedule: str = schedule_field()
    total_steps: int | None = total_steps_field()
    restore: str = field(default="auto", metadata=meta(
        "copy (auto): candidates and update written from a copy of the trainable slice; "
        "drift: in place, no copy (memory of the inference; the float32 drift of "
        "+eps z - eps z is replayed bit-exactly)", cli="--restore", choices=RESTORES))
    chunk: int = chunk_field()
    pool_size: int = pool_size_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lr_eps(self.lr, self.eps)
        check(self.probes >= 1, f"probes must be an integer >= 1, got {self.probes!r}")
        check(math.isfinite(self.damping) and self.damping > 0,
              f"damping must be a finite number > 0, got {self.damping!r}")
        check_trust(self.trust)
        check_noise_fields(self.schedule, self.total_steps, self.chunk, self.pool_size)


def gauss_newton_system(out: np.ndarray, y: Any, loss_fn: Callable[..., float], eps: float
                        ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """(G [K, K], g [K], loss at the unperturbed point, Q [K, K]) of one step, float64; Q is
    the outputs' Gram matrix J J^T / m (m outputs): a^T Q a is the mean square of the
    outputs' change sum_k a_k J_k, in logits (cross-entropy, bce) or in units of the
    outputs' RMS error (mse: J J^T / (m loss), so the trust region does not depend on the
    targets' scale).

    Args:
        out: outputs of theta and its K probes, [K + 1, batch, ...] (float).
        y: the batch's targets: int labels [batch] (cross-entropy on logits [batch, classes]),
            0/1 labels or target probabilities [batch] (bce on one sigmoid probability per
            example, [batch] or [batch, 1]) or targets of the output's shape (mse).
        loss_fn: `edgelearn.losses.cross_entropy`, `binary_cross_entropy` or `mse`.
        eps: the probes' finite-difference step.
    """
    o = np.asarray(out, np.float64)
    if loss_fn is binary_cross_entropy:  # in logits, where bce is two-class cross-entropy
        p = np.clip(o.reshape(len(o), -1), BCE_EPS, 1.0 - BCE_EPS)
        o = np.log(p) - np.log1p(-p)
    f0 = o[0]
    jac = (o[1:] - f0) / eps  # [K, batch, ...]
    resid, hj = loss_derivatives(f0, jac, y, loss_fn)
    k = len(jac)
    flat, hflat = jac.reshape(k, -1), hj.reshape(k, -1)
    loss = loss_fn(out[0], y)
    unit = max(loss, 1e-30) if loss_fn is mse else 1.0  # mse: the mean square error
    return (flat @ hflat.T, flat @ resid.reshape(-1), loss,
            flat @ flat.T / (flat.shape[1] * unit))


def loss_derivatives(f0: np.ndarray, jac: np.ndarray, y: Any, loss_fn: Callable[..., float]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(dl/df at f0, H J_k for every k) of the batch's mean loss over outputs f0 (float64;
    logits for cross-entropy and bce); H = d2l/df2 (Schraudolph 2002's GGN)."""
    b = len(f0)
    if loss_fn is cross_entropy:
        p = np.exp(f0 - f0.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        resid = p.copy()
        resid[np.arange(b), np.asarray(y)] -= 1.0
        pj = p * jac
        return resid / b, (pj - p * pj.sum(axis=-1, keepdims=True)) / b  # softmax covariance
    if loss_fn is binary_cross_entropy:
        s = 1.0 / (1.0 + np.exp(-f0))  # the clipped probabilities back
        t = np.asarray(y, np.float64).reshape(b)
        return (s - t) / b, s * (1.0 - s) * jac / b
    if loss_fn is mse:
        m = f0.size
        return 2.0 * (f0 - np.asarray(y, np.float64).reshape(f0.shape)) / m, 2.0 * jac / m
    raise InputError("zo-gn supports the cross_entropy, binary_cross_entropy and mse losses")


def marquardt_scale(G: np.ndarray) -> np.ndarray:
    """Marquardt's damping scale of a Gauss-Newton system [K, K]: its diagonal, each entry
    floored at CURVATURE_FLOOR times their mean (float64 [K])."""
    d = np.diag(G)
    return np.maximum(d, CURVATURE_FLOOR * float(np.mean(d)))


def gauss_newton_step(G: np.ndarray, g: np.ndarray, damping: float | np.ndarray) -> np.ndarray:
    """a = solve(G + diag(damping), g) (float64 [K]; a scalar damping: times I); zeros when
    the system is singular."""
    try:
        return np.linalg.solve(G + np.diag(np.broadcast_to(damping, g.shape)), g)
    except np.linalg.LinAlgError:
        return np.zeros(len(g))


def trust_scaled(a: np.ndarray, Q: np.ndarray, trust: float | None) -> np.ndarray:
    """`a` scaled down so that the RMS of the outputs' predicted change, sqrt(a^T Q a), is at
    most `trust` (a itself when it is, or when trust is None)."""
    big = float(np.max(np.abs(a))) if a.size else 0.0
    if trust is None or not 0.0 < big < math.inf:
        return a
    u = a / big  # a^T Q a of a huge a would overflow to inf (and zero the step)
    r = big * math.sqrt(max(float(u @ Q @ u), 0.0))
    return a if r <= trust else a * (trust / r)


def _kept(record: dict[str, Any]) -> bool:
    """Whether a step with this record's losses keeps its update (the check's loss under
    "evals" not above the record's "loss"; a step without a finite loss keeps nothing)."""
    l0, evals = record.get("loss"), record.get("evals")
    if not isinstance(l0, int | float) or not isinstance(evals, list) or len(evals) != 1:
        return False
    return isinstance(evals[0], int | float) and math.isfinite(evals[0]) and evals[0] <= l0


@register
class ZOGN(Optimizer):
    """Forward-only Gauss-Newton in random subspaces over the trainable float32 slice.

    Args:
        **options: `ZOGNOptions` fields (lr, eps, probes, damping, noise, ..., seed).
    """

    name = "zo-gn"
    Options = ZOGNOptions
    needs = "outputs"
    supports_lr_scale = True
    replay_hint = "corrupt, or written with other settings"
    options: ZOGNOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        self.arena = ProbeArena(Noise(o.noise, pool_size=o.pool_size, pool_seed=o.seed),
                                o.chunk, self.name, lean=o.restore == "drift")
        #: the damping of the next step (lambda_t)
        self.damping_now = o.damping

    @property
    def drift(self) -> bool:
        """True when candidates and update are written in place (restore "drift")."""
        return self.options.restore == "drift"

    def memory_bytes(self, store: ParamStore) -> int:
        """The pre-step copy (not under drift) + packed signs of every probe + chunk
        buffers."""
        n, o = store.n_trainable("float32"), self.options
        return self.arena.step_bytes(n, o.probes, o.pool_size, copy=not self.drift)

    def example_bytes(self, output_numel: int) -> int:
        """The K + 1 candidates' float32 outputs (each copied once as they are stacked) and
        the float64 system built from them (the outputs, the Jacobian, the curvature
        products and the residual)."""
        k = self.options.probes
        return output_numel * (2 * 4 * (k + 1) + 8 * (4 * k + 2))

    def population_size(self, store: ParamStore) -> int:
        """theta and its K probes (one at a time under drift)."""
        return 1 if self.drift else self.options.probes + 1

    def lr_at(self, t: int) -> float:
        """The step fraction of step t under the schedule, times `lr_scale` (divergence
        rollback)."""
        return scaled_lr(self.options, t, self.lr_scale)

    def state_dict(self) -> dict[str, Any]:
        """Counters and the damping of the next step."""
        return {**super().state_dict(), "damping_now": self.damping_now}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output."""
        super().load_state_dict(state)
        lam = state.get("damping_now")
        if not (isinstance(lam, int | float) and math.isfinite(lam)
                and lam >= self.options.damping):
            raise InputError(f"bad damping_now in optimizer state: {lam!r}")
        self.damping_now = float(lam)

    def _advance(self, accepted: bool) -> None:
        """lambda_{t+1} from lambda_t and whether step t was kept."""
        lam = self.damping_now
        self.damping_now = max(self.options.damping, lam / 2) if accepted else lam * DAMPING_UP

    def _terms(self, a: list[float], seeds: list[tuple[int, int, int]], lr: float
               ) -> list[Term]:
        """The update's terms -lr a_k z_k, coefficients rounded to float32 as in training."""
        return [(np.float32(-(lr * ak)), key) for ak, key in zip(a, seeds, strict=True)]

    def _step(self, store: ParamStore, **extra: Any) -> Generator[Any, Any, dict[str, Any]]:
        outputs = extra.get("outputs")
        if outputs is None:
            raise InputError("zo-gn needs the model outputs of its probes: train it with a "
                             "Session (or step(..., outputs=Forwards.outputs))")
        theta = self.arena.begin(store, copy=not self.drift)
        t, o = self.t, self.options
        seeds = [(self.seed, t, k) for k in range(o.probes)]
        if self.drift:
            out, y, loss_fn = yield from self._drift_outputs(theta, seeds, outputs)
        else:
            pop = self.arena.population(theta, [[], *([(np.float32(o.eps), key)]
                                                       for key in seeds)])
            out, y, loss_fn = yield Forward(lambda: outputs(pop), forwards=pop.size)
        lam, lr = self.damping_now, self.lr_at(t)
        record: dict[str, Any] = {"seeds": [list(s) for s in seeds], "lr": lr,
                                  "eps": o.eps, "damping": lam}
        G, g, l0, Q = gauss_newton_system(out, y, loss_fn, o.eps)
        scale = marquardt_scale(G) if o.damping_scale == "curvature" else theta.size
        a = trust_scaled(gauss_newton_step(G, g, lam * scale), Q, o.trust)
        if not (math.isfinite(l0) and np.isfinite(a).all()):  # reject: weights back
            self._move(theta, seeds, None, lr)
            self._advance(False)
            return {**record, "a": [0.0] * len(seeds), "loss": None, "accepted": False}
        a_list = [float(v) for v in a]
        self._move(theta, seeds, a_list, lr)
        l_new = yield  # the step's check: the loss after it, on the same batch
        kept = math.isfinite(l_new) and l_new <= l0
        if not kept:
            self._undo(theta, seeds, a_list, lr)
        self._advance(kept)
        return {**record, "a": a_list, "loss": l0, "accepted": kept}

    def _drift_outputs(self, theta: np.ndarray, seeds: list[tuple[int, int, int]],
                       outputs: Callable[[Population], Any]) -> Generator[Any, Any, Any]:
        """(outputs [K + 1, ...], y, loss_fn) of theta and its K probes written in place one
        after the other (theta is left at the last probe: `_move` takes it back)."""
        rows: list[np.ndarray] = []
        for k in range(len(seeds) + 1):
            if k:
                self._to_probe(theta, seeds, k - 1)
            out, y, loss_fn = yield Forward(lambda: outputs(Population(1, _in_place)))
            rows.append(np.asarray(out)[0])
        return np.stack(rows), y, loss_fn

    def _to_probe(self, theta: np.ndarray, seeds: list[tuple[int, int, int]], k: int) -> None:
        """Under drift: theta from probe k - 1 (theta itself for k = 0) to probe k, one pass."""
        e32 = np.float32(self.options.eps)
        self.arena.combine(theta, theta, [*([(-e32, seeds[k - 1])] if k else []),
                                          (e32, seeds[k])])

    def _move(self, theta: np.ndarray, seeds: list[tuple[int, int, int]],
              a: list[float] | None, lr: float) -> None:
        """The step's update (a None: none): from the copy, or under drift from the last
        probe, whose -eps z_{K-1} is fused with the update's terms in one pass."""
        terms = self._terms(a, seeds, lr) if a is not None else []
        if not self.drift:
            assert self.arena.copy is not None
            if terms:
                self.arena.combine(theta, self.arena.copy, terms)
            else:
                np.copyto(theta, self.arena.copy)
            return
        self.arena.combine(theta, theta, [(-np.float32(self.options.eps), seeds[-1]), *terms])

    def _undo(self, theta: np.ndarray, seeds: list[tuple[int, int, int]], a: list[float],
              lr: float) -> None:
        """Take back an update the check refused: the copy, or under drift its terms
        negated (one pass; replay repeats it)."""
        if not self.drift:
            assert self.arena.copy is not None
            np.copyto(theta, self.arena.copy)
            return
        self.arena.combine(theta, theta, [(-c, key) for c, key in self._terms(a, seeds, lr)])

    def replay(self, store: ParamStore, record: dict[str, Any], **extra: Any) -> None:
        """Apply a journal record: its a with the float32 operations of training (no data, no
        forwards); InputError when the record does not fit this run's settings and steps."""
        step, a = record.get("step"), record.get("a")
        o = self.options
        if self._gen is not None:
            raise EdgelearnError("cannot replay in the middle of a step")
        ok = (isinstance(step, int) and not isinstance(step, bool) and step >= 0
              and isinstance(a, list) and len(a) == o.probes
              and all(isinstance(v, int | float) and not isinstance(v, bool)
                      and math.isfinite(v) for v in a)
              and isinstance(record.get("accepted"), bool))
        if not ok:
            raise InputError(f"malformed {self.name} journal record (step {step!r})")
        seeds = [(self.seed, step, k) for k in range(o.probes)]
        lr = self.lr_at(step)
        if record.get("seeds") != [list(s) for s in seeds] or record.get("lr") != lr \
                or record.get("eps") != o.eps or record.get("damping") != self.damping_now \
                or record["accepted"] != _kept(record):
            raise InputError(f"journal record of step {step} does not reproduce: "
                             f"{self.replay_hint}")
        self.t = step
        theta = self.arena.begin(store, copy=not self.drift)
        for k in range(len(seeds) if self.drift else 0):  # the probes' passes, as trained
            self._to_probe(theta, seeds, k)
        solved = record.get("loss") is not None  # else rejected before any update
        if self.drift or record["accepted"]:
            self._move(theta, seeds, a if solved else None, lr)
        if self.drift and solved and not record["accepted"]:
            self._undo(theta, seeds, a, lr)
        self._advance(record["accepted"])
        self.t = step + 1


def _in_place(j: int) -> None:
    """`Population.place` of a candidate that is already in the weights (drift probes)."""
