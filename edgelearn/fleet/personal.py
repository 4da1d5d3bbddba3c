"""Personal on top of global: a device keeps its own fine-tuning of the fleet's model.

Two journals replay it bit-exactly: the fleet's global journal (bundle -> global weights,
`replay_global`) then the device's local journal, an ordinary Session journal recorded on the
bundle rebased on those global weights (`rebase_bundle`: deterministic, so the rebased
weights file and its sha256, which the local journal's header pins, are the same wherever it
is rebuilt). Nothing but the two journals and the bundle is needed to rebuild the device's
weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgelearn.bundle import load_bundle
from edgelearn.data import Dataset
from edgelearn.fleet.history import replay_global
from edgelearn.fleet.rebase import rebase_bundle
from edgelearn.training import RuntimeConfig, Session, TrainConfig, replay

GLOBAL_BUNDLE, LOCAL_RUN = "global-bundle", "personal"


def personalize(bundle: str | os.PathLike, global_journal: str | os.PathLike, data: Dataset,
                out: str | os.PathLike, *, steps: int, config: TrainConfig,
                runtime: RuntimeConfig | None = None) -> dict[str, Any]:
    """Fine-tune the fleet's global model on local data (a resumable Session run).

    Args:
        bundle: the fleet's bundle.
        global_journal: the fleet's global journal (a node's or the server's global.bin).
        data: the device's data.
        out: directory for the rebased bundle (global-bundle/) and the run (personal/).
        steps: the local run's total steps.
        config: how the local run trains (its own optimizer, seed, trainable set).
    Returns: global_sha256, sha256 (personal weights), rounds, journal, weights.
    """
    b = load_bundle(bundle)
    store, rounds = replay_global(b, global_journal)
    rebased = rebase_bundle(b, store, Path(out) / GLOBAL_BUNDLE)
    with Session(rebased, Path(out) / LOCAL_RUN, config, runtime) as s:
        result = s.run(data, steps)
    return {"global_sha256": store.digest(), "sha256": result.sha256, "rounds": rounds,
            "journal": result.journal, "weights": result.weights}


def replay_personal(bundle: str | os.PathLike, global_journal: str | os.PathLike,
                    local_journal: str | os.PathLike, work: str | os.PathLike) -> dict[str, Any]:
    """Rebuild personal weights from the bundle and the two journals (global, then local).

    Args:
        work: scratch directory for the rebased bundle.
    Returns: global_sha256, sha256, steps.
    """
    b = load_bundle(bundle)
    store, _ = replay_global(b, global_journal)
    rebased = rebase_bundle(b, store, Path(work) / GLOBAL_BUNDLE)
    result = replay(rebased, local_journal)
    return {"global_sha256": store.digest(), "sha256": result.sha256, "steps": result.steps}
