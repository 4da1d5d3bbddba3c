"""What every backend is: one base class holding the public methods, capabilities as class flags.

A backend runs one graph of a bundle (its model, or its layer-taps graph for tpSGD) with the
weights of a ParamStore: `bind(store)` once, then `forward(inputs)` any number of times;
in-place edits of the store's trainable views are seen by the next forward without rebuilding
anything. The public methods (`bind`, `forward`, `output_names`, `close`, population scoring)
are written once here; a runtime implements the small hooks `_bind`, `_forward`, `_close` and
declares what it can do with the class flags below (nevergrad-style), so callers ask a flag
instead of probing a backend with getattr/hasattr. A subclass that leaves a flag undeclared is
refused when it is defined.

`PopulationScorer` is the separate, smaller contract of an evaluator that scores K candidate
weight sets in one runtime call (a backend with `supports_population` makes one).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgelearn.errors import BundleError, EdgelearnError, InputError
from edgelearn.losses import row_losses

if TYPE_CHECKING:
    from edgelearn.bundle import Bundle
    from edgelearn.optim.base import Population
    from edgelearn.params import ParamStore

#: candidates a population scorer runs per runtime call (larger populations are split)
MAX_POPULATION = 64
#: the class flags every backend declares (checked when a subclass is defined)
FLAGS = ("name", "model_role", "taps_role", "strategies", "taps_strategies", "reuses_outputs",
         "live_int8", "supports_population")


class PopulationScorer(abc.ABC):
    """Scores K candidate weight sets of a store's trainable slice on one data batch."""

    #: candidates per runtime call (larger populations are split into chunks of this size)
    max_population: int

    @abc.abstractmethod
    def forward(self, pop: Population, x: np.ndarray) -> np.ndarray:
        """First model output of every candidate of `pop` on batch `x`: [K, batch, ...]."""

    @abc.abstractmethod
    def memory_bytes(self, candidates: int | None = None) -> int:
        """Bytes the scorer keeps for candidate rows (what a memory budget must count) when
        the populations it scores have `candidates` candidates (None: as many as a call
        takes; 1: no populations, no rows)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the runtime; the scorer cannot be used afterwards (idempotent)."""

    def losses(self, pop: Population, x: np.ndarray, y: np.ndarray,
               loss_fn: Callable[[np.ndarray, np.ndarray], float]) -> list[float]:
        """loss_fn(output, y) of every candidate of `pop` on (x, y), in candidate order
        (one vectorized call for the losses that have a row form, same values)."""
        return row_losses(loss_fn, self.forward(pop, x), y)


class Backend(abc.ABC):
    """A runtime running one graph of a bundle with weights bound in place from a ParamStore.

    Args:
        bundle: the loaded bundle.
        threads: runtime threads (None = the runtime's default).
        strategy: how weights reach the runtime, one of `strategies` (None = the backend's
            choice for this bundle).
        graph: bundle file role of the graph to run: `model_role` (default) or `taps_role`.
        outputs: graph outputs forward() returns (None: all); a name the graph does not have
            is refused at bind (BundleError).
    """

    name: ClassVar[str]
    """Registry name (`make_backend(name, ...)`, `--backend`)."""
    model_role: ClassVar[str]
    """Bundle file role of the model graph this backend runs ("onnx", "tflite")."""
    taps_role: ClassVar[str | None]
    """Bundle file role of its layer-taps graph (tpSGD), or None: no taps support."""
    strategies: ClassVar[tuple[str, ...]]
    """Ways the weights can reach the runtime (`strategy=`); the first is the default."""
    taps_strategies: ClassVar[tuple[str, ...]]
    """The strategies that can run the taps graph (a subset of `strategies`; () without taps)."""
    reuses_outputs: ClassVar[bool]
    """forward(reuse_outputs=True) may return arrays the next call overwrites (else fresh)."""
    live_int8: ClassVar[bool]
    """int8 parameters can be trainable (read live from the int8 arena), not only baked."""
    supports_population: ClassVar[bool]
    """Can make a `PopulationScorer` (K candidates per runtime call) for a population graph."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        missing = [f for f in FLAGS if not hasattr(cls, f)]
        if missing:
            raise TypeError(f"backend {cls.__name__} does not declare {missing}")

    def __init__(self, bundle: Bundle, *, threads: int | None = None,
                 strategy: str | None = None, graph: str | None = None,
                 outputs: Collection[str] | None = None) -> None:
        self.graph = graph or self.model_role
        if self.graph not in (self.model_role, self.taps_role):
            if self.taps_role is None:
                raise InputError(f"the {self.name} backend runs no layer-taps graph; it runs "
                                 f"only {self.model_role!r}")
            raise InputError(f"unknown {self.name} graph {self.graph!r}; choose "
                             f"{(self.model_role, self.taps_role)}")
        self.strategy = self._check_strategy(strategy)
        self.bundle = bundle
        self.threads = threads
        self.outputs = None if outputs is None else frozenset(outputs)
        self.store: ParamStore | None = None
        self._output_names: list[str] = []

    # -- public methods (written once) ---------------------------------------------------------
    def bind(self, store: ParamStore) -> None:
        """Attach the store: trainable views become live runtime inputs, frozen ones baked."""
        if not self.live_int8 and store.n_trainable("int8"):
            raise InputError(f"the {self.name} backend cannot train int8 parameters; freeze "
                             "them (--trainable) or use another backend")
        self.store = None  # a failed re-bind leaves the backend unbound, not half-bound
        self._bind(store)
        self.store = store

    def forward(self, inputs: Mapping[str, np.ndarray], *, reuse_outputs: bool = False,
                release: bool = False) -> dict[str, np.ndarray]:
        """Run the graph on `inputs` with the store's current weights (no rebuild from disk).

        Args:
            inputs: input name -> array (the bundle's declared inputs, any batch size).
            reuse_outputs: allow returning arrays that this backend keeps and overwrites on
                the next call with the same input shapes (no allocation per call: tpSGD's taps
                graph returns every activation). Only backends with `reuses_outputs` do;
                others return fresh arrays either way.
            release: give the runtime's working memory of this call back when it returns (a
                one-off forward whose activations should not stay allocated beside another
                session's; onnxruntime shrinks its arena, a backend that keeps none ignores
                it).
        Returns: output name -> array, in `output_names` order.
        """
        self._bound()
        feeds = dict(inputs)
        self.bundle.check_inputs(feeds)
        return self._forward(feeds, reuse_outputs=reuse_outputs and self.reuses_outputs,
                             release=release)

    @property
    def output_names(self) -> list[str]:
        """Names forward() returns, in order (for a taps graph: the model output, then taps)."""
        self._bound()
        return list(self._output_names)

    def close(self) -> None:
        """Release the runtime session; bind() makes the backend usable again (idempotent)."""
        self.store = None
        self._close()

    def can_score_population(self) -> bool:
        """True when `population_scorer()` works: the backend supports populations and the
        bundle has a population graph batching exactly the bound store's trainables."""
        return self.supports_population and self._population_ready(self._bound())

    def population_scorer(self, *, max_population: int = MAX_POPULATION) -> PopulationScorer:
        """A scorer of candidate weight sets of the bound store (see `can_score_population`).

        Args:
            max_population: candidates per runtime call.
        """
        store = self._bound()
        if not self.supports_population:
            raise InputError(f"the {self.name} backend cannot score populations in one call")
        if not self._population_ready(store):
            raise BundleError("the bundle has no population graph batching the trainable set")
        return self._population_scorer(store, max_population)

    @property
    def runs_taps(self) -> bool:
        """True when this backend runs the bundle's layer-taps graph (`graph=taps_role`)."""
        return self.graph != self.model_role

    def _check_strategy(self, strategy: str | None) -> str:
        """The strategy to use for `self.graph` (first allowed one when None), or InputError."""
        if strategy is not None and strategy not in self.strategies:
            raise InputError(f"unknown {self.name} strategy {strategy!r}; choose "
                             f"{self.strategies}")
        allowed = self.taps_strategies if self.runs_taps else self.strategies
        if strategy is not None and strategy not in allowed:
            raise InputError(f"the {self.name} taps graph runs with strategy "
                             f"{' or '.join(map(repr, allowed))}, not {strategy!r}")
        return strategy or allowed[0]

    # -- hooks ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def _bind(self, store: ParamStore) -> None:
        """Build the runtime over `store` and set `self._output_names`."""

    @abc.abstractmethod
    def _forward(self, inputs: dict[str, np.ndarray], *, reuse_outputs: bool, release: bool
                 ) -> dict[str, np.ndarray]:
        """Run on checked `inputs`; reuse_outputs is already False unless `reuses_outputs`
        (`forward` says what release asks)."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Drop the runtime objects."""

    def _population_ready(self, store: ParamStore) -> bool:
        """Whether the bundle's population graph fits `store` (backends with populations)."""
        return False

    def _population_scorer(self, store: ParamStore, max_population: int) -> PopulationScorer:
        """Make the scorer (backends with populations; called once `_population_ready`)."""
        raise InputError(f"the {self.name} backend cannot score populations in one call")

    def _bound(self) -> ParamStore:
        """The bound store, or EdgelearnError before bind() / after close()."""
        if self.store is None:
            raise EdgelearnError("backend is not bound: call bind(store) first")
        return self.store
