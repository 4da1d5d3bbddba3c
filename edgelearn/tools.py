"""Unstable: the tool-level entry points of `edgelearn prepare|bake|bench|report` (`el.tools.*`).

Host- and developer-side work on models rather than what an app does while it learns: turn a
third-party ONNX model into a bundle, bake personalized weights back into plain inference
models, time a bundle's forwards and steps. Their signatures and result keys (the commands'
`--json` objects) may change between versions. onnx and onnxruntime load only when called.
"""

from __future__ import annotations

from edgelearn.bench import bench
from edgelearn.model import Model
from edgelearn.parity import ATOL, RTOL
from edgelearn.prepare import bake_bundle as bake
from edgelearn.prepare import list_params
from edgelearn.prepare import prepare_onnx as prepare
from edgelearn.report import write_report as report
from edgelearn.training.cached_evaluator import cache_plan

__all__ = ["ATOL", "RTOL", "Model", "bake", "bench", "cache_plan", "list_params", "prepare",
           "report"]
