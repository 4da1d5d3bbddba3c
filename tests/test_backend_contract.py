"""One contract suite over every registered backend x strategy (optax `_common_test` style).

The table is built from the registry: a new backend or strategy is in every test below without
being listed here. Bundles: the committed demo bundle (float MLP with ONNX, TFLite, both taps
graphs and a population graph; no torch needed) and an int8 MLP exported once per session
(torch-marked). References are plain onnxruntime sessions over the bundle's .onnx graphs with
every parameter fed as an input (no baking, no IOBinding), compared with
`edgelearn.parity.compare` (atol + rtol * max|ref|); in-place edits are compared exactly with
a fresh backend bound to the edited weights.
"""

from __future__ import annotations

import inspect
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np
import pytest

from edgelearn.backends import (
    ALIASES,
    BACKENDS,
    EXPORT_FORMATS,
    INSTALL,
    MODEL_FILE,
    REGISTRY,
    Backend,
    PopulationScorer,
    backend_class,
    import_problem,
    make_backend,
)
from edgelearn.backends.base import FLAGS
from edgelearn.bundle import Bundle, load_bundle
from edgelearn.demo import DATA
from edgelearn.errors import BundleError, EdgelearnError, InputError
from edgelearn.losses import cross_entropy
from edgelearn.optim.base import Population
from edgelearn.params import ParamStore
from edgelearn.parity import compare

CASES = [pytest.param(n, s, id=f"{n}-{s}") for n, c in REGISTRY.items() for s in c.strategies]
DEMO = DATA / "demo"
INT8_BATCH = 8  # the int8 bundle's TFLite fixed batch (the demo's is 32)


@pytest.fixture(scope="session")
def int8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An int8 MLP bundle (every weight int8 with a float32 scale), ONNX + TFLite batch 8."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    from edgelearn.export.quantize import export_int8_bundle
    from edgelearn.export.zoo import ZOO

    factory, shape = ZOO["mlp"]
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("contract") / "int8"
    export_int8_bundle(factory(), torch.randn(1, *shape), out, formats=("onnx", "tflite"),
                       tflite_batch=INT8_BATCH)
    return out


@pytest.fixture(params=["demo", pytest.param("int8", marks=pytest.mark.torch)])
def bundle(request: pytest.FixtureRequest) -> Bundle:
    """Each contract bundle, loaded."""
    if request.param == "demo":
        return load_bundle(DEMO)
    return load_bundle(request.getfixturevalue("int8_dir"))


# -- helpers ------------------------------------------------------------------------------------
def need_runtime(name: str) -> None:
    """Skip unless backend `name`'s runtime and the onnxruntime reference import here."""
    for n in dict.fromkeys((name, "onnxruntime")):
        why = import_problem(n)
        if why:
            pytest.skip(why)


def bound(name: str, strategy: str, bundle: Bundle, trainable: Any = "*", **kw: Any
          ) -> tuple[Backend, ParamStore]:
    """A backend of the case bound to a fresh store of `bundle` (threads=1: deterministic)."""
    need_runtime(name)
    store = bundle.load_store(trainable=trainable)
    be = make_backend(name, bundle, threads=1, strategy=strategy, **kw)
    be.bind(store)
    return be, store


def feeds(bundle: Bundle, n: int, seed: int) -> dict[str, np.ndarray]:
    """Random float32 inputs with batch n for every bundle input."""
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal((n, *t.shape[1:])).astype(np.float32)
            for t in bundle.inputs}


def batch_sizes(bundle: Bundle) -> tuple[int, ...]:
    """1, 3 and one above the TFLite fixed batch (chunked, with a padded tail)."""
    return 1, 3, int(bundle.manifest["tflite"]["batch"]) + 5


@cache
def _session(path: str) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def reference(bundle: Bundle, role: str, store: ParamStore, x: dict[str, np.ndarray]
              ) -> dict[str, np.ndarray]:
    """The bundle's ONNX graph `role` run by plain onnxruntime, every parameter an input."""
    sess = _session(str(bundle.files[role]))
    names = [o.name for o in sess.get_outputs()]
    ins = {i.name for i in sess.get_inputs()}
    full = {**x, **{n: np.asarray(store[n]) for n in store.names if n in ins}}
    return dict(zip(names, sess.run(names, full), strict=True))


def edit_in_place(store: ParamStore, seed: int) -> None:
    """Change every trainable parameter through its view (int8 ones stay on the int8 grid)."""
    rng = np.random.default_rng(seed)
    for name in store.trainable_names:
        v = store[name]
        if v.dtype == np.int8:
            step = rng.integers(-3, 4, v.shape)
            v[...] = np.clip(v.astype(np.int16) + step, -127, 127).astype(np.int8)
        else:
            v += (0.05 * (np.abs(v).max() + 1e-3) * rng.standard_normal(v.shape)).astype(v.dtype)


# -- the protocol itself ------------------------------------------------------------------------
FLAG_TYPES = {"name": str, "model_role": str, "taps_role": (str, type(None)), "strategies": tuple,
              "taps_strategies": tuple, "reuses_outputs": bool, "live_int8": bool,
              "supports_population": bool}
PUBLIC = ("bind", "forward", "output_names", "close", "can_score_population",
          "population_scorer", "runs_taps")


def test_flags_are_the_declared_class_vars() -> None:
    hints = get_type_hints(Backend)
    assert set(FLAGS) == set(FLAG_TYPES)
    assert set(FLAGS) <= set(hints)  # every flag is annotated (and documented) on the base


@pytest.mark.parametrize("name", BACKENDS)
def test_every_backend_implements_every_member(name: str) -> None:
    cls = REGISTRY[name]
    assert issubclass(cls, Backend)
    assert not inspect.isabstract(cls), cls.__abstractmethods__
    for flag, kind in FLAG_TYPES.items():
        assert isinstance(getattr(cls, flag), kind), flag
    assert cls.name == name
    assert cls.strategies
    assert all(isinstance(s, str) for s in cls.strategies)
    assert set(cls.taps_strategies) <= set(cls.strategies)
    assert bool(cls.taps_strategies) == (cls.taps_role is not None)
    for member in PUBLIC:  # written once in the base; an override keeps its signature
        base, mine = inspect.getattr_static(Backend, member), inspect.getattr_static(cls, member)
        if callable(base):
            assert inspect.signature(mine) == inspect.signature(base), member
        else:
            assert isinstance(mine, property), member
    params = inspect.signature(cls.__init__).parameters
    assert {"bundle", "threads", "strategy", "graph", "outputs"} <= set(params)
    assert MODEL_FILE[name][0] == cls.model_role
    assert name in INSTALL
    assert name in EXPORT_FORMATS
    assert import_problem(name) is None or "unknown backend" not in import_problem(name)


def test_names_and_aliases_resolve() -> None:
    for alias, name in ALIASES.items():
        assert backend_class(alias) is REGISTRY[name]
    with pytest.raises(InputError, match="unknown backend 'tensorrt'"):
        backend_class("tensorrt")


def test_a_backend_cannot_skip_a_flag_or_a_hook() -> None:
    flags = {f: getattr(REGISTRY[BACKENDS[0]], f) for f in FLAGS}
    without = {k: v for k, v in flags.items() if k != "live_int8"}
    with pytest.raises(TypeError, match="live_int8"):
        type("NoInt8Flag", (Backend,), without)
    hookless = type("Hookless", (Backend,), flags)
    with pytest.raises(TypeError, match="abstract"):
        hookless(load_bundle(DEMO))


# -- forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "strategy"), CASES)
@pytest.mark.parametrize("trainable", ["*", ""], ids=["live", "baked"])
def test_forward_matches_onnx_reference(name: str, strategy: str, bundle: Bundle,
                                        trainable: str) -> None:
    be, store = bound(name, strategy, bundle, trainable)
    assert be.strategy == strategy
    want_names = [o.name for o in bundle.outputs]
    assert be.output_names == want_names  # the manifest's outputs, in order
    for i, n in enumerate(batch_sizes(bundle)):
        x = feeds(bundle, n, seed=i)
        got = be.forward(x)
        assert list(got) == want_names
        assert all(a.dtype == np.float32 and a.shape[0] == n for a in got.values())
        par = compare(got, reference(bundle, "onnx", store, x), where=f"{name} batch {n}")
        assert par.ok, par.describe()


@pytest.mark.parametrize(("name", "strategy"), CASES)
def test_in_place_edit_is_seen_exactly(name: str, strategy: str, bundle: Bundle) -> None:
    be, store = bound(name, strategy, bundle)
    if store.n_trainable("int8"):
        assert be.live_int8  # bound above, so the flag must say int8 weights are live
    x = feeds(bundle, 3, seed=5)
    before = be.forward(x)
    edit_in_place(store, seed=1)
    after = be.forward(x)
    fresh_store = bundle.load_store(trainable="*")
    fresh_store.assign(store.state())
    fresh = make_backend(name, bundle, threads=1, strategy=strategy)
    fresh.bind(fresh_store)
    want = fresh.forward(x)
    for k in want:
        np.testing.assert_array_equal(after[k], want[k], err_msg=k)
        assert not np.array_equal(after[k], before[k]), k


@pytest.mark.parametrize(("name", "strategy"), CASES)
def test_output_buffers_reused_only_where_declared(name: str, strategy: str,
                                                   bundle: Bundle) -> None:
    be, _ = bound(name, strategy, bundle)
    x1, x2 = feeds(bundle, 3, seed=1), feeds(bundle, 3, seed=2)
    a = be.forward(x1, reuse_outputs=True)
    kept = {k: v.copy() for k, v in a.items()}
    b = be.forward(x2, reuse_outputs=True)
    plain = be.forward(x2)
    for k in a:
        np.testing.assert_array_equal(b[k], plain[k])  # reuse never changes the values
        assert not np.shares_memory(plain[k], b[k])
        if be.reuses_outputs:
            assert np.shares_memory(a[k], b[k]), k  # declared: the next call wrote into a
        else:
            assert not np.shares_memory(a[k], b[k]), k
            np.testing.assert_array_equal(a[k], kept[k])
    c, d = be.forward(x1), be.forward(x2)
    assert not any(np.shares_memory(c[k], d[k]) for k in c)  # not asked: always fresh


@pytest.mark.parametrize(("name", "strategy"), CASES)
def test_close_then_bind_again(name: str, strategy: str) -> None:
    bundle = load_bundle(DEMO)
    be, store = bound(name, strategy, bundle)
    x = feeds(bundle, 3, seed=0)
    before = be.forward(x)
    be.close()
    be.close()  # idempotent
    with pytest.raises(EdgelearnError, match="not bound"):
        be.forward(x)
    with pytest.raises(EdgelearnError, match="not bound"):
        _ = be.output_names
    be.bind(store)
    for k, v in be.forward(x).items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize(("name", "strategy"), CASES)
def test_unbound_unknown_and_bad_inputs_are_refused(name: str, strategy: str) -> None:
    bundle = load_bundle(DEMO)
    need_runtime(name)
    fresh = make_backend(name, bundle, strategy=strategy)
    x = feeds(bundle, 2, seed=0)
    with pytest.raises(EdgelearnError, match="not bound"):
        fresh.forward(x)
    with pytest.raises(InputError, match=f"unknown {name} strategy 'nope'"):
        make_backend(name, bundle, strategy="nope")
    with pytest.raises(InputError, match=f"unknown {name} graph 'onnx_population'"):
        make_backend(name, bundle, graph="onnx_population")
    be, _ = bound(name, strategy, bundle)
    with pytest.raises(InputError, match="model inputs"):
        be.forward({"nope": x["x"]})
    with pytest.raises(InputError):
        be.forward({"x": x["x"][:, :5]})


# -- taps graph ---------------------------------------------------------------------------------
def taps_names(bundle: Bundle) -> list[str]:
    """The taps graph's outputs as the manifest names them: the model output, then the taps."""
    return list(bundle.manifest["tflite_taps"]["outputs"])


@pytest.mark.parametrize(("name", "strategy"), CASES)
@pytest.mark.parametrize("trainable", ["*", ""], ids=["live", "baked"])
def test_taps_graph_matches_reference_where_declared(name: str, strategy: str,
                                                     trainable: str) -> None:
    bundle = load_bundle(DEMO)
    cls = REGISTRY[name]
    if cls.taps_role is None or strategy not in cls.taps_strategies:
        with pytest.raises(InputError, match="taps graph"):
            make_backend(name, bundle, strategy=strategy, graph=cls.taps_role or "taps")
        return
    be, store = bound(name, strategy, bundle, trainable, graph=cls.taps_role)
    assert be.runs_taps
    assert be.output_names == taps_names(bundle)
    for i, n in enumerate(batch_sizes(bundle)):
        x = feeds(bundle, n, seed=10 + i)
        got = be.forward(x, reuse_outputs=True)
        assert list(got) == taps_names(bundle)
        par = compare(got, reference(bundle, "onnx_taps", store, x), where=f"taps batch {n}")
        assert par.ok, par.describe()


@pytest.mark.parametrize("name", BACKENDS)
def test_taps_outputs_subset_and_unknown_names(name: str) -> None:
    bundle = load_bundle(DEMO)
    cls = REGISTRY[name]
    if cls.taps_role is None:
        pytest.skip(f"{name} declares no taps graph")
    strategy = cls.taps_strategies[0]
    be, _ = bound(name, strategy, bundle, graph=cls.taps_role, outputs={"layers.0:out"})
    assert be.output_names == ["layers.0:out"]
    assert list(be.forward(feeds(bundle, 2, seed=0))) == ["layers.0:out"]
    with pytest.raises(BundleError, match="nope"):
        bound(name, strategy, bundle, graph=cls.taps_role, outputs={"nope"})


@pytest.mark.parametrize("name", BACKENDS)
def test_a_backend_declaring_no_taps_refuses_them(name: str) -> None:
    """The base class enforces the flag: the same runtime, declared without taps, says so."""
    cls = REGISTRY[name]
    role = cls.taps_role or "taps"
    no_taps = type(f"NoTaps{cls.__name__}", (cls,), {"taps_role": None, "taps_strategies": ()})
    with pytest.raises(InputError, match="runs no layer-taps graph"):
        no_taps(load_bundle(DEMO), graph=role)


# -- capabilities: int8, populations ------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("name", BACKENDS)
def test_a_backend_declaring_no_live_int8_refuses_int8_trainables(name: str,
                                                                  int8_dir: Path) -> None:
    bundle = load_bundle(int8_dir)
    cls = REGISTRY[name]
    need_runtime(name)
    store = bundle.load_store(trainable="*")
    assert store.n_trainable("int8")
    frozen_int8 = type(f"NoInt8{cls.__name__}", (cls,), {"live_int8": False})
    with pytest.raises(InputError, match="cannot train int8"):
        frozen_int8(bundle, threads=1).bind(store)
    frozen_int8(bundle, threads=1).bind(bundle.load_store(trainable="*.scale"))  # float only


@pytest.mark.parametrize("name", BACKENDS)
def test_population_flag_is_truthful(name: str) -> None:
    bundle = load_bundle(DEMO)
    pop_params = bundle.manifest["population"]["params"]
    be, _ = bound(name, REGISTRY[name].strategies[0], bundle, pop_params)
    assert be.can_score_population() == be.supports_population
    if be.supports_population:
        scorer = be.population_scorer(max_population=4)
        assert isinstance(scorer, PopulationScorer)
        scorer.close()
    else:
        with pytest.raises(InputError, match="cannot score populations"):
            be.population_scorer()
    other, _ = bound(name, REGISTRY[name].strategies[0], bundle, "*")  # not the graph's set
    assert not other.can_score_population()
    with pytest.raises(EdgelearnError):
        other.population_scorer()


SCORERS = [n for n, c in REGISTRY.items() if c.supports_population]


def candidates(store: ParamStore, k: int, seed: int) -> tuple[Population, np.ndarray]:
    """K random candidate trainable slices around the store's weights, as a Population."""
    base = store.flat().copy()
    rng = np.random.default_rng(seed)
    rows = (base + 0.1 * rng.standard_normal((k, base.size))).astype(np.float32)

    def place(j: int) -> None:
        store.flat()[:] = rows[j]

    def fill(out: dict[str, np.ndarray], lo: int, hi: int) -> None:
        out["float32"][: hi - lo] = rows[lo:hi]

    return Population(k, place, fill), rows


@pytest.mark.parametrize("name", SCORERS)
def test_population_scores_match_single_forwards(name: str) -> None:
    bundle = load_bundle(DEMO)
    be, store = bound(name, REGISTRY[name].strategies[0], bundle,
                      bundle.manifest["population"]["params"])
    scorer = be.population_scorer(max_population=4)  # 10 candidates: chunks 4, 4, 2
    assert scorer.memory_bytes() >= 4 * 4 * store.n_trainable()
    pop, _ = candidates(store, 10, seed=3)
    x = feeds(bundle, 5, seed=4)["x"]
    y = np.arange(5) % 10
    out = scorer.forward(pop, x)
    assert out.shape == (10, 5, 10)
    losses = scorer.losses(pop, x, y, cross_entropy)
    for j in range(pop.size):
        pop.place(j)
        want = be.forward({"x": x})["logits"]
        par = compare({"logits": out[j]}, {"logits": want}, where=f"candidate {j}")
        assert par.ok, par.describe()
        assert losses[j] == pytest.approx(cross_entropy(want, y), rel=1e-5, abs=1e-6)
    scorer.close()
    with pytest.raises(EdgelearnError, match="closed"):
        scorer.forward(pop, x)
