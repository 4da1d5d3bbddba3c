"""Flower ClientApp and ServerApp of the fleet (imports flwr).

`make_client_app(node_for)` answers TRAIN messages with `FleetNode.train` (the round's frame)
and EVALUATE messages with `FleetNode.sync` (the sha256 the node now holds); `node_for(context)`
says which bundle, data and work directory the node has (simulation: from the partition id;
deployment: from the SuperNode's `--node-config`). An exception in the client becomes Flower's
error reply, which the server drops for that round. `make_server_app(options)` runs
`FleetStrategy.start` and writes the run's summary (`fleet.json`) in the run directory.

The module-level `client_app` and `server_app` are the deployment apps (`edgelearn fleet
server|client` write a Flower app whose components name them): their settings come from the
node config (bundle, data, work-dir) and the run config (bundle, out, settings, eval-data).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from edgelearn.bundle import load_bundle
from edgelearn.data import load_data
from edgelearn.errors import InputError
from edgelearn.fleet.node import FleetNode
from edgelearn.fleet.server import FleetServer
from edgelearn.fleet.settings import FleetSettings
from edgelearn.fleet.strategy import KEY, FleetStrategy

#: the summary a finished federation writes into its run directory
SUMMARY = "fleet.json"
#: what a node writes into its work directory after each round (read by `fleet client`)
STATUS = "status.json"
Handler = Callable[[Message, Context], Message]


def train_handler(node_for: Callable[[Context], FleetNode]) -> Handler:
    """The ClientApp's TRAIN handler: one local round, answered with the update frame."""

    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content.config_records[KEY]
        settings = FleetSettings.from_json(str(cfg["settings"]))
        payload, metrics = node_for(context).train(settings, bytes(cfg["state"]),
                                                   int(cfg["row"]))
        return Message(RecordDict({KEY: ConfigRecord({"payload": payload}),
                                   "metrics": MetricRecord(metrics)}), reply_to=msg)

    return train


def sync_handler(node_for: Callable[[Context], FleetNode]) -> Handler:
    """The ClientApp's EVALUATE handler: take the new global model, answer its sha256."""

    def sync(msg: Message, context: Context) -> Message:
        cfg = msg.content.config_records[KEY]
        settings = FleetSettings.from_json(str(cfg["settings"]))
        node = node_for(context)
        info = node.sync(settings, bytes(cfg["state"]))
        status = {**info, "final": info["round"] >= settings.rounds}
        tmp = node.work / (STATUS + ".tmp")
        tmp.write_text(json.dumps(status, sort_keys=True))
        os.replace(tmp, node.work / STATUS)
        return Message(RecordDict({KEY: ConfigRecord({"sha256": info["sha256"],
                                                      "accuracy": float(info["accuracy"])})}),
                       reply_to=msg)

    return sync


def make_client_app(node_for: Callable[[Context], FleetNode]) -> ClientApp:
    """A ClientApp whose node is `node_for(context)`."""
    app = ClientApp()
    app.train()(train_handler(node_for))
    app.evaluate()(sync_handler(node_for))
    return app


def run_federation(grid: Grid, options: dict[str, Any]) -> dict[str, Any]:
    """Run every round on `grid`; the summary (also written to the run directory).

    Args:
        options: bundle, out (run directory), settings (FleetSettings), eval_data (path|None).
    """
    settings: FleetSettings = options["settings"]
    out = Path(options["out"])
    server = FleetServer(load_bundle(options["bundle"]), settings, out)
    eval_data = load_data(options["eval_data"]) if options.get("eval_data") else None
    strategy = FleetStrategy(server, eval_data)
    try:
        strategy.start(grid, ArrayRecord(), num_rounds=settings.rounds,
                       timeout=settings.round_timeout_s, evaluate_fn=strategy.evaluate_fn)
    finally:
        server.close()
    summary = {"strategy": settings.strategy, "rounds": strategy.rounds,
               "heldout_accuracy_initial": strategy.initial_accuracy,
               "sha256": server.digest, "global_journal": str(server.journal.path),
               "weights": str(out / "global.safetensors"), "settings": json.loads(
                   settings.to_json())}
    tmp = out / (SUMMARY + ".tmp")  # whole or absent: `fleet server` polls for it
    tmp.write_text(json.dumps(summary, sort_keys=True, indent=1))
    os.replace(tmp, out / SUMMARY)
    return summary


def make_server_app(options: dict[str, Any]) -> ServerApp:
    """A ServerApp running `run_federation(grid, options)`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, options)

    return app


# -- deployment: settings from the node config / run config ---------------------------------
_NODES: dict[tuple[str, str, str], FleetNode] = {}


def node_from_config(context: Context) -> FleetNode:
    """The FleetNode a SuperNode's `--node-config` names (bundle, data, work-dir)."""
    cfg = context.node_config
    try:
        key = (str(cfg["bundle"]), str(cfg["data"]), str(cfg["work-dir"]))
    except KeyError as e:
        raise InputError(f"the SuperNode's --node-config lacks {e}") from None
    if key not in _NODES:
        _NODES[key] = FleetNode(*key)
    return _NODES[key]


client_app = make_client_app(node_from_config)
server_app = ServerApp()


@server_app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    run_federation(grid, {"bundle": str(cfg["bundle"]), "out": str(cfg["out"]),
                          "settings": FleetSettings.from_json(str(cfg["settings"])),
                          "eval_data": str(cfg.get("eval-data", "")) or None})
