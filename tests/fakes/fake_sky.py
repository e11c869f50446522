"""FakeSkyCloud: a test double for the cloud side of SkyPilot (launch, status, down). Nothing else is faked.

It keeps its own cluster list in a JSON file (`$FAKE_SKY_STATE` or the `path` argument), under a file lock, so
the list survives a process killed with SIGKILL and is shared between the test and a `thunderops` CLI run in a
subprocess (`THUNDEROPS_SKY_ADAPTER=tests.fakes.fake_sky:FakeSkyCloud`). Tests tell it to misbehave with
rules: the first rule whose `match` text occurs in "<cluster> <infra> <instance_type> spot=<bool> gpu=<GPU>;"
(GPU: the node's GPU type, so `gpu=H200;` matches that type on every cloud and region) fires
(`times` times) with one of these actions:

- `capacity`: raise CapacityError, nothing created (the usual out-of-capacity answer);
- `capacity_partial`: create the cluster (INIT) then raise CapacityError (a half-made cluster left behind);
- `error`: create the cluster (INIT) then raise RuntimeError (an SDK exception mid-launch);
- `hang`: create the cluster (INIT) and block until cancelled (a launch that never finishes).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from thunderops.provision.sky_adapter import CapacityError, Cluster, LaunchError

ALL_CLOUDS = ["aws", "gcp", "azure", "lambda", "nebius", "oci", "vast", "cudo"]


class FakeSkyCloud:
    """Stands in for the clouds behind SkyPilot's SDK; persists its clusters in a JSON file."""

    def __init__(self, path: str | Path | None = None) -> None:
        path = path or os.environ.get("FAKE_SKY_STATE")
        if not path:
            raise RuntimeError("FakeSkyCloud needs a state file: pass path or set FAKE_SKY_STATE")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cancel: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        with self._state() as s:
            s.setdefault("clusters", {})
            s.setdefault("rules", [])
            s.setdefault("launches", [])
            s.setdefault("downs", [])
            s.setdefault("enabled", list(ALL_CLOUDS))
            s.setdefault("launch_delay_s", 0.0)

    # -- the file -----------------------------------------------------------------------------------------
    @contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        with open(self.path.with_suffix(".lock"), "a+") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            try:
                state = json.loads(self.path.read_text()) if self.path.exists() else {}
                yield state
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(json.dumps(state, indent=1))
                os.replace(tmp, self.path)
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)

    def read(self) -> dict[str, Any]:
        with self._state() as s:
            return json.loads(json.dumps(s))

    # -- test controls --------------------------------------------------------------------------------------
    def add_rule(self, match: str, action: str, times: int = 1) -> None:
        assert action in ("capacity", "capacity_partial", "error", "hang"), action
        with self._state() as s:
            s["rules"].append({"match": match, "action": action, "times": times})

    def set(self, **settings: Any) -> None:
        """E.g. set(enabled=["gcp"], launch_delay_s=0.5)."""
        with self._state() as s:
            s.update(settings)

    def names(self) -> set[str]:
        return set(self.read()["clusters"])

    # -- SkyCloud -----------------------------------------------------------------------------------------
    def enabled_clouds(self) -> set[str]:
        return set(self.read()["enabled"])

    def launch(self, cluster: str, task_config: dict[str, Any], on_stage: Callable[[str], None]) -> str:
        res = task_config.get("resources", {})
        gpu = task_config.get("envs", {}).get("THUNDEROPS_AGENT_GPU", "")
        what = (f"{cluster} {res.get('infra', '')} {res.get('instance_type', '')} spot={bool(res.get('use_spot'))} "
                f"gpu={gpu};")
        with self._lock:
            cancel = self._cancel.setdefault(cluster, threading.Event())
        with self._state() as s:
            s["launches"].append(cluster)
            action = None
            for rule in s["rules"]:
                if rule["times"] > 0 and rule["match"] in what:
                    rule["times"] -= 1
                    action = rule["action"]
                    break
            if action != "capacity":
                n = len(s["launches"])
                s["clusters"][cluster] = {"status": "INIT", "host": f"127.0.{n // 250}.{n % 250 + 1}",
                                          "infra": res.get("infra"), "instance_type": res.get("instance_type"),
                                          "use_spot": bool(res.get("use_spot")), "created": time.time()}
            delay = float(s.get("launch_delay_s", 0.0))
        if action in ("capacity", "capacity_partial"):
            raise CapacityError(f"{what}: insufficient capacity (fake)")
        if action == "error":
            raise RuntimeError(f"{cluster}: SDK exploded mid-launch (fake)")
        if action == "hang":
            cancel.wait()
            raise LaunchError(f"{cluster}: launch cancelled")
        if cancel.wait(delay):
            raise LaunchError(f"{cluster}: launch cancelled")
        on_stage("setup")
        with self._state() as s:
            c = s["clusters"].get(cluster)
            if c is None:  # torn down while launching
                raise LaunchError(f"{cluster}: cluster vanished during launch")
            c["status"] = "UP"
            return c["host"]

    def cancel(self, cluster: str) -> None:
        with self._lock:
            self._cancel.setdefault(cluster, threading.Event()).set()

    def clusters(self, prefix: str) -> list[Cluster]:
        return [Cluster(name, c["status"], c["host"]) for name, c in sorted(self.read()["clusters"].items())
                if name.startswith(prefix)]

    def down(self, cluster: str) -> None:
        with self._state() as s:
            s["downs"].append(cluster)
            s["clusters"].pop(cluster, None)
