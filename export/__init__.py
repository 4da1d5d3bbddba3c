"""Host-side exporter (torch lives only here): nn.Module -> edgelearn bundle.

Modules, each importing only those listed before it: common (shared torch helpers, ExportError),
checks (torch vs device parity), taps (tpSGD layer taps), tflite_export (LiteRT graphs),
onnx_export (`export_bundle`), quantize (int8), population (PolyStep's batched graph).
Every bundle file and manifest is written through `edgelearn.bundle_writer`.
"""

from edgelearn.export.common import ExportError
from edgelearn.export.onnx_export import export_bundle

__all__ = ["ExportError", "export_bundle"]
