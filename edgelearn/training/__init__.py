"""Training as a library: a Session personalizes a bundle in a run directory.

One concern per module:
  config       TrainConfig (what the journal pins + checkpoint/fsync policy), RuntimeConfig
  session      Session: open, step(batch), run(data, steps), evaluate, save, resume
  loop         the journaled step (record, checkpoint, guard, callbacks)
  evaluators   how a step's forwards run (plain, population, taps): the one factory
  feeds        where batches come from (data set order, live samples, recorded samples)
  header       the journal header, changed-settings diff, optimizer from header
  resume       checkpoint + journal replay to the end of a run
  replay       weights from a journal alone (`edgelearn replay`)
  checkpoints  atomic checkpoints, their validation against the journal
  divergence   rollback rule and its guard callback
  callbacks    Callback base, ProgressBar, MetricsLog, EarlyStopping
  metrics      RunMetrics: the run directory's metrics.jsonl (+ held-out scores), its reader
  results      StepResult, RunResult, EvalResult, ReplayResult
  evaluation   scoring weights on a data set
  interrupt    Ctrl-C at step boundaries
  lock         the run directory lock
  rundir       run directory files, clearing a run, session.json
  timing       bounded timing rings
"""

from edgelearn.training.callbacks import Callback, EarlyStopping, MetricsLog, ProgressBar
from edgelearn.training.config import Runtime, RuntimeConfig, TrainConfig
from edgelearn.training.divergence import DivergencePolicy
from edgelearn.training.evaluation import evaluate
from edgelearn.training.interrupt import TrainingInterrupted
from edgelearn.training.metrics import RunMetrics
from edgelearn.training.replay import replay
from edgelearn.training.results import EvalResult, ReplayResult, RunResult, StepResult
from edgelearn.training.session import Session

__all__ = ["Callback", "DivergencePolicy", "EarlyStopping", "EvalResult", "MetricsLog",
           "ProgressBar", "ReplayResult", "RunMetrics", "RunResult", "Runtime", "RuntimeConfig",
           "Session", "StepResult", "TrainConfig", "TrainingInterrupted", "evaluate", "replay"]
