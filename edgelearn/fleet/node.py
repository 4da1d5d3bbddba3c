"""A fleet device: rebuild the round's global model, train on local data, report the result.

A client trains each round with an edgelearn `Session` (zo-sgd) on a copy of its bundle
rebased on the global weights, so its round is an ordinary run directory with an ordinary
journal; what it sends is read from that journal's step records (one scalar g per step, the
seeds implied by its pool row) or, for the FedAvg baseline, its trainable slice. After every
round it rebuilds the new global model from the server's state, keeps it (weights and its own
global journal) and reports the sha256 it holds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.bundle import load_bundle
from edgelearn.data import Dataset, load_data
from edgelearn.errors import InputError
from edgelearn.fleet import wire
from edgelearn.fleet.history import GlobalJournal, global_store
from edgelearn.fleet.rebase import rebase_bundle
from edgelearn.fleet.settings import FleetSettings
from edgelearn.journal import iter_journal
from edgelearn.params import ParamStore
from edgelearn.training import RuntimeConfig, Session, TrainConfig, evaluate

#: files of a node's work directory
GLOBAL_BUNDLE, LOCAL_RUN, GLOBAL_WEIGHTS, GLOBAL_JOURNAL = (
    "global-bundle", "round-run", "global.safetensors", "global.bin")


class FleetNode:
    """One device: its bundle, its local data and its work directory.

    Args:
        bundle: the fleet's bundle directory (the same base weights as the server's).
        data: the device's local .npz.
        work_dir: where the node keeps the global model and its round runs.
        threads: runtime threads (None: the detected profile's).
    """

    def __init__(self, bundle: str | os.PathLike, data: str | os.PathLike,
                 work_dir: str | os.PathLike, *, threads: int | None = None) -> None:
        self.bundle = load_bundle(bundle)
        self.data: Dataset = load_data(data)
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.runtime = RuntimeConfig(backend="onnxruntime", threads=threads)

    def rebuild(self, settings: FleetSettings, state: bytes) -> tuple[ParamStore, wire.Frame]:
        """The global weights a server state frame defines, and the frame."""
        frame = wire.decode(state)
        want = wire.ZO_STATE if settings.strategy == "fedkseed" else wire.AVG_STATE
        if frame.kind != want:
            raise InputError("the server sent a state of another strategy")
        values = frame.values if frame.round > 0 else None
        return global_store(self.bundle, settings, values), frame

    def train(self, settings: FleetSettings, state: bytes, row: int) -> tuple[bytes, dict]:
        """Run one round on the local data from the global model; (payload, metrics)."""
        store, frame = self.rebuild(settings, state)
        base = store.digest()
        rebased = rebase_bundle(self.bundle, store, self.work / GLOBAL_BUNDLE)
        steps = settings.local_steps
        config = TrainConfig(optimizer="zo-sgd", options=settings.zo_options(),
                             trainable=settings.trainable, seed=settings.pool.run_seed(row),
                             batch_size=min(settings.batch_size, len(self.data)),
                             checkpoint_every=steps, fsync_every=steps)
        with Session(rebased, self.work / LOCAL_RUN, config, self.runtime, restart=True) as s:
            result = s.run(self.data, steps)
            trained = s.store.flat("float32").copy()
            journal = s.journal_path
        if settings.strategy == "fedkseed":
            values = self._scalars(settings, journal, row)
            out = wire.Frame(wire.ZO_UPDATE, frame.round + 1, base, values, len(self.data), row)
        else:
            out = wire.Frame(wire.AVG_UPDATE, frame.round + 1, base, trained, len(self.data))
        metrics = {"num-examples": len(self.data), "loss-first": float(result.loss_first or 0.0),
                   "loss-last": float(result.loss_last or 0.0)}
        return wire.encode(out), metrics

    @staticmethod
    def _scalars(settings: FleetSettings, journal: Path, row: int) -> np.ndarray:
        """The g of each journaled step, checked to walk the pool's row `row` in order."""
        pool, g = settings.pool, []
        for rec in iter_journal(journal):
            if rec.get("kind") != "step":
                continue
            t = len(g)
            if rec.get("seeds") != [list(pool.key(row * pool.steps + t))]:
                raise InputError(f"local step {t} did not use pool direction ({row}, {t})")
            g.append(float(rec["g"][0]))
        if len(g) != settings.local_steps:
            raise InputError(f"local run journaled {len(g)} steps, not {settings.local_steps}")
        return np.asarray(g, np.float64)

    def sync(self, settings: FleetSettings, state: bytes) -> dict[str, Any]:
        """Take the new global model: rebuild, check its digest, keep it; what the node holds."""
        store, frame = self.rebuild(settings, state)
        digest = store.digest()
        if digest != frame.base:
            raise InputError(f"rebuilt global model has sha256 {digest[:12]}, the server's "
                             f"is {frame.base[:12]}")
        weights = store.save(self.work / GLOBAL_WEIGHTS, metadata={"sha256": digest})
        self._record(settings, frame, digest)
        acc = evaluate(self.bundle, self.data, weights=weights, runtime=self.runtime).accuracy
        return {"sha256": digest, "round": frame.round, "accuracy": acc}

    def _record(self, settings: FleetSettings, frame: wire.Frame, digest: str) -> None:
        """Append the round to the node's global journal (a new fleet starts a new one)."""
        path = self.work / GLOBAL_JOURNAL
        try:
            journal = GlobalJournal(path, self.bundle, settings)
        except InputError:
            path.unlink()
            journal = GlobalJournal(path, self.bundle, settings)
        try:
            journal.append(frame.round, frame.values, digest)
        finally:
            journal.close()
