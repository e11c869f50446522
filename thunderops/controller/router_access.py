"""Router access: where a deployment's router listens and its admin key (save_router, load_router), the
engine launcher it recorded (launcher_from) and the router's admin API (RouterAdmin)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from thunderops.controller.config import ControllerError
from thunderops.controller.engines import EngineLauncher, LocalEmulators, NodeEngines, RayEmulators
from thunderops.state import default_home


def _router_file(deployment: str) -> Path:
    return default_home() / "tokens" / f"{deployment}.router.json"


def save_router(deployment: str, url: str, admin_key: str, engines: Mapping[str, Any] | None = None) -> Path:
    """Remember where a deployment's router listens and its admin key ($THUNDEROPS_HOME/tokens, mode 0600),
    so `thunderops watch` and a restarted controller find it. `thunderops up` calls this after serving starts.
    `engines` says how replacement engines start (see `launcher_from`): {"kind": "node"} (the node's own
    setup, the default), {"kind": "ray-emulators", "address", "engine_key", "speedup"} or
    {"kind": "local-emulators", "engine_key", "speedup", "owner_pid"} (emulators end with the owner process)."""
    path = _router_file(deployment)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url.rstrip("/").removesuffix("/v1"), "admin_key": admin_key,
                   "engines": dict(engines or {"kind": "node"})}, f)
    tmp.replace(path)
    return path


def _saved(deployment: str) -> dict[str, Any]:
    path = _router_file(deployment)
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def launcher_from(deployment: str, timeout_s: float = 1800.0) -> EngineLauncher:
    """The engine launcher `save_router` recorded for the deployment (NodeEngines when none was)."""
    cfg = _saved(deployment).get("engines") or {}
    kind = cfg.get("kind", "node")
    if kind == "ray-emulators":
        return RayEmulators(cfg["address"], engine_key=cfg.get("engine_key"), speedup=float(cfg.get("speedup", 1.0)))
    if kind == "local-emulators":
        return LocalEmulators(engine_key=cfg.get("engine_key"), speedup=float(cfg.get("speedup", 1.0)),
                              owner_pid=cfg.get("owner_pid"))
    return NodeEngines(timeout_s)


def load_router(deployment: str, url: str | None = None, admin_key: str | None = None) -> tuple[str, str]:
    """The router's base URL and admin key: arguments first, then THUNDEROPS_ADMIN_KEY / THUNDEROPS_API_KEY,
    then what `save_router` wrote."""
    saved = _saved(deployment)
    url = url or saved.get("url")
    key = admin_key or os.environ.get("THUNDEROPS_ADMIN_KEY") or saved.get("admin_key") or os.environ.get(
        "THUNDEROPS_API_KEY")
    if not url:
        raise ControllerError(f"no router address for deployment {deployment!r}: pass --router URL "
                              "(it is saved when `thunderops up` starts serving)")
    if not key:
        raise ControllerError("no router admin key: set THUNDEROPS_ADMIN_KEY (or THUNDEROPS_API_KEY)")
    return url.rstrip("/").removesuffix("/v1"), key


class RouterAdmin:
    """The router's admin API: the routing table in use, swapping it, usage records."""

    def __init__(self, url: str, admin_key: str, timeout_s: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {admin_key}"})

    def table(self):  # -> thunderops.serve.router.RoutingTable
        from thunderops.serve.router import RoutingTable

        r = self.http.get(self.url + "/admin/routing")
        r.raise_for_status()
        return RoutingTable.from_dict(r.json())

    def push(self, table) -> None:
        r = self.http.post(self.url + "/admin/routing", content=json.dumps(table.to_dict()))
        r.raise_for_status()

    def usage(self, records: int) -> dict[str, Any]:
        r = self.http.get(self.url + "/admin/usage", params={"records": records})
        r.raise_for_status()
        return r.json()

    def close(self) -> None:
        self.http.close()
