"""FZOO: batched one-sided Rademacher probes with a step normalised by the losses' spread.

Dang et al., ICLR 2026, "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language
Models towards Adam-Scale Speed" (reference code DKmiyan/FZOO `trainer.py`, read, not copied).
Per step t, with K probes z_k = z(seed, t, k) (Rademacher +-1 by default, `edgelearn.rng`):
    L_0 = L(theta),  L_k = L(theta + eps z_k)  (k < K),  sigma = std(L_1..L_K)  (ddof 0)
    g_k = (L_k - L_0) / (K sigma)
    theta <- theta - lr_t sum_k g_k z_k
Dividing by sigma (about eps |grad| on a smooth loss) makes the step size adaptive: it is
roughly lr times a unit direction whatever the loss scale, like normalized SGD. The K + 1
candidates (theta and its K probes) are one `Population` request, so a backend with a
population graph scores them in ONE runtime call; otherwise they are K + 1 plain forwards
(the same numbers). The unperturbed trainable slice is kept in a copy: candidates and the
update are written from it, so after a step the weights are exactly the rule in float32.
When sigma is 0 (all probes tie) the step moves nothing; a non-finite loss rejects the step
(weights restored exactly). The journal record holds (seeds, g, sigma, lr, eps, losses); replay
re-runs the step with the recorded losses (no data, no forwards) and is bit-exact.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
from edgelearn.optim.zo_probe import ProbeArena, Term
from edgelearn.params import ParamStore
from edgelearn.rng import NOISE_KINDS, Noise


@dataclass(frozen=True)
class FZOOOptions(OptimizerOptions):
    """Options of fzoo (the update rule is in the module docstring)."""

    # defaults tuned on the demo's head at a 3000-forward budget (benchmarks/bench_zo_methods.py)
    lr: float = field(default=0.1, metadata=meta(
        "learning rate (base value of the schedule; the step is normalised by the spread of "
        "the probe losses)", cli="--lr"))
    eps: float = field(default=1e-3, metadata=meta(
        "perturbation scale (units of the weights)", cli="--eps"))
    probes: int = field(default=8, metadata=meta(
        "one-sided probes per step (K >= 2); a step costs K + 1 forwards, one runtime call "
        "with a population graph", cli="--probes"))
    noise: str = field(default="rademacher", metadata=meta(
        "rademacher (as in FZOO), gaussian or pool", cli="--noise", choices=NOISE_KINDS))
    schedule: str = schedule_field()
    total_steps: int | None = total_steps_field()
    restore: str = copy_restore_field("fzoo")
    chunk: int = chunk_field()
    pool_size: int = pool_size_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lr_eps(self.lr, self.eps)
        check(self.probes >= 2, f"probes must be an integer >= 2 (sigma needs two losses), "
              f"got {self.probes!r}")
        check_noise_fields(self.schedule, self.total_steps, self.chunk, self.pool_size)


def fzoo_coefficients(l0: float, losses: list[float]) -> tuple[list[float], float]:
    """(g_k, sigma) of one FZOO step from the unperturbed and the K probe losses (float64)."""
    sigma = float(np.std(np.asarray(losses, np.float64)))
    k = len(losses)
    if sigma == 0.0:  # every probe tied: no direction to prefer
        return [0.0] * k, sigma
    return [(lk - l0) / (k * sigma) for lk in losses], sigma


@register
class FZOO(Optimizer):
    """FZOO over the trainable float32 slice of a ParamStore.

    Args:
        **options: `FZOOOptions` fields (lr, eps, probes, noise, schedule, ..., seed).
    """

    name = "fzoo"
    Options = FZOOOptions
    supports_lr_scale = True
    options: FZOOOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        self.arena = ProbeArena(Noise(o.noise, pool_size=o.pool_size, pool_seed=o.seed),
                                o.chunk, self.name)

    def memory_bytes(self, store: ParamStore) -> int:
        """The pre-step copy + packed signs of every probe + chunk buffers."""
        n, o = store.n_trainable("float32"), self.options
        return self.arena.step_bytes(n, o.probes, o.pool_size)

    def population_size(self, store: ParamStore) -> int:
        """theta and its K probes."""
        return self.options.probes + 1

    def lr_at(self, t: int) -> float:
        """Learning rate of step t under the schedule, times `lr_scale` (divergence rollback)."""
        return scaled_lr(self.options, t, self.lr_scale)

    def _step(self, store: ParamStore, **extra: Any) -> Generator[Any, Any, dict[str, Any]]:
        theta = self.arena.begin(store)
        copy = self.arena.copy
        assert copy is not None
        t, eps = self.t, self.options.eps
        e32 = np.float32(eps)
        seeds = [(self.seed, t, k) for k in range(self.options.probes)]
        cands: list[list[Term]] = [[], *([(e32, key)] for key in seeds)]
        evals = yield self.arena.population(theta, cands)
        l0, losses = evals[0], list(evals[1:])
        lr = self.lr_at(t)
        record: dict[str, Any] = {"seeds": [list(s) for s in seeds], "lr": lr, "eps": eps,
                                  "loss": l0 if math.isfinite(l0) else None}
        if not all(math.isfinite(v) for v in evals):  # reject: weights back exactly
            np.copyto(theta, copy)
            return {**record, "g": [0.0] * len(seeds), "std": None, "accepted": False}
        gs, sigma = fzoo_coefficients(l0, losses)
        terms: list[Term] = [(np.float32(-(lr * g)), key)
                             for g, key in zip(gs, seeds, strict=True)]
        self.arena.combine(theta, copy, terms)
        return {**record, "g": gs, "std": sigma, "accepted": True}
