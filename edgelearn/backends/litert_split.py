"""LiteRT frozen-prefix split: the bundle's TFLite model cut in two on the device, no converter.

The split is made from the very flatbuffer the run's LiteRT backend runs, so both halves use
the same kernels as the uncached run (`edgelearn.tflite_graph` finds the cut and writes the
halves):
  "inputs"   model.tflite: parameters stay subgraph inputs; frozen ones are set once in
             each half, the trainable ones the suffix reads are set before each forward.
  "rebuild"  model_const.tflite, every parameter's bytes first patched from the store (as
             the backend binds it): the prefix keeps the frozen constants; the suffix is a
             private in-memory model whose trainable constants are patched from the arena when
             they changed, then its (small) XNNPACK interpreter is re-created.
Both halves have the bundle's fixed batch (`tflite.batch`): `run_padded` zero-pads smaller
batches and chunks larger ones exactly as the backend does, and cuts every result back to the
real rows, so features are cached per example.
A taps graph (model_taps.tflite, "inputs" only: what tpSGD and the hybrid run on LiteRT) splits
the same way with several outputs, the logits and the taps a step reads
(`LiteRTTapsSplitPlanner`, `TapsSuffixRunner`); a tap above the cut is a cut tensor, named
after its tap.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from edgelearn.backends.litert import import_interpreter, run_padded
from edgelearn.errors import BundleError, EdgelearnError
from edgelearn.prefix_cache import Cut
from edgelearn.tflite_graph import (
    TfliteGraph,
    buffer_offsets,
    constant_offsets,
    find_cut,
    find_taps_cut,
)

if TYPE_CHECKING:
    from edgelearn.bundle import Bundle
    from edgelearn.params import ParamStore


@dataclass(frozen=True)
class LiteRTSplit:
    """A bundle's TFLite model split at its cut (see the module docstring).

    Args:
        cut: the Cut (tensor names are the TFLite graph's).
        prefix / suffix: the two flatbuffers.
        trainable: trainable parameters the suffix reads.
        strategy: "inputs" or "rebuild". batch: the fixed batch of both halves.
        prefix_feeds / suffix_feeds: feed name (data input, or cut tensor) -> tensor index.
        prefix_params / suffix_params: parameter name -> input tensor index ("inputs").
        prefix_outputs: cut tensor name -> tensor index. output: the suffix's output tensor.
        suffix_const: trainable parameter -> (byte offset, nbytes) in `suffix` ("rebuild").
    """

    cut: Cut
    prefix: bytes
    suffix: bytes
    trainable: tuple[str, ...]
    strategy: str
    batch: int
    prefix_feeds: dict[str, int]
    prefix_params: dict[str, int]
    prefix_outputs: dict[str, int]
    suffix_feeds: dict[str, int]
    suffix_params: dict[str, int]
    suffix_const: dict[str, tuple[int, int]]
    output: int


class LiteRTSplitPlanner:
    """The bundle's TFLite model for `strategy`, read once, split at cuts (`split`).

    Args:
        bundle: a bundle with a "tflite" section. store: the run's parameters (trainable
            flags; values for the "rebuild" constants).
        strategy: the run backend's weight strategy. output: the bundle output the loss reads.
    Raises: EdgelearnError when the model cannot be read as a splittable graph.
    """

    def __init__(self, bundle: Bundle, store: ParamStore, *, strategy: str,
                 output: str) -> None:
        sec = bundle.manifest["tflite"]
        self.store, self.strategy, self.batch = store, strategy, int(sec["batch"])
        if strategy == "inputs":
            self.g = TfliteGraph(bundle.files["tflite"].read_bytes())
            ins, outs = self.g.signature()
            self.params = {n: ins[s] for n, s in sec["params"].items() if s in ins}
        else:
            raw = _patched_const(bundle, store)
            self.g = TfliteGraph(raw)
            ins, outs = self.g.signature()
            at = constant_offsets(raw)
            self.params = {n: at[int(off)] for n, (off, _) in sec["const"].items()
                           if int(off) in at}
        try:
            self.data = {n: ins[s] for n, s in sec["inputs"].items()}
            self.out = outs[sec["outputs"][output]]
        except KeyError as e:
            raise BundleError(f"manifest.json: tflite names {e} the model's signature lacks"
                              ) from None
        self.names = self.g.names()

    def split(self, after: Iterable[str] = ()) -> LiteRTSplit | str:
        """The split at the automatic cut above the tensors `after` (names), or why none."""
        g, index = self.g, {n: i for i, n in enumerate(self.names)}
        trainable = [self.params[n] for n in self.store.trainable_names if n in self.params]
        forced = {g.producer[index[n]] for n in after if index.get(n) in g.producer}
        cut = find_cut(g, list(self.data.values()), trainable, self.out, batch=self.batch,
                       forced=forced)
        if isinstance(cut, str):
            return cut
        ins = self._halves_inputs(cut)
        if isinstance(ins, str):
            return ins
        pre_in, suf_in = ins
        prefix, pre = g.extract(cut.prefix_ops, pre_in, cut.tensors)
        suffix, suf = g.extract(cut.suffix_ops, suf_in, [self.out])
        return self._split(cut, prefix, pre, suffix, suf)

    def _halves_inputs(self, cut: Any) -> tuple[list[int], list[int]] | str:
        """The tensors the prefix and the suffix of `cut` read from outside, or why the
        halves cannot run (an input neither data, a frozen weight in the prefix, a weight or
        a cut tensor in the suffix)."""
        pre_in, suf_in = self.g.free_inputs(cut.prefix_ops), self.g.free_inputs(cut.suffix_ops)
        param_of, data = {i: n for n, i in self.params.items()}, set(self.data.values())
        stray = [t for t in pre_in if t not in data and (
            t not in param_of or self.store.specs[param_of[t]].trainable)]
        stray += [t for t in suf_in if t not in data and t not in param_of
                  and t not in cut.tensors]
        if stray:
            odd = [self.names[t] for t in stray][:3]
            return f"the TFLite halves would read unknown inputs {odd}"
        return pre_in, suf_in

    def _split(self, cut: Any, prefix: bytes, pre: dict[int, int], suffix: bytes,
               suf: dict[int, int]) -> LiteRTSplit:
        """The LiteRTSplit of extracted halves (`pre` / `suf`: old -> new tensor index)."""
        names, store = self.names, self.store
        param_of = {i: n for n, i in self.params.items()}
        data_of = {i: n for n, i in self.data.items()}
        live = {param_of[t] for t in suf if t in param_of and store.specs[param_of[t]].trainable}
        const: dict[str, tuple[int, int]] = {}
        if self.strategy == "rebuild":
            at = buffer_offsets(suffix, [suf[self.params[n]] for n in live])
            const = {n: at[suf[self.params[n]]] for n in live}
            for n, (off, nbytes) in const.items():  # the baked bytes are the store's
                if suffix[off : off + nbytes] != np.ascontiguousarray(store[n]).tobytes():
                    raise EdgelearnError(f"the suffix's constant {n!r} is not where expected")
        feeds = {data_of[t]: suf[t] for t in cut.passthrough}
        feeds.update({names[t]: suf[t] for t in cut.tensors})
        c = Cut(tuple(names[t] for t in cut.tensors), tuple(data_of[t] for t in cut.passthrough),
                len(cut.prefix_ops), len(cut.suffix_ops),
                {names[t]: self.g.row_shape(t, self.batch) for t in cut.tensors})
        return LiteRTSplit(
            c, prefix, suffix, tuple(sorted(live)), self.strategy, self.batch,
            prefix_feeds={data_of[t]: pre[t] for t in pre if t in data_of},
            prefix_params={param_of[t]: pre[t] for t in pre if t in param_of
                           and not self.g.is_const(t)},
            prefix_outputs={names[t]: pre[t] for t in cut.tensors},
            suffix_feeds=feeds,
            suffix_params={param_of[t]: suf[t] for t in suf if t in param_of
                           and not self.g.is_const(t)},
            suffix_const=const, output=suf[self.out])


def _patched_const(bundle: Bundle, store: ParamStore) -> bytes:
    """model_const.tflite with every parameter's bytes taken from `store` (as bound)."""
    raw = bytearray(bundle.files["tflite_const"].read_bytes())
    for name, (off, nbytes) in bundle.manifest["tflite"]["const"].items():
        src = np.ascontiguousarray(store[name]).tobytes()
        if len(src) != nbytes or off < 0 or off + nbytes > len(raw):
            raise BundleError(f"tflite const slot of {name!r} does not fit the model")
        raw[off : off + nbytes] = src
    return bytes(raw)


def _interpreter(model: bytes, threads: int | None) -> Any:
    Interpreter, _ = import_interpreter()
    it = Interpreter(model_content=model, num_threads=threads)
    it.allocate_tensors()
    return it


class PrefixRunner:
    """The prefix half: data inputs -> cut tensors, frozen parameters set once.

    Args:
        split: the LiteRTSplit. store: the run's parameters. threads: interpreter threads.
    """

    def __init__(self, split: LiteRTSplit, store: ParamStore, threads: int | None) -> None:
        self.split = split
        self.it = _interpreter(split.prefix, threads)
        for name, idx in split.prefix_params.items():
            self.it.set_tensor(idx, np.ascontiguousarray(store[name]))

    def run(self, names: Sequence[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The cut tensors `names` of batch `feed` (bundle input name -> [n, ...])."""
        s = self.split
        out = run_padded(self.it, s.batch, {i: feed[n] for n, i in s.prefix_feeds.items()},
                         {n: s.prefix_outputs[n] for n in names})
        return [out[n] for n in names]


class SuffixRunner:
    """The suffix half: cut tensors (+ passthrough inputs) -> the model output, reading the
    store's trainable views before each forward (set as inputs, or patched and re-created).

    Args:
        split: the LiteRTSplit. store: the arena the optimizer updates in place.
        threads: interpreter threads.
    """

    def __init__(self, split: LiteRTSplit, store: ParamStore, threads: int | None) -> None:
        self.split, self.threads, self.rebuilds = split, threads, 0
        self.live = [(store[n], n) for n in split.trainable]
        if split.strategy == "inputs":
            self.it = _interpreter(split.suffix, threads)
            for name, idx in split.suffix_params.items():
                self.it.set_tensor(idx, np.ascontiguousarray(store[name]))
            return
        # a private bytes object the interpreter reads its constants from; patched in place
        # with no interpreter alive (as LiteRTBackend's "rebuild" strategy)
        self._model = bytes(bytearray(split.suffix))
        self._base = np.frombuffer(self._model, np.uint8).ctypes.data
        self._slots = {n: np.frombuffer(self._model, store[n].dtype, store[n].size, off)
                       for n, (off, _) in split.suffix_const.items()}
        self.it = _interpreter(self._model, threads)

    def _sync(self) -> None:
        if self.split.strategy == "inputs":
            for view, name in self.live:
                self.it.set_tensor(self.split.suffix_params[name], view)
            return
        changed = [(v, n) for v, n in self.live if not np.array_equal(self._slots[n],
                                                                       v.reshape(-1))]
        if not changed:
            return
        self.it = None
        for view, name in changed:
            src = np.ascontiguousarray(view)
            ctypes.memmove(self._base + self.split.suffix_const[name][0], src.ctypes.data,
                           src.nbytes)
        self.it = _interpreter(self._model, self.threads)
        self.rebuilds += 1

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The model output for the cut tensors (and passthrough inputs) in `feeds`."""
        self._sync()
        s = self.split
        out = run_padded(self.it, s.batch, {s.suffix_feeds[n]: a for n, a in feeds.items()},
                         {"out": s.output})
        return out["out"]


@dataclass(frozen=True)
class LiteRTTapsSplit(LiteRTSplit):
    """A taps graph's LiteRTSplit; `outputs`: tap name -> suffix output tensor index (the
    taps computed in the suffix, the logits among them; the others are cut tensors)."""

    outputs: dict[str, int] = field(default_factory=dict)


class LiteRTTapsSplitPlanner(LiteRTSplitPlanner):
    """The bundle's model_taps.tflite ("inputs": parameters are subgraph inputs), read once,
    split at cuts with the taps a step reads as outputs (`split`).

    Args:
        bundle: a bundle with a "tflite_taps" section. store: the run's parameters.
        taps: the taps a step reads, logits first (names of the section's outputs).
    Raises: EdgelearnError when the model cannot be read as a splittable graph, or names
        a tap it does not output.
    """

    def __init__(self, bundle: Bundle, store: ParamStore, *, taps: Sequence[str]) -> None:
        sec = bundle.manifest["tflite_taps"]
        self.store, self.strategy, self.batch = store, "inputs", int(sec["batch"])
        self.g = TfliteGraph(bundle.files["tflite_taps"].read_bytes())
        ins, outs = self.g.signature()
        self.params = {n: ins[s] for n, s in sec["params"].items() if s in ins}
        try:
            self.data = {n: ins[s] for n, s in sec["inputs"].items()}
            self.taps = {t: outs[sec["outputs"][t]] for t in taps}
        except KeyError as e:
            raise BundleError(f"manifest.json: tflite_taps names {e} the model's signature "
                              "lacks") from None
        self.out = self.taps[taps[0]]
        # a tap's tensor is named after the tap: the cut and the cache say "layers.0:out"
        self.names = self.g.names()
        for tap, t in self.taps.items():
            self.names[t] = tap
        if len(set(self.names)) != len(self.names):
            raise EdgelearnError("the taps graph has taps sharing one tensor, or named like "
                                 "another tensor")

    def split(self, after: Iterable[str] = ()) -> LiteRTTapsSplit | str:
        """The split at the automatic cut above the tensors `after` (names), or why none."""
        g, index = self.g, {n: i for i, n in enumerate(self.names)}
        trainable = [self.params[n] for n in self.store.trainable_names if n in self.params]
        forced = {g.producer[index[n]] for n in after if index.get(n) in g.producer}
        cut = find_taps_cut(g, list(self.data.values()), trainable, list(self.taps.values()),
                            batch=self.batch, forced=forced)
        if isinstance(cut, str):
            return cut
        ins = self._halves_inputs(cut)
        if isinstance(ins, str):
            return ins
        pre_in, suf_in = ins
        live = [t for t in dict.fromkeys(self.taps.values()) if t not in cut.tensors]
        prefix, pre = g.extract(cut.prefix_ops, pre_in, cut.tensors)
        # every cut tensor is a suffix input (a tap the suffix does not read is fed unused),
        # so the cached features feed the suffix as they are
        suffix, suf = g.extract(cut.suffix_ops, sorted(set(suf_in) | set(cut.tensors)), live)
        base = self._split(cut, prefix, pre, suffix, suf)
        return LiteRTTapsSplit(**{f.name: getattr(base, f.name) for f in fields(base)},
                               outputs={tap: suf[t] for tap, t in self.taps.items()
                                        if t in live})


class TapsSuffixRunner(SuffixRunner):
    """The suffix half of a taps graph: `run_all` -> every tap it computes (tap name ->
    [n, ...]), reading the store's trainable views before each forward."""

    def run_all(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The suffix's taps (the logits among them) for the cut tensors in `feeds`."""
        self._sync()
        s = self.split
        assert isinstance(s, LiteRTTapsSplit)
        return run_padded(self.it, s.batch, {s.suffix_feeds[n]: a for n, a in feeds.items()},
                          s.outputs)
