"""Hostile input: fuzzed manifests and safetensors headers (hypothesis), ONNX external data,
memory bombs, bad data files. Each case loads correctly or raises EdgelearnError with a
message, within a time and memory bound; nothing is unpickled."""

from __future__ import annotations

import io
import json
import shutil
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import load_stress_module

from edgelearn.bundle import MANIFEST, Bundle, sha256_file
from edgelearn.data import load_npz
from edgelearn.errors import BundleError, EdgelearnError, InputError
from edgelearn.params import ParamSpec, ParamStore, read_safetensors_header

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given, settings, HealthCheck = hypothesis.given, hypothesis.settings, hypothesis.HealthCheck

ROOT = Path(__file__).resolve().parents[1]
CASE_SECONDS = 2.0  # per-case bound (generous: 2 shared cores)
RSS_GROWTH_MB = 64.0  # over a whole fuzz run


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


FUZZ = settings(max_examples=520, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
    max_leaves=6)
names = st.one_of(st.sampled_from(["W1", "b1", "W2", "b2", "a.b", "../x", "/abs", "a/../b",
                                   "x" * 600, "", "ok/name", "nul\x00", "é"]),
                  st.text(max_size=10))
dims = st.one_of(st.integers(0, 8), st.sampled_from([-1, 2**31, 2**40, 2**62]), json_leaf)


def _outcome(fn: Any) -> str:
    """Run one case: 'ok' or 'error'; anything else (a crash) propagates and fails the test."""
    t0 = time.perf_counter()
    message = None
    try:
        fn()
    except EdgelearnError as e:
        message = str(e).strip()
    assert message != "", "an error must say what is wrong"
    assert time.perf_counter() - t0 < CASE_SECONDS
    result = "ok" if message is None else "error"
    return result


# -- safetensors headers -----------------------------------------------------------------------
@st.composite
def st_files(draw: Any) -> bytes:
    header: dict[str, Any] = {}
    pos = 0
    for _ in range(draw(st.integers(0, 4))):
        shape = draw(st.lists(dims, max_size=3))
        dtype = draw(st.sampled_from(["F32", "I8", "I32", "U8", "F64", "BF16", "", None]))
        honest = draw(st.booleans())
        if honest and all(type(d) is int and 0 <= d <= 8 for d in shape):
            size = int(np.prod(shape, dtype=np.int64)) * {"I8": 1, "U8": 1}.get(str(dtype), 4)
            offs: Any = [pos, pos + size]
            pos += size
        else:
            offs = draw(st.one_of(st.lists(st.integers(-5, 2**40), min_size=0, max_size=3),
                                  json_value))
        entry: Any = {"dtype": dtype, "shape": shape, "data_offsets": offs}
        if draw(st.integers(0, 9)) == 0:
            entry = draw(json_value)
        header[draw(names)] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_value)
    raw = json.dumps(header).encode()
    if draw(st.integers(0, 9)) == 0:
        raw = draw(st.binary(max_size=40))
    data = bytes(draw(st.integers(0, pos + 8)))
    n = len(raw) if draw(st.integers(0, 5)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", n) + raw + data


def test_fuzz_safetensors_headers(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    counts = {"ok": 0, "error": 0}
    rss0 = rss_mb()

    @FUZZ
    @given(st_files())
    def case(content: bytes) -> None:
        path.write_bytes(content)

        def load() -> None:
            header = read_safetensors_header(path)
            specs = [ParamSpec(k, v["shape"], v["dtype"]) for k, v in header.items()]
            store = ParamStore.from_file(path, specs)
            for s in specs:
                assert store[s.name].shape == tuple(s.shape)

        counts[_outcome(load)] += 1

    case()
    assert sum(counts.values()) >= 500, counts
    assert counts["ok"] > 0, counts  # the generator also makes valid files
    assert counts["error"] > 0, counts
    assert rss_mb() - rss0 < RSS_GROWTH_MB


# -- manifests ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx")
    return load_stress_module().make_bundle(tmp_path_factory.mktemp("hostile") / "bundle")


MUTATION_KEYS = ["format", "format_version", "task", "inputs", "outputs", "params", "files"]


@st.composite
def st_manifests(draw: Any, base: dict[str, Any]) -> dict[str, Any]:
    m = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 5))
        if kind == 0:  # replace a top-level value
            m[draw(st.sampled_from(MUTATION_KEYS))] = draw(json_value)
        elif kind == 1:  # a parameter's shape (memory bombs included)
            p = draw(st.sampled_from(m["params"])) if isinstance(m.get("params"), list) \
                and m["params"] and isinstance(m["params"][0], dict) else None
            if p is not None:
                p["shape"] = draw(st.lists(dims, max_size=4))
        elif kind == 2:  # a parameter's name or dtype
            p = draw(st.sampled_from(m["params"])) if isinstance(m.get("params"), list) \
                and m["params"] and isinstance(m["params"][0], dict) else None
            if p is not None:
                p[draw(st.sampled_from(["name", "dtype", "trainable"]))] = draw(
                    st.one_of(names, json_leaf))
        elif kind == 3:  # file paths that try to leave the bundle
            f = m.get("files")
            if isinstance(f, dict) and f:
                role = draw(st.sampled_from(sorted(f)))
                if isinstance(f[role], dict):
                    f[role]["path"] = draw(st.sampled_from(
                        ["../weights.safetensors", "/etc/passwd", "..", ".", "sub/x",
                         "link_out", "model.onnx", "weights.safetensors", "", "a\\b"]))
        elif kind == 4:  # sizes and hashes
            f = m.get("files")
            if isinstance(f, dict) and f:
                role = draw(st.sampled_from(sorted(f)))
                if isinstance(f[role], dict):
                    f[role][draw(st.sampled_from(["size", "sha256"]))] = draw(json_leaf)
        else:  # an input/output spec
            key = draw(st.sampled_from(["inputs", "outputs"]))
            if isinstance(m.get(key), list) and m[key] and isinstance(m[key][0], dict):
                m[key][0][draw(st.sampled_from(["name", "shape", "dtype"]))] = draw(json_value)
    return m


def test_fuzz_bundle_manifests(good_bundle: Path, tmp_path: Path) -> None:
    d = tmp_path / "b"
    shutil.copytree(good_bundle, d)
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"outside the bundle")
    (d / "link_out").symlink_to(outside)
    base = json.loads((good_bundle / MANIFEST).read_text())
    counts = {"ok": 0, "error": 0}
    rss0 = rss_mb()

    @FUZZ
    @given(st_manifests(base))
    def case(m: dict[str, Any]) -> None:
        (d / MANIFEST).write_text(json.dumps(m))

        def load() -> None:
            b = Bundle(d)
            for p in b.files.values():  # every file it accepted lies inside the bundle
                assert p.resolve().parent == d.resolve()
            b.load_store()

        counts[_outcome(load)] += 1

    case()
    assert sum(counts.values()) >= 500, counts
    assert counts["error"] > 0, counts
    assert rss_mb() - rss0 < RSS_GROWTH_MB


def test_manifest_memory_bomb_fails_before_allocating(good_bundle: Path, tmp_path: Path) -> None:
    d = tmp_path / "b"
    shutil.copytree(good_bundle, d)
    m = json.loads((d / MANIFEST).read_text())
    m["params"][0]["shape"] = [2**30, 2**30]  # 4 EiB of float32
    (d / MANIFEST).write_text(json.dumps(m))
    rss0 = rss_mb()
    with pytest.raises(BundleError, match="elements"):
        Bundle(d)
    m["params"][0]["shape"] = [2**16, 2**16]  # 16 GiB: under the element cap, not in the file
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest says"):
        Bundle(d)
    assert rss_mb() - rss0 < 16


# -- ONNX external data -----------------------------------------------------------------------
def _rewrite_onnx(d: Path, edit: Any) -> None:
    import onnx

    model = onnx.load(str(d / "model.onnx"))
    edit(model, onnx)
    # Raw bytes: onnx.save would try to write (and refuse) the external data itself.
    (d / "model.onnx").write_bytes(model.SerializeToString())
    m = json.loads((d / MANIFEST).read_text())
    p = d / "model.onnx"
    m["files"]["onnx"].update(size=p.stat().st_size, sha256=sha256_file(p))
    (d / MANIFEST).write_text(json.dumps(m))


def _external(t: Any, onnx: Any, location: str) -> None:
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in (("location", location), ("offset", "0"), ("length", "4")):
        e = t.external_data.add()
        e.key, e.value = k, v


def _add_initializer(model: Any, onnx: Any) -> None:
    from onnx import numpy_helper

    t = numpy_helper.from_array(np.zeros(1, np.float32), "extra")
    _external(t, onnx, "../../../../etc/hostname")
    model.graph.initializer.append(t)


def _add_constant(model: Any, onnx: Any) -> None:
    from onnx import helper, numpy_helper

    t = numpy_helper.from_array(np.zeros(1, np.float32), "c")
    _external(t, onnx, "/etc/hostname")
    model.graph.node.append(helper.make_node("Constant", [], ["c_out"], value=t))


def _add_subgraph(model: Any, onnx: Any) -> None:
    from onnx import helper, numpy_helper

    t = numpy_helper.from_array(np.zeros(1, np.float32), "s")
    _external(t, onnx, "../outside.bin")
    branch = helper.make_graph([helper.make_node("Identity", ["s"], ["r"])], "br", [],
                               [helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [1])],
                               initializer=[t])
    cond = numpy_helper.from_array(np.array(True), "cond")
    model.graph.initializer.append(cond)
    model.graph.node.append(helper.make_node("If", ["cond"], ["if_out"], then_branch=branch,
                                             else_branch=branch))


@pytest.mark.parametrize("edit", [_add_initializer, _add_constant, _add_subgraph])
@pytest.mark.parametrize("trainable", [None, "W2,b2"])  # all live / some baked
def test_onnx_external_data_refused(good_bundle: Path, tmp_path: Path, edit: Any,
                                    trainable: Any) -> None:
    from edgelearn.model import Model

    d = tmp_path / "b"
    shutil.copytree(good_bundle, d)
    _rewrite_onnx(d, edit)
    with pytest.raises(BundleError, match="external data"):
        Model(Bundle(d), trainable=trainable)


def test_clean_onnx_still_runs(good_bundle: Path) -> None:
    from edgelearn.model import Model

    out = Model(Bundle(good_bundle)).predict(np.zeros((2, 16), np.float32))
    assert out.shape == (2, 4)


# -- data files ---------------------------------------------------------------------------------
def _npz_with_header(path: Path, key_headers: dict[str, tuple[str, bytes]]) -> None:
    """An .npz whose members carry a hand-written .npy header dict and raw data."""
    with zipfile.ZipFile(path, "w") as zf:
        for key, (hdr, data) in key_headers.items():
            h = hdr.encode("latin1")
            pad = 64 - (10 + len(h) + 1) % 64
            blob = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h) + pad + 1) + h + \
                b" " * pad + b"\n" + data
            zf.writestr(f"{key}.npy", blob)


GOOD_Y = ("{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }", bytes(16))


@pytest.mark.parametrize(("x_header", "match"), [
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1000000), }", "holds"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", "limit"),
    ("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", "object|dtype"),
    ("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", "dtype"),
    ("{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }", "dtype"),
    ("not a dict", "readable"),
])
def test_hostile_npy_headers(tmp_path: Path, x_header: str, match: str) -> None:
    p = tmp_path / "d.npz"
    _npz_with_header(p, {"x": (x_header, bytes(16)), "y": GOOD_Y})
    rss0 = rss_mb()
    with pytest.raises(InputError, match=match):
        load_npz(p)
    assert rss_mb() - rss0 < 16  # nothing big was allocated


def test_zip_bomb_refused_before_decompressing(tmp_path: Path) -> None:
    p = tmp_path / "bomb.npz"
    buf = io.BytesIO()
    np.save(buf, np.zeros((1 << 21, 8), np.float32))  # 64 MiB of zeros, compresses to ~64 KiB
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", buf.getvalue())
        zf.writestr("y.npy", b"")
    assert p.stat().st_size < 2 << 20
    rss0 = rss_mb()
    with pytest.raises(InputError, match="limit"):
        load_npz(p, max_bytes=16 << 20)
    assert rss_mb() - rss0 < 16


@pytest.mark.parametrize(("x", "y", "match"), [
    (np.array([[1.0, np.nan]], np.float32), np.array([0]), "NaN"),
    (np.array([[1.0, 1e300]]), np.array([0]), "NaN or inf"),  # inf once cast to float32
    (np.array([[1, 2]], np.int32), np.array([0]), "dtype"),
    (np.array([[True, False]]), np.array([0]), "dtype"),
    (np.ones((1, 2), np.float32), np.array([0.5]), "integer"),
    (np.ones((1, 2), np.float32), np.array([-1]), "negative"),
    (np.ones((2, 2), np.float32), np.array([0]), "examples"),
])
def test_bad_data_values(tmp_path: Path, x: np.ndarray, y: np.ndarray, match: str) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y)
    with pytest.raises(InputError, match=match):
        load_npz(p)


def test_pickles_and_non_npz_never_unpickled(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (marker.write_text, ("x",))

    (tmp_path / "p.npz").write_bytes(pickle.dumps({"x": Evil()}))
    np.save(tmp_path / "plain.npy", np.ones(3, np.float32))
    obj = np.empty(2, dtype=object)
    obj[:] = [Evil(), Evil()]
    np.savez(tmp_path / "obj.npz", x=obj, y=np.array([0, 1]))
    for name in ("p.npz", "plain.npy", "obj.npz"):
        with pytest.raises(InputError):
            load_npz(tmp_path / name)
    assert not marker.exists()
    with pytest.raises(InputError, match="directory"):
        load_npz(tmp_path)
