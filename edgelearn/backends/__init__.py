"""Inference backends: run a bundle's graph with weights bound in place from a ParamStore.

Every backend is a `Backend` (edgelearn/backends/base.py): `bind(store)` once, then
`forward(inputs)` any number of times; in-place edits of the store's trainable views are seen
by the next forward without rebuilding anything. What a backend can do (taps graph, population
scoring, reused output buffers, live int8 weights, weight strategies) are class flags declared
on every backend. Runtimes are imported lazily inside each backend module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edgelearn.backends.base import Backend, PopulationScorer
from edgelearn.backends.litert import LiteRTBackend
from edgelearn.backends.ort import OrtBackend
from edgelearn.errors import InputError

if TYPE_CHECKING:
    from edgelearn.bundle import Bundle

__all__ = ["ALIASES", "BACKENDS", "EXPORT_FORMATS", "INSTALL", "MODEL_FILE", "REGISTRY", "Backend",
           "PopulationScorer", "backend_class", "import_problem", "make_backend"]

#: name -> backend class, for every backend the CLI offers (the contract tests run them all)
REGISTRY: dict[str, type[Backend]] = {c.name: c for c in (OrtBackend, LiteRTBackend)}
#: other names accepted for a backend
ALIASES = {"ort": "onnxruntime", "tflite": "litert"}
BACKENDS = tuple(REGISTRY)
#: backend -> (bundle file role of the model it runs, file name, format label)
MODEL_FILE = {"onnxruntime": ("onnx", "model.onnx", "ONNX"),
              "litert": ("tflite", "model.tflite", "TFLite")}
#: backend -> how to install its runtime
INSTALL = {"onnxruntime": "pip install 'edgelearn[onnx]'",
           "litert": "pip install 'edgelearn[litert]'"}
#: backend -> the export formats that give a bundle its model
EXPORT_FORMATS = {"onnxruntime": "--formats onnx", "litert": "--formats onnx,tflite"}
#: backend -> modules that must import, tried in order; each inner tuple is alternatives
_RUNTIME_MODULES: dict[str, tuple[tuple[str, ...], ...]] = {
    # the ort backend checks and loads the bundle's graph with onnx before onnxruntime runs it
    "onnxruntime": (("onnxruntime",), ("onnx",)),
    # tflite-runtime is LiteRT's interpreter on numpy<2 devices
    "litert": (("ai_edge_litert.interpreter", "tflite_runtime.interpreter"),),
}


def backend_class(name: str) -> type[Backend]:
    """The backend class registered as `name` (or an alias); InputError for an unknown one."""
    try:
        return REGISTRY[ALIASES.get(name, name)]
    except KeyError:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") \
            from None


def make_backend(name: str, bundle: Bundle, **options: Any) -> Backend:
    """Create the backend called `name` for `bundle`.

    Args:
        name: a registered backend name or alias.
        bundle: the loaded bundle.
        options: constructor keywords: threads, strategy, graph, outputs (every backend);
            providers, spinning (onnxruntime).
    """
    return backend_class(name)(bundle, **options)


def import_problem(name: str) -> str | None:
    """Why backend `name` cannot run here (a runtime module that does not import), or None.

    Really imports the modules (a wheel that is installed but broken, e.g. built for another
    numpy, does not count as available); call it only for a backend you are about to use.
    """
    if name not in _RUNTIME_MODULES:
        return f"unknown backend {name!r}"
    for alternatives in _RUNTIME_MODULES[name]:
        errors = []
        for module in alternatives:  # stop at the first that imports
            why = _import_error(module)
            if why is None:
                break
            errors.append(why)
        else:
            return "; ".join(errors)
    return None


def _import_error(module: str) -> str | None:
    """None when `module` imports, else a one-line reason."""
    try:
        importlib.import_module(module)
    except Exception as e:  # a broken native wheel raises more than ImportError
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"{module.split('.')[0]} does not import: {text}"
    return None
