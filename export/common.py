"""What the exporter modules share (torch, host side): the error type, the parameters of a model,
the functional wrapper that turns weights into graph inputs, random example batches and the
torch.export -> ONNX step.

Imports no other module of edgelearn.export, so every exporter module can import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from edgelearn.errors import EdgelearnError
from edgelearn.params import check_name

#: The symbolic name of the batch dimension in bundle tensor specs and ONNX graphs.
BATCH = "batch"


class ExportError(EdgelearnError):
    """The model cannot be exported faithfully (unsupported op, parity mismatch, ...)."""


class Functional(nn.Module):
    """forward(*inputs, *params) = functional_call(model, params, inputs).

    Args:
        model: the torch module.
        names: parameter names, in the order their tensors follow the inputs.
        n_inputs: how many leading forward arguments are model inputs.
    """

    def __init__(self, model: nn.Module, names: list[str], n_inputs: int):
        super().__init__()
        self.model = model
        self.names = names
        self.n_inputs = n_inputs

    def forward(self, *args: torch.Tensor) -> Any:
        """The model's outputs with the trailing arguments as its parameters."""
        inputs, params = args[: self.n_inputs], args[self.n_inputs :]
        return functional_call(self.model, dict(zip(self.names, params, strict=False)), inputs)


def collect_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and floating-point buffers by torch name (tied parameters appear once)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        out[name] = p.detach()
    for name, b in model.named_buffers():
        if b.is_floating_point():
            out[name] = b.detach()
    for name, t in out.items():
        check_name(name)
        if t.dtype != torch.float32:
            raise ExportError(f"parameter {name!r} is {t.dtype}; export float32 models")
    return out


def as_tuple(x: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """One tensor or a sequence of tensors (model inputs or outputs) as a tuple."""
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def with_batch(x: torch.Tensor, b: int, seed: int) -> torch.Tensor:
    """A random tensor like `x` with batch size `b` (same dtype, value scale ~ N(0, 1)).

    Args:
        x: template tensor, batch first (integer tensors draw from 0 .. max(x)).
        b: the batch size of the result.
        seed: seed of the torch generator (the same seed gives the same tensor).
    """
    g = torch.Generator().manual_seed(seed)
    if x.is_floating_point():
        return torch.randn((b, *x.shape[1:]), generator=g, dtype=x.dtype)
    hi = int(x.max().item()) + 1 if x.numel() else 2
    return torch.randint(0, max(hi, 2), (b, *x.shape[1:]), generator=g, dtype=x.dtype)


def describe_error(e: BaseException, limit: int | None = None) -> str:
    """"Type: first line of the message" (third-party errors can be pages long).

    Args:
        e: the exception.
        limit: keep at most this many characters of the first line (None: all).
    """
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:limit]}"


def export_onnx_program(module: nn.Module, args: tuple[torch.Tensor, ...], dynamic: tuple[Any, ...],
                        path: Path, *, input_names: list[str], output_names: list[str],
                        what: str) -> None:
    """torch.export `module` on `args` and write it as ONNX (dynamo exporter, no optimizer).

    Args:
        module: the module to export (eval mode).
        args: its forward arguments (inputs, then parameters).
        dynamic: per argument, {dim: torch.export.Dim} or None (torch.export's dynamic_shapes).
        path: the .onnx file to write (weights embedded, no external data).
        input_names / output_names: ONNX graph names of the arguments and the outputs.
        what: what is exported, for the error message.
    Raises ExportError naming the first line of whatever torch.export / the exporter raised.
    """
    try:
        with torch.no_grad():
            ep = torch.export.export(module, args, dynamic_shapes=(dynamic,))
            # optimize=False keeps every parameter a named graph input (no folding, no merging).
            torch.onnx.export(ep, (), str(path), input_names=input_names,
                              output_names=output_names, dynamo=True, optimize=False,
                              external_data=False, verbose=False)
    except Exception as e:  # torch.export / onnx exporter raise many types
        raise ExportError(f"{what} failed: {describe_error(e)}") from e
