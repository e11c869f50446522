"""Keep one engine process running on a node: restart it when it exits, with a back-off, until told to stop.

A node's SkyPilot job runs every engine of the node under `thunderops serve supervise -- vllm serve ...`. An
engine that crashes (a CUDA error, an OOM, a spanning engine that lost a worker node) comes back by itself on the
same GPUs and port, and the controller, which took its replica out of the router when it stopped answering,
waits for its /health and puts it back. Without it the crash ended the node's job, and with it every other
engine and the agent of the node, while the node went on billing.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


def restart_delay(ran_s: float, previous_delay_s: float | None, delay_s: float, max_delay_s: float,
                  healthy_after_s: float) -> float:
    """Seconds to wait before the next start: `delay_s` after a run of at least `healthy_after_s` (or the first
    exit), doubling for each exit that follows a short run, at most `max_delay_s` (an engine that cannot start
    is not restarted in a tight loop)."""
    if previous_delay_s is None or ran_s >= healthy_after_s:
        return delay_s
    return min(max_delay_s, previous_delay_s * 2)


def supervise(argv: Sequence[str], *, delay_s: float = 10.0, max_delay_s: float = 300.0,
              healthy_after_s: float = 600.0, max_restarts: int | None = None,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> int:
    """Run `argv`; whenever it exits, start it again after `restart_delay`. SIGTERM or SIGINT goes to the
    engine (it shuts down as it would on its own) and ends the supervision; returns the engine's last exit
    code. `max_restarts` (tests) stops after that many restarts."""
    stop = False
    child: subprocess.Popen | None = None

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    delay: float | None = None
    restarts = 0
    try:
        while True:
            started = time.monotonic()
            try:
                child = subprocess.Popen(list(argv))
            except OSError as e:  # no such program: as an engine that exits at once (127, as a shell says)
                log(f"thunderops supervise: cannot start {argv[0]}: {e.strerror}")
                code = 127
            else:
                code = child.wait()
            if stop:
                return code
            ran = time.monotonic() - started
            delay = restart_delay(ran, delay, delay_s, max_delay_s, healthy_after_s)
            if max_restarts is not None and restarts >= max_restarts:
                log(f"thunderops supervise: {argv[0]} exited with {code} after {ran:.0f} s; "
                    f"{restarts} restart(s) done, stopping")
                return code
            restarts += 1
            log(f"thunderops supervise: {argv[0]} exited with {code} after {ran:.0f} s; "
                f"restart {restarts} in {delay:g} s")
            deadline = time.monotonic() + delay
            while not stop and time.monotonic() < deadline:
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            if stop:
                return code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
