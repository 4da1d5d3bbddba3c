"""What is registered, by name: optimizers (with their options), objectives and backends.

(`backend_names`, not `backends`: `edgelearn.backends` is the package of the backends, and an
attribute of that name on `edgelearn` would hide it.)

For pickers and argument checking (`edgelearn train --optimizer ...`); every name listed here
is accepted by `TrainConfig` / `RuntimeConfig`; `auto_rule` says what optimizer "auto" picks.
Imports no runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgelearn.optim import OptimizerOptions


def optimizers() -> dict[str, type[OptimizerOptions]]:
    """Registered optimizer name -> its Options (a frozen dataclass: the fields with their
    defaults and help, `opt_keys()` for `--opt KEY=VALUE`, `cli_flags()`), sorted by name."""
    from edgelearn.optim import REGISTRY

    return {name: REGISTRY[name].Options for name in sorted(REGISTRY)}


def objectives() -> tuple[str, ...]:
    """Names of the losses a run can minimize or report (`TrainConfig(objective=...)`), sorted."""
    from edgelearn.losses import LOSSES

    return tuple(sorted(LOSSES))


def backend_names() -> tuple[str, ...]:
    """Names of the runtime backends (`RuntimeConfig(backend=...)`), installed or not, in the
    default preference order."""
    from edgelearn.backends import BACKENDS

    return tuple(BACKENDS)


def auto_rule() -> tuple[str, dict[str, dict[str, Any]]]:
    """How `TrainConfig(optimizer="auto")` picks (`edgelearn.optim.defaults`): the rule in one
    sentence, and optimizer name -> the options it sets for each method it may pick."""
    from edgelearn.optim.defaults import RECIPES, rule_summary

    return rule_summary(), {name: dict(options) for name, options in RECIPES.items()}
