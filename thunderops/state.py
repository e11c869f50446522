"""The SQLite state store: deployments, versioned plans, nodes, events and token usage.

One file, `$THUNDEROPS_HOME/state.db` (default `~/.thunderops/state.db`), WAL mode, mode 0600. Every
public write is one transaction (`BEGIN IMMEDIATE` .. `COMMIT`), so a process killed at any instant leaves
either the old or the new state. Several writes can be grouped with `with store.transaction(): ...`.
The schema is versioned with `PRAGMA user_version`; `MIGRATIONS[i]` takes version i to i+1.

Times are ISO 8601 UTC strings; money is $/h per node (`price_per_hour`) and $ for spend.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from thunderops.errors import StateError
from thunderops.plan import Plan

MIGRATIONS: list[str] = [
    # v1: the initial schema.
    """
    CREATE TABLE deployments (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        status TEXT NOT NULL,
        provider TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '',
        budget_per_hour REAL,
        meta TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE plans (
        deployment TEXT NOT NULL REFERENCES deployments(id),
        version INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        json TEXT NOT NULL,
        PRIMARY KEY (deployment, version)
    );
    CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        deployment TEXT NOT NULL REFERENCES deployments(id),
        instance_id TEXT NOT NULL,
        cluster_name TEXT NOT NULL,
        cloud TEXT NOT NULL DEFAULT '',
        region TEXT NOT NULL DEFAULT '',
        zone TEXT NOT NULL DEFAULT '',
        instance_type TEXT NOT NULL DEFAULT '',
        gpu TEXT NOT NULL DEFAULT '',
        gpus INTEGER NOT NULL DEFAULT 0,
        spot INTEGER NOT NULL DEFAULT 0,
        price_per_hour REAL NOT NULL DEFAULT 0,
        host TEXT,
        status TEXT NOT NULL,
        launched_at TEXT,
        terminated_at TEXT,
        engine_port INTEGER,
        kv_port INTEGER,
        agent_port INTEGER,
        error TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL
    );
    CREATE INDEX nodes_deployment ON nodes(deployment);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        deployment TEXT NOT NULL REFERENCES deployments(id),
        ts TEXT NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT '',
        payload TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_deployment ON events(deployment, id);
    CREATE TABLE usage (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        deployment TEXT NOT NULL REFERENCES deployments(id),
        ts TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        prefill TEXT NOT NULL DEFAULT '',
        decode TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX usage_deployment ON usage(deployment, ts);
    """,
    # v2: provider-specific facts per node (JSON), e.g. the local provider's Ray node id and process ids.
    """
    ALTER TABLE nodes ADD COLUMN meta TEXT NOT NULL DEFAULT '{}';
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

# Node lifecycle. LIVE ones may be costing money.
NODE_STATUSES = ("intent", "provisioning", "setup", "ready", "failed", "terminating", "terminated", "preempted")
LIVE_NODE_STATUSES = ("intent", "provisioning", "setup", "ready", "terminating", "failed")
DEPLOYMENT_STATUSES = ("planned", "provisioning", "up", "failed", "down")
_NODE_COLUMNS = (
    "deployment", "instance_id", "cluster_name", "cloud", "region", "zone", "instance_type", "gpu", "gpus",
    "spot", "price_per_hour", "host", "status", "launched_at", "terminated_at", "engine_port", "kv_port",
    "agent_port", "error", "meta",
)
_DEPLOYMENT_ID = re.compile(r"^[a-z][a-z0-9]{0,15}$")


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def parse_ts(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


def default_home() -> Path:
    return Path(os.environ.get("THUNDEROPS_HOME") or Path.home() / ".thunderops").expanduser()


def default_db_path() -> Path:
    return default_home() / "state.db"


def check_deployment_id(dep_id: str) -> str:
    """Deployment ids go into cloud cluster names (`to-<id>-...`): short, lower-case letters and digits, no '-'
    (so a cluster name tells its deployment without ambiguity), starting with a letter."""
    if not _DEPLOYMENT_ID.match(dep_id):
        raise StateError(f"deployment name {dep_id!r} is not valid: use 1-16 lower-case letters or digits, "
                         "starting with a letter (e.g. --name chat1)")
    return dep_id


@dataclass
class Deployment:
    id: str
    created_at: str
    status: str
    provider: str = ""
    model: str = ""
    budget_per_hour: float | None = None  # $/h hard limit
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class NodeRecord:
    """One node as the store knows it (a launch attempt of one plan instance). `price_per_hour` is $/h."""

    id: str
    deployment: str
    instance_id: str
    cluster_name: str
    cloud: str = ""
    region: str = ""
    zone: str = ""
    instance_type: str = ""
    gpu: str = ""
    gpus: int = 0
    spot: bool = False
    price_per_hour: float = 0.0
    host: str | None = None
    status: str = "intent"
    launched_at: str | None = None
    terminated_at: str | None = None
    engine_port: int | None = None
    kv_port: int | None = None
    agent_port: int | None = None
    error: str = ""
    created_at: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.status in LIVE_NODE_STATUSES

    def hours(self, now: datetime | None = None) -> float:
        """Hours billed so far: launch to termination (or now)."""
        if not self.launched_at:
            return 0.0
        end = parse_ts(self.terminated_at) if self.terminated_at else (now or datetime.now(UTC))
        return max(0.0, (end - parse_ts(self.launched_at)).total_seconds() / 3600.0)

    def spend(self, now: datetime | None = None) -> float:
        """$ spent on this node so far (its $/h times hours up)."""
        return self.price_per_hour * self.hours(now)


@dataclass
class Event:
    id: int
    deployment: str
    ts: str
    kind: str
    message: str
    payload: dict[str, Any]


@dataclass
class Usage:
    """Tokens of one request as the router counted them."""

    deployment: str
    ts: str
    prompt_tokens: int
    output_tokens: int
    prefill: str = ""
    decode: str = ""


class Store:
    """The state store. Cheap to construct; opens one connection per transaction (thread- and fork-safe)."""

    def __init__(self, path: str | Path | None = None, *, timeout_s: float = 30.0) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._init()

    # -- plumbing ---------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = NORMAL")  # safe in WAL mode: durable across process crashes
            return conn
        except sqlite3.DatabaseError as e:
            raise StateError(f"{self.path}: cannot open the state store ({e}); move it aside to start afresh") from None

    def _init(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Create the file 0600 before SQLite does (its -wal/-shm files inherit the mode).
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
            os.chmod(self.path, 0o600)
        except OSError as e:
            raise StateError(f"{self.path}: cannot create the state store ({e.strerror}); set THUNDEROPS_HOME "
                             "to a writable directory") from None
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StateError(f"{self.path}: SQLite refused WAL mode ({mode}); put THUNDEROPS_HOME on a local disk")
            self._migrate(conn)
        except sqlite3.DatabaseError as e:
            raise StateError(f"{self.path}: not a usable state store ({e}); move it aside to start afresh") from None
        finally:
            conn.close()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(f"{self.path}: state schema v{version} is newer than this thunderops (v{SCHEMA_VERSION}); "
                             "upgrade thunderops")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            try:
                conn.execute("BEGIN IMMEDIATE")
                # Re-check under the write lock: another process may have migrated meanwhile.
                if conn.execute("PRAGMA user_version").fetchone()[0] >= target:
                    conn.execute("ROLLBACK")
                    continue
                for stmt in _statements(MIGRATIONS[target - 1]):
                    conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; nested calls in the same thread join the outer one."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        conn = self._connect()
        self._local.conn = conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            self._local.conn = None
            conn.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    def _require(self, conn: sqlite3.Connection, deployment: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM deployments WHERE id = ?", (deployment,)).fetchone()
        if row is None:
            known = [r[0] for r in conn.execute("SELECT id FROM deployments ORDER BY created_at DESC LIMIT 20")]
            hint = f"; known: {', '.join(known)}" if known else "; there are none yet (`thunderops up` makes one)"
            raise StateError(f"unknown deployment {deployment!r}{hint}")
        return row

    # -- deployments ------------------------------------------------------------------------------------
    def create_deployment(self, dep_id: str, *, provider: str = "", model: str = "",
                          budget_per_hour: float | None = None, meta: Mapping[str, Any] | None = None,
                          status: str = "planned") -> Deployment:
        check_deployment_id(dep_id)
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM deployments WHERE id = ?", (dep_id,)).fetchone():
                raise StateError(f"deployment {dep_id!r} already exists; pick another --name or "
                                 f"`thunderops down {dep_id}` first")
            dep = Deployment(dep_id, now_utc(), status, provider, model, budget_per_hour, dict(meta or {}))
            c.execute("INSERT INTO deployments VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (dep.id, dep.created_at, dep.status, dep.provider, dep.model, dep.budget_per_hour,
                       json.dumps(dep.meta)))
            return dep

    def deployment(self, dep_id: str) -> Deployment:
        with self._read() as c:
            return _deployment(self._require(c, dep_id))

    def deployments(self) -> list[Deployment]:
        with self._read() as c:
            return [_deployment(r) for r in c.execute("SELECT * FROM deployments ORDER BY created_at, id")]

    def has_deployment(self, dep_id: str) -> bool:
        with self._read() as c:
            return c.execute("SELECT 1 FROM deployments WHERE id = ?", (dep_id,)).fetchone() is not None

    def set_deployment_status(self, dep_id: str, status: str) -> None:
        if status not in DEPLOYMENT_STATUSES:
            raise ValueError(f"deployment status {status!r} not in {DEPLOYMENT_STATUSES}")
        with self.transaction() as c:
            self._require(c, dep_id)
            c.execute("UPDATE deployments SET status = ? WHERE id = ?", (status, dep_id))

    # -- plans ------------------------------------------------------------------------------------------
    def add_plan(self, dep_id: str, plan: Plan, reason: str = "") -> int:
        """Store the next version of the deployment's plan; returns that version (1, 2, ...)."""
        with self.transaction() as c:
            self._require(c, dep_id)
            version = c.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM plans WHERE deployment = ?",
                                (dep_id,)).fetchone()[0]
            plan.version = version
            c.execute("INSERT INTO plans VALUES (?, ?, ?, ?, ?)",
                      (dep_id, version, now_utc(), reason, plan.to_json(indent=None)))
            return version

    def plan(self, dep_id: str, version: int | None = None) -> Plan:
        """A stored plan version (the latest when `version` is None)."""
        with self._read() as c:
            self._require(c, dep_id)
            if version is None:
                row = c.execute("SELECT json FROM plans WHERE deployment = ? ORDER BY version DESC LIMIT 1",
                                (dep_id,)).fetchone()
            else:
                row = c.execute("SELECT json FROM plans WHERE deployment = ? AND version = ?",
                                (dep_id, version)).fetchone()
        if row is None:
            what = "no plan" if version is None else f"no plan version {version}"
            raise StateError(f"deployment {dep_id!r} has {what}")
        return Plan.from_json(row[0])

    def latest_plan(self, dep_id: str) -> Plan:
        return self.plan(dep_id)

    def plan_versions(self, dep_id: str) -> list[int]:
        with self._read() as c:
            self._require(c, dep_id)
            return [r[0] for r in c.execute("SELECT version FROM plans WHERE deployment = ? ORDER BY version",
                                            (dep_id,))]

    # -- nodes ------------------------------------------------------------------------------------------
    def record_node_intent(self, dep_id: str, node_id: str, instance_id: str, cluster_name: str,
                           **fields: Any) -> NodeRecord:
        """Record that we are about to launch a node (before any money is spent), status 'intent'."""
        fields.setdefault("status", "intent")
        _check_node_fields(fields)
        with self.transaction() as c:
            self._require(c, dep_id)
            cols = {"deployment": dep_id, "instance_id": instance_id, "cluster_name": cluster_name, **fields}
            cols = _node_values(cols)
            names = ["id", "created_at", *cols]
            c.execute(f"INSERT INTO nodes ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                      (node_id, now_utc(), *cols.values()))
            return _node(c.execute("SELECT * FROM nodes WHERE id = ?", (node_id,)).fetchone())

    def update_node(self, node_id: str, **fields: Any) -> NodeRecord:
        """Change a node's columns (status, host, launched_at, ...) in one transaction."""
        _check_node_fields(fields)
        fields = _node_values(fields)
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is None:
                raise StateError(f"unknown node {node_id!r}")
            if fields:
                c.execute(f"UPDATE nodes SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                          (*fields.values(), node_id))
            return _node(c.execute("SELECT * FROM nodes WHERE id = ?", (node_id,)).fetchone())

    def node(self, node_id: str) -> NodeRecord:
        with self._read() as c:
            row = c.execute("SELECT * FROM nodes WHERE id = ?", (node_id,)).fetchone()
        if row is None:
            raise StateError(f"unknown node {node_id!r}")
        return _node(row)

    def nodes(self, dep_id: str, *, live_only: bool = False) -> list[NodeRecord]:
        with self._read() as c:
            self._require(c, dep_id)
            rows = c.execute("SELECT * FROM nodes WHERE deployment = ? ORDER BY created_at, id", (dep_id,))
            out = [_node(r) for r in rows]
        return [n for n in out if n.live] if live_only else out

    def spend(self, dep_id: str, now: datetime | None = None) -> float:
        """$ spent so far on the deployment's nodes (each node's $/h times its hours up)."""
        return sum(n.spend(now) for n in self.nodes(dep_id))

    def cost_per_hour(self, dep_id: str) -> float:
        """$/h of the nodes running now (ready or being set up)."""
        return sum(n.price_per_hour for n in self.nodes(dep_id) if n.status in ("provisioning", "setup", "ready"))

    # -- events -----------------------------------------------------------------------------------------
    def add_event(self, dep_id: str, kind: str, message: str = "", payload: Mapping[str, Any] | None = None,
                  *, ts: str | None = None) -> int:
        """Append an event (payload: JSON, e.g. {"before": plan_version, "after": plan_version}); `ts` (ISO UTC)
        defaults to now (give it when recording something that happened earlier, e.g. a preemption)."""
        with self.transaction() as c:
            self._require(c, dep_id)
            cur = c.execute("INSERT INTO events (deployment, ts, kind, message, payload) VALUES (?, ?, ?, ?, ?)",
                            (dep_id, ts or now_utc(), kind, message, json.dumps(dict(payload or {}), default=str)))
            return int(cur.lastrowid or 0)

    def events(self, dep_id: str, kind: str | None = None) -> list[Event]:
        with self._read() as c:
            self._require(c, dep_id)
            sql, args = "SELECT * FROM events WHERE deployment = ?", [dep_id]
            if kind is not None:
                sql, args = sql + " AND kind = ?", [*args, kind]
            rows = c.execute(sql + " ORDER BY id", args).fetchall()
        return [Event(r["id"], r["deployment"], r["ts"], r["kind"], r["message"], json.loads(r["payload"]))
                for r in rows]

    # -- usage ------------------------------------------------------------------------------------------
    def record_usage(self, dep_id: str, rows: Iterable[Usage | Mapping[str, Any]]) -> int:
        """Append token counts (a batch from the router) in one transaction; returns rows written."""
        values = []
        for r in rows:
            u = r if isinstance(r, Usage) else Usage(deployment=dep_id, ts=r.get("ts") or now_utc(),
                                                     prompt_tokens=int(r["prompt_tokens"]),
                                                     output_tokens=int(r["output_tokens"]),
                                                     prefill=str(r.get("prefill", "")), decode=str(r.get("decode", "")))
            values.append((dep_id, u.ts or now_utc(), int(u.prompt_tokens), int(u.output_tokens), u.prefill, u.decode))
        with self.transaction() as c:
            self._require(c, dep_id)
            c.executemany("INSERT INTO usage (deployment, ts, prompt_tokens, output_tokens, prefill, decode) "
                          "VALUES (?, ?, ?, ?, ?, ?)", values)
        return len(values)

    def usage(self, dep_id: str, since: str | None = None) -> list[Usage]:
        with self._read() as c:
            self._require(c, dep_id)
            sql, args = "SELECT * FROM usage WHERE deployment = ?", [dep_id]
            if since is not None:
                sql, args = sql + " AND ts >= ?", [*args, since]
            rows = c.execute(sql + " ORDER BY id", args).fetchall()
        return [Usage(r["deployment"], r["ts"], r["prompt_tokens"], r["output_tokens"], r["prefill"], r["decode"])
                for r in rows]


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _check_node_fields(fields: Mapping[str, Any]) -> None:
    bad = set(fields) - set(_NODE_COLUMNS)
    if bad:
        raise ValueError(f"unknown node fields: {sorted(bad)}")
    if "status" in fields and fields["status"] not in NODE_STATUSES:
        raise ValueError(f"node status {fields['status']!r} not in {NODE_STATUSES}")


def _node_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    if "spot" in out:
        out["spot"] = int(bool(out["spot"]))
    if "meta" in out:
        out["meta"] = json.dumps(dict(out["meta"] or {}), default=str)
    return out


def _deployment(r: sqlite3.Row) -> Deployment:
    return Deployment(r["id"], r["created_at"], r["status"], r["provider"], r["model"], r["budget_per_hour"],
                      json.loads(r["meta"]))


def _node(r: sqlite3.Row) -> NodeRecord:
    d = dict(r)
    d["spot"] = bool(d["spot"])
    d["meta"] = json.loads(d.get("meta") or "{}")
    return NodeRecord(**d)
