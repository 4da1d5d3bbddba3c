"""Fleet (issue 18): FedKSeed over Flower, devices sending seeds and scalars.

Default suite: the frames refuse damaged and hostile payloads; the pool rebuilds the model
bit-exactly; an in-process federation (FleetNode / FleetServer, the logic Flower carries) keeps
server and every client on one sha256 through dropped clients (corrupt, hostile, wrong base,
dead) and a late joiner; global + personal journals replay bit-exactly.
Slow: the same through Flower's simulation engine (CLI, 10 clients of a per-user split, held-out
accuracy of unseen users improves) and its deployment runtime (SuperLink + 3 SuperNodes on
loopback, one killed mid-round).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

import edgelearn as el
from edgelearn.fleet import wire
from edgelearn.fleet.node import FleetNode
from edgelearn.fleet.pool import SeedPool, apply_coefficients
from edgelearn.fleet.server import FleetServer, Reply
from edgelearn.fleet.settings import FleetSettings
from edgelearn.rng import Noise

DEMO = Path(el.__file__).resolve().parent / "data" / "demo"
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return el.fleet.write_demo_users(tmp_path_factory.mktemp("users"), users=12, holdout=2)


# -- frames and pool ---------------------------------------------------------------------------
def _frame() -> wire.Frame:
    return wire.Frame(wire.ZO_UPDATE, 3, "ab" * 32, np.linspace(-1, 1, 64), 40, 2)


def test_frame_round_trip_and_size() -> None:
    data = wire.encode(_frame())
    assert len(data) <= 1024  # 64 local steps: one float64 each, plus 56 bytes of framing
    back = wire.decode(data)
    assert (back.kind, back.round, back.base, back.n_examples, back.row) == (
        wire.ZO_UPDATE, 3, "ab" * 32, 40, 2)
    assert np.array_equal(back.values, _frame().values)


@pytest.mark.parametrize("damage", ["truncate", "flip", "extend", "magic", "nan", "type"])
def test_frame_refuses_damaged_or_hostile_payloads(damage: str) -> None:
    data = bytearray(wire.encode(_frame()))
    if damage == "truncate":
        data = data[:-9]
    elif damage == "flip":
        data[70] ^= 0x10
    elif damage == "extend":
        data += b"\0" * 8
    elif damage == "magic":
        data[:4] = b"PK\x03\x04"
    elif damage == "nan":  # a valid checksum over a non-finite value
        bad = _frame()
        data = bytearray(wire.encode(wire.Frame(bad.kind, 3, bad.base,
                                                np.full(64, np.nan), 40, 2)))
    with pytest.raises(wire.WireError):
        wire.decode(12345 if damage == "type" else bytes(data))


def test_frame_refuses_a_huge_count_without_allocating_it() -> None:
    data = bytearray(wire.encode(_frame()))
    data[41:45] = (2**31).to_bytes(4, "little")  # count field
    with pytest.raises(wire.WireError, match="values"):
        wire.decode(bytes(data))


def test_pool_directions_are_zo_sgd_noise_and_rebuild_is_chunk_independent() -> None:
    pool = SeedPool(seed=5, rows=2, steps=3)
    coef = np.zeros(pool.size)
    coef[4] = 0.25  # row 1, step 1 -> key (6, 1, 0)
    theta = np.zeros(1000, np.float32)
    apply_coefficients(theta, coef, pool)
    z = np.empty(1000, np.float32)
    Noise("rademacher").fill(z, run_seed=6, step=1, probe=0, start=0)
    assert np.array_equal(theta, np.float32(0.25) * z)
    coef[[0, 5]] = (-1e-3, 3e-2)
    a = np.linspace(-1, 1, 1000, dtype=np.float32)
    b = a.copy()
    apply_coefficients(a, coef, pool)
    apply_coefficients(b, coef, pool, chunk=64)
    assert a.tobytes() == b.tobytes()


# -- an in-process federation: the logic Flower carries -----------------------------------------
def _round(server: FleetServer, nodes: dict[int, FleetNode], r: int, settings: FleetSettings,
           tamper: dict[int, object] | None = None) -> dict:
    """One round: train every node, apply `tamper` (node -> bytes or Exception), merge, sync."""
    rows = server.assign_rows(r, list(nodes))
    state = server.state_frame()
    replies = []
    for n, node in nodes.items():
        fault = (tamper or {}).get(n)
        if isinstance(fault, Exception):
            replies.append(Reply(n, error=f"client error: {fault}"))
            continue
        payload, _ = node.train(settings, state, rows[n])
        replies.append(Reply(n, fault(payload) if callable(fault) else payload))
    summary = server.merge(r, replies, rows)
    new = server.state_frame()
    summary["holds"] = {n: node.sync(settings, new)["sha256"] for n, node in nodes.items()}
    return summary


def _hostile(payload: bytes) -> bytes:
    f = wire.decode(payload)
    return wire.encode(wire.Frame(f.kind, f.round, f.base, f.values * 1e6, f.n_examples, f.row))


def _other_base(payload: bytes) -> bytes:
    f = wire.decode(payload)
    return wire.encode(wire.Frame(f.kind, f.round, "00" * 32, f.values, f.n_examples, f.row))


def _flip(payload: bytes) -> bytes:
    return payload[:60] + bytes([payload[60] ^ 1]) + payload[61:]


@pytest.mark.parametrize("strategy", ["fedkseed", "fedavg"])
def test_federation_faults_are_dropped_and_every_node_holds_the_server_sha(
        tmp_path: Path, users: dict, strategy: str) -> None:
    settings = FleetSettings(strategy=strategy, rounds=2, local_steps=8, pool_rows=2)
    bundle = el.load_bundle(DEMO)
    server = FleetServer(bundle, settings, tmp_path / "server")
    files = users["clients"]
    nodes = {n: FleetNode(DEMO, files[n], tmp_path / f"n{n}", threads=1) for n in range(5)}
    faults = {1: _flip, 2: _hostile, 3: _other_base, 4: RuntimeError("died mid-round")}
    first = _round(server, nodes, 1, settings, faults if strategy == "fedkseed" else {1: _flip})
    dropped = {"1", "2", "3", "4"} if strategy == "fedkseed" else {"1"}
    assert set(first["dropped"]) == dropped
    assert first["merged"][0] == 0
    assert "checksum" in first["dropped"]["1"]
    if strategy == "fedkseed":
        assert "clip bound" in first["dropped"]["2"]
        assert "sha256" in first["dropped"]["3"]
    assert set(first["holds"].values()) == {first["sha256"]}
    assert first["sha256"] != FleetServer(bundle, settings, tmp_path / "s0").digest  # moved
    nodes[5] = FleetNode(DEMO, files[5], tmp_path / "late", threads=1)  # joins late
    second = _round(server, nodes, 2, settings)
    assert second["dropped"] == {}
    assert set(second["holds"].values()) == {second["sha256"]}
    server.close()
    for journal in (tmp_path / "server" / "global.bin", tmp_path / "late" / "global.bin"):
        store, rounds = el.fleet.replay_global(bundle, journal)
        assert (store.digest(), rounds) == (second["sha256"], 2)


def test_personal_on_top_of_global_replays_bit_exactly(tmp_path: Path, users: dict) -> None:
    settings = FleetSettings(rounds=1, local_steps=8, pool_rows=1)
    bundle = el.load_bundle(DEMO)
    server = FleetServer(bundle, settings, tmp_path / "server")
    nodes = {n: FleetNode(DEMO, users["clients"][n], tmp_path / f"n{n}", threads=1)
             for n in range(2)}
    sha = _round(server, nodes, 1, settings)["sha256"]
    server.close()
    mine = tmp_path / "n0" / "global.bin"
    config = el.TrainConfig(optimizer="zo-sgd", trainable="head.*", seed=7,
                            options={"lr": 0.01, "probes": 2})
    got = el.fleet.personalize(DEMO, mine, el.load_data(users["clients"][0]),
                               tmp_path / "me", steps=12, config=config)
    assert got["global_sha256"] == sha
    assert got["sha256"] != sha
    again = el.fleet.replay_personal(DEMO, tmp_path / "server" / "global.bin", got["journal"],
                                     tmp_path / "elsewhere")
    assert (again["global_sha256"], again["sha256"], again["steps"]) == (sha, got["sha256"], 12)
    weights = el.load_bundle(tmp_path / "me" / "global-bundle").load_store(
        trainable="head.*", weights=got["weights"])
    assert weights.digest() == got["sha256"]


def test_cli_fleet_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from edgelearn.cli import main

    rc = main(["fleet", "simulate", str(DEMO), "--clients-data", str(tmp_path), "--out",
               str(tmp_path / "run"), "--json"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "no .npz" in json.loads(out)["error"]
    assert err.count("\n") == 1
    assert err.startswith("edgelearn: error:")
    with pytest.raises(SystemExit) as e:
        main(["fleet", "server", str(DEMO), "--out", str(tmp_path), "--port", "70000"])
    assert e.value.code == 2


def test_import_edgelearn_does_not_load_flower() -> None:
    import subprocess
    import sys

    code = ("import sys, edgelearn as el; el.fleet.FleetSettings(); "
            "assert not any(m.split('.')[0] in ('flwr', 'ray') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_demo_data_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from edgelearn.cli import main

    assert main(["fleet", "demo-data", str(tmp_path / "d"), "--users", "5", "--holdout", "1",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["clients"]) == 4
    assert Path(res["heldout"]).is_file()
    ys = [el.load_data(f).y for f in res["clients"]]
    assert sum(len(y) for y in ys) + res["heldout_examples"] == 797  # disjoint users


# -- Flower's own runtimes (slow: Ray start-up, one process per client app) ----------------------
@pytest.mark.slow
def test_simulation_of_ten_users_improves_unseen_users_and_every_node_agrees(
        tmp_path: Path, users: dict, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("ray")
    from edgelearn.cli import main

    rc = main(["fleet", "simulate", str(DEMO), "--clients-data", users["clients_dir"],
               "--rounds", "3", "--local-steps", "64", "--out", str(tmp_path / "run"),
               "--eval-data", users["heldout"], "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert len(res["clients"]) == 10
    for r in res["rounds"]:
        assert r["dropped"] == {}
        assert len(r["nodes_sha256"]) == 10
        assert r["all_nodes_match"]
        assert max(r["payload_bytes"].values()) <= 1024  # 64 local steps
    assert res["rounds"][-1]["heldout_accuracy"] >= res["heldout_accuracy_initial"] + 0.1
    on_disk = {json.loads(p.read_text())["sha256"]
               for p in (tmp_path / "run" / "nodes").glob("*/status.json")}
    assert on_disk == {res["sha256"]}


@pytest.mark.slow
def test_simulation_drops_a_crashing_and_a_corrupting_client(tmp_path: Path, users: dict) -> None:
    """Faults through Flower's transport: an exception in the ClientApp (Flower's error reply)
    and a damaged frame are dropped; the others merge and every node still agrees."""
    pytest.importorskip("ray")
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp

    from edgelearn.fleet import apps
    from edgelearn.fleet.simulate import client_files, node_for_partition, simulate

    data = tmp_path / "clients"
    data.mkdir()
    for f in users["clients"][:4]:
        (data / Path(f).name).write_bytes(Path(f).read_bytes())
    node_for = node_for_partition(str(DEMO), client_files(data), tmp_path / "run")
    train = apps.train_handler(node_for)
    app = ClientApp()

    @app.train()
    def faulty(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if pid == 1:
            raise RuntimeError("device crashed mid-round")
        reply = train(msg, context)
        if pid == 2:
            payload = reply.content.config_records["fleet"]["payload"]
            bad = bytes(payload[:-1]) + bytes([payload[-1] ^ 0xFF])
            return Message(RecordDict({"fleet": ConfigRecord({"payload": bad})}), reply_to=msg)
        return reply

    app.evaluate()(apps.sync_handler(node_for))
    res = simulate(DEMO, data, FleetSettings(rounds=2, local_steps=8, min_clients=4),
                   tmp_path / "run", client_app=app)
    for r in res["rounds"]:
        assert len(r["merged"]) == 2
        reasons = " | ".join(sorted(r["dropped"].values()))
        assert "checksum" in reasons
        assert "client error" in reasons
        assert len(r["dropped"]) == 2
        assert r["all_nodes_match"]
        assert len(r["nodes_sha256"]) == 4


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deployment_superlink_three_supernodes_one_killed_mid_round(
        tmp_path: Path, users: dict) -> None:
    import os
    import signal

    from edgelearn.fleet import deploy

    port = _free_port()
    settings = FleetSettings(rounds=3, local_steps=16, min_clients=2, round_timeout_s=25)
    result: dict = {}
    clients: dict[int, object] = {}

    def client(i: int) -> None:
        try:
            clients[i] = deploy.run_client(str(DEMO), users["clients"][i], tmp_path / f"n{i}",
                                           superlink=f"127.0.0.1:{port}", port=_free_port(),
                                           timeout_s=420)
        except el.EdgelearnError as e:
            clients[i] = e

    server = threading.Thread(target=lambda: result.update(deploy.serve(
        str(DEMO), settings, tmp_path / "run", eval_data=users["heldout"], port=port)))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    try:
        server.start()
        deploy.wait_for(lambda: deploy.port_open("127.0.0.1", port), 60, "superlink")
        for t in threads:
            t.start()
        victim_log = tmp_path / "n2" / "supernode.log"
        deploy.wait_for(lambda: victim_log.is_file() and victim_log.read_bytes().count(
            b"Receiving: train") >= 2, 300, "round 2 reaching node 2")  # mid-round 2
        (victim,) = [p for p in list(deploy.RUNNING) if str(tmp_path / "n2") in str(p.args)]
        os.killpg(victim.pid, signal.SIGKILL)
        server.join(timeout=420)
        for t in threads:
            t.join(timeout=60)
    finally:
        for proc in list(deploy.RUNNING):
            deploy.stop(proc)
    rounds = result["rounds"]
    assert [len(r["merged"]) for r in rounds] == [3, 2, 2]
    assert len(rounds[1]["dropped"]) == 1
    for i in (0, 1):
        assert clients[i]["sha256"] == result["sha256"]
    assert isinstance(clients[2], el.EdgelearnError)
    store, n = el.fleet.replay_global(el.load_bundle(DEMO), tmp_path / "n0" / "global.bin")
    assert (store.digest(), n) == (result["sha256"], 3)
