"""The fleet's global journal: the global model of every round, replayable from the bundle.

An edgelearn journal (`edgelearn.journal`: checksummed JSON records) whose header holds the
fleet settings and the bundle's weights sha256, then one record per round:

    {"kind": "round", "round": r, "state": [...], "sha256": digest after the round,
     "merged": [node ids], "dropped": {node id: reason}}

"state" is the whole global state, not a difference: FedKSeed's accumulated per-seed
coefficients A (K float64), or FedAvg's trainable slice (float32 values). A node rebuilds the
round's weights from the bundle's base weights and that state alone (`global_store`), with the
same float operations as the server, and checks the digest. A client keeps the same journal of
the rounds it saw; `replay_global` rebuilds the weights of its last record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.bundle import Bundle
from edgelearn.errors import InputError
from edgelearn.fleet.pool import apply_coefficients
from edgelearn.fleet.settings import FleetSettings
from edgelearn.journal import Journal, iter_journal
from edgelearn.params import ParamStore


def global_store(bundle: Bundle, settings: FleetSettings, state: np.ndarray | None) -> ParamStore:
    """The global weights a state defines (None: the bundle's base weights).

    Args:
        bundle: the fleet's bundle.
        settings: the fleet's settings (strategy, trainable set, pool).
        state: float64 [K] pool coefficients (fedkseed) or float32 [n_trainable] (fedavg).
    """
    store = bundle.load_store(trainable=settings.trainable)
    theta = store.flat("float32")
    if theta.size == 0:
        raise InputError(f"--trainable {settings.trainable!r} selects no float32 parameter")
    if state is None:
        return store
    if settings.strategy == "fedkseed":
        apply_coefficients(theta, np.asarray(state, np.float64), settings.pool)
    else:
        if state.shape != theta.shape:
            raise InputError(f"global state of {state.size} values for {theta.size} trainable")
        theta[...] = np.asarray(state, np.float32)
    return store


def state_json(state: np.ndarray) -> list[float]:
    """A state as JSON numbers that read back to the very same values."""
    return [float(v) for v in state]


def state_from_json(settings: FleetSettings, values: Any) -> np.ndarray:
    """The array a record's "state" holds (dtype by strategy)."""
    dtype = np.float64 if settings.strategy == "fedkseed" else np.float32
    try:
        return np.asarray(values, dtype=dtype)
    except (TypeError, ValueError):
        raise InputError("global journal record holds a malformed state") from None


class GlobalJournal:
    """The global journal of a node (server or client), appended round by round.

    Args:
        path: the journal file (created with its header when missing).
        bundle: the fleet's bundle.
        settings: the fleet's settings (a journal holding others is refused).
    """

    def __init__(self, path: str | os.PathLike, bundle: Bundle, settings: FleetSettings) -> None:
        self.path = Path(path)
        header = {"kind": "header", "fleet": 1, "settings": json.loads(settings.to_json()),
                  "base_sha256": bundle.manifest["files"]["weights"]["sha256"]}
        fresh = not self.path.is_file() or next(iter_journal(self.path), None) is None
        if not fresh and next(iter_journal(self.path)) != header:
            raise InputError(f"{self.path} is the global journal of another fleet")
        self._journal = Journal(self.path)
        if fresh:
            self._journal.append(header)

    def append(self, round_: int, state: np.ndarray, digest: str, **extra: Any) -> None:
        """Record round `round_`'s global state and the digest of its weights."""
        self._journal.append({"kind": "round", "round": round_, "state": state_json(state),
                              "sha256": digest, **extra})

    def close(self) -> None:
        """Close the file."""
        self._journal.close()


def replay_global(bundle: Bundle, path: str | os.PathLike) -> tuple[ParamStore, int]:
    """Rebuild the weights of a global journal's last round: (store, rounds).

    Raises: InputError when the journal is not of this bundle or its digest does not match.
    """
    records = iter_journal(path)
    header = next(records, {})
    if header.get("kind") != "header" or header.get("fleet") != 1:
        raise InputError(f"{path}: not a fleet global journal")
    if header.get("base_sha256") != bundle.manifest["files"]["weights"]["sha256"]:
        raise InputError(f"{path} was recorded on a bundle with other base weights")
    settings = FleetSettings(**header["settings"])
    last = None
    for rec in records:
        last = rec
    if last is None:
        return global_store(bundle, settings, None), 0
    store = global_store(bundle, settings, state_from_json(settings, last.get("state")))
    if store.digest() != last.get("sha256"):
        raise InputError(f"{path}: round {last.get('round')} does not replay to its sha256")
    return store, int(last["round"])
