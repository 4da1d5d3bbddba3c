"""Torch reference implementations of device optimizer steps, for parity tests.

Readable, not fast (pycma's `purecma` spirit): each function performs one step of the
algorithm with torch ops on named tensors, given the same noise the device drew.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy in float64 (the device accumulates losses in float64)."""
    return torch.nn.functional.cross_entropy(out.double(), y)


def zo_sgd_step(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    z: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    lr: float,
    eps: float,
    loss_fn: LossFn = cross_entropy,
) -> tuple[dict[str, torch.Tensor], float, tuple[float, float]]:
    """One MeZO / SPSA step (Malladi et al. 2023) on the parameters named in `z`.

    Args:
        model: torch module (eval mode); parameters not in `params` keep the module's values.
        params: name -> current float32 tensor of every parameter to override.
        z: name -> float32 noise tensor for each trainable parameter (same shape).
        inputs: input batch.
        targets: labels / targets for `loss_fn`.
        lr: learning rate.
        eps: perturbation scale.
        loss_fn: (output, targets) -> scalar loss.
    Returns: (new params for the names in z, projected gradient g, (L+, L-)).
    """
    with torch.no_grad():
        def loss_at(sign: float) -> float:
            cand = dict(params)
            for n, zn in z.items():
                cand[n] = params[n] + sign * eps * zn
            return float(loss_fn(functional_call(model, cand, (inputs,)), targets))

        lp, lm = loss_at(+1.0), loss_at(-1.0)
        g = (lp - lm) / (2.0 * eps)
        new = {n: params[n] - (lr * g) * zn for n, zn in z.items()}
    return new, g, (lp, lm)
