"""The `edgelearn fleet ...` command group: argparse setup and handlers (edgelearn/cli.py
delegates here through `el.fleet.cli`).

    edgelearn fleet demo-data DIR [--users 12 --holdout 2]          # per-user .npz files
    edgelearn fleet simulate BUNDLE --clients-data DIR --rounds R --local-steps S --out RUN
    edgelearn fleet server BUNDLE --rounds R --local-steps S --out RUN --min-clients N
    edgelearn fleet client BUNDLE --data D.npz --superlink HOST:PORT --work-dir DIR

A handler returns (the --json object, the human text); errors are EdgelearnError (exit 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgelearn.argtypes import positive_int as _positive
from edgelearn.errors import InputError
from edgelearn.fleet.settings import STRATEGIES, FleetSettings


def _port(text: str) -> int:
    v = _positive(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1..65535), got {text!r}")
    return v


def _add_federation(sp: argparse.ArgumentParser) -> None:
    """Flags of the fleet's settings (the server side decides them for every client)."""
    d = FleetSettings()
    sp.add_argument("bundle", help="the fleet's bundle directory")
    sp.add_argument("--out", required=True, help="run directory (global journal, weights, "
                    "fleet.json)")
    sp.add_argument("--rounds", type=_positive, default=d.rounds, help="federation rounds")
    sp.add_argument("--local-steps", type=_positive, default=d.local_steps,
                    help="zo-sgd steps per client per round")
    sp.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                    help="fedkseed: clients send one scalar per step; fedavg: clients send "
                    "their trainable slice (baseline)")
    sp.add_argument("--eval-data", default=None, help="held-out .npz scored every round")
    sp.add_argument("--lr", type=float, default=d.lr, help="zo-sgd learning rate")
    sp.add_argument("--eps", type=float, default=d.eps, help="zo-sgd perturbation scale")
    sp.add_argument("--clip", type=float, default=d.clip, help="clip of |L+ - L-|")
    sp.add_argument("--batch-size", type=_positive, default=d.batch_size,
                    help="examples per local step")
    sp.add_argument("--trainable", default=d.trainable, help="glob of parameters to train")
    sp.add_argument("--seed", type=int, default=d.seed, help="base seed of the seed pool")
    sp.add_argument("--pool-rows", type=_positive, default=d.pool_rows,
                    help="run seeds in the pool (K = pool rows x local steps)")
    sp.add_argument("--round-timeout-s", type=float, default=d.round_timeout_s,
                    help="how long a round waits for clients; late ones are dropped")
    sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_parser(sub: Any) -> None:
    """Add the `fleet` command group to the top-level subparsers `sub`."""
    fp = sub.add_parser("fleet", help="federated personalization on Flower (seeds, not weights)")
    fsub = fp.add_subparsers(dest="fleet_command", required=True, parser_class=type(fp),
                             metavar="FLEET_COMMAND", help="one of:")
    sp = fsub.add_parser("simulate", help="a fleet on this machine (Flower's simulation)")
    _add_federation(sp)
    sp.add_argument("--clients-data", required=True, help="directory of one .npz per client")
    sp.add_argument("--min-clients", type=_positive, default=None,
                    help="clients a round waits for (default: all)")
    sp.add_argument("--cpus", type=_positive, default=None, help="CPUs for client apps")
    sp = fsub.add_parser("server", help="SuperLink + the fleet's ServerApp (deployment)")
    _add_federation(sp)
    sp.add_argument("--min-clients", type=_positive, default=2, help="clients a round waits for")
    sp.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on")
    sp.add_argument("--port", type=_port, default=9092, help="the SuperLink's port")
    sp = fsub.add_parser("client", help="a device's SuperNode until the federation ends")
    sp.add_argument("bundle", help="the fleet's bundle directory")
    sp.add_argument("--data", required=True, help="this device's .npz")
    sp.add_argument("--superlink", required=True, help="HOST:PORT of the fleet server")
    sp.add_argument("--work-dir", required=True, help="where the node keeps the global model")
    sp.add_argument("--port", type=_port, default=9094, help="the SuperNode's own API port")
    sp.add_argument("--timeout-s", type=float, default=3600.0, help="give up after this long")
    sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    sp = fsub.add_parser("demo-data", help="the demo's shifted digits split into users")
    sp.add_argument("out", help="directory for clients/user_NN.npz and heldout.npz")
    sp.add_argument("--users", type=_positive, default=12, help="users in all")
    sp.add_argument("--holdout", type=_positive, default=2, help="unseen users held out")
    sp.add_argument("--seed", type=int, default=0, help="seed of the split")
    sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def settings_of(args: argparse.Namespace, min_clients: int) -> FleetSettings:
    """The FleetSettings of the flags."""
    return FleetSettings(strategy=args.strategy, rounds=args.rounds,
                         local_steps=args.local_steps, lr=args.lr, eps=args.eps,
                         clip=args.clip, batch_size=args.batch_size, trainable=args.trainable,
                         seed=args.seed, pool_rows=args.pool_rows, min_clients=min_clients,
                         round_timeout_s=args.round_timeout_s)


def _check_out(out: str, inputs: list[str | None]) -> None:
    o = Path(out).resolve()
    for i in inputs:
        if i is not None and (Path(i).resolve() == o or o in Path(i).resolve().parents):
            raise InputError(f"--out {out} would overwrite the input {i}")
    if o.exists() and not o.is_dir():
        raise InputError(f"--out {out} is a file, not a directory")


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Run the fleet command `args` names: (its --json object, its human text)."""
    cmd = args.fleet_command
    if cmd == "demo-data":
        from edgelearn.fleet.users import write_demo_users

        res = write_demo_users(args.out, users=args.users, holdout=args.holdout,
                               seed=args.seed)
        return res, (f"{len(res['clients'])} clients in {res['clients_dir']}, held-out "
                     f"users' digits in {res['heldout']}")
    if cmd == "client":
        from edgelearn.fleet.deploy import run_client

        res = run_client(args.bundle, args.data, args.work_dir, superlink=args.superlink,
                         port=args.port, timeout_s=args.timeout_s)
        return res, f"round {res['round']}: holds sha256 {res['sha256']} ({res['weights']})"
    _check_out(args.out, [args.bundle, args.eval_data, getattr(args, "clients_data", None)])
    if cmd == "simulate":
        from edgelearn.fleet.simulate import client_files, simulate

        n = len(client_files(args.clients_data))
        res = simulate(args.bundle, args.clients_data, settings_of(args, args.min_clients or n),
                       args.out, eval_data=args.eval_data, cpus=args.cpus)
    else:
        from edgelearn.fleet.deploy import serve

        res = serve(args.bundle, settings_of(args, args.min_clients), args.out,
                    eval_data=args.eval_data, host=args.host, port=args.port)
    return res, summary_text(res)


def summary_text(res: dict[str, Any]) -> str:
    """One line per round of a federation's summary."""
    lines = []
    if res.get("heldout_accuracy_initial") is not None:
        lines.append(f"round 0: held-out accuracy {res['heldout_accuracy_initial']:.1%}")
    for r in res["rounds"]:
        sent = max(r.get("sent_bytes", {}).values(), default=0)
        got = max(r.get("received_bytes", {}).values(), default=0)
        acc = r.get("heldout_accuracy")
        holds = r.get("nodes_sha256", {})
        lines.append(
            f"round {r['round']}: {len(r['merged'])} merged, {len(r['dropped'])} dropped"
            + (f", held-out accuracy {acc:.1%}" if acc is not None else "")
            + f", sent <= {sent} B/client, received <= {got} B/client, "
            f"{sum(v == r['sha256'] for v in holds.values())}/{len(holds)} nodes hold "
            f"sha256 {r['sha256'][:12]}")
    lines.append(f"global journal: {res['global_journal']}; weights: {res['weights']}")
    return "\n".join(lines)
