"""Unstable: federated personalization on Flower (`el.fleet`): devices send seeds and scalars.

A fleet of devices improves one model from all of their data without the data leaving them.
Each round every client runs an edgelearn Session (zo-sgd) on its local data from the global
model and returns its journal's scalars (FedKSeed: one float per local step, the seeds implied
by a shared finite pool); the server merges them into the round's global state, and every
node rebuilds the global model from the bundle and that state with the same float operations,
so server and clients hold the same sha256 after every round. `fedavg` (clients send their
trainable slice) is the baseline. Transport, scheduling and simulation are Flower's
(`pip install 'edgelearn[fleet]'`); flwr is imported only by the modules that talk to it
(apps, strategy, simulate, deploy), never by `import edgelearn`.

Modules: pool (seed pool, model rebuild), wire (frames), settings, history (global journal),
rebase (bundle on the global weights), node (a device's round), server (merge rules),
personal (local personalization on top of the global model), users (demo per-user split),
strategy / apps (Flower Strategy, ClientApp, ServerApp), simulate, deploy, cli.
"""

from edgelearn.fleet import cli
from edgelearn.fleet.history import replay_global
from edgelearn.fleet.node import FleetNode
from edgelearn.fleet.personal import personalize, replay_personal
from edgelearn.fleet.pool import SeedPool, apply_coefficients
from edgelearn.fleet.server import FleetServer, Reply
from edgelearn.fleet.settings import STRATEGIES, FleetSettings
from edgelearn.fleet.users import write_demo_users

__all__ = ["STRATEGIES", "FleetNode", "FleetServer", "FleetSettings", "Reply", "SeedPool",
           "apply_coefficients", "cli", "personalize", "replay_global", "replay_personal",
           "write_demo_users"]
