"""Tests for edgelearn.journal: exact round-trip, torn tails, corruption and truncation."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest

from edgelearn.errors import EdgelearnError
from edgelearn.journal import (
    MAGIC,
    MAX_RECORD_BYTES,
    Journal,
    JournalError,
    iter_journal,
    read_journal,
)

FLOATS = [0.1, 1e-300, -0.0, 5e-324, 1.7976931348623157e308, 1 / 3, -2.5, 0.0]


def sample_records() -> list[dict]:
    return [
        {"step": 0, "loss": 0.1, "lr": 1e-300},
        {"step": 1, "values": FLOATS, "name": "héllo ✓", "nested": {"a": [1, None, True]}},
        {"step": 2, "loss": -0.0, "seed": 2**63 + 5},
    ]


def write(path: Path, records: list[dict], **kw: int) -> None:
    with Journal(path, **kw) as j:
        for r in records:
            j.append(r)


def test_round_trip_exact_floats(tmp_path: Path) -> None:
    path = tmp_path / "j.bin"
    recs = sample_records()
    write(path, recs)
    got, valid = read_journal(path)
    assert got == recs
    assert valid == path.stat().st_size
    # == treats -0.0 == 0.0; check the sign bit and exact bit patterns explicitly.
    assert str(got[2]["loss"]) == "-0.0"
    for a, b in zip(got[1]["values"], FLOATS, strict=True):
        assert struct.pack("<d", a) == struct.pack("<d", b)


def test_file_starts_with_magic_and_header_layout(tmp_path: Path) -> None:
    path = tmp_path / "j.bin"
    write(path, [{"b": 1, "a": 0.5}])
    data = path.read_bytes()
    assert data[:8] == MAGIC
    length, crc = struct.unpack("<II", data[8:16])
    payload = data[16:]
    assert length == len(payload)
    assert crc == zlib.crc32(payload)
    assert payload == b'{"a":0.5,"b":1}'


def test_records_exposed_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "j.bin"
    write(path, sample_records())
    with Journal(path) as j:
        assert j.records == sample_records()
        j.append({"step": 3})
        assert len(j) == 4
    assert read_journal(path)[0] == [*sample_records(), {"step": 3}]


def test_records_are_decoded_copies(tmp_path: Path) -> None:
    rec = {"t": (1, 2), "k": 1}
    with Journal(tmp_path / "j.bin") as j:
        j.append(rec)
        rec["k"] = 99
        assert j.records == [{"t": [1, 2], "k": 1}]


def test_torn_tail_every_offset(tmp_path: Path) -> None:
    path = tmp_path / "j.bin"
    recs = sample_records()
    write(path, recs)
    full = path.read_bytes()
    _, good_len = read_journal(path, max_records=len(recs) - 1)
    for cut in range(good_len, len(full)):
        path.write_bytes(full[:cut])
        got, valid = read_journal(path)
        assert got == recs[:-1], cut
        assert valid == good_len, cut
        with Journal(path) as j:
            assert j.records == recs[:-1]
            assert path.stat().st_size == good_len  # torn tail removed on open
            j.append({"step": "new"})
        got, valid = read_journal(path)
        assert got == [*recs[:-1], {"step": "new"}], cut
        assert valid == path.stat().st_size


def test_flipped_payload_byte_drops_record(tmp_path: Path) -> None:
    path = tmp_path / "j.bin"
    recs = sample_records()
    write(path, recs)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    got, _ = read_journal(path)
    assert got == recs[:-1]


def test_corrupt_middle_record_stops_reading(tmp_path: Path) -> None:
    path = tmp_path / "j.bin"
    recs = sample_records()
    write(path, recs)
    _, end0 = read_journal(path, max_records=1)
    data = bytearray(path.read_bytes())
    data[end0 + 8 + 2] ^= 0xFF  # inside record 1's payload; record 2 is intact after it
    path.write_bytes(bytes(data))
    got, valid = read_journal(path)
    assert got == recs[:1]
    assert valid == end0


def test_oversized_length_is_corrupt_tail(tmp_path: Path) -> None:
    path = tmp_path / "j.bin"
    write(path, [{"a": 1}])
    good = path.stat().st_size
    with path.open("ab") as f:
        f.write(struct.pack("<II", MAX_RECORD_BYTES + 1, 0) + b"x" * 10)
    got, valid = read_journal(path)
    assert got == [{"a": 1}]
    assert valid == good


def test_valid_crc_non_object_json_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "j.bin"
    write(path, [{"a": 1}])
    for payload in (b"[1,2]", b"{not json", b"\xff\xfe", b'{"a":NaN}'):
        with path.open("ab") as f:
            f.write(struct.pack("<II", len(payload), zlib.crc32(payload)) + payload)
        assert read_journal(path)[0] == [{"a": 1}]
        Journal(path).close()  # truncates the bad tail again


def test_bad_magic_raises(tmp_path: Path) -> None:
    path = tmp_path / "j.bin"
    path.write_bytes(b"NOTAJRNL" + b"\x00" * 16)
    with pytest.raises(JournalError, match="magic"):
        read_journal(path)
    with pytest.raises(JournalError, match="magic"):
        Journal(path)
    assert issubclass(JournalError, EdgelearnError)
    assert issubclass(JournalError, ValueError)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="does not exist"):
        read_journal(tmp_path / "nope.bin")


@pytest.mark.parametrize("content", [b"", b"ELJ"])
def test_torn_creation_is_reinitialized(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "j.bin"
    path.write_bytes(content)
    write(path, [{"a": 1}])
    assert read_journal(path)[0] == [{"a": 1}]


def test_new_file_has_only_magic(tmp_path: Path) -> None:
    path = tmp_path / "j.bin"
    Journal(path).close()
    assert path.read_bytes() == MAGIC
    assert read_journal(path) == ([], len(MAGIC))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises_value_error(tmp_path: Path, bad: float) -> None:
    path = tmp_path / "j.bin"
    with Journal(path) as j:
        j.append({"ok": 1})
        with pytest.raises(ValueError, match="finite"):
            j.append({"loss": bad})
        assert j.records == [{"ok": 1}]
    assert read_journal(path)[0] == [{"ok": 1}]


def test_bad_record_types_raise(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.bin") as j:
        with pytest.raises(JournalError, match="dict"):
            j.append([1, 2])  # type: ignore[arg-type]
        with pytest.raises(JournalError, match="serializable"):
            j.append({"x": object()})


def test_fsync_every_three(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "j.bin"
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    j = Journal(path, fsync_every=3)
    monkeypatch.setattr(os, "fsync", counting_fsync)
    for i in range(7):
        j.append({"i": i})
    assert len(calls) == 2  # after appends 3 and 6
    # Unsynced records are still written (flushed to the OS) and readable.
    assert read_journal(path)[0] == [{"i": i} for i in range(7)]
    j.close()
    assert len(calls) == 3  # close syncs the pending 7th
    assert read_journal(path)[0] == [{"i": i} for i in range(7)]


def test_bad_fsync_every_raises(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="fsync_every"):
        Journal(tmp_path / "j.bin", fsync_every=0)


def test_truncate_to(tmp_path: Path) -> None:
    path = tmp_path / "j.bin"
    with Journal(path) as j:
        for i in range(5):
            j.append({"i": i})
        j.truncate_to(2)
        assert j.records == [{"i": 0}, {"i": 1}]
        assert read_journal(path)[0] == [{"i": 0}, {"i": 1}]
        j.append({"i": "after"})
        j.truncate_to(3)  # no-op
        with pytest.raises(JournalError, match="n_records"):
            j.truncate_to(4)
        with pytest.raises(JournalError, match="n_records"):
            j.truncate_to(-1)
    got, valid = read_journal(path)
    assert got == [{"i": 0}, {"i": 1}, {"i": "after"}]
    assert valid == path.stat().st_size
    with Journal(path) as j:
        j.truncate_to(0)
    assert path.read_bytes() == MAGIC


def test_max_records(tmp_path: Path) -> None:
    path = tmp_path / "j.bin"
    write(path, sample_records())
    assert read_journal(path, max_records=0) == ([], len(MAGIC))
    assert read_journal(path, max_records=2)[0] == sample_records()[:2]


def test_closed_journal_raises(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.bin")
    j.close()
    j.close()  # idempotent
    with pytest.raises(JournalError, match="closed"):
        j.append({"a": 1})


def test_iter_journal_streams_the_valid_prefix(tmp_path: Path) -> None:
    path = tmp_path / "j.bin"
    recs = sample_records()
    write(path, recs)
    assert list(iter_journal(path)) == recs
    assert list(iter_journal(path, max_records=2)) == recs[:2]
    with open(path, "rb+") as f:  # torn last record
        f.truncate(path.stat().st_size - 3)
    assert list(iter_journal(path)) == recs[:2]
    with pytest.raises(JournalError, match="does not exist"):
        iter_journal(tmp_path / "nope.bin")  # raised at the call, not at the first next()
    (tmp_path / "bad.bin").write_bytes(b"garbage!")
    with pytest.raises(JournalError, match="magic"):
        iter_journal(tmp_path / "bad.bin")


def test_writer_memory_does_not_grow_with_records(tmp_path: Path) -> None:
    import tracemalloc

    record = {"kind": "step", "evals": [0.1] * 40, "note": "x" * 200}
    with Journal(tmp_path / "j.bin", fsync_every=10**6) as j:
        for _ in range(100):
            j.append(record)
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for _ in range(5000):  # ~3 MB on disk; a list of the records would hold more
                j.append(record)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        assert len(j) == 5100
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 64 * 1024, f"the journal writer kept {grown} bytes for 5000 records"
