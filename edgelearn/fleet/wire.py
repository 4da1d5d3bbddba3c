"""The bytes a fleet node and its server exchange: one checksummed binary frame, never pickle.

A frame is `<4s B I 32s I I H B` = (magic b"ELFL", kind, round, base sha256 digest (raw 32
bytes), count, n_examples, row, dtype code) followed by `count` little-endian values (float64
"d" or float32 "f") and a CRC-32 of everything before it. Kinds:

    ZO_UPDATE  client -> server: the projected gradients g of its `count` local zo-sgd steps
               (journal records, seeds implied by the assigned pool row), base = the weights
               it trained from
    ZO_STATE   server -> client: the accumulated per-seed coefficients A (FedKSeed)
    AVG_UPDATE client -> server: its trainable slice after the round (FedAvg baseline)
    AVG_STATE  server -> client: the global trainable slice (FedAvg baseline)

`decode` checks everything a hostile or damaged frame could get wrong (size, magic, kind,
CRC, counts, finite values) and raises WireError with the reason; semantic checks (round,
base, row, bounds) are the receiver's.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from edgelearn.errors import InputError

MAGIC = b"ELFL"
ZO_UPDATE, ZO_STATE, AVG_UPDATE, AVG_STATE = 1, 2, 3, 4
KINDS = (ZO_UPDATE, ZO_STATE, AVG_UPDATE, AVG_STATE)
_HEAD = struct.Struct("<4sBI32sIIHB")
_CRC = struct.Struct("<I")
_DTYPES = {ord("d"): np.dtype("<f8"), ord("f"): np.dtype("<f4")}
#: frames larger than this are refused before anything is allocated
MAX_FRAME_BYTES = 256 << 20


class WireError(InputError):
    """A frame that is damaged, hostile or not what the receiver expects."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame.

    Args:
        kind: ZO_UPDATE, ZO_STATE, AVG_UPDATE or AVG_STATE.
        round: the federation round it belongs to (1-based; 0: before the first).
        base: hex sha256 digest of the weights it starts from (ZO_UPDATE, AVG_UPDATE) or
            leads to (ZO_STATE, AVG_STATE).
        values: float64 or float32 [count].
        n_examples: the client's local examples (weight of its update); 0 for states.
        row: the pool row the client trained (ZO_UPDATE), else 0.
    """

    kind: int
    round: int
    base: str
    values: np.ndarray
    n_examples: int = 0
    row: int = 0


def encode(frame: Frame) -> bytes:
    """The frame's bytes (values as float64 unless they are float32)."""
    values = np.asarray(frame.values)
    code = ord("f") if values.dtype == np.float32 else ord("d")
    data = np.ascontiguousarray(values, dtype=_DTYPES[code]).tobytes()
    head = _HEAD.pack(MAGIC, frame.kind, frame.round, bytes.fromhex(frame.base),
                      values.size, frame.n_examples, frame.row, code)
    body = head + data
    return body + _CRC.pack(zlib.crc32(body))


def decode(data: object) -> Frame:
    """Parse and check a frame (WireError naming what is wrong)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"payload is {type(data).__name__}, not bytes")
    data = bytes(data)
    if not _HEAD.size + _CRC.size <= len(data) <= MAX_FRAME_BYTES:
        raise WireError(f"payload of {len(data)} bytes is not a frame")
    magic, kind, rnd, base, count, n_ex, row, code = _HEAD.unpack_from(data)
    if magic != MAGIC or kind not in KINDS or code not in _DTYPES:
        raise WireError("payload is not an edgelearn fleet frame (magic, kind or dtype)")
    want = _HEAD.size + count * _DTYPES[code].itemsize + _CRC.size
    if len(data) != want:
        raise WireError(f"frame says {count} values ({want} bytes) but has {len(data)} bytes")
    if _CRC.unpack_from(data, want - _CRC.size)[0] != zlib.crc32(data[: want - _CRC.size]):
        raise WireError("frame checksum does not match (corrupt payload)")
    values = np.frombuffer(data, _DTYPES[code], count, _HEAD.size).copy()
    if not np.all(np.isfinite(values)):
        raise WireError("frame holds non-finite values")
    return Frame(kind, rnd, base.hex(), values, n_ex, row)
