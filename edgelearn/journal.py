"""Append-only, checksummed, fsynced journal of JSON records (e.g. per-step training state).

File layout: the 8-byte magic ``b"ELJRNL01"``, then records. Each record is an 8-byte
little-endian header ``<II`` = (payload length in bytes, CRC-32 of the payload) followed by the
payload, a UTF-8 JSON object written with sorted keys, compact separators and
``allow_nan=False``. Python floats round-trip exactly through JSON (``repr`` is shortest
round-trip), so values read back compare equal to the values appended.

Crash model: a write interrupted by a crash can leave a torn tail (short header, short payload,
or bytes whose CRC does not match). Readers stop at the *first* record that is incomplete,
oversized, fails its CRC or is not a JSON object, and report how many bytes before it are good;
anything after that point is ignored, even if valid-looking records follow (a journal is only
ever appended to, so valid data after a bad record means the file was damaged some other way,
and replaying past a hole would silently skip a step). ``Journal`` truncates such a tail on open
so new records never follow garbage.

Durability policy: ``fsync_every`` N records and/or ``fsync_seconds`` S seconds (whichever
comes first); ``sync()`` forces one (training calls it before every checkpoint). A SIGKILL loses
nothing that was appended (records are written to the OS at once); a power loss loses at most
the records appended since the last fsync, and the torn tail is dropped on the next open.

Memory: the writer keeps a record count, not the records, and readers can stream
(``iter_journal``), so a run of any length costs constant memory; ``read_journal`` and
``Journal.records`` build a list and are meant for short journals, inspection and tests.

Single writer only: no file locking is done here (training holds a lock on its run directory).
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, BinaryIO

from edgelearn.errors import EdgelearnError
from edgelearn.osutil import fsync_dir

MAGIC = b"ELJRNL01"
MAX_RECORD_BYTES = 16 << 20
_HEADER = struct.Struct("<II")


class JournalError(EdgelearnError, ValueError):
    """A journal file is missing or has a bad magic, or a record cannot be journaled."""


def _reject_constant(name: str) -> Any:
    # json.loads accepts NaN/Infinity by default; the writer never emits them, so seeing one
    # means the payload is not ours.
    raise ValueError(f"non-finite JSON constant {name}")


#: the record encoder (what json.dumps(sort_keys=True, separators=(",", ":"), allow_nan=False)
#: builds on every call; one instance, the same text)
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)


def _encode(record: dict[str, Any]) -> bytes:
    """Serialize one record to header + payload bytes.

    Args:
        record: JSON-serializable dict; floats must be finite.

    Returns:
        bytes: 8-byte ``<II`` header followed by the UTF-8 JSON payload.
    """
    return _encode_text(record)[0]


def _encode_text(record: dict[str, Any]) -> tuple[bytes, str]:
    """`_encode`'s bytes and the JSON text of the payload (decoded back by `append`)."""
    if not isinstance(record, dict):
        raise JournalError(f"journal record must be a dict, got {type(record).__name__}")
    try:
        text = _ENCODER.encode(record)
    except ValueError as exc:
        raise JournalError(f"journal record is not finite JSON (NaN/inf?): {exc}") from exc
    except TypeError as exc:
        raise JournalError(f"journal record is not JSON-serializable: {exc}") from exc
    payload = text.encode("utf-8")
    if len(payload) > MAX_RECORD_BYTES:
        raise JournalError(
            f"journal record is {len(payload)} bytes, over MAX_RECORD_BYTES={MAX_RECORD_BYTES}"
        )
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload, text


def _check_magic(f: BinaryIO, path: str | os.PathLike[str]) -> None:
    if f.read(len(MAGIC)) != MAGIC:
        raise JournalError(f"{os.fspath(path)!r} is not a journal (bad or missing magic)")


def _iter_records(f: BinaryIO) -> Iterator[tuple[dict[str, Any], int]]:
    """Yield the valid records of an open journal positioned just after its magic.

    Args:
        f: binary file object opened for reading.

    Yields:
        (record, end): the decoded record and the byte offset where it ends. Stops at the
        first torn or corrupt record; nothing is kept between records (constant memory).
    """
    end = len(MAGIC)
    while True:
        header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        length, crc = _HEADER.unpack(header)
        # Checked before reading: a corrupt length must not make us allocate gigabytes.
        if length > MAX_RECORD_BYTES:
            return
        payload = f.read(length)
        if len(payload) < length or zlib.crc32(payload) != crc:
            return
        try:
            record = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
        except ValueError:  # includes UnicodeDecodeError and json.JSONDecodeError
            return
        if not isinstance(record, dict):
            return
        end += _HEADER.size + length
        yield record, end


def _open_checked(path: str | os.PathLike[str], max_records: int | None) -> BinaryIO:
    """Open a journal for reading, positioned after its (checked) magic."""
    if max_records is not None and (isinstance(max_records, bool) or max_records < 0):
        raise JournalError(f"max_records must be None or >= 0, got {max_records!r}")
    try:
        f = open(path, "rb")  # noqa: SIM115 - the callers close it
    except FileNotFoundError as exc:
        raise JournalError(f"journal {os.fspath(path)!r} does not exist") from exc
    try:
        _check_magic(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _prefix(
    f: BinaryIO, max_records: int | None
) -> Iterator[tuple[dict[str, Any], int]]:
    """The first max_records (all when None) of `_iter_records(f)`."""
    for n, item in enumerate(_iter_records(f)):
        if max_records is not None and n >= max_records:
            return
        yield item


def iter_journal(
    path: str | os.PathLike[str], *, max_records: int | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the records of a journal's valid prefix one by one (constant memory).

    Same stopping rule as `read_journal`; use it for journals of long runs, where a list of
    every record grows with the run. The file is opened and its magic checked at the call.

    Args:
        path: journal file path.
        max_records: stop after this many records (>= 0); None reads all.
    """
    f = _open_checked(path, max_records)

    def records() -> Iterator[dict[str, Any]]:
        with f:
            for record, _ in _prefix(f, max_records):
                yield record

    return records()


def read_journal(
    path: str | os.PathLike[str], *, max_records: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Read the valid prefix of a journal.

    Reading stops at the first torn or corrupt record (short header or payload, length over
    ``MAX_RECORD_BYTES``, CRC mismatch, payload not a JSON object); records after it are not
    returned even if they look valid.

    Args:
        path: journal file path.
        max_records: read at most this many records (>= 0); None reads all.

    Returns:
        (records, valid_length): list of dicts in append order, and the byte offset (from file
        start, including the magic) where the last returned record ends.
    """
    records, end = [], len(MAGIC)
    with _open_checked(path, max_records) as f:
        for record, end in _prefix(f, max_records):  # noqa: B007 - `end` is returned
            records.append(record)
    return records, end


def _count(path: str | os.PathLike[str], max_records: int | None = None) -> tuple[int, int]:
    """(records, byte offset where they end) of a journal's valid prefix, nothing kept."""
    n, end = 0, len(MAGIC)
    with _open_checked(path, max_records) as f:
        for _, end in _prefix(f, max_records):  # noqa: B007 - `end` is returned
            n += 1
    return n, end


class Journal:
    """Append-only writer; keeps the record count, not the records (constant memory)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync_every: int = 1,
        fsync_seconds: float | None = None,
        before_sync: Callable[[], None] | None = None,
    ) -> None:
        """Open a journal for appending, creating it or repairing a torn tail.

        Args:
            path: journal file path; created (with magic) if missing. An existing empty file,
                or one holding only a prefix of the magic (crash during creation), is
                re-initialized.
            fsync_every: fsync after every this many appends (>= 1; 1 = every record).
                Records appended since the last fsync may be lost on power failure.
            fsync_seconds: also fsync on the first append at least this many seconds (monotonic
                clock) after the last fsync; None = no time-based policy. Combine with a large
                ``fsync_every`` for "every S seconds" (bounded loss in time, not in records).
            before_sync: called before every fsync of this journal: makes another file
                durable first (a run's recorded samples before the steps that used them).
        """
        if isinstance(fsync_every, bool) or not isinstance(fsync_every, int) or fsync_every < 1:
            raise JournalError(f"fsync_every must be an int >= 1, got {fsync_every!r}")
        if fsync_seconds is not None and not (
            isinstance(fsync_seconds, int | float) and not isinstance(fsync_seconds, bool)
            and math.isfinite(fsync_seconds) and fsync_seconds >= 0
        ):
            raise JournalError(f"fsync_seconds must be None or a finite number >= 0, "
                               f"got {fsync_seconds!r}")
        self.path = os.fspath(path)
        self.fsync_every = fsync_every
        self.fsync_seconds = None if fsync_seconds is None else float(fsync_seconds)
        self._before_sync = before_sync
        self._unsynced = 0
        self._synced_at = time.monotonic()
        self._create_if_missing()
        # Only the count and the end offset are kept, never the records: a long run's
        # journal must not grow the process (records are read back from the file on demand).
        self._n, end = _count(self.path)
        size = os.path.getsize(self.path)
        # Unbuffered: each append is exactly one write() syscall; O_APPEND keeps it at EOF
        # even after ftruncate.
        self._file: BinaryIO | None = open(self.path, "ab", buffering=0)  # noqa: SIM115
        if size > end:
            os.ftruncate(self._file.fileno(), end)
            os.fsync(self._file.fileno())

    def _create_if_missing(self) -> None:
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            size = -1
        if size >= len(MAGIC):
            return
        if size > 0:
            with open(self.path, "rb") as f:
                head = f.read()
            if not MAGIC.startswith(head):
                raise JournalError(f"{self.path!r} is not a journal (bad or missing magic)")
        # Missing, empty or torn during creation: (re)write the magic durably.
        with open(self.path, "wb") as f:
            f.write(MAGIC)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def _require_open(self) -> BinaryIO:
        if self._file is None:
            raise JournalError(f"journal {self.path!r} is closed")
        return self._file

    def _write_all(self, data: bytes) -> None:
        f = self._require_open()
        view = memoryview(data)
        # Raw FileIO.write may write fewer bytes than asked (e.g. near disk-full); finish it.
        while view:
            n = f.write(view)
            if n is None or n <= 0:
                raise OSError(f"short write to journal {self.path!r}")
            view = view[n:]

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one record; fsync per the policy (``fsync_every`` / ``fsync_seconds``).

        Args:
            record: JSON-serializable dict with finite floats (NaN/inf raise JournalError,
                a ValueError).

        Returns:
            the record as a reader will see it (decoded from the written payload: tuples ->
            lists, int keys -> str), a new object the caller's later mutation cannot change.
        """
        return json.loads(self.append_text(record))

    def append_text(self, record: dict[str, Any]) -> str:
        """`append`, returning the payload's JSON text (decoded only by a caller that reads
        it: decoding costs a small model's step more than the write)."""
        self._require_open()
        data, text = _encode_text(record)
        self._write_all(data)
        self._require_open().flush()
        self._n += 1
        self._unsynced += 1
        if self._unsynced >= self.fsync_every or (
            self.fsync_seconds is not None
            and time.monotonic() - self._synced_at >= self.fsync_seconds
        ):
            self.sync()
        return text

    def sync(self) -> None:
        """Flush and fsync any appended records to stable storage."""
        f = self._require_open()
        if self._before_sync is not None:
            self._before_sync()
        f.flush()
        os.fsync(f.fileno())
        self._unsynced = 0
        self._synced_at = time.monotonic()

    @property
    def unsynced(self) -> int:
        """Records appended since the last fsync (what a power loss could take)."""
        return self._unsynced

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record, read back from the file (cost grows with the journal: for inspection
        and tests; training streams with `iter_journal` instead)."""
        return read_journal(self.path, max_records=self._n)[0]

    def truncate_to(self, n_records: int) -> None:
        """Drop every record after the first ``n_records`` and fsync.

        Args:
            n_records: number of records to keep, 0 <= n_records <= len(self).
        """
        f = self._require_open()
        if (
            isinstance(n_records, bool)
            or not isinstance(n_records, int)
            or not 0 <= n_records <= self._n
        ):
            raise JournalError(
                f"n_records must be an int in [0, {self._n}], got {n_records!r}"
            )
        f.flush()
        _, end = _count(self.path, n_records)  # offsets are not kept: scan (rarely used)
        os.ftruncate(f.fileno(), end)
        os.fsync(f.fileno())
        self._n = n_records
        self._unsynced = 0

    def close(self) -> None:
        """Fsync pending records and close the file; idempotent."""
        if self._file is None:
            return
        try:
            self.sync()
        finally:
            self._file.close()
            self._file = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __len__(self) -> int:
        return self._n


__all__ = ["MAGIC", "MAX_RECORD_BYTES", "Journal", "JournalError", "iter_journal", "read_journal"]
