"""Forward-only optimizers, one algorithm per module, registered by name."""

from edgelearn.optim import adamezo as _adamezo  # noqa: F401  (registers "adamezo")
from edgelearn.optim import fzoo as _fzoo  # noqa: F401  (registers "fzoo")
from edgelearn.optim import hybrid as _hybrid  # noqa: F401  (registers "hybrid")
from edgelearn.optim import lozo as _lozo  # noqa: F401  (registers "lozo")
from edgelearn.optim import polystep as _polystep  # noqa: F401  (registers "polystep")
from edgelearn.optim import tpsgd as _tpsgd  # noqa: F401  (registers "tpsgd")
from edgelearn.optim import zo_gn as _zo_gn  # noqa: F401  (registers "zo-gn")
from edgelearn.optim import zo_readout as _zo_readout  # noqa: F401  (registers "zo-readout")
from edgelearn.optim import zo_scale as _zo_scale  # noqa: F401  (registers "zo-scale")
from edgelearn.optim import zo_sgd as _zo_sgd  # noqa: F401  (registers "zo-sgd")
from edgelearn.optim.base import (
    REGISTRY,
    Forward,
    Optimizer,
    Population,
    StepInfo,
    make_optimizer,
    optimizer_class,
    optimizer_from_config,
    register,
)
from edgelearn.optim.options import OptimizerOptions

__all__ = ["REGISTRY", "Forward", "Optimizer", "OptimizerOptions", "Population", "StepInfo",
           "make_optimizer", "optimizer_class", "optimizer_from_config", "register"]
