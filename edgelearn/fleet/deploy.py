"""`edgelearn fleet server|client`: a federation over Flower's own deployment runtime.

The server side starts Flower's `flower-superlink` (insecure: loopback or a trusted network
only; TLS is Flower's own `--ssl-*` flags, not wired here), writes a minimal Flower app
(`pyproject.toml` naming `edgelearn.fleet.apps:server_app` / `client_app`, with the bundle,
run directory and fleet settings as its run config) and submits it with `flwr run`; it waits for
the run's `fleet.json`, then stops the SuperLink. The client side runs Flower's
`flower-supernode` with `--node-config` naming the device's bundle, data and work directory,
and stops it once the node has synced the final round (`status.json`). Every Flower file
(FLWR_HOME: config, installed app, logs) stays inside the run / work directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgelearn.errors import EdgelearnError, InputError
from edgelearn.fleet.settings import FleetSettings

APP_TOML = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "edgelearn-fleet"
version = "1.0.0"
description = "edgelearn fleet: federated personalization with seeds and scalars"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "edgelearn"

[tool.flwr.app.components]
serverapp = "edgelearn.fleet.apps:server_app"
clientapp = "edgelearn.fleet.apps:client_app"

[tool.flwr.app.config]
bundle = {bundle}
out = {out}
settings = {settings}
eval-data = {eval_data}
"""


#: Flower processes started by this process and not yet stopped (a test's teardown stops them)
RUNNING: set[subprocess.Popen] = set()


def _tool(name: str) -> str:
    """The path of a Flower console script (beside this Python, else on PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        raise InputError(f"{name} not found: install the fleet extra (pip install "
                         "'edgelearn[fleet]')")
    return found


def start(argv: list[str], home: Path, log: Path) -> subprocess.Popen:
    """Start a Flower process in its own session (so its children stop with it); it is
    listed in RUNNING until `stop`ped.

    Args:
        argv: the command.
        home: its FLWR_HOME (Flower's config, installed apps).
        log: file its stdout and stderr are appended to.
    """
    # Flower's processes start their own console scripts (the superlink its flower-superexec)
    # by PATH: this Python's scripts first, so a venv's edgelearn works without activating it
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": path}
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    RUNNING.add(proc)
    return proc


def stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stop a process started by `start` and its process group (SIGTERM, then SIGKILL)."""
    RUNNING.discard(proc)
    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError):  # what is left of its group (superexec...)
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait()


def wait_for(ready: Callable[[], bool], timeout_s: float, what: str,
             alive: subprocess.Popen | None = None) -> None:
    """Poll `ready()` until it holds (EdgelearnError naming `what` on timeout or exit)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if alive is not None and alive.poll() is not None:
            raise EdgelearnError(f"{what}: the Flower process exited ({alive.returncode})")
        if time.monotonic() > deadline:
            raise EdgelearnError(f"{what}: timed out after {timeout_s:g} s")
        time.sleep(0.3)


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def write_app(out: Path, bundle: str, settings: FleetSettings, eval_data: str | None) -> Path:
    """The Flower app directory `flwr run` submits (its run config is the federation's)."""
    app = out / "flower-app"
    app.mkdir(parents=True, exist_ok=True)
    text = APP_TOML.format(bundle=json.dumps(str(Path(bundle).resolve())),
                           out=json.dumps(str(out)), settings=json.dumps(settings.to_json()),
                           eval_data=json.dumps(str(Path(eval_data).resolve())
                                                if eval_data else ""))
    (app / "pyproject.toml").write_text(text)
    return app


def write_connection(home: Path, host: str, port: int) -> None:
    """FLWR_HOME/config.toml: the SuperLink connection `flwr run` uses (insecure)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\naddress = "{host}:{port}"\n'
        "insecure = true\n")


def serve(bundle: str, settings: FleetSettings, out: str | os.PathLike, *,
          eval_data: str | None = None, host: str = "127.0.0.1", port: int = 9092,
          start_timeout_s: float = 60.0) -> dict[str, Any]:
    """Run a SuperLink and the fleet's ServerApp until every round is done; its summary."""
    from edgelearn.fleet.apps import SUMMARY

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY).unlink(missing_ok=True)
    home = out / "flwr-home"
    write_connection(home, host, port)
    app = write_app(out, bundle, settings, eval_data)
    if port_open(host, port):
        raise InputError(f"{host}:{port} is already in use")
    link = start([_tool("flower-superlink"), "--insecure", "--host", host, "--port",
                   str(port), "--disable-runtime-dependency-installation"],
                  home, out / "superlink.log")
    try:
        wait_for(lambda: port_open(host, port), start_timeout_s, "SuperLink start", link)
        runner = start([_tool("flwr"), "run", str(app), "fleet", "--stream"], home,
                        out / "serverapp.log")
        budget = start_timeout_s + settings.rounds * (2 * settings.round_timeout_s + 60)
        try:  # `flwr run --stream` returns when the run ends, done or failed
            wait_for(lambda: (out / SUMMARY).is_file(), budget,
                     f"federation (see {out / 'serverapp.log'})", runner)
        finally:
            stop(runner)
    finally:
        stop(link)
    summary = json.loads((out / SUMMARY).read_text())
    summary["superlink"] = f"{host}:{port}"
    return summary


def _replied_all(log: Path) -> bool:
    """Whether the SuperNode's log shows a sent reply for every message it received."""
    text = log.read_bytes()
    return text.count(b"Sent successfully") >= text.count(b"Receiving:")


def run_client(bundle: str, data: str, work: str | os.PathLike, *, superlink: str,
               port: int = 9094, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run a SuperNode for this device until it has synced the federation's last round."""
    from edgelearn.fleet.apps import STATUS

    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / STATUS).unlink(missing_ok=True)
    config = " ".join(f"{k}={json.dumps(str(Path(v).resolve()))}" for k, v in
                      (("bundle", bundle), ("data", data), ("work-dir", work)))
    node = start([_tool("flower-supernode"), "--insecure", "--superlink", superlink,
                   "--port", str(port), "--node-config", config],
                  work / "flwr-home", work / "supernode.log")

    def final() -> bool:
        try:
            return bool(json.loads((work / STATUS).read_text()).get("final"))
        except (OSError, ValueError):
            return False

    log = work / "supernode.log"
    try:
        wait_for(final, timeout_s, "fleet client", node)
        # the final sync's reply is sent after status.json is written: let it go out first
        wait_for(lambda: _replied_all(log), 60.0, "fleet client's last reply", node)
    finally:
        stop(node)
    status = json.loads((work / STATUS).read_text())
    return {**status, "work_dir": str(work), "weights": str(work / "global.safetensors"),
            "global_journal": str(work / "global.bin")}
