"""Inference backends: run a bundle's graph with weights bound in place from a ParamStore.

Protocol (duck-typed, see `Backend`): `bind(store)` once, then `forward(inputs)` any number of
times; in-place edits of the store's trainable views are seen by the next forward without
rebuilding anything. Runtimes are imported lazily inside each backend module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgelearn.errors import InputError

if TYPE_CHECKING:
    from edgelearn.bundle import Bundle
    from edgelearn.params import ParamStore

BACKENDS = ("onnxruntime", "litert")


class Backend(Protocol):
    """What optimizers and the training loop need from a runtime."""

    name: str

    def bind(self, store: ParamStore) -> None:
        """Attach the store: trainable views become live runtime inputs, frozen ones baked."""

    def forward(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on `inputs` (name -> array) with the store's current weights."""


def make_backend(name: str, bundle: Bundle, **options: Any) -> Backend:
    """Create the backend called `name` for `bundle` (options: threads, providers, strategy)."""
    if name in ("onnxruntime", "ort"):
        from edgelearn.backends.ort import OrtBackend

        return OrtBackend(bundle, **options)
    if name in ("litert", "tflite"):
        from edgelearn.backends.litert import LiteRTBackend

        return LiteRTBackend(bundle, **options)
    raise InputError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
