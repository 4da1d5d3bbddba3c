"""Where a run's batches come from, and the recorded samples of a run fed live.

A run is fed either from a data set (`Session.run`: the batch of step t is
`batch_indices(n, batch_size, t, seed)`, so the data set, batch size and seed pin every
batch) or live (`Session.step`: whatever batch the app just got). Every step record holds the
identity of its batch (`edgelearn.data.batch_digest`; a data set's per-example digests are
computed once per run, `DatasetFeed.digest`). Replays that re-run forwards (tpSGD) need the
batches back: from the data set (checked against the header's sha256) or, for a live run,
from `samples.bin`, which the run appends each step's batch to when
`TrainConfig(record_samples=True)`.

`samples.bin` is a journal of its own (same length-prefixed, CRC-checked records), one record
{"step", "x", "y"} per step, arrays as {"dtype", "shape", "b64"} (raw bytes, so replay sees the
exact floats). The training journal fsyncs it first (`Journal(before_sync=...)`), so a durable
step record always has durable samples; samples of a step that never reached the journal
(a kill in between) are dropped on resume.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.bundle import Bundle
from edgelearn.data import Dataset, ExampleDigests, batch_indices, data_sha256
from edgelearn.errors import InputError
from edgelearn.inputs import Inputs, convert, feeds, has_batch_axis
from edgelearn.journal import Journal, iter_journal

Batch = tuple[Inputs, np.ndarray]
#: step -> the batch it was fed (None where a replay has no way to know)
BatchSource = Callable[[int], Batch]


class DatasetFeed:
    """Batches of a data set in seeded per-epoch order.

    Args:
        data: the examples. batch_size: examples per step. seed: data-order seed.
    """

    def __init__(self, data: Dataset, batch_size: int, seed: int) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self._digests: ExampleDigests | None = None  # made on first use
        self._last: tuple[int, np.ndarray] | None = None  # (step, its indices)

    def indices(self, step: int) -> np.ndarray:
        """The example indices of `step` (`batch_indices`; a step's batch and digest share
        them)."""
        last = self._last
        if last is None or last[0] != step:
            last = self._last = (step, batch_indices(len(self.data), self.batch_size, step,
                                                     self.seed))
        return last[1]

    def batch(self, step: int) -> Batch:
        """The (x, y) of `step` (`Dataset.batch_at`)."""
        return self.data.rows_at(self.indices(step))

    def digest(self, step: int) -> str:
        """`batch_digest` of the batch of `step`, from per-example digests kept for the run
        (each example is hashed once; the batch's rows are not taken)."""
        if self._digests is None:
            self._digests = ExampleDigests(self.data)
        return self._digests.batch_digest(self.indices(step))

    def header(self, *, pin_data: bool) -> dict[str, Any]:
        """Journal header keys of this feed (`pin_data`: the data's sha256 too)."""
        keys: dict[str, Any] = {"batch_size": self.batch_size, "data_seed": self.seed,
                                "n_examples": len(self.data)}
        if pin_data:
            keys["data_sha256"] = data_sha256(self.data)
        return keys


def live_header() -> dict[str, Any]:
    """Journal header keys of a run fed live batches (`Session.step`)."""
    return {"feed": "live"}


def as_batch(bundle: Bundle, x: Any, y: Any) -> Batch:
    """One sample or one batch from an app, as the model's batch (x float32, y int64 labels
    for classifiers, float32 targets otherwise); a single sample gets a batch axis.

    Args:
        x: model input [*input_shape] (one sample) or [n, *input_shape]; for a model with
            several inputs a dict input name -> array (`edgelearn.inputs`).
        y: its label / target (scalar or [n, ...]).
    """
    specs = bundle.inputs
    if isinstance(x, Mapping):
        x = feeds(specs, x)
        lead = next((s for s in specs if has_batch_axis(s)), specs[0])
        if x[lead.name].ndim == len(lead.shape) - 1:  # one sample: a batch of one
            x = {s.name: x[s.name][None] if has_batch_axis(s) else x[s.name] for s in specs}
            y = np.asarray(y)[None]
        n = len(x[lead.name])
    else:
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise InputError(f"x must hold numbers, got dtype {x.dtype}")
        x = np.ascontiguousarray(convert(specs[0], x, "x")) if np.dtype(specs[0].dtype).kind \
            in "iub" else np.ascontiguousarray(x, dtype=np.float32)
        y = np.asarray(y)
        if x.ndim == len(specs[0].shape) - 1:  # one sample: a batch of one
            x, y = x[None], y[None]
        n = len(x)
    y = np.asarray(y)
    if bundle.task == "classification":
        if y.dtype.kind not in "iu":
            raise InputError(f"y must be integer class labels, got {y.dtype}")
        y = np.ascontiguousarray(y, dtype=np.int64).reshape(-1)
    else:
        y = np.ascontiguousarray(y, dtype=np.float32)
    if len(y) != n:
        raise InputError(f"x has {n} examples but y has {len(y)}")
    arrays = list(x.values()) if isinstance(x, dict) else [x]
    if not all(np.isfinite(a).all() for a in [*arrays, y] if a.dtype.kind == "f"):
        raise InputError("the batch contains NaN or inf")
    return x, y


def _encode(a: Inputs) -> dict[str, Any]:
    if isinstance(a, Mapping):  # a multi-input batch: {"inputs": {name: array}}
        return {"inputs": {k: _encode(v) for k, v in a.items()}}
    return {"dtype": a.dtype.str, "shape": list(a.shape),
            "b64": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")}


def _decode(d: Any, where: str) -> Inputs:
    if isinstance(d, dict) and isinstance(d.get("inputs"), dict):
        return {str(k): _decode_array(v, where) for k, v in d["inputs"].items()}
    return _decode_array(d, where)


def _decode_array(d: Any, where: str) -> np.ndarray:
    try:
        dtype = np.dtype(d["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"dtype {dtype}")
        return np.frombuffer(base64.b64decode(d["b64"]), dtype).reshape(d["shape"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{where}: malformed sample record ({e})") from None


class SampleLog:
    """The writer of `samples.bin`: one record per step, synced before the training journal.

    Args:
        path: the file. steps: step records the training journal holds (samples of later
            steps, from a run killed before journaling them, are dropped).
    """

    def __init__(self, path: Path, *, steps: int) -> None:
        self.journal = Journal(path, fsync_every=1 << 62)  # synced by the training journal
        keep = 0
        for rec in iter_journal(path, max_records=len(self.journal)):
            if not (isinstance(rec.get("step"), int) and rec["step"] < steps):
                break
            keep += 1
        if keep < len(self.journal):
            self.journal.truncate_to(keep)

    def append(self, step: int, x: Inputs, y: np.ndarray) -> None:
        """Record the batch of `step`."""
        self.journal.append({"step": step, "x": _encode(x), "y": _encode(y)})

    def sync(self) -> None:
        """fsync the samples appended so far."""
        self.journal.sync()

    def close(self) -> None:
        """Sync and close (idempotent)."""
        self.journal.close()


class SampleReader:
    """Recorded batches by step, streamed in step order from `samples.bin` (constant memory).

    Args:
        path: the samples file.
    """

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise InputError(f"{path}: the run's recorded samples are missing (replaying its "
                             "steps needs them; keep samples.bin beside journal.bin)")
        self.path = path
        self._records: Iterator[dict[str, Any]] = iter_journal(path)

    def batch(self, step: int) -> Batch:
        """The batch recorded for `step` (steps must be asked for in increasing order)."""
        for rec in self._records:
            if rec.get("step") == step:
                return _decode(rec.get("x"), str(self.path)), _decode(rec.get("y"),
                                                                      str(self.path))
            if not isinstance(rec.get("step"), int) or rec["step"] > step:
                break
        raise InputError(f"{self.path}: no recorded samples for step {step}")
