"""Frozen-prefix caching: split a bundle's ONNX graph where every trainable weight lies after.

When only a suffix of the graph trains (a new head on a prepared backbone, the last blocks),
the nodes that depend on the data but on no trainable weight (the *prefix*) compute the same
values for an example at every step. `plan_split` finds the cut automatically: the prefix
tensors that suffix nodes read. A cut tensor must be per example (leading batch axis, fixed
other dims); where one is not (a Shape of an activation, a sequence of unknown length), its
producer moves to the suffix and the cut moves up. The graph is split at the cut with onnx's
own `onnx.utils.Extractor`, frozen weights baked in as in the plain session: the prefix graph
maps the data inputs to the cut tensors, the suffix graph maps the cut tensors (and any data
input a suffix node reads directly) plus the trainable weights to the model output.

`FeatureCache` keeps the prefix outputs per example under a key (a data-set index, or a
sha256 of the example's bytes for live samples) in a bounded memory arena, spills further
examples to a file in the run directory, and recomputes what fits neither: every path gives
the same floats, so training is bit-identical however much is cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.inputs import Inputs, take

#: in-memory cache bound without a memory budget (bytes)
DEFAULT_CAPACITY = 1 << 30
#: spill-file bound (bytes); examples past it are recomputed
SPILL_LIMIT = 4 << 30
SPILL_FILE = "prefix_cache.bin"


@dataclass(frozen=True)
class Cut:
    """Where a graph splits: what the suffix reads, and how much the prefix does.

    Args:
        tensors: prefix-computed tensors the suffix reads (cached per example).
        passthrough: data inputs a suffix node reads directly (fed as given, not cached).
        prefix_nodes: nodes of the prefix (run once per example).
        suffix_nodes: nodes the suffix keeps (run every forward).
        row_shapes: tensor -> (per-example shape, numpy dtype string).
    """

    tensors: tuple[str, ...]
    passthrough: tuple[str, ...]
    prefix_nodes: int
    suffix_nodes: int
    row_shapes: dict[str, tuple[tuple[int, ...], str]]

    @property
    def row_bytes(self) -> int:
        """Bytes of one example's cut tensors."""
        return sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize
                   for s, d in self.row_shapes.values())

    def to_json(self) -> dict[str, Any]:
        """The `cut` part of the `cache` report."""
        return {"cut": list(self.tensors), "passthrough": list(self.passthrough),
                "prefix_nodes": self.prefix_nodes, "suffix_nodes": self.suffix_nodes,
                "row_bytes": self.row_bytes}


def _subgraph_names(node: Any) -> set[str]:
    """Every name a control-flow node's subgraphs read (outer-scope values included)."""
    names: set[str] = set()
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for n in g.node:
                names.update(n.input)
                names |= _subgraph_names(n)
    return names


def _reads(node: Any) -> set[str]:
    return {i for i in node.input if i} | _subgraph_names(node)


def _closure(nodes: Sequence[Any], seeds: set[str], skip: set[int]) -> tuple[set[int], set[str]]:
    """Node indices reached from `seeds` (in topological order) and the tensors they make."""
    reached, tensors = set(), set(seeds)
    for i, node in enumerate(nodes):
        if i not in skip and _reads(node) & tensors:
            reached.add(i)
            tensors.update(node.output)
    return reached, tensors


def _row_shape(vi: Any, batch: str | None, onnx: Any) -> tuple[tuple[int, ...], str] | None:
    """(per-example shape, dtype) of a value whose first dim is the batch, else None."""
    tt = vi.type.tensor_type
    dims = list(tt.shape.dim) if tt.HasField("shape") else []
    # a batch dim shape inference lost to a Reshape (-1: "unk__N") counts too: the cut check
    # (`CachedEvaluator.mismatch`) proves rows are per example before anything is cached
    if not dims or batch is None or not dims[0].dim_param:
        return None
    if any(d.dim_value <= 0 for d in dims[1:]):
        return None
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
    except KeyError:
        return None
    return tuple(int(d.dim_value) for d in dims[1:]), np.dtype(dtype).str


def find_cut(model: Any, trainable: Iterable[str], data_inputs: Sequence[str],
             output: str | Sequence[str], *, after: Iterable[str] = ()) -> Cut | str:
    """The cut of `model` (shape-inferred ModelProto) before every `trainable` weight.

    Args:
        model: the ONNX model with shapes inferred (`onnx.shape_inference.infer_shapes`).
        trainable: names of the trainable parameters (graph inputs).
        data_inputs: the model's data input names (their first dim is the batch).
        output: the model output the loss reads; or several (a taps graph's: the logits
            first, then the layer taps a tpSGD step reads), each either made by the suffix
            or a cut tensor itself (a tap above the cut, e.g. a head's input, is cached).
        after: tensors whose producers must go to the suffix (a cut that a runtime check
            refused moves above them).
    Returns: the Cut, or a sentence saying why there is none worth caching.
    """
    import onnx

    g = model.graph
    nodes = list(g.node)
    values = {v.name: v for v in [*g.input, *g.value_info, *g.output]}
    batch = next((vi.type.tensor_type.shape.dim[0].dim_param for vi in g.input
                  if vi.name == data_inputs[0] and vi.type.tensor_type.shape.dim), None)
    outs = [output] if isinstance(output, str) else list(output)
    output = outs[0]
    live, live_t = _closure(nodes, set(trainable), set())
    if output not in live_t:
        return f"no trainable weight reaches the output {output!r}"
    forced = set(after)
    demoted = {i for i, n in enumerate(nodes) if forced & set(n.output)}
    while True:
        prefix, made = _closure(nodes, set(data_inputs), live | demoted)
        made -= set(data_inputs)
        producer = {t: i for i in prefix for t in nodes[i].output}
        suffix = [i for i in range(len(nodes)) if i not in prefix]
        read = set().union(*(_reads(nodes[i]) for i in suffix)) | set(outs)
        cut = sorted(t for t in made & read)
        bad = [t for t in cut if t not in values or _row_shape(values[t], batch, onnx) is None]
        if not bad:
            break
        demoted.update(producer[t] for t in bad)
    if not cut:
        return "the first trainable weight is read by the first layer: no frozen prefix"
    shapes = {t: _row_shape(values[t], batch, onnx) for t in cut}
    passthrough = tuple(sorted(set(data_inputs) & read))
    return Cut(tuple(cut), passthrough, len(prefix), len(nodes) - len(prefix),
               {t: s for t, s in shapes.items() if s is not None})


@dataclass(frozen=True)
class Split:
    """A bundle's graph split at its cut (see `plan_split`).

    Args:
        cut: the Cut. prefix: ONNX bytes, data inputs -> cut tensors (frozen weights baked).
        suffix: ONNX bytes, cut tensors + passthrough inputs + trainable weights -> output.
        trainable: the trainable weights the suffix reads (bound live).
    """

    cut: Cut
    prefix: bytes
    suffix: bytes
    trainable: tuple[str, ...]


class SplitPlanner:
    """A bundle's graph, frozen values baked and shapes inferred once, split at cuts.

    Args:
        model_path: a bundle's model.onnx.
        frozen: frozen parameter name -> value (baked as initializers, as the plain session).
        trainable: trainable parameter names.
        data_inputs: the bundle's data input names.
        output: the output the loss reads (other outputs are dropped); or the outputs a
            step reads, first the one that must depend on a trainable weight (`find_cut`).
    """

    def __init__(self, model_path: str | os.PathLike, frozen: dict[str, np.ndarray],
                 trainable: Sequence[str], data_inputs: Sequence[str],
                 output: str | Sequence[str]) -> None:
        import onnx

        from edgelearn.backends.ort_graph import baked_model_bytes

        self.outputs = [output] if isinstance(output, str) else list(output)
        self.data_inputs, self.output = list(data_inputs), self.outputs[0]
        self.model: Any = None
        self.error: str | None = None
        model = onnx.load_from_string(baked_model_bytes(model_path, frozen, self.outputs))
        try:
            self.model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as e:  # onnx raises its own InferenceError types
            self.error = f"onnx shape inference failed ({e})"
            return
        graph_inputs = {i.name for i in self.model.graph.input}
        self.live = [n for n in trainable if n in graph_inputs]

    def split(self, after: Iterable[str] = ()) -> Split | str:
        """The split at the automatic cut above `after` (see `find_cut`), or why none."""
        from onnx.utils import Extractor

        if self.error is not None:
            return self.error
        data, live = self.data_inputs, self.live
        cut = find_cut(self.model, live, data, self.outputs, after=after)
        if isinstance(cut, str):
            return cut
        try:
            ex = Extractor(self.model)
            pre = ex.extract_model(data, list(cut.tensors))
            suf = ex.extract_model([*cut.tensors, *cut.passthrough, *live],
                                   suffix_outputs(cut, self.outputs))
        except Exception as e:  # Extractor raises KeyError/ValueError on untyped values
            return f"onnx.utils.Extractor could not split the graph ({type(e).__name__}: {e})"
        pre_inputs = {i.name for i in pre.graph.input}
        used = [n for n in live if n in {i.name for i in suf.graph.input}]
        if not pre_inputs <= set(data):
            return f"the prefix reads {sorted(pre_inputs - set(data))[:3]}, not only data"
        cut = replace(cut, suffix_nodes=len(suf.graph.node))
        return Split(cut, pre.SerializeToString(), suf.SerializeToString(), tuple(used))


def suffix_outputs(cut: Cut, outputs: Sequence[str]) -> list[str]:
    """The outputs the suffix graph computes: those that are not cut tensors or data inputs
    (a tap above the cut is read from the cached features, a data input from the batch)."""
    return [o for o in outputs if o not in cut.tensors and o not in cut.passthrough]


def plan_split(model_path: str | os.PathLike, frozen: dict[str, np.ndarray],
               trainable: Sequence[str], data_inputs: Sequence[str], output: str, *,
               after: Iterable[str] = ()) -> Split | str:
    """Split the model file at its cut (frozen values baked), or say why it cannot be
    (`SplitPlanner(...).split(after)`)."""
    return SplitPlanner(model_path, frozen, trainable, data_inputs, output).split(after)


def example_keys(x: Inputs) -> list[bytes]:
    """One content key per example of batch `x`: sha256 of its dtype, shape and bytes (of
    every input, by name, for a multi-input batch)."""
    if isinstance(x, dict):
        per = [example_keys(x[k]) for k in sorted(x)]
        names = "\0".join(sorted(x)).encode()
        return [hashlib.sha256(names + b"".join(keys)).digest() for keys in zip(*per,
                                                                                  strict=True)]
    x = np.ascontiguousarray(x)
    head = f"{x.dtype.str}{x.shape[1:]}".encode()
    return [hashlib.sha256(head + memoryview(row).cast("B")).digest() for row in x]


class FeatureCache:
    """Prefix outputs per example key: a memory arena, then a spill file, then recompute.

    Args:
        cut: the Cut (per-example shapes of the cached tensors).
        capacity: bytes the memory arena may hold.
        spill: directory for the spill file (None: recompute what memory cannot hold).
    """

    def __init__(self, cut: Cut, capacity: int, spill: Path | None = None) -> None:
        self.cut = cut
        self.row = max(cut.row_bytes, 1)
        self.max_rows = max(capacity, 0) // self.row
        self.arena: dict[str, np.ndarray] = {}
        self.slots: dict[Hashable, int] = {}
        self.spilled: dict[Hashable, int] = {}
        self.spill_dir = spill
        self._spill_fd: int | None = None
        self.hits = self.misses = self.recomputed = 0

    # -- filling ---------------------------------------------------------------------------
    def _grow(self, rows: int) -> None:
        """Make the arena hold at least `rows` rows (doubling, at most `max_rows`)."""
        have = next(iter(self.arena.values())).shape[0] if self.arena else 0
        if rows <= have:
            return
        size = min(max(rows, 2 * have, 64), self.max_rows)
        for t, (shape, dtype) in self.cut.row_shapes.items():
            new = np.empty((size, *shape), dtype)
            if have:
                new[:have] = self.arena[t]
            self.arena[t] = new

    def _spill(self, key: Hashable, feats: dict[str, np.ndarray], i: int) -> bool:
        if self.spill_dir is None or (len(self.spilled) + 1) * self.row > SPILL_LIMIT:
            return False
        if self._spill_fd is None:
            path = self.spill_dir / SPILL_FILE
            flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
            self._spill_fd = os.open(path, flags, 0o600)  # never through a symlink
        data = b"".join(np.ascontiguousarray(feats[t][i]).tobytes() for t in self.cut.tensors)
        off = len(self.spilled) * self.row
        os.pwrite(self._spill_fd, data, off)
        self.spilled[key] = off
        return True

    def _store(self, keys: Sequence[Hashable], feats: dict[str, np.ndarray]) -> None:
        """Keep the rows of `feats` under `keys` wherever they fit."""
        for i, key in enumerate(keys):
            if key in self.slots or key in self.spilled:
                continue
            slot = len(self.slots)
            if slot < self.max_rows:
                self._grow(slot + 1)
                for t in self.cut.tensors:
                    self.arena[t][slot] = feats[t][i]
                self.slots[key] = slot
            elif not self._spill(key, feats, i):
                self.recomputed += 1

    # -- reading ---------------------------------------------------------------------------
    def _read_spilled(self, off: int) -> dict[str, np.ndarray]:
        assert self._spill_fd is not None
        raw = os.pread(self._spill_fd, self.row, off)
        out, pos = {}, 0
        for t in self.cut.tensors:
            shape, dtype = self.cut.row_shapes[t]
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            out[t] = np.frombuffer(raw, dtype, count=n // np.dtype(dtype).itemsize,
                                   offset=pos).reshape(shape)
            pos += n
        return out

    def features(self, keys: Sequence[Hashable], x: Inputs,
                 compute: Callable[[Inputs], dict[str, np.ndarray]],
                 out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The cut tensors of batch `x` (one key per example), computing the misses.

        Args:
            keys: one hashable key per example of `x`.
            x: the batch (only its missing examples are run through the prefix).
            compute: batch -> cut tensor name -> [n, ...] (the prefix graph).
            out: arrays [len(keys), ...] per cut tensor to write the rows into (returned);
                None: fresh ones.
        """
        slots = list(map(self.slots.get, keys, itertools.repeat(-1)))
        if min(slots, default=0) >= 0:  # the common case once warm: one gather per tensor
            idx = np.asarray(slots)
            if out is None:
                self.hits += len(keys)
                return {t: self.arena[t][idx] for t in self.cut.tensors}
            return self.gather(idx, out)
        miss = [i for i, (k, s) in enumerate(zip(keys, slots, strict=True))
                if s < 0 and k not in self.spilled]
        fresh = compute(take(x, miss)) if miss else {}
        self.misses += len(miss)
        self.hits += len(keys) - len(miss)
        if out is None:
            out = {t: np.empty((len(keys), *s), d) for t, (s, d) in self.cut.row_shapes.items()}
        where = {m: j for j, m in enumerate(miss)}
        for i, k in enumerate(keys):
            row = ({t: fresh[t][where[i]] for t in fresh} if i in where else
                   {t: self.arena[t][self.slots[k]] for t in out} if k in self.slots else
                   self._read_spilled(self.spilled[k]))
            for t in out:
                out[t][i] = row[t]
        if miss:
            self._store([keys[i] for i in miss], fresh)
        return out

    def gather(self, slots: np.ndarray, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rows at arena `slots` (intp [n], every one a slot `features` filled, as the
        caller knows) written into `out` (arrays [n, ...] per cut tensor); returns `out`."""
        self.hits += len(slots)
        for t in self.cut.tensors:  # every index is a valid slot: "clip" never clips, and
            # it lets take write straight into `out` (mode "raise" buffers it); the method
            # with positional arguments: np.take's keyword dispatch costs more than the copy
            self.arena[t].take(slots, 0, out[t], "clip")
        return out

    def memory_bytes(self) -> int:
        """Bytes the arena may grow to (what a memory plan counts)."""
        return self.max_rows * self.row

    def report(self) -> dict[str, Any]:
        """Counts for the `cache` report."""
        return {"cached_examples": len(self.slots) + len(self.spilled),
                "bytes": len(self.slots) * self.row, "capacity_bytes": self.memory_bytes(),
                "spilled_examples": len(self.spilled), "spilled_bytes":
                len(self.spilled) * self.row, "hits": self.hits, "misses": self.misses,
                "not_kept": self.recomputed}

    def close(self) -> None:
        """Close and delete the spill file (idempotent)."""
        if self._spill_fd is not None:
            os.close(self._spill_fd)
            self._spill_fd = None
            if self.spill_dir is not None:
                with contextlib.suppress(OSError):
                    (self.spill_dir / SPILL_FILE).unlink()
            self.spilled.clear()

