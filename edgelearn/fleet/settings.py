"""What a federation agrees on: strategy, rounds, local training and the seed pool.

The server owns these settings and sends them to every client with each round (a client only
brings its bundle and data), so a device cannot train with other settings than the fleet's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from edgelearn.errors import InputError
from edgelearn.fleet.pool import SeedPool

STRATEGIES = ("fedkseed", "fedavg")


@dataclass(frozen=True)
class FleetSettings:
    """A federation's settings.

    Args:
        strategy: "fedkseed" (clients send seeds' scalars) or "fedavg" (clients send their
            trainable slice; the baseline).
        rounds: federation rounds.
        local_steps: zo-sgd steps each client runs per round.
        lr, eps: zo-sgd learning rate and perturbation scale.
        clip: zo-sgd clips |L+ - L-| to this; the server refuses any |g| above clip / (2 eps).
        batch_size: examples per local step.
        trainable: glob of the parameters the fleet trains.
        seed: base run seed of the pool (row r trains with run seed seed + r).
        pool_rows: run seeds in the pool (K = pool_rows * local_steps directions).
        min_clients: clients a round waits for before it starts.
        round_timeout_s: how long a round waits for replies; late ones are dropped.
    """

    strategy: str = "fedkseed"
    rounds: int = 3
    local_steps: int = 64
    lr: float = 0.05
    eps: float = 1e-3
    clip: float = 0.1
    batch_size: int = 16
    trainable: str = "head.*"
    seed: int = 0
    pool_rows: int = 4
    min_clients: int = 2
    round_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        for name in ("rounds", "local_steps", "batch_size", "pool_rows", "min_clients"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "eps", "clip", "round_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (
                    math.isfinite(v) and v > 0):
                raise InputError(f"{name} must be a finite number > 0, got {v!r}")
        self.pool  # noqa: B018 - validates seed, rows and steps

    @property
    def pool(self) -> SeedPool:
        """The shared seed pool."""
        return SeedPool(self.seed, self.pool_rows, self.local_steps)

    @property
    def g_bound(self) -> float:
        """Largest |g| a client following the settings can report: clip / (2 eps)."""
        return self.clip / (2.0 * self.eps)

    def zo_options(self) -> dict[str, Any]:
        """The zo-sgd options of a client's local round (one probe: one pool key per step)."""
        return {"lr": self.lr, "eps": self.eps, "clip": self.clip, "probes": 1,
                "noise": "rademacher", "restore": "copy"}

    def to_json(self) -> str:
        """Compact JSON (what a round message carries)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> FleetSettings:
        """Parse `to_json` output (InputError on anything else)."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError):
            raise InputError("fleet settings are not JSON") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise InputError("fleet settings hold unknown keys")
        return cls(**data)
