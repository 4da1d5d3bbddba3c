"""zo-scale: zeroth-order training of the quantization scales of an int8 model (QZO-style).

After Shang et al. 2025, "Fine-tuning Quantized Neural Networks with Zeroth-order Optimization"
(QZO): the int8 weights stay frozen and only their per-channel scales move, estimated with
two-point SPSA on Gaussian directions z ~ N(0, I) over the scales, with the directional
derivative clipped for stability:
    g = clip((L(s + eps z) - L(s - eps z)) / (2 eps), -C, C),   s <- s - lr g z
A handful of trainable numbers (one per output channel) personalizes an int8 model. Scales are
kept positive: after each update, every scale parameter (manifest quant.role == "scale") is
floored at `min_ratio` times its pre-step value. Other selected float32 parameters (none by
default: `edgelearn train --optimizer zo-scale` trains the parameters whose role is a
quantization scale, "@scale", whatever their names) get the plain update.

Relative steps (`relative`, the default): scales of one model span orders of magnitude
(1e-4 .. 1e-1), so an absolute eps is noise for the large ones and a 100% change for the small
ones (measured: eps 1e-4 drove a prepared int8 model from 0.61 to 0.50 accuracy). With
`relative` each scale element s_i is perturbed and stepped in units of its own magnitude at
the step's start, m_i = |s_i| (m_i = 1 for other parameters):
    L+- = L(s +- eps m z),   g = clip((L+ - L-) / (2 eps), -C, C),   s <- s - lr g m z
i.e. SPSA on log-scale coordinates to first order; eps and lr are then fractions.

The probing, restore policies and journal/replay machinery are ZO-SGD's (`zo_sgd.py`): this
module only changes the noise default, the clip (on g rather than on L+ - L-) and adds the
positivity projection, which replay repeats with the same float operations.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelearn.errors import InputError
from edgelearn.optim.base import register
from edgelearn.optim.options import OptimizerOptions, check, meta
from edgelearn.optim.zo_fields import (
    chunk_field,
    pool_size_field,
    schedule_field,
    total_steps_field,
)
from edgelearn.optim.zo_sgd import RESTORE_POLICIES, ZOSGD, ZOSGDOptions
from edgelearn.params import ParamStore
from edgelearn.rng import NOISE_KINDS


@dataclass(frozen=True)
class ZOScaleOptions(OptimizerOptions):
    """Options of zo-scale; `zo_rule()` is the ZO-SGD setting they amount to."""

    lr: float = field(default=0.02, metadata=meta(
        "learning rate (a fraction of each scale with relative, else absolute)", cli="--lr"))
    eps: float = field(default=1e-2, metadata=meta(
        "perturbation (a fraction of each scale with relative, else units of the scales)",
        cli="--eps"))
    relative: bool = field(default=True, metadata=meta(
        "perturb and step each scale in units of its own magnitude (journals before this "
        "option: absolute)", legacy=False))
    probes: int = field(default=1, metadata=meta("directions per step", cli="--probes"))
    noise: str = field(default="gaussian", metadata=meta(
        "gaussian (as in QZO), rademacher or pool", cli="--noise", choices=NOISE_KINDS))
    clip: float | None = field(default=100.0, metadata=meta(
        "bound C on the directional derivative |g| (null: no clipping)", cli="--clip"))
    min_ratio: float = field(default=0.5, metadata=meta(
        "a scale never drops below min_ratio x its pre-step value (0 < ratio < 1)"))
    restore: str = field(default="auto", metadata=meta(
        "auto, copy or drift (see zo-sgd)", cli="--restore", choices=RESTORE_POLICIES))
    schedule: str = schedule_field()
    total_steps: int | None = total_steps_field("schedule length (train sets it to --steps)")
    chunk: int = chunk_field()
    pool_size: int = pool_size_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.min_ratio < 1, f"min_ratio must lie in (0, 1), got {self.min_ratio}")
        check(self.clip is None or (self.clip > 0 and math.isfinite(self.clip)),
              f"clip must be a finite number > 0, got {self.clip}")
        check(self.eps > 0 and math.isfinite(self.eps),
              f"eps must be a finite number > 0, got {self.eps}")
        self.zo_rule()  # the remaining checks are ZO-SGD's

    def zo_rule(self) -> ZOSGDOptions:
        """The ZO-SGD settings these options run: the clip on g is a clip on |L+ - L-| of
        2 eps C."""
        return ZOSGDOptions(seed=self.seed, lr=self.lr, eps=self.eps, probes=self.probes,
                            noise=self.noise, restore=self.restore, schedule=self.schedule,
                            clip=None if self.clip is None else 2.0 * self.eps * self.clip,
                            total_steps=self.total_steps, chunk=self.chunk,
                            pool_size=self.pool_size)


@register
class ZOScale(ZOSGD):
    """QZO-style ZO-SGD on per-channel quantization scales.

    Args:
        **options: `ZOScaleOptions` fields (lr, eps, probes, noise, clip, min_ratio, ..., seed).
    """

    name = "zo-scale"
    Options = ZOScaleOptions
    default_trainable = "@scale"
    options: ZOScaleOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._mag: np.ndarray | None = None  # per-element units of this step (relative)
        self._zeros = np.zeros(0, np.float32)
        self._sum = np.zeros(0, np.float32)

    def _rule(self) -> ZOSGDOptions:
        return self.options.zo_rule()

    @staticmethod
    def scale_segments(store: ParamStore) -> list[tuple[int, int]]:
        """(start, stop) in the trainable float32 slice of every quantization-scale parameter."""
        return [(a, b) for name, a, b in store.segments("float32")
                if (store.specs[name].quant or {}).get("role") == "scale"]

    def memory_bytes(self, store: ParamStore) -> int:
        """ZO-SGD's, plus three trainable-sized buffers for relative steps."""
        extra = 12 * store.n_trainable("float32") if self.options.relative else 0
        return super().memory_bytes(store) + extra

    def _combine(self, dst: np.ndarray, src: np.ndarray, terms: Any,
                 group: str | None = None) -> None:
        """dst = src + m * sum_k coef_k z_k (relative), else ZO-SGD's dst = src + sum."""
        if self._mag is None:
            super()._combine(dst, src, terms, group)
            return
        super()._combine(self._sum, self._zeros, terms, group)  # 0 + x == x exactly
        np.multiply(self._sum, self._mag, out=self._sum)
        np.add(src, self._sum, out=dst)

    def _rows_by_signs(self) -> bool:
        """Relative steps scale each probe by |scale|: rows go through `_combine` then."""
        return self._mag is None and super()._rows_by_signs()

    def _units(self, theta: np.ndarray, segs: list[tuple[int, int]]) -> None:
        """Fix this step's per-element units: |scale| on scale segments, 1 elsewhere."""
        if not self.options.relative:
            return
        if self._mag is None or self._mag.size != theta.size:
            self._mag = np.empty_like(theta)
            self._zeros = np.zeros_like(theta)
            self._sum = np.empty_like(theta)
        self._mag.fill(1.0)
        for a, b in segs:
            np.abs(theta[a:b], out=self._mag[a:b])

    def _step(self, store: ParamStore, **extra: Any) -> Generator[Any, Any, dict[str, Any]]:
        theta = store.flat("float32")
        segs = self.scale_segments(store)
        before = [theta[a:b].copy() for a, b in segs]
        if any(bool((p <= 0).any()) for p in before):
            raise InputError("zo-scale: a quantization scale is not positive")
        self._units(theta, segs)
        record = yield from super()._step(store, **extra)
        floor = np.float32(self.options.min_ratio)
        for (a, b), prev in zip(segs, before, strict=True):
            np.maximum(theta[a:b], floor * prev, out=theta[a:b])
        return record
