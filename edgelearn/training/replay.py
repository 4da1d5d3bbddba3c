"""Replay: rebuild weights from the bundle's base weights and a journal.

Zeroth-order optimizers (zo-sgd, zo-scale, polystep) replay from seeds and scalars alone: no
data, no forwards. tpSGD's update depends on the activations, so its replay re-runs each step's
taps forward on the step's batch: from `samples.bin` beside the journal when the run recorded
its samples, else from the run's data set (`data`, checked against the header's sha256). Either
way each batch is checked against the identity its step record holds: `batch_digest`
(per-example digests, `edgelearn.data.batch_digest`) in new runs, `batch_sha256` (the whole
batch's sha256) in runs journaled before them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgelearn.bundle import Bundle
from edgelearn.data import Dataset, arrays_sha256, batch_digest, data_sha256
from edgelearn.errors import InputError
from edgelearn.journal import iter_journal
from edgelearn.optim import Optimizer
from edgelearn.params import ParamStore
from edgelearn.training.divergence import GuardRule, apply_rollback, guard_from_header
from edgelearn.training.evaluators import StepEvaluator, make_evaluator
from edgelearn.training.feeds import BatchSource, DatasetFeed, SampleReader
from edgelearn.training.header import optimizer_from_header
from edgelearn.training.results import ReplayResult


def check_batch(record: dict[str, Any], x: Any, y: Any) -> None:
    """Refuse a batch other than the one a step record names (by the identity it holds)."""
    if "batch_digest" in record:
        what, got, want = "batch digest", batch_digest(x, y), record["batch_digest"]
    elif "batch_sha256" in record:
        what, got, want = "batch sha256", arrays_sha256(x, y), record["batch_sha256"]
    else:
        return
    if got != want:
        raise InputError(f"step {record.get('step')} was fed other data than its journal "
                         f"record says ({what} differs)")


def apply_records(records: Iterable[dict[str, Any]], store: ParamStore, opt: Optimizer,
                  rule: GuardRule | None, evaluator: StepEvaluator,
                  batches: BatchSource | None) -> None:
    """Replay step and rollback records, following the divergence rule.

    Args:
        records: journal records after the header (streamed).
        evaluator: the run's step evaluator (re-runs forwards for optimizers that need them).
        batches: step -> its batch, for evaluators that replay on data (None: none known).
    """
    for rec in records:
        kind = rec.get("kind")
        if kind == "step":
            batch = None
            if evaluator.replay_needs_data and batches is not None:
                batch = batches(int(rec["step"]))
                check_batch(rec, *batch)
            evaluator.replay(opt, store, rec, batch)
            if rule is not None and rule.feed_step(rec) == "snapshot":
                rule.snap.take(store, opt)
        elif kind == "rollback":
            apply_rollback(rule, store, opt, rec)
        else:
            raise InputError(f"journal record of unknown kind {kind!r}")


def replay_batches(header: dict[str, Any], journal_path: Path, data: Dataset | None,
                   opt: Optimizer) -> BatchSource:
    """Where a replay that re-runs forwards gets each step's batch (InputError when nowhere)."""
    if header.get("samples"):
        return SampleReader(journal_path.parent / str(header["samples"])).batch
    if header.get("feed") == "live":
        raise InputError(f"this {opt.name} run was fed live samples that were not recorded: "
                         "its journal cannot be replayed (record them with "
                         "TrainConfig(record_samples=True))")
    if data is None:
        raise InputError(f"{opt.name} journals replay by re-running the steps on the run's "
                         "data: pass --data")
    if data_sha256(data) != header.get("data_sha256"):
        raise InputError("--data is not the data this run was trained on (sha256 differs)")
    try:
        return DatasetFeed(data, int(header["batch_size"]), int(header["data_seed"])).batch
    except (KeyError, TypeError, ValueError):
        raise InputError("journal header does not say how the run's batches were drawn") \
            from None


def replay(bundle: Bundle, journal: str | os.PathLike, *, data: Dataset | None = None,
           out: str | os.PathLike | None = None, prefix_cache: bool = False) -> ReplayResult:
    """Rebuild the weights a journal describes from the bundle's base weights.

    Args:
        bundle: the bundle the run trained.
        journal: the run's journal.bin (recorded samples are read from beside it).
        data: the run's data set, for a tpSGD run fed from one (`Session.run`); not needed
            for zeroth-order runs or runs that recorded their samples.
        out: write the weights to this safetensors file (None: do not write).
        prefix_cache: a tpsgd / hybrid replay re-runs its taps forwards on cached
            frozen-prefix features (`edgelearn.training.cached_taps`; same floats, checked as
            in training), so a long head-only journal does not re-run the backbone per step.
            A tpsgd run whose head update ran in the graph (`head_update` graph / auto)
            replays on cached features always: the same graph, the same floats.
    Raises: InputError when the journal does not belong to the bundle, cannot be replayed
        without data it was not given, or does not reproduce itself.
    """
    path = Path(journal)
    records = iter_journal(path)  # streamed: a long journal is never held whole
    header = next(records, {})
    if header.get("kind") != "header":
        raise InputError(f"{journal}: journal has no header record")
    if header.get("base_sha256") != bundle.manifest["files"]["weights"]["sha256"]:
        raise InputError("journal was recorded on a bundle with different base weights")
    store = bundle.load_store(trainable=header.get("trainable", []) or "")
    opt = optimizer_from_header(header)
    graph_head = getattr(getattr(opt, "options", None), "head_update", "numpy") != "numpy"
    evaluator = make_evaluator(bundle, store, opt,
                               backend=header.get("taps_backend", "onnxruntime"),
                               prefix_cache=prefix_cache or graph_head)
    batches = replay_batches(header, path, data, opt) if evaluator.replay_needs_data else None
    rule = guard_from_header(header)
    if rule is not None:
        rule.snap.take(store, opt)  # step 0: the base weights are the first good point
    try:
        apply_records(records, store, opt, rule, evaluator, batches)
        opt.settle(store)  # the last steps' pending update (lozo)
    finally:
        evaluator.close()
    written = None
    if out is not None:
        written = str(store.save(out, metadata={"sha256": store.digest()}))
    return ReplayResult(steps=opt.t, sha256=store.digest(), weights=written, store=store)
