"""K candidates of a cached head step scored in one onnxruntime call (zo-sgd's probe points).

A zo-sgd step under the "copy" restore asks its 2q probe points as one `Population`
(`edgelearn.optim.zo_sgd`); on cached frozen-prefix features (`CachedEvaluator`) each point
was one suffix forward. Here the suffix graph is rewritten into a K-candidate graph: every node
that depends on a trainable weight is copied K times (candidate j reads its own weight inputs,
views of row j of a candidate rows buffer that `Population.fill` writes), the nodes that do not
(a pooling before the head) run once, and the K model outputs come back from one call.

Each copy is the very node of the suffix, on the same shapes, so each candidate's output is
computed by the same kernel as a single suffix forward of it; this is checked, not assumed:
when the graph is made (on the setup's probe batch) and on the first population of every batch
size (the single forwards run too and their losses are used), every candidate's output must
equal its single suffix forward exactly, or the population path is dropped for the session
(the reason in the cache report) and probes run one forward each as before. The losses are
`loss_fn` of each candidate's output, as `evaluate()` computes them, so the journal is the same
bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: candidates per runtime call (larger populations run in chunks)
MAX_CANDIDATES = 16
_P = "edgelearn.candidate"


def candidate_name(name: str, j: int) -> str:
    """The K-candidate graph's name of tensor `name` for candidate j."""
    return f"{_P}{j}/{name}"


def k_candidate_graph(suffix: bytes, trainable: Sequence[str], k: int) -> bytes:
    """`suffix` with every node that depends on `trainable` copied per candidate (see the
    module docstring): inputs candidate_name(w, j) per trainable w, outputs
    candidate_name(o, j) per graph output o.

    Raises: ValueError when a node carries a subgraph or an output depends on no trainable.
    """
    import onnx

    model = onnx.load_from_string(suffix)
    g = model.graph
    tainted = set(trainable)
    shared, per = [], []
    for node in g.node:  # topological order (the splitter writes it so)
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            raise ValueError(f"node {node.op_type} carries a subgraph")
        if tainted.intersection(node.input):
            per.append(node)
            tainted.update(node.output)
        else:
            shared.append(node)
    if not all(o.name in tainted for o in g.output):
        raise ValueError("a suffix output does not depend on the trainable weights")
    nodes = list(shared)
    for j in range(k):
        for node in per:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = candidate_name(node.name or node.output[0], j)
            copy.input[:] = [candidate_name(i, j) if i in tainted else i for i in node.input]
            copy.output[:] = [candidate_name(o, j) for o in node.output]
            nodes.append(copy)
    inputs = [i for i in g.input if i.name not in tainted]
    for j in range(k):
        for i in g.input:
            if i.name in tainted:
                inputs.append(_renamed(i, candidate_name(i.name, j)))
    outputs = [_renamed(o, candidate_name(o.name, j)) for j in range(k) for o in g.output]
    del g.node[:], g.input[:], g.output[:], g.value_info[:]
    g.node.extend(nodes)
    g.input.extend(inputs)
    g.output.extend(outputs)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _renamed(info: Any, name: str) -> Any:
    import onnx

    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    out.name = name
    return out


class CandidateRunner:
    """The K-candidate graph of a suffix, its weight inputs bound to a candidate rows buffer.

    Args:
        make_runner: split -> a `SuffixRunner` (the run's onnxruntime settings).
        split: the cached evaluator's Split. store: the trainable arena (segments, shapes).
        output: the suffix's model output. k: candidates per call.
    """

    def __init__(self, make_runner: Callable[[Any], Any], split: Any, store: Any,
                 output: str, k: int) -> None:
        graph = k_candidate_graph(split.suffix, split.trainable, k)
        # trainable=(): the candidates' weights are bound below, not the arena's
        self.runner = make_runner(dataclasses.replace(split, suffix=graph, trainable=()))
        self.k = k
        self.rows = np.empty((k, store.n_trainable("float32")), np.float32)
        self.names = [candidate_name(output, j) for j in range(k)]
        io = self.runner.io
        for j in range(k):
            for name, s, e in store.segments("float32"):
                # row j of the buffer is contiguous: each weight a zero-copy view, bound once
                io.bind_cpu_input(candidate_name(name, j),
                                  self.rows[j, s:e].reshape(store[name].shape))

    def outputs(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The model output of each candidate whose rows are in `rows` (the cut tensors and
        passthrough inputs in `feeds`); arrays kept until the next call."""
        out = self.runner.run_all(feeds)
        return [out[n] for n in self.names]


def population_supported(split: Any, store: Any) -> str | None:
    """Why a cached run cannot score populations in one call (None: it may try)."""
    if store.n_trainable("int8"):
        return "int8 trainable weights (the candidate rows are float32)"
    if sorted(split.trainable) != sorted(n for n, _, _ in store.segments("float32")):
        return "the suffix does not read every trainable weight"
    return None
