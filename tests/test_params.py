"""Tests for edgelearn.params: arena layout, views, digest, safetensors save/load and the
validation of hostile safetensors headers (no torch)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgelearn.errors import BundleError
from edgelearn.params import ALIGN_BYTES, ParamSpec, ParamStore, read_safetensors_header

SPECS = [
    ParamSpec("frozen.a", (3,), "float32", trainable=False),
    ParamSpec("w1", (2, 3), "float32", trainable=True),
    ParamSpec("q.w", (4, 2), "int8", trainable=True),
    ParamSpec("frozen.b", (2, 2), "float32", trainable=False),
    ParamSpec("b1", (3,), "float32", trainable=True),
    ParamSpec("q.frozen", (5,), "int8", trainable=False),
]


def values(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for s in SPECS:
        if s.dtype == "int8":
            out[s.name] = rng.integers(-128, 128, size=s.shape).astype(np.int8)
        else:
            out[s.name] = rng.standard_normal(s.shape).astype(np.float32)
    return out


@pytest.fixture
def store() -> ParamStore:
    return ParamStore(SPECS, values=values())


# -- layout -----------------------------------------------------------------------------------
def test_values_assigned_exactly(store: ParamStore) -> None:
    for name, v in values().items():
        np.testing.assert_array_equal(store[name], v)
        assert store[name].dtype == v.dtype
        assert store[name].shape == v.shape


def test_trainable_first_and_contiguous_per_dtype(store: ParamStore) -> None:
    assert store.names == [s.name for s in SPECS]
    assert store.trainable_names == ["w1", "q.w", "b1"]
    assert set(store.arenas) == {"float32", "int8"}
    f32, i8 = store.arenas["float32"], store.arenas["int8"]
    assert f32.dtype == np.float32
    assert f32.size == 3 + 6 + 4 + 3
    assert i8.dtype == np.int8
    assert i8.size == 8 + 5
    # fp32: trainable w1, b1 (spec order), then frozen.a, frozen.b
    np.testing.assert_array_equal(
        f32,
        np.concatenate([values()[n].ravel() for n in ("w1", "b1", "frozen.a", "frozen.b")]),
    )
    np.testing.assert_array_equal(
        i8, np.concatenate([values()[n].ravel() for n in ("q.w", "q.frozen")])
    )
    assert store.n_trainable("float32") == 9
    assert store.n_trainable("int8") == 8
    assert store.n_trainable("int32") == 0
    np.testing.assert_array_equal(store.flat("float32"), f32[:9])
    np.testing.assert_array_equal(store.flat("float32", trainable=False), f32[9:])
    assert store.flat("float32", trainable=None) is f32
    assert store.flat("int32").size == 0


def test_arenas_aligned(store: ParamStore) -> None:
    for arena in store.arenas.values():
        assert arena.ctypes.data % ALIGN_BYTES == 0
    for specs in ([ParamSpec("x", (1,), "int8")], [ParamSpec("y", (7, 3))]):
        for _ in range(5):  # different allocations, different raw offsets
            s = ParamStore(specs)
            assert all(a.ctypes.data % ALIGN_BYTES == 0 for a in s.arenas.values())


def test_views_share_arena_memory(store: ParamStore) -> None:
    f32 = store.arenas["float32"]
    for name in ("w1", "b1", "frozen.a", "frozen.b"):
        assert np.shares_memory(store[name], f32)
        assert store[name].flags.c_contiguous
    assert np.shares_memory(store["q.w"], store.arenas["int8"])
    assert not np.shares_memory(store["q.w"], f32)


def test_flat_is_a_writable_view(store: ParamStore) -> None:
    flat = store.flat("float32")
    flat[0] = 123.0  # first element of w1
    flat[6:9] = [7.0, 8.0, 9.0]  # b1
    assert store["w1"][0, 0] == np.float32(123.0)
    np.testing.assert_array_equal(store["b1"], np.array([7, 8, 9], np.float32))
    flat *= 0
    assert not store["w1"].any()
    assert not store["b1"].any()
    np.testing.assert_array_equal(store["frozen.a"], values()["frozen.a"])  # untouched
    store.flat("int8")[:] = 3
    np.testing.assert_array_equal(store["q.w"], np.full((4, 2), 3, np.int8))
    np.testing.assert_array_equal(store["q.frozen"], values()["q.frozen"])
    # and the other way round: a write through a named view shows in flat()
    store["b1"][1] = -1.5
    assert store.flat("float32")[7] == np.float32(-1.5)


def test_segments(store: ParamStore) -> None:
    assert store.segments("float32") == [("w1", 0, 6), ("b1", 6, 9)]
    assert store.segments("int8") == [("q.w", 0, 8)]
    assert store.segments("int32") == []
    flat = store.flat("float32")
    for name, a, b in store.segments("float32"):
        np.testing.assert_array_equal(flat[a:b], store[name].ravel())


def test_segments_skip_frozen_empty_param() -> None:
    specs = [ParamSpec("w", (2,)), ParamSpec("empty", (0,), trainable=False)]
    s = ParamStore(specs)
    assert s.segments() == [("w", 0, 2)]


def test_all_frozen_and_state_and_copy(store: ParamStore) -> None:
    s = ParamStore([ParamSpec("a", (2,), trainable=False)], values={"a": np.ones(2, np.float32)})
    assert s.flat().size == 0
    assert s.segments() == []
    assert s.trainable_names == []
    st = store.state()
    assert list(st) == store.names
    assert all(np.shares_memory(st[n], store[n]) for n in st)
    c = store.copy()
    assert c.digest() == store.digest()
    c["w1"][...] = 0
    assert c.digest() != store.digest()
    np.testing.assert_array_equal(store["w1"], values()["w1"])


def test_unknown_name_and_dtype() -> None:
    s = ParamStore(SPECS)
    with pytest.raises(KeyError, match="nope"):
        s["nope"]
    assert "w1" in s
    assert "nope" not in s
    with pytest.raises(BundleError, match="float16"):
        ParamStore([ParamSpec("h", (2,), "float16")])
    with pytest.raises(BundleError, match="duplicate"):
        ParamStore([ParamSpec("a", (1,)), ParamSpec("a", (2,))])


@pytest.mark.parametrize(
    ("value", "what"),
    [
        (np.zeros((3, 2), np.float32), r"\[3, 2\]"),  # wrong shape (same size)
        (np.zeros((2, 3), np.float64), "float64"),  # wrong dtype
        (np.zeros(6, np.float32), r"\[6\]"),  # flat instead of shaped
    ],
)
def test_assign_rejects_mismatch(store: ParamStore, value: np.ndarray, what: str) -> None:
    before = store["w1"].copy()
    with pytest.raises(BundleError, match=f"'w1'.*{what}"):
        store.assign({"w1": value})
    np.testing.assert_array_equal(store["w1"], before)


def test_assign_unknown_name(store: ParamStore) -> None:
    with pytest.raises(KeyError, match="nope"):
        store.assign({"nope": np.zeros(1, np.float32)})


# -- digest -----------------------------------------------------------------------------------
def test_digest_stable_and_sensitive(store: ParamStore) -> None:
    d0 = store.digest()
    assert d0 == store.digest() == ParamStore(SPECS, values=values()).digest()
    assert len(d0) == 64
    old = store["frozen.b"][1, 1].copy()
    store["frozen.b"][1, 1] = np.nextafter(old, np.float32(np.inf))  # one ulp in one element
    assert store.digest() != d0
    store["frozen.b"][1, 1] = old
    assert store.digest() == d0
    store["q.frozen"][0] ^= 1  # one bit of an int8 tensor
    assert store.digest() != d0
    # -0.0 vs 0.0 compare equal but are different bytes
    s1 = ParamStore([ParamSpec("z", (1,))], values={"z": np.array([0.0], np.float32)})
    s2 = ParamStore([ParamSpec("z", (1,))], values={"z": np.array([-0.0], np.float32)})
    assert s1.digest() != s2.digest()


def test_digest_covers_names_and_shapes() -> None:
    v = np.arange(6, dtype=np.float32)
    a = ParamStore([ParamSpec("a", (6,))], values={"a": v})
    b = ParamStore([ParamSpec("b", (6,))], values={"b": v})
    c = ParamStore([ParamSpec("a", (2, 3))], values={"a": v.reshape(2, 3)})
    assert len({a.digest(), b.digest(), c.digest()}) == 3


# -- save / load ------------------------------------------------------------------------------
def test_save_load_round_trip_exact(store: ParamStore, tmp_path: Path) -> None:
    store["w1"][0, 0] = -0.0
    store["w1"][0, 1] = np.float32(1e-45)  # subnormal
    store["b1"][0] = np.float32(np.finfo(np.float32).max)
    path = store.save(tmp_path / "w.safetensors", metadata={"k": "v"})
    assert path == tmp_path / "w.safetensors"
    other = ParamStore(SPECS)
    other.load(path)
    assert other.digest() == store.digest()
    for n in store.names:
        assert other[n].tobytes() == store[n].tobytes()
    again = ParamStore.from_file(path, SPECS)
    assert again.digest() == store.digest()
    # loading does not replace the arena: views handed out before load see the new values
    view = other["w1"]
    store["w1"][...] = 5.0
    store.save(path)
    other.load(path)
    np.testing.assert_array_equal(view, np.full((2, 3), 5.0, np.float32))


def test_safetensors_file_is_standard(store: ParamStore, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    path = store.save(tmp_path / "w.safetensors")
    got = load_file(str(path))
    assert set(got) == set(store.names)
    for n, v in got.items():
        np.testing.assert_array_equal(v, store[n])
        assert v.dtype == store[n].dtype


def test_save_is_atomic_replace(store: ParamStore, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old junk that is not a weight file")
    store.save(path)
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]  # no temp file left behind
    assert ParamStore.from_file(path, SPECS).digest() == store.digest()
    store["b1"][...] = 1.0
    store.save(path)
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]
    assert ParamStore.from_file(path, SPECS).digest() == store.digest()


def test_failed_save_keeps_old_file(store: ParamStore, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    store.save(path)
    old = path.read_bytes()
    with pytest.raises(TypeError):  # safetensors metadata values must be strings
        store.save(path, metadata={"k": 1})  # type: ignore[dict-item]
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]


def test_load_rejects_other_params(store: ParamStore, tmp_path: Path) -> None:
    path = store.save(tmp_path / "w.safetensors")
    with pytest.raises(BundleError, match=r"missing tensors.*extra"):
        ParamStore.from_file(path, [*SPECS, ParamSpec("extra", (1,))])
    with pytest.raises(BundleError, match=r"unexpected tensors.*b1"):
        ParamStore.from_file(path, [s for s in SPECS if s.name != "b1"])
    bad = [ParamSpec("w1", (3, 2)) if s.name == "w1" else s for s in SPECS]
    with pytest.raises(BundleError, match=r"'w1'.*manifest says"):
        ParamStore.from_file(path, bad)
    bad = [ParamSpec("q.w", (4, 2), "uint8") if s.name == "q.w" else s for s in SPECS]
    with pytest.raises(BundleError, match=r"'q.w'.*int8"):
        ParamStore.from_file(path, bad)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="cannot read"):
        ParamStore.from_file(tmp_path / "nope.safetensors", SPECS)


# -- hostile headers --------------------------------------------------------------------------
def st_bytes(header: dict[str, Any], data: bytes, *, header_len: int | None = None) -> bytes:
    """A safetensors file built by hand: u64 header length, JSON header, raw data."""
    h = json.dumps(header).encode()
    n = len(h) if header_len is None else header_len
    return struct.pack("<Q", n) + h + data


def write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    return path


GOOD_HEADER = {
    "__metadata__": {"k": "v"},
    "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    "b": {"dtype": "I8", "shape": [3], "data_offsets": [16, 19]},
}
GOOD_DATA = np.arange(4, dtype=np.float32).tobytes() + bytes([1, 2, 255])


def test_hand_built_header_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, st_bytes(GOOD_HEADER, GOOD_DATA))
    h = read_safetensors_header(path)
    assert h == {
        "a": {"dtype": "float32", "shape": (2, 2), "data_offsets": (0, 16)},
        "b": {"dtype": "int8", "shape": (3,), "data_offsets": (16, 19)},
    }
    s = ParamStore.from_file(path, [ParamSpec("a", (2, 2)), ParamSpec("b", (3,), "int8")])
    np.testing.assert_array_equal(s["a"], np.arange(4, dtype=np.float32).reshape(2, 2))
    np.testing.assert_array_equal(s["b"], np.array([1, 2, -1], np.int8))


def test_truncated_at_many_offsets(tmp_path: Path) -> None:
    full = st_bytes(GOOD_HEADER, GOOD_DATA)
    n_header = len(full) - len(GOOD_DATA)
    for cut in sorted({0, 1, 4, 7, 8, 9, 20, n_header - 1, n_header, n_header + 5,
                       len(full) - 1}):
        path = write(tmp_path, full[:cut])
        if cut < 8:
            match = "truncated"
        elif cut < n_header:
            match = "header length"
        else:
            match = "outside"
        with pytest.raises(BundleError, match=match):
            read_safetensors_header(path)


def test_header_length_larger_than_file(tmp_path: Path) -> None:
    path = write(tmp_path, st_bytes(GOOD_HEADER, GOOD_DATA, header_len=10_000))
    with pytest.raises(BundleError, match="header length 10000 does not fit"):
        read_safetensors_header(path)
    path = write(tmp_path, st_bytes(GOOD_HEADER, GOOD_DATA, header_len=2**63))
    with pytest.raises(BundleError, match="header length"):
        read_safetensors_header(path)


def hostile(**changes: Any) -> dict[str, Any]:
    h = json.loads(json.dumps(GOOD_HEADER))
    for name, info in changes.items():
        if info is None:
            h.pop(name, None)
        else:
            h[name] = info
    return h


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (hostile(b={"dtype": "I8", "shape": [3], "data_offsets": [16, 20]}), "outside"),
        (hostile(b={"dtype": "I8", "shape": [3], "data_offsets": [-1, 2]}), "outside"),
        (hostile(b={"dtype": "I8", "shape": [3], "data_offsets": [17, 16]}), "outside"),
        (hostile(b={"dtype": "I8", "shape": [3], "data_offsets": [16]}), "outside"),
        (hostile(b={"dtype": "I8", "shape": [3], "data_offsets": [16.0, 19.0]}), "outside"),
        (hostile(b={"dtype": "I8", "shape": [3], "data_offsets": [14, 17]}), "'a' and 'b' overlap"),
        (hostile(b={"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
                 c={"dtype": "I8", "shape": [3], "data_offsets": [16, 19]}), "overlap"),
        (hostile(b={"dtype": "F16", "shape": [3], "data_offsets": [16, 19]}), "dtype 'F16'"),
        (hostile(b={"dtype": None, "shape": [3], "data_offsets": [16, 19]}), "dtype None"),
        (hostile(b={"dtype": "I8", "shape": [2], "data_offsets": [16, 19]}),
         "spans 3 bytes.*needs 2"),
        (hostile(a={"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}),
         "spans 16 bytes.*needs 24"),
        (hostile(b={"dtype": "I8", "shape": [-3], "data_offsets": [16, 19]}), "invalid shape"),
        (hostile(b={"dtype": "I8", "shape": "3", "data_offsets": [16, 19]}), "invalid shape"),
        (hostile(b={"dtype": "I8", "shape": [True], "data_offsets": [16, 17]}), "invalid shape"),
        (hostile(b=[1, 2]), "not an object"),
        (hostile(b=None, **{"../b": {"dtype": "I8", "shape": [3], "data_offsets": [16, 19]}}),
         r"invalid tensor name '\.\./b'"),
        (hostile(b=None, **{"x/../../b": {"dtype": "I8", "shape": [3],
                                          "data_offsets": [16, 19]}}), "invalid tensor name"),
        (hostile(b=None, **{"/etc/b": {"dtype": "I8", "shape": [3], "data_offsets": [16, 19]}}),
         "invalid tensor name '/etc/b'"),
        (hostile(b=None, **{"": {"dtype": "I8", "shape": [3], "data_offsets": [16, 19]}}),
         "invalid tensor name ''"),
        (hostile(b=None, **{"a\nb": {"dtype": "I8", "shape": [3], "data_offsets": [16, 19]}}),
         "invalid tensor name"),
    ],
)
def test_hostile_header(tmp_path: Path, header: dict[str, Any], match: str) -> None:
    path = write(tmp_path, st_bytes(header, GOOD_DATA))
    with pytest.raises(BundleError, match=match):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    ("raw", "match"),
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "not a JSON object"),
     (b"\xff\xfe{}", "not valid JSON")],
)
def test_header_not_a_json_object(tmp_path: Path, raw: bytes, match: str) -> None:
    path = write(tmp_path, struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(BundleError, match=match):
        read_safetensors_header(path)


def test_load_validates_before_reading(tmp_path: Path) -> None:
    """ParamStore.load goes through the same validation (hostile file -> BundleError)."""
    header = hostile(b={"dtype": "I8", "shape": [3], "data_offsets": [14, 17]})
    path = write(tmp_path, st_bytes(header, GOOD_DATA))
    store = ParamStore([ParamSpec("a", (2, 2)), ParamSpec("b", (3,), "int8")])
    with pytest.raises(BundleError, match="overlap"):
        store.load(path)
    assert not store["a"].any()


def test_setitem_writes_in_place(store: ParamStore) -> None:
    view = store["w1"]
    store["w1"] += np.float32(1.0)  # in-place operator on the view: no rebinding
    assert store["w1"] is view
    np.testing.assert_array_equal(view, values()["w1"] + np.float32(1.0))
    store["b1"] = np.array([1, 2, 3], np.float32)  # assignment copies into the arena
    assert np.shares_memory(store["b1"], store.arenas["float32"])
    np.testing.assert_array_equal(store.flat()[6:9], np.array([1, 2, 3], np.float32))
    with pytest.raises(BundleError, match="'b1'"):
        store["b1"] = np.array([1, 2, 3], np.float64)


def test_files_the_safetensors_library_writes_load_exactly(tmp_path: Path) -> None:
    """Every tensor read straight into its arena view: 0-d, empty, 2-D, int8 and int32
    tensors of a file written by the safetensors library come back bit for bit."""
    from safetensors.numpy import save_file

    vals = {"a": np.array(3.5, np.float32), "b": np.zeros((0,), np.float32),
            "c": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
            "q": np.array([-3, 7, 127], np.int8), "i": np.array([1, -2], np.int32)}
    save_file(vals, str(tmp_path / "w.safetensors"))
    loaded = ParamStore.from_file(tmp_path / "w.safetensors",
                                  [ParamSpec(k, v.shape, str(v.dtype)) for k, v in vals.items()])
    for k, v in vals.items():
        assert loaded[k].dtype == v.dtype
        assert loaded[k].tobytes() == v.tobytes()


def test_loading_peaks_at_the_arena(tmp_path: Path) -> None:
    """In a fresh process, loading 64 MB of weights raises the peak resident memory by about
    the arena's 64 MB (the safetensors library's mapped file and per-tensor copies took ~3x:
    a 400 MB model would need 1.2 GB at startup)."""
    import subprocess
    import sys

    from safetensors.numpy import save_file

    big = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    save_file({"w": big, "b": big[0].copy()}, str(tmp_path / "w.safetensors"))
    code = ("import sys; from edgelearn.osutil import current_rss_mb, peak_rss_mb; "
            "from edgelearn.params import ParamSpec, ParamStore; r0 = current_rss_mb(); "
            "s = ParamStore.from_file(sys.argv[1], [ParamSpec('w', (4096, 4096)), "
            "ParamSpec('b', (4096,))]); print(peak_rss_mb() - r0, float(s['w'][7, 9]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "w.safetensors")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert float(out[1]) == float(big[7, 9])
    assert float(out[0]) < 1.25 * 64  # MB: the arena, not the file mapped besides it
