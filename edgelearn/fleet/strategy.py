"""The fleet's Flower Strategy: a round of FleetServer driven through Flower's Grid (imports flwr).

`FleetStrategy` subclasses `flwr.serverapp.strategy.Strategy` and runs under its `start` loop:

  * configure_train: waits for `min_clients` connected nodes, assigns each a pool row and sends
    it the global state frame, its row and the fleet settings (MessageType.TRAIN);
  * aggregate_train: turns the replies (and errors, and the nodes that never answered) into
    `Reply`s and merges them (`FleetServer.merge`: unfit replies are dropped and logged);
  * configure_evaluate / aggregate_evaluate: sends the new state to every connected node, each
    rebuilds the model and answers with the sha256 it now holds and its local accuracy;
  * `evaluate_fn` (held-out accuracy of the global model) is `start`'s server-side evaluation.

The model never travels as an ArrayRecord: `start`'s arrays stay an empty record and the
state lives in the FleetServer. Byte counts are those of each message's RecordDict as Flower
serializes it (protobuf), plus the fleet frame alone ("payload").
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from edgelearn.data import Dataset
from edgelearn.fleet.server import FleetServer, Reply

#: the RecordDict key of every fleet message's ConfigRecord
KEY = "fleet"


def message_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serializes it (protobuf)."""
    return recorddict_to_proto(content).ByteSize()


class FleetStrategy(Strategy):
    """FedKSeed (or the FedAvg baseline) over Flower, holding a FleetServer.

    Args:
        server: the fleet server (settings, global model, journal).
        eval_data: held-out data scored on the server after every round (None: none).
    """

    def __init__(self, server: FleetServer, eval_data: Dataset | None = None) -> None:
        self.server = server
        self.eval_data = eval_data
        self.rounds: list[dict[str, Any]] = []
        self.initial_accuracy: float | None = None
        self._rows: dict[int, int] = {}
        self._down: dict[int, int] = {}
        self._t0 = 0.0

    def summary(self) -> None:
        """Log the fleet settings."""
        log(INFO, "\t└──> edgelearn fleet: %s", self.server.settings.to_json())

    def wait_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes, once `min_clients` are there (or the round timeout passed)."""
        s = self.server.settings
        deadline = time.monotonic() + s.round_timeout_s
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < s.min_clients and time.monotonic() < deadline:
            time.sleep(0.2)
            nodes = sorted(grid.get_node_ids())
        return nodes

    def _messages(self, nodes: list[int], kind: str, fields: dict[int, dict[str, Any]]
                  ) -> list[Message]:
        out = []
        for n in nodes:
            content = RecordDict({KEY: ConfigRecord(fields[n])})
            self._down[n] = message_bytes(content)
            out.append(Message(content, dst_node_id=n, message_type=kind))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send each connected node the global state, its pool row and the settings."""
        nodes = self.wait_nodes(grid)
        self._rows = self.server.assign_rows(server_round, nodes)
        state, settings = self.server.state_frame(), self.server.settings.to_json()
        self._down = {}
        self._t0 = time.monotonic()
        return self._messages(nodes, MessageType.TRAIN, {
            n: {"round": server_round, "state": state, "row": self._rows[n],
                "settings": settings} for n in nodes})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Merge the round's replies; unfit ones are dropped with a log line."""
        replies = list(replies)
        got = [self._reply(m) for m in replies]
        summary = self.server.merge(server_round, got, self._rows)
        summary["received_bytes"] = {str(n): b for n, b in self._down.items()}
        summary["sent_bytes"] = {str(m.metadata.src_node_id): message_bytes(m.content)
                                 for m in replies if not m.has_error()}
        summary["payload_bytes"] = {str(r.node): len(r.payload) for r in got
                                    if isinstance(r.payload, bytes)}
        summary["train_s"] = round(time.monotonic() - self._t0, 3)
        self.rounds.append(summary)
        return None, MetricRecord({"merged": len(summary["merged"]),
                                   "dropped": len(summary["dropped"])})

    @staticmethod
    def _reply(msg: Message) -> Reply:
        node = msg.metadata.src_node_id
        if msg.has_error():
            return Reply(node, error=f"client error: {msg.error.reason}")
        try:
            payload = msg.content.config_records[KEY]["payload"]
        except (KeyError, TypeError, AttributeError):
            return Reply(node, error="reply holds no fleet payload")
        return Reply(node, payload)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Send the new global state to every connected node."""
        nodes = sorted(grid.get_node_ids())
        state, settings = self.server.state_frame(), self.server.settings.to_json()
        self._down = {}
        return self._messages(nodes, MessageType.EVALUATE, {
            n: {"round": server_round, "state": state, "settings": settings} for n in nodes})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Record the sha256 every node holds after the round (and their local accuracy)."""
        holds: dict[str, str | None] = {}
        accuracy: dict[str, float] = {}
        for m in replies:
            node = str(m.metadata.src_node_id)
            if m.has_error():
                holds[node] = None
                log(WARNING, "fleet round %d: node %s could not sync: %s", server_round, node,
                    m.error.reason)
                continue
            holds[node] = str(m.content.config_records[KEY]["sha256"])
            accuracy[node] = float(m.content.config_records[KEY]["accuracy"])
        summary = self.rounds[-1]
        summary["nodes_sha256"] = holds
        summary["all_nodes_match"] = bool(holds) and all(
            v == self.server.digest for v in holds.values())
        summary["client_accuracy"] = accuracy
        summary["sync_received_bytes"] = {str(n): b for n, b in self._down.items()}
        agree = sum(v == self.server.digest for v in holds.values())
        return MetricRecord({"nodes": len(holds), "agree": agree})

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Server-side held-out accuracy of the global model (`Strategy.start`'s hook)."""
        if self.eval_data is None:
            return None
        acc = self.server.evaluate(self.eval_data)
        if server_round == 0:
            self.initial_accuracy = acc
        elif self.rounds and self.rounds[-1]["round"] == server_round:
            self.rounds[-1]["heldout_accuracy"] = acc
        return MetricRecord({"accuracy": acc})
