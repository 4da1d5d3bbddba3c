"""`edgelearn fleet simulate`: a whole fleet on this machine with Flower's simulation engine.

One virtual SuperNode per client file (`DIR/*.npz`, sorted; node i trains file i, its work
directory is RUN_DIR/nodes/NN), run by `flwr.simulation.run_simulation` (the Ray backend:
client apps run in worker processes, at most one per CPU). The summary is the ServerApp's
`fleet.json`, with each node's final sha256 read back from its work directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from edgelearn.errors import EdgelearnError, InputError
from edgelearn.fleet.node import FleetNode
from edgelearn.fleet.settings import FleetSettings


def client_files(clients_data: str | os.PathLike) -> list[Path]:
    """The client .npz files of a directory, sorted (InputError if none)."""
    d = Path(clients_data)
    if not d.is_dir():
        raise InputError(f"--clients-data {d}: not a directory")
    files = sorted(p for p in d.iterdir() if p.suffix == ".npz" and p.is_file())
    if not files:
        raise InputError(f"--clients-data {d} holds no .npz file (one per client)")
    return files


def simulate(bundle: str | os.PathLike, clients_data: str | os.PathLike,
             settings: FleetSettings, out: str | os.PathLike, *,
             eval_data: str | os.PathLike | None = None, client_app: Any = None,
             cpus: int | None = None) -> dict[str, Any]:
    """Run a federation of one node per client file; the run's summary.

    Args:
        bundle: the fleet's bundle directory.
        clients_data: directory of client .npz files.
        settings: the fleet's settings.
        out: the run directory (global journal, weights, nodes/, fleet.json).
        eval_data: held-out .npz scored after every round.
        client_app: a ClientApp to run instead of the fleet's (tests inject faults this way).
        cpus: Ray CPUs (None: all); one client app per CPU at a time.
    """
    from flwr.simulation import run_simulation

    from edgelearn.fleet.apps import SUMMARY, make_client_app, make_server_app

    files = client_files(clients_data)
    out = Path(out).resolve()
    (out / "nodes").mkdir(parents=True, exist_ok=True)
    if client_app is None:
        client_app = make_client_app(node_for_partition(str(bundle), files, out))
    server_app = make_server_app({"bundle": str(bundle), "out": str(out),
                                  "settings": settings, "eval_data": eval_data})
    (out / SUMMARY).unlink(missing_ok=True)
    backend = {"client_resources": {"num_cpus": 1},
               "init_args": {"num_cpus": cpus or os.cpu_count() or 1, "log_to_driver": False}}
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the one JSON object
        run_simulation(server_app, client_app, num_supernodes=len(files),
                       backend_config=backend)
    if not (out / SUMMARY).is_file():
        raise EdgelearnError("the simulation ended without a result (see the log above)")
    summary = json.loads((out / SUMMARY).read_text())
    summary["clients"] = [str(f) for f in files]
    return summary


def node_for_partition(bundle: str, files: list[Path], out: Path) -> Any:
    """node_for(context) of a simulation: partition i trains files[i] in out/nodes/ii."""
    cache: dict[int, FleetNode] = {}

    def node_for(context: Any) -> FleetNode:
        pid = int(context.node_config["partition-id"])
        if pid not in cache:
            cache[pid] = FleetNode(bundle, files[pid], out / "nodes" / f"{pid:02d}", threads=1)
        return cache[pid]

    return node_for
