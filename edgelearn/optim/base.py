"""Optimizer contract shared by every forward-only optimizer.

An optimizer changes the trainable slice of a ParamStore in place. Its hyperparameters are a
frozen `Options` dataclass (optim/options.py), its capabilities class flags declared here.
A step is a short dialogue: `ask(store)` puts the next candidate weights into the store
(returns False when the step is done), the caller evaluates the loss with whatever backend it
likes and reports it with `tell(loss)`. `step(store, evaluate, **extra)` runs that dialogue
with a callback. Each finished step leaves a JSON-able `record` (what the journal stores). The
record holds, under "evals", every loss told during the step; `replay(store, record)` re-runs
the very same step generator and feeds it those losses instead of running forwards, so replay
performs the same float operations as training by construction (bit-exact), needs no data,
and checks that the regenerated record matches the stored one. Subclasses implement
`_step(store, **extra)` as a generator that yields once per candidate and receives its loss,
returning the record; public methods, validation and counters live here once (as in
nevergrad/evosax).

One step signature for every optimizer (optax's GradientTransformationExtraArgs): inputs
beyond the loss travel as keyword arguments of `step` / `replay` / `setup`, which reach
`_step`; an optimizer reads those it needs and ignores the rest. tpSGD reads `taps=`.

Requests a step generator may yield:
  * None: one candidate is in the store; receives its loss.
  * `Population`: K candidates at once; receives a list of K losses. `step(...,
    evaluate_population=...)` hands it to a caller that can score many weight sets in one
    runtime call; without one (and through ask/tell) the base class expands it into K single
    candidates. Either way the K losses are recorded under "evals" in order.
  * `Forward`: a forward whose output is not a loss (tpSGD's layer taps; zo-gn's model
    outputs of K candidates, `forwards` K); receives its output. Replay runs it again (the
    update depends on the data) unless the optimizer replays from its record alone (zo-gn),
    so only optimizers whose `needs` is not "loss" yield it, and they have no ask/tell
    dialogue.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from edgelearn.errors import EdgelearnError, InputError
from edgelearn.optim.options import OptimizerOptions
from edgelearn.params import ParamStore

REGISTRY: dict[str, type[Optimizer]] = {}
#: what an optimizer's step consumes (class flag `needs`)
NEEDS = ("loss", "taps", "outputs")

_IDLE, _PENDING = object(), object()


@dataclass(frozen=True)
class StepInfo:
    """Outcome of one optimizer step.

    Args:
        step: index of the step just finished (0-based).
        loss: loss estimate at the pre-step weights (the record's "loss" when it states one,
            else the mean of the finite losses told).
        record: JSON-able journal record; `replay` reproduces the update from it.
        accepted: False when the update was rejected (non-finite loss, conservative check).
        evaluations: number of forwards (losses told and `Forward` requests) the step used.
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


@dataclass(frozen=True)
class Forward:
    """A forward whose output is not a loss; `step` and `replay` run it and send the output back.

    Args:
        run: () -> the output (tpSGD: (taps: name -> array, targets y) of one taps forward).
        forwards: the forwards it costs (counted in `StepInfo.evaluations`; zo-gn: the K
            candidates whose outputs one request asks).
    """

    run: Callable[[], Any] = field(repr=False)
    forwards: int = 1


def register(cls: type[Optimizer]) -> type[Optimizer]:
    """Class decorator: make an optimizer available by its `name`."""
    if not cls.name or cls.needs not in NEEDS or not issubclass(cls.Options, OptimizerOptions):
        raise TypeError(f"{cls.__name__}: an optimizer needs a name, needs in {NEEDS} and an "
                        "Options dataclass derived from OptimizerOptions")
    REGISTRY[cls.name] = cls
    return cls


def optimizer_class(name: str) -> type[Optimizer]:
    """The registered optimizer class called `name` (InputError naming the choices if none)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown optimizer {name!r}; choose one of {sorted(REGISTRY)}") \
            from None


def make_optimizer(name: str, **options: Any) -> Optimizer:
    """Instantiate a registered optimizer by name with keyword options (its Options fields)."""
    return optimizer_class(name)(**options)


def optimizer_from_config(name: str, config: Any) -> Optimizer:
    """The optimizer a journal header describes (its "optimizer" and "config"); keys an older
    header lacks take the values its run used (`OptimizerOptions.from_config`)."""
    cls = optimizer_class(name)
    return cls(**cls.Options.from_config(name, config).as_kwargs())


def check_reproduced(step: int, again: dict[str, Any], record: dict[str, Any], hint: str) -> None:
    """Raise InputError unless a replayed step regenerated its journal record exactly."""
    body = {k: v for k, v in record.items() if k != "kind"}
    if again != body:
        diff = sorted(k for k in set(again) | set(body) if again.get(k) != body.get(k))
        raise InputError(f"journal record of step {step} does not reproduce ({diff}): {hint}")


def _drive(gen: Generator[Any, Any, dict[str, Any]],
           answer: Callable[[Any], Any]) -> dict[str, Any]:
    """Run a step generator to its end, sending `answer(request)` for each request."""
    try:
        req = next(gen)
        while True:
            req = gen.send(answer(req))
    except StopIteration as stop:
        return stop.value


class Optimizer:
    """Base class: options, ask/tell bookkeeping, step counter, state (de)serialization.

    Args:
        **options: fields of the class's `Options` dataclass (unknown keys are refused with
            the valid ones); `seed` is the run seed every random draw derives from.
    """

    name: ClassVar[str] = ""
    #: the frozen dataclass of this optimizer's options (validation, config, CLI flags)
    Options: ClassVar[type[OptimizerOptions]] = OptimizerOptions
    #: what a step consumes: "loss" (evaluate() -> a float, as candidates are placed),
    #: "taps" (one taps-graph forward, `taps=` () -> (taps, y); see optim/tpsgd.py) or
    #: "outputs" (model outputs of a Population, `outputs=` pop -> (outputs, y, loss_fn),
    #: and losses; see optim/zo_gn.py). The train loop builds the evaluator it names; replay
    #: of a "taps" journal needs the run's data.
    needs: ClassVar[str] = "loss"
    #: why a replayed step may not reproduce its record (the replay error names it)
    replay_hint: ClassVar[str] = "corrupt, or written with other settings, weights or data"
    #: True when the optimizer multiplies its learning rate by `self.lr_scale` (set by the
    #: trainer's divergence rollback; 1.0 otherwise). Optimizers that do not cannot be used
    #: with divergence rollback.
    supports_lr_scale: ClassVar[bool] = False
    #: "lowrank": the step's probes are `LowRankPopulation`s (optim/lozo.py) that an evaluator
    #: may score with a low-rank graph (`make_evaluator` reads it); None: plain candidates
    probe_graph: ClassVar[str | None] = None
    #: True when `setup` needs the bundle's linear head (zo-readout): `make_evaluator` passes
    #: layers= (the manifest's records, else the head found in the ONNX graph) and output=
    reads_head: ClassVar[bool] = False
    #: what `edgelearn train` trains when --trainable is not given (None: the manifest's flags)
    default_trainable: ClassVar[str | None] = None

    def __init__(self, **options: Any) -> None:
        self.options = self.Options.create(self.name, options)
        self.seed = self.options.seed
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
        """Hyperparameters as JSON data (stored in the journal header): `Options.config()`."""
        return self.options.config()

    def setup(self, store: ParamStore, **extra: Any) -> None:
        """Attach what the optimizer needs besides `store` before its first step (default:
        nothing). `extra` as in `step` (tpsgd: layers=, targets=, out_shape=)."""

    def check_targets(self, y: np.ndarray, out_shape: tuple[int, ...]) -> None:
        """Raise InputError unless the optimizer can learn from targets `y` [N, ...] for a model
        output of shape [batch, *out_shape] (default: any; checked before anything is journaled)."""

    def memory_bytes(self, store: ParamStore) -> int:
        """Bytes of buffers this optimizer will allocate for `store` (for memory budgets)."""
        return 0

    def settle(self, store: ParamStore) -> None:
        """Write into `store` any part of an update that steps run with `defer=True` left
        pending (default: none is ever left; lozo's pending low-rank sum). Whoever steps
        with defer=True calls it (or reads inside `settled`) before anything else reads the
        weights; the next step's record notes it, so replay does the same."""

    def settled(self, store: ParamStore) -> AbstractContextManager[None]:
        """A block in which `store` holds the weights `settle` would give, and after which
        the run goes on as if nothing had been read (the same bits; default: no-op)."""
        return nullcontext()

    def example_bytes(self, output_numel: int) -> int:
        """Bytes this optimizer keeps per example of a step's batch (for memory budgets;
        default: none).

        Args:
            output_numel: elements of the model's first output per example."""
        return 0

    def population_size(self, store: ParamStore) -> int:
        """Candidates of the largest `Population` one step asks for on `store` (1: none).

        A population graph runs up to that many forwards in one runtime call, so their
        activations are live together (memory plans multiply a forward's by it)."""
        return 1

    def _step(self, store: ParamStore, **extra: Any) -> Generator[Any, Any, dict[str, Any]]:
        """Yield one request per candidate or forward (module docstring); return the record."""
        raise NotImplementedError

    # -- training -------------------------------------------------------------------------------
    def step(
        self,
        store: ParamStore,
        evaluate: Callable[[], float] | None = None,
        evaluate_population: Callable[[Population], Sequence[float]] | None = None,
        **extra: Any,
    ) -> StepInfo:
        """One full step.

        Args:
            store: the parameters to update in place.
            evaluate: loss of the weights currently in `store` (optimizers that need losses).
            evaluate_population: optional; K losses of a `Population` request in one go
                (without it populations are expanded into K `evaluate()` calls).
            **extra: further inputs by keyword, ignored by optimizers that do not read them
                (tpsgd: taps=() -> (taps, y), one taps forward on the step's batch; lozo:
                defer=True leaves the 2-D weights' update pending until `settle`).
        """
        if self._gen is not None:
            raise EdgelearnError("step() called in the middle of an ask/tell step")
        self._evals, self._losses = 0, []
        self._gen = gen = self._step(store, **extra)
        try:
            record = _drive(gen, lambda req: self._answer(req, evaluate, evaluate_population))
        except BaseException:
            self._gen = None
            raise
        return self._finish(record)

    def _answer(self, req: Any, evaluate: Callable[[], float] | None,
                evaluate_population: Callable[[Population], Sequence[float]] | None) -> Any:
        """Serve one request of a training step (and count the forwards)."""
        if isinstance(req, Forward):
            self._evals += req.forwards
            return req.run()
        if isinstance(req, Population) and evaluate_population is not None:
            losses = [float(v) for v in evaluate_population(req)]
            if len(losses) != req.size:
                raise EdgelearnError(f"population of {req.size} got {len(losses)} losses")
            self._evals += len(losses)
            self._losses.extend(losses)
            return losses
        if evaluate is None:
            raise EdgelearnError(f"{self.name} steps need evaluate(): the loss of the weights "
                                 "in the store")
        if isinstance(req, Population):  # expanded into single candidates
            out = []
            for j in range(req.size):
                req.place(j)
                out.append(self._answer(None, evaluate, None))
            return out
        loss = float(evaluate())
        self._evals += 1
        self._losses.append(loss)
        return loss

    def _finish(self, record: dict[str, Any]) -> StepInfo:
        record["step"] = self.t
        evals = [v if math.isfinite(v) else None for v in self._losses]
        if evals:  # steps that were told losses record them: replay feeds them back
            record["evals"] = evals
        if "loss" in record:
            loss = math.nan if record["loss"] is None else float(record["loss"])
        else:
            finite = [v for v in evals if v is not None]
            loss = sum(finite) / len(finite) if finite else math.nan
        info = StepInfo(self.t, loss, record, bool(record.get("accepted", True)), self._evals)
        self.last_info = info
        self._gen = None
        self._last = _IDLE
        self._pop, self._pop_losses = None, []
        self.t += 1
        return info

    def replay(self, store: ParamStore, record: dict[str, Any], **extra: Any) -> None:
        """Apply a journal record to `store` with the same float operations as training.

        Re-runs the step generator at the recorded step index, feeding it the recorded losses
        (and running its `Forward` requests, with `extra` as in `step`). Raises InputError if
        the record is malformed or does not reproduce itself.
        """
        evals, step = record.get("evals", []), record.get("step")
        if not (isinstance(evals, list) and isinstance(step, int) and step >= 0
                and all(v is None or isinstance(v, int | float) for v in evals)):
            raise InputError(f"malformed {self.name} journal record (step {step!r})")
        if self._gen is not None:
            raise EdgelearnError("cannot replay in the middle of a step")
        self.t = step
        feed = iter(evals)

        def take() -> float:
            v = next(feed, _PENDING)
            if v is _PENDING:
                raise InputError(f"journal record of step {step} has too few losses")
            return math.nan if v is None else float(v)

        def answer(req: Any) -> Any:
            if isinstance(req, Forward):
                return req.run()
            return [take() for _ in range(req.size)] if isinstance(req, Population) else take()

        again = {**_drive(self._step(store, **extra), answer), "step": step}
        if next(feed, _PENDING) is not _PENDING:
            raise InputError(f"journal record of step {step} has too many losses")
        if "evals" in record:
            again["evals"] = evals
        check_reproduced(step, again, record, self.replay_hint)
        self.t = step + 1

    # -- public dialogue ------------------------------------------------------------------------
    def ask(self, store: ParamStore) -> bool:
        """Place the next candidate in `store`; False when the step has finished."""
        if self.needs != "loss":
            raise EdgelearnError(f"{self.name} has no ask/tell dialogue (its steps need "
                                 f"{self.needs}): use step(store, ...)")
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
