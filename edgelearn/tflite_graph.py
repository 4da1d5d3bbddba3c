"""A TFLite flatbuffer as a graph: find a frozen-prefix cut and write the two halves, no converter.

The LiteRT side of frozen-prefix caching (`edgelearn.prefix_cache` is the ONNX side). The model
is read with the flatbuffer object API of the schema that ai_edge_litert ships
(`schema_py_generated`, with the `flatbuffers` package it depends on); both are imported
lazily, so this module loads with the stdlib and numpy only.

`find_cut` splits the operators of a one-subgraph model: an operator reading a trainable
weight (or a value computed from one) runs in the suffix; an operator computed from the data
and frozen values only runs in the prefix; the cut is the prefix values the suffix reads. A
cut tensor must be per example: leading dimension the graph's fixed batch, other dims fixed;
where one is not, its producer moves to the suffix and the cut moves up (as in the ONNX
planner). Operators computed from constants only run wherever they are needed (in both halves
if both read them).

`TfliteGraph.extract` writes a new model holding a subset of the operators, with chosen tensors
as its subgraph inputs and outputs: tensors and buffers are renumbered and unused ones dropped,
every constant buffer is 64-byte aligned (as the exporter writes them, so an in-memory model can
be patched in place and re-created), the operator codes and the model metadata are kept.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelearn.errors import EdgelearnError

TFLITE_ALIGN = 64
#: TFLite TensorType -> numpy dtype string (the types a cut tensor may have)
#: operators that only move or relabel data: a prefix of these alone is not worth caching
LAYOUT_OPS = frozenset({"RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS", "CAST", "PACK",
                        "UNPACK", "CONCATENATION", "SLICE", "STRIDED_SLICE", "GATHER", "SHAPE",
                        "QUANTIZE", "DEQUANTIZE"})
DTYPES = {0: "<f4", 1: "<f2", 2: "<i4", 3: "|u1", 4: "<i8", 6: "|b1", 7: "<i2", 9: "|i1",
          10: "<f8", 12: "<u8", 15: "<u4", 16: "<u2"}


def schema() -> Any:
    """ai_edge_litert's generated TFLite schema module (EdgelearnError when not installed)."""
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        raise EdgelearnError("splitting a TFLite model needs ai-edge-litert's schema "
                             "(tflite-runtime does not ship it): pip install ai-edge-litert"
                             ) from None
    return schema_py_generated


@dataclass(frozen=True)
class GraphCut:
    """Where a TFLite graph splits (tensor and operator indices of its subgraph).

    Args:
        tensors: prefix-computed tensors the suffix reads (cached per example).
        passthrough: data input tensors a suffix operator reads directly.
        prefix_ops / suffix_ops: operators each half runs, in graph order.
    """

    tensors: tuple[int, ...]
    passthrough: tuple[int, ...]
    prefix_ops: tuple[int, ...]
    suffix_ops: tuple[int, ...]


class TfliteGraph:
    """A one-subgraph TFLite model read with the object API (see the module docstring).

    Args:
        model_bytes: the flatbuffer.
    Raises: EdgelearnError naming what this module cannot split (control flow, variables,
        external buffers).
    """

    def __init__(self, model_bytes: bytes) -> None:
        self.model = schema().ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
        subs = self.model.subgraphs or []
        if len(subs) != 1:
            raise EdgelearnError(f"the TFLite model has {len(subs)} subgraphs (control flow "
                                 "or composite ops); only one-subgraph models are split")
        self.sub = subs[0]
        self.tensors = self.sub.tensors or []
        if any(t.isVariable for t in self.tensors):
            raise EdgelearnError("the TFLite model has variable (state) tensors")
        if any(b.offset > 1 for b in self.model.buffers or []):
            raise EdgelearnError("the TFLite model keeps its buffers outside the flatbuffer")
        self.ops = [([int(i) for i in (op.inputs if op.inputs is not None else [])],
                     [int(o) for o in (op.outputs if op.outputs is not None else [])])
                    for op in self.sub.operators or []]
        self.producer = {t: i for i, (_, outs) in enumerate(self.ops) for t in outs}

    def op_type(self, i: int) -> str:
        """Builtin name of operator `i` ("RESHAPE", "CONV_2D", ...; "CUSTOM" for custom ops)."""
        S = schema()
        code = self.model.operatorCodes[self.sub.operators[i].opcodeIndex]
        num = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        names = {v: k for k, v in vars(S.BuiltinOperator).items() if not k.startswith("_")}
        return names.get(num, str(num))

    # -- tensors -------------------------------------------------------------------------------
    def is_const(self, t: int) -> bool:
        """True when tensor `t` holds data in the file (a constant)."""
        data = self.model.buffers[self.tensors[t].buffer].data
        return data is not None and len(data) > 0

    def shape(self, t: int) -> tuple[int, ...]:
        """Tensor `t`'s declared shape."""
        s = self.tensors[t].shape
        return tuple(int(d) for d in (s if s is not None else []))

    def names(self) -> list[str]:
        """A unique name per tensor: its TFLite name, `#index` added where names repeat."""
        raw = [_text(t.name) for t in self.tensors]
        seen: dict[str, int] = {}
        for n in raw:
            seen[n] = seen.get(n, 0) + 1
        return [n if seen[n] == 1 else f"{n}#{i}" for i, n in enumerate(raw)]

    def row_shape(self, t: int, batch: int) -> tuple[tuple[int, ...], str] | None:
        """(per-example shape, numpy dtype string) of a tensor whose leading dim is the
        batch, else None."""
        shape = self.shape(t)
        dtype = DTYPES.get(int(self.tensors[t].type))
        if not shape or shape[0] != batch or any(d <= 0 for d in shape) or dtype is None:
            return None
        return shape[1:], dtype

    def signature(self) -> tuple[dict[str, int], dict[str, int]]:
        """(signature input name -> tensor index, output name -> tensor index) of the model's
        only signature ({} when it has none)."""
        sigs = self.model.signatureDefs or []
        if len(sigs) != 1:
            return {}, {}
        ins = {_text(m.name): int(m.tensorIndex) for m in sigs[0].inputs or []}
        outs = {_text(m.name): int(m.tensorIndex) for m in sigs[0].outputs or []}
        return ins, outs

    def free_inputs(self, ops: Iterable[int]) -> list[int]:
        """Non-constant tensors the operators `ops` read but do not compute, sorted."""
        ops = list(ops)
        made = {t for i in ops for t in self.ops[i][1]}
        return sorted({t for i in ops for t in self.ops[i][0]
                       if t >= 0 and t not in made and not self.is_const(t)})

    def needed(self, targets: Iterable[int], stop: set[int]) -> tuple[int, ...]:
        """The operators that compute `targets` from graph inputs, constants and `stop`
        tensors (backward closure), in graph order."""
        ops: set[int] = set()
        todo = [t for t in targets if t not in stop]
        while todo:
            i = self.producer.get(todo.pop())
            if i is None or i in ops:
                continue
            ops.add(i)
            todo.extend(t for t in self.ops[i][0] if t >= 0 and t not in stop)
        return tuple(sorted(ops))

    # -- writing -------------------------------------------------------------------------------
    def extract(self, ops: Sequence[int], inputs: Sequence[int], outputs: Sequence[int]
                ) -> tuple[bytes, dict[int, int]]:
        """A new model running operators `ops` with subgraph `inputs` and `outputs`.

        Args:
            ops: operator indices, in graph order. inputs / outputs: tensor indices.
        Returns: (flatbuffer bytes, old tensor index -> new tensor index).
        """
        import flatbuffers

        S = schema()
        used = set(inputs) | set(outputs)
        for i in ops:
            used.update(t for t in (*self.ops[i][0], *self.ops[i][1]) if t >= 0)
        remap = {old: new for new, old in enumerate(sorted(used))}
        buffers: list[Any] = [S.BufferT()]  # buffer 0: the empty sentinel TFLite expects
        tensors = []
        for old in sorted(used):
            t = copy.copy(self.tensors[old])
            t.buffer = 0
            if self.is_const(old):
                data = self.model.buffers[self.tensors[old].buffer].data
                buffers.append(_AlignedBuffer(data))
                t.buffer = len(buffers) - 1
            tensors.append(t)
        sub = S.SubGraphT(tensors=tensors, inputs=[remap[t] for t in inputs],
                          outputs=[remap[t] for t in outputs],
                          operators=[self._op(i, remap) for i in ops], name=self.sub.name)
        meta = []
        for m in self.model.metadata or []:  # e.g. min_runtime_version
            buffers.append(copy.copy(self.model.buffers[m.buffer]))
            meta.append(S.MetadataT(name=m.name, buffer=len(buffers) - 1))
        model = S.ModelT(version=self.model.version, operatorCodes=self.model.operatorCodes,
                         subgraphs=[sub], description=self.model.description, buffers=buffers,
                         metadata=meta or None)
        builder = flatbuffers.Builder(1 << 16)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output()), remap

    def _op(self, i: int, remap: dict[int, int]) -> Any:
        op = copy.copy(self.sub.operators[i])
        op.inputs = [remap[t] if t >= 0 else -1 for t in self.ops[i][0]]
        op.outputs = [remap[t] for t in self.ops[i][1]]
        if op.intermediates is not None and len(op.intermediates):
            raise EdgelearnError("a TFLite operator with intermediate tensors cannot be moved")
        return op


def find_cut(g: TfliteGraph, data: Sequence[int], trainable: Iterable[int], output: int, *,
             batch: int, forced: Iterable[int] = ()) -> GraphCut | str:
    """The cut of `g` before every operator that reads a trainable tensor.

    Args:
        g: the graph. data: tensor indices of the data inputs.
        trainable: tensor indices of the trainable weights (inputs or constants).
        output: tensor index of the output the loss reads.
        batch: the graph's fixed batch (a cut tensor's leading dimension).
        forced: operators that must run in the suffix (a cut a runtime check refused moves
            above them).
    Returns: the GraphCut, or a sentence saying why there is none worth caching.
    """
    forced, seeds = set(forced), set(trainable)
    while True:
        live, dep = _kinds(g, data, seeds, forced)
        if output not in live:
            return f"no trainable weight reaches the output (tensor {output})"
        suffix = g.needed([output], stop=dep - live)
        read = {t for i in suffix for t in g.ops[i][0] if t >= 0}
        cut = sorted(t for t in read & dep if t not in live and t not in set(data))
        bad = [t for t in cut if g.row_shape(t, batch) is None]
        if not bad:
            break
        forced.update(g.producer[t] for t in bad)
    return _graph_cut(g, cut, tuple(sorted(read & set(data))), suffix)


def find_taps_cut(g: TfliteGraph, data: Sequence[int], trainable: Iterable[int],
                  outputs: Sequence[int], *, batch: int, forced: Iterable[int] = ()
                  ) -> GraphCut | str:
    """`find_cut` for a taps graph: several outputs, the logits first, then the taps a step
    reads. An output computed from the data and frozen values only (a head's input) is a cut
    tensor itself (cached; the suffix need not read it).

    Args:
        g / data / trainable / batch / forced: as `find_cut`'s.
        outputs: tensor indices of the outputs a step reads, the logits first.
    Returns: the GraphCut, or a sentence saying why there is none worth caching.
    """
    forced, seeds, fed = set(forced), set(trainable), set(data)
    while True:
        live, dep = _kinds(g, data, seeds, forced)
        if outputs[0] not in live:
            return f"no trainable weight reaches the logits (tensor {outputs[0]})"
        above = {t for t in outputs if t not in live}
        if above - dep or above & fed:
            return "a tap the step reads is a model input or a constant, not a layer's value"
        suffix = g.needed([t for t in outputs if t in live], stop=dep - live)
        read = {t for i in suffix for t in g.ops[i][0] if t >= 0}
        cut = sorted(((read & dep) - live - fed) | above)
        bad = [t for t in cut if g.row_shape(t, batch) is None]
        if not bad:
            break
        forced.update(g.producer[t] for t in bad)
    return _graph_cut(g, cut, tuple(sorted(read & fed)), suffix)


def _graph_cut(g: TfliteGraph, cut: list[int], passthrough: tuple[int, ...],
               suffix: tuple[int, ...]
               ) -> GraphCut | str:
    """The GraphCut at tensors `cut`, or why it is not worth caching (no frozen prefix, or
    one that only moves data)."""
    prefix = g.needed(cut, stop=set())
    kinds = sorted({g.op_type(i) for i in prefix})
    if not cut or set(kinds) <= LAYOUT_OPS:
        moves = f" (the frozen operators only move data: {', '.join(kinds)})" if cut else ""
        return f"the first trainable weight is read by the first layer: no frozen prefix{moves}"
    return GraphCut(tuple(cut), passthrough, prefix, suffix)


def _kinds(g: TfliteGraph, data: Sequence[int], trainable: set[int], forced: set[int]
           ) -> tuple[set[int], set[int]]:
    """(tensors computed in the suffix: from a trainable weight or by a forced operator,
    tensors that depend on the data)."""
    live, dep = set(trainable), set(data)
    for i, (ins, outs) in enumerate(g.ops):
        if i in forced or live.intersection(ins):
            live.update(outs)
        if dep.intersection(ins):
            dep.update(outs)
    return live, dep


def buffer_offsets(model_bytes: bytes, tensors: Iterable[int]) -> dict[int, tuple[int, int]]:
    """Tensor index -> (byte offset, nbytes) of its constant data inside `model_bytes`."""
    S = schema()
    m = S.Model.GetRootAs(model_bytes, 0)
    sub = m.Subgraphs(0)
    out = {}
    for t in tensors:
        buf = m.Buffers(sub.Tensors(t).Buffer())
        o = buf._tab.Offset(4)  # the `data` field's vector
        if not o:
            raise EdgelearnError(f"TFLite tensor {t} has no constant data")
        out[t] = (int(buf._tab.Vector(o)), int(buf._tab.VectorLen(o)))
    return out


def constant_offsets(model_bytes: bytes) -> dict[int, int]:
    """Byte offset of each constant tensor's data inside `model_bytes` -> its tensor index
    (how the manifest's `const` slots of model_const.tflite name their tensors)."""
    S = schema()
    m = S.Model.GetRootAs(model_bytes, 0)
    sub = m.Subgraphs(0)
    out = {}
    for t in range(sub.TensorsLength()):
        buf = m.Buffers(sub.Tensors(t).Buffer())
        o = buf._tab.Offset(4)
        if o and buf._tab.VectorLen(o):
            out[int(buf._tab.Vector(o))] = t
    return out


class _AlignedBuffer:
    """A flatbuffer Buffer whose data vector starts on a TFLITE_ALIGN boundary."""

    def __init__(self, data: Any) -> None:
        self.data = np.asarray(data, np.uint8).tobytes()

    def Pack(self, builder: Any) -> int:  # the object API's method name
        S = schema()
        n = len(self.data)
        builder.StartVector(1, n, TFLITE_ALIGN)
        builder.head -= n
        builder.Bytes[builder.head : builder.head + n] = self.data
        import inspect

        takes_len = len(inspect.signature(builder.EndVector).parameters) >= 1
        vec = builder.EndVector(n) if takes_len else builder.EndVector()
        S.BufferStart(builder)
        S.BufferAddData(builder, vec)
        return S.BufferEnd(builder)


def _text(v: bytes | str | None) -> str:
    return v.decode() if isinstance(v, bytes) else (v or "")
