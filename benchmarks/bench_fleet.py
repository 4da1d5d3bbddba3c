"""Fleet benchmark (issue 18): what a device sends per round, and what the fleet learns.

Usage:
    python benchmarks/bench_fleet.py                  # 10 users, 5 rounds, 64 local steps
    python benchmarks/bench_fleet.py --rounds 3       # shorter

Prints ONE JSON object on stdout; progress goes to stderr; never asserts. Data: the demo's
shifted digits split into 12 users (`el.fleet.write_demo_users`): 10 clients, 2 unseen users
held out. Three federations from the same pretrained demo bundle, same rounds, local steps,
batch size and clients:

  fedkseed         Flower simulation; clients run zo-sgd and send one float64 per local step
                   (FedKSeed frame); server and every node rebuild the model from the seed pool.
  fedavg           Flower simulation; clients run zo-sgd and send their trainable slice
                   (float32); the server averages it (FedAvg of the trainable slice).
  fedavg_backprop  plain torch on this host (no Flower): each client runs SGD by backprop on the
                   head (the same trainable set), the server averages the heads.

Per federation: bytes each client sent / received per round (the fleet frame alone, and the
whole message content as Flower serializes it), held-out accuracy after each round, wall time
per round (train + merge; Flower simulation: the first round includes Ray's worker start-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import edgelearn as el

DEMO = Path(el.__file__).resolve().parent / "data" / "demo"


def flower_run(strategy: str, users: dict, args: argparse.Namespace, out: Path) -> dict:
    """One Flower simulation; its per-round figures."""
    from edgelearn.fleet.settings import FleetSettings
    from edgelearn.fleet.simulate import simulate

    settings = FleetSettings(strategy=strategy, rounds=args.rounds, local_steps=args.local_steps,
                             lr=args.lr, batch_size=args.batch_size, min_clients=10)
    t0 = time.perf_counter()
    res = simulate(DEMO, users["clients_dir"], settings, out / strategy,
                   eval_data=users["heldout"])
    rounds = res["rounds"]
    return {
        "payload_bytes_sent_per_client": max(max(r["payload_bytes"].values()) for r in rounds),
        "message_bytes_sent_per_client": max(max(r["sent_bytes"].values()) for r in rounds),
        "message_bytes_received_per_client": max(max(r["received_bytes"].values())
                                                 for r in rounds),
        "sync_bytes_received_per_client": max(max(r["sync_received_bytes"].values())
                                              for r in rounds),
        "heldout_accuracy": [res["heldout_accuracy_initial"]]
        + [r["heldout_accuracy"] for r in rounds],
        "round_train_s": [r["train_s"] for r in rounds],
        "round_train_s_median_after_first": statistics.median(
            [r["train_s"] for r in rounds[1:]] or [rounds[0]["train_s"]]),
        "all_nodes_match_every_round": all(r["all_nodes_match"] for r in rounds),
        "total_s": round(time.perf_counter() - t0, 1),
    }


def backprop_run(users: dict, args: argparse.Namespace) -> dict:
    """FedAvg of head SGD by backprop in torch (same clients, rounds, steps, batch)."""
    import torch
    from safetensors.numpy import load_file

    torch.set_num_threads(1)  # a 650-parameter head: threads only contend on a small box
    w = load_file(str(DEMO / "weights.safetensors"))

    def feats(x: np.ndarray) -> torch.Tensor:
        return torch.relu(torch.from_numpy(x @ w["layers.0.weight"].T + w["layers.0.bias"]))

    clients = [el.load_data(f) for f in users["clients"]]
    held = el.load_data(users["heldout"])
    hx, hy = feats(held.x), torch.from_numpy(held.y)
    head = [torch.from_numpy(w["head.weight"].copy()), torch.from_numpy(w["head.bias"].copy())]

    def accuracy() -> float:
        return float(((hx @ head[0].T + head[1]).argmax(1) == hy).float().mean())

    accs, walls = [accuracy()], []
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        total = sum(len(c) for c in clients)
        new = [torch.zeros_like(head[0]), torch.zeros_like(head[1])]
        for c in clients:
            x, y = feats(c.x), torch.from_numpy(c.y)
            p = [head[0].clone().requires_grad_(), head[1].clone().requires_grad_()]
            opt = torch.optim.SGD(p, lr=args.backprop_lr)
            for _ in range(args.local_steps):
                idx = torch.randint(len(c), (min(args.batch_size, len(c)),), generator=gen)
                loss = torch.nn.functional.cross_entropy(x[idx] @ p[0].T + p[1], y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            for k in range(2):
                new[k] += (len(c) / total) * p[k].detach()
        head = new
        walls.append(round(time.perf_counter() - t0, 3))
        accs.append(accuracy())
    slice_bytes = 4 * sum(v.numel() for v in head)
    return {"payload_bytes_sent_per_client": slice_bytes, "heldout_accuracy": accs,
            "round_train_s": walls, "lr": args.backprop_lr}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05, help="zo-sgd lr of the clients")
    p.add_argument("--backprop-lr", type=float, default=0.1, help="SGD lr of the torch run")
    p.add_argument("--parts", default="fedkseed,fedavg,fedavg_backprop",
                   help="comma-separated federations to run")
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench_fleet."))
    users = el.fleet.write_demo_users(out / "data", users=12, holdout=2)
    result = {"clients": len(users["clients"]), "heldout_examples": users["heldout_examples"],
              "rounds": args.rounds, "local_steps": args.local_steps,
              "batch_size": args.batch_size}
    parts = args.parts.split(",")
    for strategy in [s for s in ("fedkseed", "fedavg") if s in parts]:
        print(f"bench_fleet: {strategy} (Flower simulation)...", file=sys.stderr)
        result[strategy] = flower_run(strategy, users, args, out)
    if "fedavg_backprop" in parts:
        print("bench_fleet: fedavg_backprop (torch)...", file=sys.stderr)
        result["fedavg_backprop"] = backprop_run(users, args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
