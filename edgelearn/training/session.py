"""Session: a bundle being personalized in a run directory, as an app or the CLI drives it.

    with el.Session("bundles/mlp", "runs/u1", el.TrainConfig(optimizer="zo-sgd")) as s:
        for x, y in samples_as_they_arrive():
            s.step((x, y))            # one optimizer step, journaled

A session holds the run directory's lock for its lifetime. Its journal is opened at the first
step (or `run`): a new run writes the journal header and `session.json` (bundle path and
configs, for `Session.resume`); an existing one is checked against the session's settings
(every change named) and resumed: checkpoint, then the journal records after it, so a run
killed at any moment continues bit-identically. A run is fed either live (`step`) or from a
data set (`run`, the CLI's loop), not both.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from edgelearn.budget import (
    MARGIN,
    data_dims,
    output_numel,
    plan_batch,
    run_memory_bytes,
)
from edgelearn.bundle import Bundle, load_bundle
from edgelearn.data import Dataset
from edgelearn.errors import EdgelearnError, InputError
from edgelearn.inputs import Inputs, n_rows
from edgelearn.journal import Journal, iter_journal
from edgelearn.losses import default_loss, get_loss
from edgelearn.model import Model
from edgelearn.osutil import peak_rss_mb
from edgelearn.params import ParamStore
from edgelearn.training.cached_evaluator import CachedEvaluator
from edgelearn.training.callbacks import Callback
from edgelearn.training.config import RuntimeConfig, TrainConfig
from edgelearn.training.divergence import DivergenceGuard, guard_from_header, weights_digest
from edgelearn.training.evaluation import score
from edgelearn.training.evaluators import StepEvaluator, make_evaluator
from edgelearn.training.feeds import (
    BatchSource,
    DatasetFeed,
    SampleLog,
    SampleReader,
    as_batch,
    live_header,
)
from edgelearn.training.header import make_header
from edgelearn.training.interrupt import deferred_sigint
from edgelearn.training.interrupt import release as release_sigint
from edgelearn.training.lock import RunLock
from edgelearn.training.loop import RunLoop
from edgelearn.training.results import EvalResult, RunResult, StepResult
from edgelearn.training.resume import check_header, fewer_steps_error, resume
from edgelearn.training.rundir import (
    JOURNAL,
    SAMPLES,
    WEIGHTS,
    check_run_dir,
    clear_run,
    read_session_record,
    write_session_record,
)
from edgelearn.training.timing import TIMING_SAMPLES, Timers

#: header keys that say how a run is fed (taken from the journal to reopen a run)
FEED_KEYS = ("feed", "batch_size", "data_seed", "n_examples", "data_sha256")


class Session:
    """A bundle + run directory + training config + runtime, with the run lock held.

    Args:
        bundle: a loaded Bundle or its directory.
        run_dir: the run directory (created; resumed when it holds this run).
        config: what and how to train (`TrainConfig`; default: optimizer "auto", the
            bundle's best supported method, recorded as `config.chosen_by`).
        runtime: where to run (`RuntimeConfig`; default: this machine's detected profile).
        restart: delete the run's own files first (refused for a directory that is not a
            run directory).
        callbacks: called for every step of this session (`run` adds its own).
    Raises: InputError for settings the bundle or runtime cannot train with;
        EdgelearnError when another process holds the run directory.

    Attributes `bundle`, `config`, `runtime_config` and `run_dir` are what was given.
    Unstable: `runtime` (the resolved Runtime), `model`, `optimizer`, `evaluator` and `timers`
    are the session's internals, exposed for inspection; do not change them.
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, run_dir: str | os.PathLike,
                 config: TrainConfig | None = None, runtime: RuntimeConfig | None = None, *,
                 restart: bool = False, callbacks: Sequence[Callback] = ()) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.config = config if config is not None else TrainConfig()
        self.runtime_config = runtime if runtime is not None else RuntimeConfig()
        self.runtime = self.runtime_config.resolve(self.bundle)
        # "auto": the bundle's default optimizer, or the one of the run being resumed
        self.config = self.config.resolve(self.bundle, self.runtime.backend,
                                          run_dir=None if restart else run_dir)
        self._check_weights_fit()
        self.model = Model(self.bundle, backend=self.runtime.backend,
                           trainable=self.config.trainable_patterns(),
                           threads=self.runtime.threads, providers=self.runtime.providers,
                           backend_options=self.runtime.backend_options)
        self.optimizer = self.config.make_optimizer()
        self.objective = self.config.objective or default_loss(self.bundle.task,
                                                                   self.bundle.outputs)
        self.timers = Timers()
        self.evaluator: StepEvaluator = make_evaluator(
            self.bundle, self.model.store, self.optimizer, backend=self.runtime.backend,
            threads=self.runtime.threads, model=self.model, loss_fn=get_loss(self.objective),
            population=self.config.population, timers=self.timers,
            prefix_cache=self.runtime_config.prefix_cache, cache_bytes=self._cache_bytes())
        divergence = self.config.divergence
        self._divergence = None if divergence is None else \
            divergence.to_json(self.optimizer, self.config.checkpoint_every)
        self.run_dir = Path(run_dir)
        self._callbacks = list(callbacks)
        self._loop: RunLoop | None = None
        self._stop_reason: str | None = None
        #: the largest live batch (rows, symbolic dims) checked against the memory budget
        self._live_fit: tuple[int, dict[str, int]] = (0, {})
        #: resident MB when the first memory plan was made, before the run allocated the
        #: buffers a plan adds (a later measurement would count them twice)
        self._plan_base: float | None = None
        self._live_layout: Any = None  # input layout of the live batches checked so far
        self._feed_keys: dict[str, Any] = {}
        self._deferred = False  # an existing run that resumes only once run() gives its data
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(self.evaluator, CachedEvaluator):
            self.evaluator.spill_to(self.run_dir)
        self._lock = RunLock(self.run_dir)
        try:
            check_run_dir(self.run_dir)
            if restart:
                clear_run(self.run_dir)
        except BaseException:
            self._lock.release()
            raise

    # -- reopening ------------------------------------------------------------------------------
    @classmethod
    def resume(cls, run_dir: str | os.PathLike, *, bundle: Bundle | str | None = None,
               runtime: RuntimeConfig | None = None,
               callbacks: Sequence[Callback] = ()) -> Session:
        """Reopen the run in `run_dir` with the bundle and configs its `session.json` records.

        Args:
            bundle: use this bundle instead of the recorded path (e.g. moved since).
            runtime: run on this runtime instead of the recorded one.
        """
        record = read_session_record(Path(run_dir))
        try:
            config = TrainConfig.from_json(record["train"])
            recorded = RuntimeConfig.from_json(record["runtime"])
            path = record["bundle"]
        except (KeyError, TypeError) as e:
            raise InputError(f"{run_dir}: session record lacks {e}") from None
        if bundle is None and not Path(path).is_dir():
            raise InputError(f"{run_dir} was trained on the bundle {path}, which is not there "
                             "any more: pass bundle=")
        return cls(bundle if bundle is not None else path, run_dir, config,
                   runtime if runtime is not None else recorded, callbacks=callbacks)

    # -- training -------------------------------------------------------------------------------
    def step(self, batch: tuple[Any, Any]) -> StepResult:
        """One optimizer step on the batch (or single sample) the app just got; journaled.

        Args:
            batch: (x, y): one sample (x without a batch axis, y its label or target) or a
                batch ([n, ...] each), in the model's input layout.
        Raises: TrainingInterrupted after a Ctrl-C during the step, once it is journaled and
            the weights are written.
        """
        x, y = as_batch(self.bundle, *batch)
        self._check_live_data(x, y)
        self._check_live_batch(x)
        loop = self._open(live_header(), None, steps=None)
        # the handler stays installed between steps (acting as the default one) until close
        with deferred_sigint(keep=True) as interrupted:
            result = loop.step(x, y)
            if interrupted():
                loop.interrupt()
        return result

    def run(self, data: Dataset, steps: int, *, callbacks: Sequence[Callback] = ()
            ) -> RunResult:
        """Train on `data` (seeded per-epoch batch order) until the run holds `steps` steps.

        Args:
            data: the training examples.
            steps: the run's total (a resumed run continues up to it; fewer than it already
                holds is an InputError).
            callbacks: called for this run's steps, after the session's.
        Raises: TrainingInterrupted after Ctrl-C, once the step in flight has finished and
            the weights and a checkpoint are written.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise InputError(f"steps must be an integer >= 0, got {steps!r}")
        self.model.check_data(data, objective=self.objective)
        self.evaluator.check_targets(data.y)
        plan = self._memory_plan(len(data), self.config.batch_size,
                                 data_dims(self.bundle.inputs, data.x))
        batch_size = self.config.batch_size if plan is None else plan["batch_size"]
        feed = DatasetFeed(data, batch_size, self.config.seed)
        cached = isinstance(self.evaluator, CachedEvaluator)
        if cached and plan is not None:  # features take only what the plan leaves of the budget
            left = plan["budget_mb"] - plan["predicted_peak_mb"]
            self.evaluator.fit_cache(int(left / MARGIN * (1 << 20)))
        loop = self._open(feed.header(pin_data=self.evaluator.replay_needs_data), feed.batch,
                          steps=steps)
        batches = feed.batch
        if cached:  # keys cached features by index; copies no rows nothing reads
            batches = self.evaluator.indexed_batches(data, batch_size, self.config.seed,
                                                     rows=loop.needs_rows)
        done = self.optimizer.t
        if steps < done:
            raise fewer_steps_error(self.run_dir, done, steps)
        self.timers.clear()
        loop.loss_first = loop.loss_last = None
        self._stop_reason = None
        cbs = [*self._callbacks, *callbacks]
        for cb in cbs:
            cb.on_start(self, steps=steps)
        result: RunResult | None = None
        try:
            with deferred_sigint() as interrupted:
                stopped = loop.run(batches, range(done, steps), callbacks,
                                   interrupted=interrupted, stop=self._stop_requested,
                                   digests=feed.digest)
            loop.journal.sync()
            loop.write_weights()
            result = self._run_result(loop, done=done, plan=plan,
                                      batch_size=batch_size, stopped=stopped)
            return result
        finally:
            for cb in cbs:
                cb.on_end(self, result)

    def request_stop(self, reason: str = "stopped by a callback") -> None:
        """Ask `run` to stop before its next step (early stopping); the run ends normally."""
        self._stop_reason = reason

    @property
    def stop_reason(self) -> str | None:
        """Why the last `run` stopped early (None: it did not)."""
        return self._stop_reason

    @property
    def rollbacks(self) -> int:
        """Divergence rollbacks the run holds (0 before its journal is open)."""
        loop = self._loop
        if loop is None:
            return 0
        return loop.rollbacks_before + (loop.guard.rollbacks if loop.guard else 0)

    def _stop_requested(self) -> bool:
        return self._stop_reason is not None

    # -- state ----------------------------------------------------------------------------------
    @property
    def store(self) -> ParamStore:
        """The parameters being trained (Unstable: read them, never write them). Getting it
        settles an update the optimizer left pending (`Optimizer.settle`)."""
        self.optimizer.settle(self.model.store)
        return self.model.store

    @property
    def steps_done(self) -> int:
        """Steps the run holds (opens and resumes the run directory's run if needed)."""
        self._ensure_open()
        return self.optimizer.t

    @property
    def weights_path(self) -> Path:
        """Where `save()` writes the weights."""
        return self.run_dir / WEIGHTS

    @property
    def journal_path(self) -> Path:
        """The run's journal."""
        return self.run_dir / JOURNAL

    def digest(self) -> str:
        """sha256 of the current weights (`ParamStore.digest`, as `replay` reports it)."""
        self._ensure_open()
        return weights_digest(self.model.store, self.optimizer)

    def evaluate(self, data: Dataset, *, batch_size: int = 256) -> EvalResult:
        """Loss (and accuracy) of the current weights on `data`; the run is unaffected (no
        journal record, no random draw: training continues bit-identically)."""
        self._ensure_open()
        with self.optimizer.settled(self.model.store):  # a pending update read, not applied
            return score(self.model, data, batch_size=batch_size, objective=self.objective)

    def save(self) -> Path:
        """Make the steps so far durable (journal, checkpoint) and write the weights; returns
        the weights file. A session with no step yet writes the base weights."""
        self._ensure_open()
        if self._loop is None:
            return self.model.store.save(self.weights_path,
                                         metadata={"sha256": self.digest()})
        return self._loop.save()

    def close(self) -> None:
        """Save unsaved steps, close the journal and release the run lock (idempotent)."""
        if not self._lock.held:
            return
        release_sigint()  # the handler `step` left installed
        self.evaluator.close()
        try:
            if self._loop is not None:
                try:
                    if self._loop.dirty and not self._loop.broken:
                        self._loop.save()
                finally:
                    self._loop.close()
        finally:
            self._lock.release()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- opening the run ------------------------------------------------------------------------
    def _open(self, feed_keys: dict[str, Any], batches: BatchSource | None, *,
              steps: int | None) -> RunLoop:
        """The run loop, opening (and resuming) the journal on first use.

        Args:
            feed_keys: the header keys of how this call feeds the run.
            batches: step -> batch of that feed (None for live batches).
            steps: the run's requested total (checked before anything is replayed).
        """
        if not self._lock.held:
            raise EdgelearnError("this session is closed")
        if self._loop is not None:
            if feed_keys != self._feed_keys:  # e.g. run() on other data: refused, or equal
                check_header(self._loop.journal, self._make_header(feed_keys), self.run_dir)
                self._feed_keys = feed_keys
            return self._loop
        if feed_keys.get("feed") == "live" and self.evaluator.replay_needs_data \
                and not self.config.record_samples:
            raise InputError(f"{self.optimizer.name} replays and resumes by re-running each "
                             "step on its data: a run fed with step() must record its samples "
                             "(TrainConfig(record_samples=True))")
        self._loop = self._resume(self._make_header(feed_keys), batches, steps)
        self._feed_keys, self._deferred = feed_keys, False
        return self._loop

    def _open_existing(self) -> None:
        """Resume a run the directory already holds, fed as its header says; deferred to
        `run` when its replay needs the data set (tpSGD fed from one)."""
        path = self.run_dir / JOURNAL
        if not path.is_file():
            return
        header = next(iter_journal(path, max_records=1), None)
        if header is None:
            return  # a journal torn before its header: a new run
        if header.get("kind") != "header":
            raise InputError(f"{self.run_dir}: journal does not start with a header")
        if self.evaluator.replay_needs_data and not header.get("samples") \
                and header.get("feed") != "live":
            self._deferred = True
            return
        self._open({k: header[k] for k in FEED_KEYS if k in header}, None, steps=None)

    def _ensure_open(self) -> None:
        """Resume the run the directory holds, if not yet done (InputError when its replay
        needs the data set that only `run` gives)."""
        if self._loop is None and self._lock.held:
            self._open_existing()
        if self._deferred:
            raise InputError(f"the {self.optimizer.name} run in {self.run_dir} resumes by "
                             "re-running its steps on its data set: call run(data, steps) "
                             "first")

    def _make_header(self, feed_keys: dict[str, Any]) -> dict[str, Any]:
        run: dict[str, Any] = {**feed_keys, **self.evaluator.header_keys(),
                               "objective": self.objective}
        if self.config.record_samples:
            run["samples"] = SAMPLES
        if self._divergence is not None:
            run["divergence"] = self._divergence
        return make_header(self.bundle, self.model.store, self.optimizer, **run)

    def _resume(self, header: dict[str, Any], batches: BatchSource | None,
                steps: int | None) -> RunLoop:
        holder: list[SampleLog] = []

        def sync_samples() -> None:  # recorded samples are durable before their steps
            for log in holder:
                log.sync()

        journal = Journal(self.run_dir / JOURNAL, fsync_every=self.config.fsync_every,
                          fsync_seconds=self.config.fsync_seconds, before_sync=sync_samples)
        try:
            if header.get("samples") and len(journal) > 0 and self.evaluator.replay_needs_data:
                batches = SampleReader(self.run_dir / SAMPLES).batch  # what the steps were fed
            rule = guard_from_header(header)
            state = resume(journal, header, self.model.store, self.optimizer, self.run_dir,
                           rule=rule, evaluator=self.evaluator, batches=batches, steps=steps)
            if state.fresh:
                self._write_session_record()
            if header.get("samples"):
                holder.append(SampleLog(self.run_dir / SAMPLES, steps=state.steps))
        except BaseException:
            journal.close()
            raise
        self.timers.clear()  # replayed forwards are not this session's steps
        loop = RunLoop(self, self.run_dir, self.model.store, self.optimizer, self.evaluator,
                       journal, holder[0] if holder else None, self._callbacks, self.timers,
                       self.config.checkpoint_every)
        loop.rollbacks_before = state.rollbacks
        if rule is not None:
            loop.guard = DivergenceGuard(rule, journal, self.model.store, self.optimizer,
                                         loop.checkpoint)
            loop.guard.finish_pending()  # killed between a step and its rollback
        return loop

    def _write_session_record(self) -> None:
        write_session_record(self.run_dir, {
            "bundle": str(Path(self.bundle.path).resolve()),
            "train": self.config.to_json(), "runtime": self.runtime_config.to_json()})

    # -- memory ---------------------------------------------------------------------------------
    def _cache_bytes(self) -> int | None:
        """Memory for cached prefix features of live steps: half of what the budget leaves
        now (None: the cache's default bound without a budget; `run` bounds it by its memory
        plan); the rest spills to the run directory."""
        budget = self.runtime.memory_budget_mb
        if budget is None:
            return None
        from edgelearn.osutil import current_rss_mb

        return int(max(0.0, budget / MARGIN - current_rss_mb()) / 2 * (1 << 20))

    def _check_weights_fit(self) -> None:
        budget = self.runtime.memory_budget_mb
        if budget is None:
            return
        weights_mb = sum(p.nbytes for p in self.bundle.params) / (1 << 20)
        if 2 * weights_mb > budget:
            raise InputError(f"the bundle's weights ({weights_mb:.0f} MB) cannot be trained "
                             f"within a memory budget of {budget:.0f} MB")

    def _memory_plan(self, n_examples: int, batch_size: int, dims: dict[str, int]
                     ) -> dict[str, Any] | None:
        """The memory plan of a run (None without a budget); says so when it shrinks.

        Args:
            dims: sizes of the inputs' symbolic non-batch dimensions in the data
                (`budget.data_dims`)."""
        budget = self.runtime.memory_budget_mb
        if budget is None:
            return None
        store = self.model.store
        trainable = sum(store.flat(dt).nbytes for dt in store.arenas if store.n_trainable(dt))
        keeps = run_memory_bytes(n_examples=n_examples, trainable_bytes=trainable,
                                 snapshots=self._divergence is not None,
                                 timing_samples=TIMING_SAMPLES, timers=Timers.count())
        cands = self.optimizer.population_size(store)
        plan = plan_batch(self.bundle, batch_size=batch_size, budget_mb=budget,
                          base_mb=self._plan_base,
                          extra_bytes=self.optimizer.memory_bytes(store)
                          + self.evaluator.memory_bytes(cands) + keeps,
                          candidates=self.evaluator.rows_per_call(cands), dims=dims,
                          example_bytes=self.optimizer.example_bytes(
                              output_numel(self.bundle, dims)))
        self._plan_base = plan["base_mb"]  # measured once (later plans would count our own)
        if plan["batch_size"] < batch_size and n_examples:
            print(f"edgelearn: batch size {batch_size} would exceed the memory budget of "
                  f"{budget:.0f} MB; using {plan['batch_size']}", file=sys.stderr)
        return plan

    def _check_live_data(self, x: Any, y: Any) -> None:
        """`Model.check_data` and the evaluator's target check on a live batch: the inputs
        once per layout (names, dtypes, shapes), the labels of every batch."""
        layout = tuple((k, v.dtype.str, v.shape) for k, v in sorted(x.items())) \
            if isinstance(x, dict) else (x.dtype.str, x.shape)
        if layout == self._live_layout:
            self.model.check_labels(y, objective=self.objective)
        else:
            self.model.check_data(Dataset(x, y), objective=self.objective)
        self.evaluator.check_targets(y)
        self._live_layout = layout

    def _check_live_batch(self, x: Inputs) -> None:
        """Refuse a live batch larger than the memory budget allows (checked once per size:
        its rows and its symbolic dimensions, e.g. a sequence length)."""
        if self.runtime.memory_budget_mb is None:
            return
        n, dims = n_rows(x), data_dims(self.bundle.inputs, x)
        fit_n, fit_dims = self._live_fit
        if n <= fit_n and all(v <= fit_dims.get(k, 0) for k, v in dims.items()):
            return  # no larger than a batch that fits (its memory grows with each size)
        plan = self._memory_plan(0, n, dims)
        if plan is not None and plan["batch_size"] < n:
            shaped = f" ({', '.join(f'{k} {v}' for k, v in dims.items())})" if dims else ""
            raise InputError(f"a batch of {n}{shaped} exceeds the memory budget of "
                             f"{plan['budget_mb']:.0f} MB; at most {plan['batch_size']} fit")
        if n >= fit_n and all(dims.get(k, 0) >= v for k, v in fit_dims.items()):
            self._live_fit = (n, dims)

    def _run_result(self, loop: RunLoop, *, done: int,
                    plan: dict[str, Any] | None, batch_size: int, stopped: bool) -> RunResult:
        return RunResult(
            steps=self.optimizer.t, resumed_from=done, rollbacks=self.rollbacks,
            loss_first=loop.loss_first, loss_last=loop.loss_last,
            weights=str(self.weights_path), journal=str(self.journal_path),
            sha256=self.digest(), optimizer=self.optimizer.name,
            trainable_params=self.model.store.n_trainable("float32"),
            step_ms_median=self.timers.step.median_ms(),
            forward_ms_median=self.timers.forward.median_ms(), peak_rss_mb=peak_rss_mb(),
            batch_size=batch_size, memory_plan=plan,
            population_graph=self.evaluator.population_graph,
            population_call_ms_median=self.timers.population.median_ms(),
            stopped_early=stopped, cache=self.evaluator.cache_report(),
            chosen_by=self.config.chosen_by)
