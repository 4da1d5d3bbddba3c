"""Host-side exporter (torch lives only here): nn.Module -> edgelearn bundle."""

from edgelearn.export.onnx_export import ExportError, export_bundle

__all__ = ["ExportError", "export_bundle"]
