"""Optimizer contract shared by every forward-only optimizer.

An optimizer changes the trainable slice of a ParamStore in place. A step is a short dialogue:
`ask(store)` puts the next candidate weights into the store (returns False when the step is
done), the caller evaluates the loss with whatever backend it likes and reports it with
`tell(loss)`. `step(store, evaluate)` runs that dialogue with a callback. Each finished step
leaves a JSON-able `record` (what the journal stores). The record holds, under "evals", every
loss told during the step; `replay(store, record)` re-runs the very same step generator and
feeds it those losses instead of running forwards, so replay performs the same float operations
as training by construction (bit-exact), needs no data, and checks that the regenerated record
matches the stored one. Subclasses implement `_step(store)` as a generator that yields once per
candidate and receives its loss, returning the record; public methods, validation and counters
live here once (as in nevergrad/evosax).

Population requests: a generator may instead yield a `Population` (K candidates at once) and
receive a list of K losses. `step(store, evaluate, evaluate_population=...)` hands it to a
caller that can score many weight sets in one runtime call; without one (and through plain
ask/tell) the base class expands it into K single candidates. Either way the K losses are
recorded under "evals" in order, so replay feeds them back exactly as for single candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from edgelearn.errors import EdgelearnError, InputError
from edgelearn.params import ParamStore

REGISTRY: dict[str, type[Optimizer]] = {}

_IDLE, _PENDING = object(), object()


@dataclass(frozen=True)
class StepInfo:
    """Outcome of one optimizer step.

    Args:
        step: index of the step just finished (0-based).
        loss: loss estimate at the pre-step weights (e.g. mean of the probe losses).
        record: JSON-able journal record; `replay` reproduces the update from it.
        accepted: False when the update was rejected (non-finite loss, conservative check).
        evaluations: number of forwards (loss evaluations) the step used.
    """

    step: int
    loss: float
    record: dict[str, Any] = field(repr=False)
    accepted: bool = True
    evaluations: int = 0


@dataclass(frozen=True)
class Population:
    """K candidate weight sets requested at once (evaluated by one runtime call when possible).

    Args:
        size: K, the number of candidates.
        place: place(j) writes candidate j (0 <= j < K) into the store's trainable slice.
        fill: fill(out, lo, hi) writes the trainable slices of candidates lo..hi-1 into
            out[dtype][: hi - lo], arrays [>= hi - lo, n_trainable(dtype)] (so an evaluator
            can work in chunks of candidates); None when only `place` works.
    """

    size: int
    place: Callable[[int], None] = field(repr=False)
    fill: Callable[[dict[str, np.ndarray], int, int], None] | None = field(default=None,
                                                                          repr=False)


def register(cls: type[Optimizer]) -> type[Optimizer]:
    """Class decorator: make an optimizer available by its `name`."""
    REGISTRY[cls.name] = cls
    return cls


def make_optimizer(name: str, **options: Any) -> Optimizer:
    """Instantiate a registered optimizer by name with keyword options."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown optimizer {name!r}; choose one of {sorted(REGISTRY)}") \
            from None
    try:
        return cls(**options)
    except TypeError as e:  # an unknown keyword: name it
        raise InputError(f"optimizer {name!r}: {e}") from None


def check_reproduced(step: int, again: dict[str, Any], record: dict[str, Any], hint: str) -> None:
    """Raise InputError unless a replayed step regenerated its journal record exactly."""
    body = {k: v for k, v in record.items() if k != "kind"}
    if again != body:
        diff = sorted(k for k in set(again) | set(body) if again.get(k) != body.get(k))
        raise InputError(f"journal record of step {step} does not reproduce ({diff}): {hint}")


class Optimizer:
    """Base class: ask/tell bookkeeping, step counter, state (de)serialization.

    Args:
        seed: run seed; every random draw derives from (seed, step, probe).
    """

    name: ClassVar[str] = ""
    #: what `step`'s evaluate() returns: "loss" (a float) or "taps" (layer activations and
    #: targets of one taps-graph forward, see optim/tpsgd.py); the train loop provides it.
    needs: ClassVar[str] = "loss"
    #: True when the optimizer multiplies its learning rate by `self.lr_scale` (set by the
    #: trainer's divergence rollback; 1.0 otherwise). Optimizers that do not cannot be used
    #: with divergence rollback.
    supports_lr_scale: ClassVar[bool] = False
    #: options an older journal header may lack, with the value that header's run used (a
    #: default changed since): `edgelearn.train.optimizer_from_header` fills them in
    header_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, *, seed: int = 0) -> None:
        if not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = seed
        self.t = 0
        self.lr_scale = 1.0
        self._gen: Generator[Any, Any, dict[str, Any]] | None = None
        self._last: Any = _IDLE
        self._pop: Population | None = None  # population being expanded by ask/tell
        self._pop_losses: list[float] = []
        self._evals = 0
        self._losses: list[float] = []
        self.last_info: StepInfo | None = None

    # -- subclass hooks -------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Hyperparameters as JSON data (stored in the journal header)."""
        return {"seed": self.seed}

    def memory_bytes(self, store: ParamStore) -> int:
        """Bytes of buffers this optimizer will allocate for `store` (for memory budgets)."""
        return 0

    def _step(self, store: ParamStore) -> Generator[Any, Any, dict[str, Any]]:
        """Yield once per candidate placed in `store`; receive its loss; return the record.

        May yield a `Population` instead and receive a list of its K losses.
        """
        raise NotImplementedError

    def replay(self, store: ParamStore, record: dict[str, Any]) -> None:
        """Apply a journal record to `store` with the same float operations as training.

        Re-runs the step generator at the recorded step index, feeding it the recorded losses.
        Raises InputError if the record is malformed or does not reproduce itself.
        """
        evals, step = record.get("evals"), record.get("step")
        if not (isinstance(evals, list) and isinstance(step, int) and step >= 0
                and all(v is None or isinstance(v, int | float) for v in evals)):
            raise InputError(f"malformed {self.name} journal record (step {step!r})")
        if self._gen is not None:
            raise EdgelearnError("cannot replay in the middle of a step")
        self.t = step
        gen = self._step(store)
        feed = iter(evals)
        def take() -> float:
            v = next(feed, _PENDING)
            if v is _PENDING:
                raise InputError(f"journal record of step {step} has too few losses")
            return math.nan if v is None else float(v)

        try:
            req = next(gen)
            while True:
                if isinstance(req, Population):
                    req = gen.send([take() for _ in range(req.size)])
                else:
                    req = gen.send(take())
        except StopIteration as stop:
            again = {**stop.value, "step": step, "evals": evals}
        if next(feed, _PENDING) is not _PENDING:
            raise InputError(f"journal record of step {step} has too many losses")
        check_reproduced(step, again, record, "corrupt, or written with other settings")
        self.t = step + 1

    # -- public dialogue ------------------------------------------------------------------------
    def ask(self, store: ParamStore) -> bool:
        """Place the next candidate in `store`; False when the step has finished."""
        if self._last is _PENDING:
            raise EdgelearnError("ask() called twice without tell()")
        try:
            if self._gen is None:
                self._gen = self._step(store)
                self._evals = 0
                self._losses = []
                req = next(self._gen)
            elif self._pop is not None:
                self._pop_losses.append(self._last)
                if len(self._pop_losses) < self._pop.size:
                    self._pop.place(len(self._pop_losses))
                    self._last = _PENDING
                    return True
                losses, self._pop, self._pop_losses = self._pop_losses, None, []
                req = self._gen.send(losses)
            else:
                req = self._gen.send(self._last)
            if isinstance(req, Population):  # expand into single candidates
                self._pop, self._pop_losses = req, []
                req.place(0)
        except StopIteration as stop:
            self._finish(stop.value)
            return False
        self._last = _PENDING
        return True

    def tell(self, loss: float) -> None:
        """Report the loss of the candidate placed by the last `ask()`."""
        if self._last is not _PENDING:
            raise EdgelearnError("tell() without a pending ask()")
        self._last = float(loss)
        self._evals += 1
        self._losses.append(self._last)

    def step(
        self,
        store: ParamStore,
        evaluate: Callable[[], float],
        evaluate_population: Callable[[Population], Sequence[float]] | None = None,
    ) -> StepInfo:
        """One full step: evaluate every candidate with `evaluate()` (loss of current store).

        Args:
            store: the parameters to update in place.
            evaluate: loss of the weights currently in `store`.
            evaluate_population: optional; K losses of a `Population` request in one go
                (without it populations are expanded into K `evaluate()` calls).
        """
        if evaluate_population is None:
            while self.ask(store):
                self.tell(evaluate())
            assert self.last_info is not None
            return self.last_info
        if self._gen is not None:
            raise EdgelearnError("step() called in the middle of an ask/tell step")
        self._gen = gen = self._step(store)
        self._evals, self._losses = 0, []
        try:
            req = next(gen)
            while True:
                if isinstance(req, Population):
                    losses = [float(v) for v in evaluate_population(req)]
                    if len(losses) != req.size:
                        raise EdgelearnError(f"population of {req.size} got {len(losses)} "
                                             "losses")
                    self._evals += len(losses)
                    self._losses.extend(losses)
                    req = gen.send(losses)
                else:
                    loss = float(evaluate())
                    self._evals += 1
                    self._losses.append(loss)
                    req = gen.send(loss)
        except StopIteration as stop:
            self._finish(stop.value)
        except BaseException:
            self._gen = None
            raise
        assert self.last_info is not None
        return self.last_info

    def _finish(self, record: dict[str, Any]) -> None:
        record["step"] = self.t
        record["evals"] = [v if math.isfinite(v) else None for v in self._losses]
        finite = [v for v in self._losses if math.isfinite(v)]
        loss = sum(finite) / len(finite) if finite else math.nan
        self.last_info = StepInfo(self.t, loss, record, bool(record.get("accepted", True)),
                                  self._evals)
        self._gen = None
        self._last = _IDLE
        self._pop, self._pop_losses = None, []
        self.t += 1

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state as JSON data (counters; subclasses add their buffers)."""
        if self._gen is not None:
            raise EdgelearnError("cannot save optimizer state in the middle of a step")
        state: dict[str, Any] = {"name": self.name, "config": self.config(), "t": self.t}
        if self.lr_scale != 1.0:  # only after a divergence rollback
            state["lr_scale"] = self.lr_scale
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output; the name and config must match this optimizer."""
        if state.get("name") != self.name:
            raise InputError(f"state is for optimizer {state.get('name')!r}, not {self.name!r}")
        if state.get("config") != self.config():
            diff = sorted(k for k in set(state.get("config", {})) | set(self.config())
                          if state.get("config", {}).get(k) != self.config().get(k))
            raise InputError(f"optimizer settings differ from the saved run: {diff}")
        t = state.get("t")
        if not isinstance(t, int) or t < 0:
            raise InputError(f"bad step counter in optimizer state: {t!r}")
        scale = state.get("lr_scale", 1.0)
        if not (isinstance(scale, int | float) and 0 < scale <= 1):
            raise InputError(f"bad lr_scale in optimizer state: {scale!r}")
        self.t = t
        self.lr_scale = float(scale)
