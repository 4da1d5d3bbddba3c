"""edgelearn: personalize exported models on device with forward-only optimizers.

Only stdlib and numpy are imported here; runtimes (onnxruntime, LiteRT) load lazily inside
their backend, and torch never loads on the device side.
"""

from edgelearn.bundle import Bundle, load_bundle
from edgelearn.errors import BundleError, EdgelearnError, InputError
from edgelearn.params import ParamSpec, ParamStore

__version__ = "0.1.0"

__all__ = [
    "Bundle",
    "BundleError",
    "EdgelearnError",
    "InputError",
    "ParamSpec",
    "ParamStore",
    "__version__",
    "load_bundle",
]
