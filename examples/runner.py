"""How the examples behave as command-line tools (imported by the example scripts).

An example's device half runs in a fresh interpreter that never imports torch, as on a
Raspberry Pi. Both halves fail the way a command should: an edgelearn error is one line on
stderr and exit 2 (the child's own line reaches the terminal; the parent adds nothing),
Ctrl-C is one line and exit 130, the device half is stopped with the parent, no traceback.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import edgelearn as el

#: seconds a device half gets to stop by itself after Ctrl-C (it saw the same SIGINT from the
#: terminal), then after our own SIGINT, then after SIGTERM, before it is killed
STOP_WAIT_S = 3.0


def run_cli(prog: str, main: Callable[[], None], *, child: bool = False) -> None:
    """Run `main()` as a command: EdgelearnError -> `prog: error: ...` on stderr, exit 2;
    Ctrl-C -> `prog: interrupted`, exit 130 (a child, `child=True`, exits 130 silently:
    its parent says it).

    Args:
        prog: name in messages (the script's).
        main: the script's body.
        child: this process is a device half started by `run_device_half`.
    """
    try:
        main()
    except el.EdgelearnError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: no traceback
        if not child:
            print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def run_device_half(cmd: list[str]) -> dict[str, Any]:
    """Run the device half `cmd`; return the JSON object it prints on stdout.

    Its stderr (progress, an error line) goes straight to ours, live. If it fails, exit
    with its code (its error line is already on the terminal). On Ctrl-C it is stopped
    (see STOP_WAIT_S) before KeyboardInterrupt goes on to `run_cli`.
    """
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        try:
            out, _ = proc.communicate()
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _stop(proc)
            raise
    if proc.returncode != 0:
        if proc.returncode < 0:
            print(f"the device half was killed by signal {-proc.returncode}", file=sys.stderr)
        sys.exit(proc.returncode if proc.returncode > 0 else 1)
    return json.loads(out)


def _stop(proc: subprocess.Popen) -> None:
    """Let `proc` exit on the SIGINT it got, else send SIGINT, then SIGTERM, then kill."""
    for sig in (None, signal.SIGINT, signal.SIGTERM):
        if sig is not None:
            proc.send_signal(sig)
        try:
            proc.wait(STOP_WAIT_S)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()
