"""The fleet server's state and its merge rules (FedKSeed, FedAvg), independent of transport.

FedKSeed (Qin et al. 2024, arXiv 2312.06353): each client of a round is assigned one row of
the shared seed pool and returns the scalar g_t of each of its local steps; the server adds
-lr * w_c * g_t to the accumulated coefficient of direction (row, t), w_c = n_c / sum n over
the round's accepted clients (per-seed averaging: clients sharing a row are averaged on the
same directions). |g| is bounded by the clip of |L+ - L-| (clip / (2 eps)). FedAvg (McMahan
et al. 2017) is the baseline: the weighted mean of the clients' trainable slices.

A reply that does not fit the round (an error, a late or damaged frame, another round, a base
sha256 other than the round's global model, another pool row, a wrong count, |g| above the
bound) is dropped with a log line and named in the round record; the round merges the rest,
in node-id order, so the result does not depend on arrival order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.bundle import Bundle
from edgelearn.data import Dataset
from edgelearn.errors import InputError
from edgelearn.fleet import wire
from edgelearn.fleet.history import GlobalJournal, global_store
from edgelearn.fleet.settings import FleetSettings
from edgelearn.training import RuntimeConfig, evaluate

log = logging.getLogger("edgelearn.fleet")
GLOBAL_JOURNAL, GLOBAL_WEIGHTS = "global.bin", "global.safetensors"


@dataclass
class Reply:
    """One client's answer to a round: its node id and payload, or why there is none."""

    node: int
    payload: Any = None
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class FleetServer:
    """The global model of a federation, its journal and the merge of each round.

    Args:
        bundle: the fleet's bundle.
        settings: the fleet's settings.
        run_dir: where the global journal and weights are written.
    """

    def __init__(self, bundle: Bundle, settings: FleetSettings,
                 run_dir: str | os.PathLike) -> None:
        self.bundle, self.settings = bundle, settings
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        store = global_store(bundle, settings, None)
        self.state = np.zeros(settings.pool.size) if settings.strategy == "fedkseed" \
            else store.flat("float32").copy()
        self.digest = store.digest()
        self.round = 0
        self.journal = GlobalJournal(self.run_dir / GLOBAL_JOURNAL, bundle, settings)

    def state_frame(self) -> bytes:
        """The current global state as a frame (what every client rebuilds the model from)."""
        kind = wire.ZO_STATE if self.settings.strategy == "fedkseed" else wire.AVG_STATE
        return wire.encode(wire.Frame(kind, self.round, self.digest, self.state))

    def assign_rows(self, round_: int, nodes: list[int]) -> dict[int, int]:
        """node -> pool row for a round (rows taken in turn from a per-round seeded offset)."""
        rows = self.settings.pool_rows
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence(
            [self.settings.seed, round_, 0xF1EE7])))
        start = int(rng.integers(rows))
        return {n: (start + i) % rows for i, n in enumerate(sorted(nodes))}

    def check(self, reply: Reply, round_: int, row: int | None) -> wire.Frame:
        """The reply's frame if it fits the round, else InputError with the reason."""
        if reply.error is not None:
            raise InputError(reply.error)
        frame = wire.decode(reply.payload)
        s = self.settings
        fedkseed = s.strategy == "fedkseed"
        if frame.kind != (wire.ZO_UPDATE if fedkseed else wire.AVG_UPDATE):
            raise InputError("frame of another kind than the round's update")
        if frame.round != round_:
            raise InputError(f"update for round {frame.round}, not {round_}")
        if frame.base != self.digest:
            raise InputError(f"trained from sha256 {frame.base[:12]}, not the global model's "
                             f"{self.digest[:12]}")
        want = s.local_steps if fedkseed else self.state.size
        if frame.values.size != want or frame.n_examples < 1:
            raise InputError(f"update of {frame.values.size} values / {frame.n_examples} "
                             f"examples (expected {want} / >= 1)")
        if fedkseed and frame.row != row:
            raise InputError(f"trained pool row {frame.row}, was assigned {row}")
        if fedkseed and float(np.max(np.abs(frame.values))) > s.g_bound:
            raise InputError(f"|g| above the clip bound {s.g_bound:g}")
        return frame

    def merge(self, round_: int, replies: list[Reply], rows: dict[int, int]) -> dict[str, Any]:
        """Merge a round's replies into the global model; the round's summary."""
        accepted, dropped = [], {}
        for reply in sorted(replies, key=lambda r: r.node):
            try:
                accepted.append((reply.node, self.check(reply, round_, rows.get(reply.node))))
            except InputError as e:
                dropped[str(reply.node)] = str(e)
                log.warning("fleet round %d: dropped node %d: %s", round_, reply.node, e)
        for node in sorted(set(rows) - {r.node for r in replies}):
            dropped[str(node)] = "no reply"
            log.warning("fleet round %d: dropped node %d: no reply", round_, node)
        if accepted:
            self.state = self._merged([f for _, f in accepted])
        store = global_store(self.bundle, self.settings, self.state)
        self.round, self.digest = round_, store.digest()
        store.save(self.run_dir / GLOBAL_WEIGHTS, metadata={"sha256": self.digest})
        merged = [n for n, _ in accepted]
        self.journal.append(round_, self.state, self.digest, merged=merged, dropped=dropped)
        return {"round": round_, "sha256": self.digest, "merged": merged, "dropped": dropped}

    def _merged(self, frames: list[wire.Frame]) -> np.ndarray:
        total = float(sum(f.n_examples for f in frames))
        if self.settings.strategy == "fedkseed":
            state, steps = self.state.copy(), self.settings.local_steps
            for f in frames:
                lo = f.row * steps
                state[lo:lo + steps] += (-self.settings.lr * (f.n_examples / total)) * f.values
            return state
        acc = np.zeros(self.state.size, np.float64)
        for f in frames:
            acc += (f.n_examples / total) * f.values.astype(np.float64)
        return acc.astype(np.float32)

    def evaluate(self, data: Dataset) -> float:
        """Held-out accuracy of the current global model."""
        path = self.run_dir / GLOBAL_WEIGHTS
        if not path.is_file():
            global_store(self.bundle, self.settings, None).save(path)
        return float(evaluate(self.bundle, data, weights=path,
                              runtime=RuntimeConfig(backend="onnxruntime")).accuracy or 0.0)

    def close(self) -> None:
        """Close the global journal."""
        self.journal.close()
