"""zo-scale: zeroth-order training of the quantization scales of an int8 model (QZO-style).

After Shang et al. 2025, "Fine-tuning Quantized Neural Networks with Zeroth-order Optimization"
(QZO): the int8 weights stay frozen and only their per-channel scales move, estimated with
two-point SPSA on Gaussian directions z ~ N(0, I) over the scales, with the directional
derivative clipped for stability:
    g = clip((L(s + eps z) - L(s - eps z)) / (2 eps), -C, C),   s <- s - lr g z
A handful of trainable numbers (one per output channel) personalizes an int8 model. Scales are
kept positive: after each update, every scale parameter (manifest quant.role == "scale") is
floored at `min_ratio` times its pre-step value. Other selected float32 parameters (none by
default: `edgelearn train --optimizer zo-scale` trains `*.scale`) get the plain update.

The probing, restore policies and journal/replay machinery are ZO-SGD's (`zo_sgd.py`): this
module only changes the noise default, the clip (on g rather than on L+ - L-) and adds the
positivity projection, which replay repeats with the same float operations.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any, ClassVar

import numpy as np

from edgelearn.errors import InputError
from edgelearn.optim.base import register
from edgelearn.optim.zo_sgd import ZOSGD
from edgelearn.params import ParamStore
from edgelearn.rng import DEFAULT_CHUNK


@register
class ZOScale(ZOSGD):
    """QZO-style ZO-SGD on per-channel quantization scales.

    Args:
        lr: learning rate.
        eps: perturbation scale (units of the scales).
        probes: directions per step.
        noise: "gaussian" (default, as in QZO), "rademacher" or "pool".
        clip: bound C on the directional derivative |g| (None = no clipping).
        min_ratio: a scale never drops below min_ratio x its pre-step value (0 < ratio < 1).
        restore: "auto", "copy" or "drift" (see zo_sgd).
        schedule: "constant", "cosine" or "linear" decay of lr over `total_steps`.
        total_steps: schedule length.
        seed: run seed.
        chunk: elements per noise chunk (results do not depend on it).
        pool_size: shared-table size for noise="pool".
    """

    name = "zo-scale"
    #: what `edgelearn train` trains when --trainable is not given
    default_trainable: ClassVar[str] = "*.scale"

    def __init__(
        self,
        *,
        lr: float = 1e-5,
        eps: float = 1e-4,
        probes: int = 1,
        noise: str = "gaussian",
        clip: float | None = 100.0,
        min_ratio: float = 0.5,
        restore: str = "auto",
        schedule: str = "constant",
        total_steps: int | None = None,
        seed: int = 0,
        chunk: int = DEFAULT_CHUNK,
        pool_size: int = 1 << 22,
    ) -> None:
        if not (0 < min_ratio < 1):
            raise InputError(f"min_ratio must lie in (0, 1), got {min_ratio}")
        if clip is not None and not (clip > 0 and math.isfinite(clip)):
            raise InputError(f"clip must be a finite number > 0, got {clip}")
        if not (eps > 0 and math.isfinite(eps)):
            raise InputError(f"eps must be a finite number > 0, got {eps}")
        super().__init__(lr=lr, eps=eps, probes=probes, noise=noise,
                         clip=None if clip is None else 2.0 * eps * clip, restore=restore,
                         schedule=schedule, total_steps=total_steps, seed=seed, chunk=chunk,
                         pool_size=pool_size)
        self.grad_clip = None if clip is None else float(clip)
        self.min_ratio = float(min_ratio)

    def config(self) -> dict[str, Any]:
        """Hyperparameters (JSON), the keyword arguments of this class."""
        return {"seed": self.seed, "lr": self.lr, "eps": self.eps, "probes": self.probes,
                "noise": self.noise_kind, "clip": self.grad_clip, "min_ratio": self.min_ratio,
                "restore": self.restore, "schedule": self.schedule,
                "total_steps": self.total_steps, "pool_size": self.pool_size}

    @staticmethod
    def scale_segments(store: ParamStore) -> list[tuple[int, int]]:
        """(start, stop) in the trainable float32 slice of every quantization-scale parameter."""
        return [(a, b) for name, a, b in store.segments("float32")
                if (store.specs[name].quant or {}).get("role") == "scale"]

    def _step(self, store: ParamStore) -> Generator[Any, Any, dict[str, Any]]:
        theta = store.flat("float32")
        segs = self.scale_segments(store)
        before = [theta[a:b].copy() for a, b in segs]
        if any(bool((p <= 0).any()) for p in before):
            raise InputError("zo-scale: a quantization scale is not positive")
        record = yield from super()._step(store)
        floor = np.float32(self.min_ratio)
        for (a, b), prev in zip(segs, before, strict=True):
            np.maximum(theta[a:b], floor * prev, out=theta[a:b])
        return record
