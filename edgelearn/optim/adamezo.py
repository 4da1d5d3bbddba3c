"""AdaMeZO-style ZO-Adam: Adam moments of the SPSA gradient estimate, rebuilt by replay.

Cai, Chen and Zhu 2026, "AdaMeZO: Adam-style Zeroth-Order Optimizer for LLM Fine-tuning
Without Maintaining the Moments" (arXiv 2605.00650), after Kingma and Ba 2015 (Adam) and
Malladi et al. 2023 (MeZO). Per step t, with q probes z_k = z(seed, t, k) (`edgelearn.rng`):
    g_k = (L(theta + eps z_k) - L(theta - eps z_k)) / (2 eps),   g = (1/q) sum_k g_k z_k
    m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g * g            (u = accepted updates)
    theta <- theta - lr_t (m / (1 - b1^u)) / (sqrt(v / (1 - b2^u)) + adam_eps)
The moments are a deterministic function of the journal (each record's seeds and g_k): the
paper avoids storing them by re-summing a truncated horizon of cached seeds and scalars; here
they are kept as two float32 buffers (O(1) passes per step instead of O(horizon)) and replay,
which re-runs every step from the recorded losses, rebuilds them exactly. `state_dict` carries
them (base64 float32) so a checkpoint resumes bit-exactly. The 2q candidates of a step are
one `Population` request (one runtime call with a population graph), written from a copy of
the trainable slice, so the weights after a step are the rule in float32. A non-finite loss
rejects the step: weights restored exactly, moments unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelearn.errors import InputError
from edgelearn.optim.base import Optimizer, register
from edgelearn.optim.options import OptimizerOptions, check, meta
from edgelearn.optim.zo_fields import (
    check_lr_eps,
    check_noise_fields,
    chunk_field,
    copy_restore_field,
    pool_size_field,
    scaled_lr,
    schedule_field,
    total_steps_field,
)
from edgelearn.optim.zo_probe import ProbeArena, decode_array, encode_array
from edgelearn.params import ParamStore
from edgelearn.rng import NOISE_KINDS, Noise


@dataclass(frozen=True)
class AdaMeZOOptions(OptimizerOptions):
    """Options of adamezo (the update rule is in the module docstring)."""

    lr: float = field(default=0.01, metadata=meta(
        "learning rate (base value of the schedule)", cli="--lr"))
    eps: float = field(default=1e-3, metadata=meta(
        "perturbation scale (units of the weights)", cli="--eps"))
    probes: int = field(default=1, metadata=meta(
        "two-sided probes per step (q); a step costs 2q forwards", cli="--probes"))
    beta1: float = field(default=0.9, metadata=meta(
        "decay of the first moment (0 <= beta1 < 1)", cli="--beta1"))
    beta2: float = field(default=0.99, metadata=meta(
        "decay of the second moment (0 <= beta2 < 1)", cli="--beta2"))
    adam_eps: float = field(default=1e-8, metadata=meta(
        "added to sqrt(v) in the denominator (> 0)"))
    noise: str = field(default="rademacher", metadata=meta(
        "rademacher, gaussian (as in AdaMeZO) or pool", cli="--noise", choices=NOISE_KINDS))
    schedule: str = schedule_field()
    total_steps: int | None = total_steps_field()
    restore: str = copy_restore_field("adamezo")
    chunk: int = chunk_field()
    pool_size: int = pool_size_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lr_eps(self.lr, self.eps)
        check(self.probes >= 1, f"probes must be an integer >= 1, got {self.probes!r}")
        check(0 <= self.beta1 < 1, f"beta1 must lie in [0, 1), got {self.beta1}")
        check(0 <= self.beta2 < 1, f"beta2 must lie in [0, 1), got {self.beta2}")
        check(self.adam_eps > 0 and math.isfinite(self.adam_eps),
              f"adam_eps must be a finite number > 0, got {self.adam_eps}")
        check_noise_fields(self.schedule, self.total_steps, self.chunk, self.pool_size)


@register
class AdaMeZO(Optimizer):
    """ZO-Adam with journal-rebuilt moments over the trainable float32 slice of a ParamStore.

    Args:
        **options: `AdaMeZOOptions` fields (lr, eps, probes, beta1, beta2, ..., seed).
    """

    name = "adamezo"
    Options = AdaMeZOOptions
    supports_lr_scale = True
    options: AdaMeZOOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        self.arena = ProbeArena(Noise(o.noise, pool_size=o.pool_size, pool_seed=o.seed),
                                o.chunk, self.name)
        self.m: np.ndarray | None = None  # moments, allocated at the first step (or loaded)
        self.v: np.ndarray | None = None
        self.updates = 0  # accepted moment updates (Adam's bias-correction count)

    def memory_bytes(self, store: ParamStore) -> int:
        """Copy, two moments and the gradient buffer (4 x n float32) + signs + chunks."""
        n, o = store.n_trainable("float32"), self.options
        return self.arena.step_bytes(n, o.probes, o.pool_size) + 12 * n

    def population_size(self, store: ParamStore) -> int:
        """The 2K probe points theta +- eps z_k."""
        return 2 * self.options.probes

    def lr_at(self, t: int) -> float:
        """Learning rate of step t under the schedule, times `lr_scale` (divergence rollback)."""
        return scaled_lr(self.options, t, self.lr_scale)

    def _moments(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.m is None or self.v is None:
            self.m, self.v = np.zeros(n, np.float32), np.zeros(n, np.float32)
        elif self.m.size != n:
            raise InputError(f"optimizer moments have {self.m.size} elements, the store's "
                             f"trainable slice {n}")
        return self.m, self.v

    def _step(self, store: ParamStore, **extra: Any) -> Generator[Any, Any, dict[str, Any]]:
        theta = self.arena.begin(store)
        copy = self.arena.copy
        assert copy is not None
        t, eps = self.t, self.options.eps
        e32 = np.float32(eps)
        seeds = [(self.seed, t, k) for k in range(self.options.probes)]
        cands = [[(sign * e32, key)] for key in seeds for sign in (1, -1)]
        evals = yield self.arena.population(theta, cands)
        lr = self.lr_at(t)
        record: dict[str, Any] = {"seeds": [list(s) for s in seeds], "lr": lr, "eps": eps}
        if not all(math.isfinite(v) for v in evals):  # reject: weights and moments kept
            np.copyto(theta, copy)
            return {**record, "g": [0.0] * len(seeds), "accepted": False}
        gs = [(evals[2 * k] - evals[2 * k + 1]) / (2.0 * eps) for k in range(len(seeds))]
        self._adam(theta, copy, gs, seeds, lr)
        return {**record, "g": gs, "accepted": True}

    def _adam(self, theta: np.ndarray, copy: np.ndarray, gs: list[float],
              seeds: list[tuple[int, int, int]], lr: float) -> None:
        """Moments from the step's estimate, then theta = copy - lr * mhat / (sqrt(vhat) + d)."""
        o = self.options
        m, v = self._moments(theta.size)
        q = len(seeds)
        g = np.zeros_like(theta)
        self.arena.combine(g, g, [(np.float32(gk / q), key) for gk, key in zip(gs, seeds,
                                                                             strict=True)])
        self.updates += 1
        b1, b2 = np.float32(o.beta1), np.float32(o.beta2)
        m *= b1
        m += np.float32(1.0 - o.beta1) * g
        np.multiply(g, g, out=g)
        v *= b2
        v += np.float32(1.0 - o.beta2) * g
        # g is reused as the update's buffer: sqrt(v / c2) + d, then step = m / c1 / that
        np.multiply(v, np.float32(1.0 / (1.0 - o.beta2 ** self.updates)), out=g)
        np.sqrt(g, out=g)
        g += np.float32(o.adam_eps)
        np.divide(m, g, out=g)
        g *= np.float32(-lr / (1.0 - o.beta1 ** self.updates))
        np.add(copy, g, out=theta)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters plus the moments (base64 float32) and the accepted-update count."""
        state = super().state_dict()
        state["updates"] = self.updates
        if self.m is not None and self.v is not None:
            state["m"], state["v"] = encode_array(self.m), encode_array(self.v)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        updates = state.get("updates", 0)
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise InputError(f"bad updates count in optimizer state: {updates!r}")
        self.updates = updates
        if "m" in state or "v" in state:
            m, v = decode_array(state.get("m"), "m"), decode_array(state.get("v"), "v")
            if m.size != v.size:
                raise InputError("optimizer moments m and v differ in size")
            self.m, self.v = m, v
        else:
            self.m = self.v = None
