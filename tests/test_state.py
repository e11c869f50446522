"""The SQLite state store: schema, migrations, API, file mode, and crash safety under SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta

import pytest

from thunderops.errors import StateError, UserError
from thunderops.plan import Group, Instance, Plan, Stage
from thunderops.state import SCHEMA_VERSION, Store, default_db_path


def small_plan(cost: float = 3.0) -> Plan:
    inst = Instance(id="i0", cloud="aws", region="us-east-1", zone="us-east-1a", instance_type="g5.xlarge",
                    gpu="A10G", gpus=1, spot=False, price_per_hour=cost, source="test", as_of="2026-01-01")
    return Plan(model="llama-2-7b", budget_per_hour=10.0, cost_per_hour=cost, instances=[inst],
                groups=[Group(id="g0", phase="colocated", stages=[Stage(instance="i0", gpu="A10G", tp=1, layers=32)])],
                routing=[])


def test_store_lives_under_thunderops_home_in_wal_mode_with_mode_0600(thunderops_home):
    store = Store()
    assert store.path == thunderops_home / "state.db" == default_db_path()
    store.create_deployment("d1", model="llama-2-7b")
    store.add_event("d1", "test", "hello")
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    for p in thunderops_home.iterdir():
        if p.name.startswith("state.db"):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_plans_are_versioned_and_round_trip():
    store = Store()
    store.create_deployment("d1")
    assert store.add_plan("d1", small_plan(3.0), reason="initial") == 1
    assert store.add_plan("d1", small_plan(4.5), reason="reschedule") == 2
    assert store.plan_versions("d1") == [1, 2]
    latest = store.latest_plan("d1")
    assert latest.version == 2 and latest.cost_per_hour == 4.5
    assert store.plan("d1", 1).cost_per_hour == 3.0
    assert latest.groups[0].stages[0].layers == 32


def test_unknown_deployment_is_one_line_user_error():
    store = Store()
    store.create_deployment("known")
    for call in (lambda: store.latest_plan("nope"), lambda: store.nodes("nope"),
                 lambda: store.add_event("nope", "x"), lambda: store.record_usage("nope", [])):
        with pytest.raises(StateError) as e:
            call()
        assert isinstance(e.value, UserError)
        assert "\n" not in str(e.value) and "nope" in str(e.value) and "known" in str(e.value)


def test_bad_deployment_names_and_duplicates_are_refused():
    store = Store()
    for bad in ("Upper", "1abc", "a" * 17, "a b", "x;rm", "a-b"):
        with pytest.raises(StateError):
            store.create_deployment(bad)
    store.create_deployment("ok1")
    with pytest.raises(StateError, match="already exists"):
        store.create_deployment("ok1")
    assert [d.id for d in store.deployments()] == ["ok1"]


def test_nodes_intent_then_outcome_and_spend():
    store = Store()
    store.create_deployment("d1")
    store.record_node_intent("d1", "d1-i0-1", "i0", "to-d1-i0-1", cloud="aws", gpu="A10G", gpus=1,
                             spot=True, price_per_hour=2.0)
    n = store.node("d1-i0-1")
    assert n.status == "intent" and n.spot is True and n.live
    launched = datetime.now(UTC) - timedelta(hours=1.5)
    store.update_node("d1-i0-1", status="ready", host="10.0.0.1", launched_at=launched.isoformat())
    assert store.cost_per_hour("d1") == 2.0
    assert store.spend("d1") == pytest.approx(3.0, rel=1e-3)  # 2 $/h x 1.5 h
    store.update_node("d1-i0-1", status="terminated", terminated_at=(launched + timedelta(hours=1)).isoformat())
    assert store.spend("d1") == pytest.approx(2.0)
    assert store.nodes("d1", live_only=True) == []
    with pytest.raises(ValueError):
        store.update_node("d1-i0-1", status="bogus")
    with pytest.raises(ValueError):
        store.update_node("d1-i0-1", price="1; DROP TABLE nodes")


def test_events_and_usage():
    store = Store()
    store.create_deployment("d1")
    store.add_event("d1", "reschedule", "light", {"before": 1, "after": 2})
    store.add_event("d1", "preempted", "i3 gone")
    assert [e.kind for e in store.events("d1")] == ["reschedule", "preempted"]
    assert store.events("d1", kind="reschedule")[0].payload == {"before": 1, "after": 2}
    n = store.record_usage("d1", [{"prompt_tokens": 100, "output_tokens": 7, "prefill": "g0", "decode": "g1"},
                                  {"prompt_tokens": 50, "output_tokens": 3, "prefill": "g0", "decode": "g2"}])
    assert n == 2
    rows = store.usage("d1")
    assert sum(r.prompt_tokens for r in rows) == 150 and {r.decode for r in rows} == {"g1", "g2"}


def test_transaction_groups_writes_and_rolls_back_on_error():
    store = Store()
    store.create_deployment("d1")
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.add_plan("d1", small_plan())
            store.add_event("d1", "x")
            raise RuntimeError("boom")
    assert store.plan_versions("d1") == [] and store.events("d1") == []


def test_concurrent_writers_from_threads_lose_nothing():
    store = Store()
    store.create_deployment("d1")

    def work(k):
        for i in range(20):
            store.add_event("d1", "tick", f"{k}-{i}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({e.message for e in store.events("d1")}) == 80


def test_a_v1_database_is_migrated_in_place_keeping_its_rows(thunderops_home):
    import thunderops.state as state_mod

    thunderops_home.mkdir(parents=True)
    path = thunderops_home / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(state_mod.MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    conn.execute("INSERT INTO deployments (id, created_at, status) VALUES ('old', '2026-01-01T00:00:00+00:00', 'up')")
    conn.execute("INSERT INTO nodes (id, deployment, instance_id, cluster_name, status, created_at) "
                 "VALUES ('n1', 'old', 'i0', 'to-old-i0-1', 'ready', '2026-01-01T00:00:00+00:00')")
    conn.commit()
    conn.close()
    store = Store(path)
    assert store.node("n1").meta == {} and store.deployment("old").status == "up"
    store.update_node("n1", meta={"pids": [1, 2]})
    assert store.node("n1").meta == {"pids": [1, 2]}
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 2
    conn.close()


def test_migration_from_an_older_schema_and_refusal_of_a_newer_one(thunderops_home):
    thunderops_home.mkdir(parents=True)
    path = thunderops_home / "state.db"
    sqlite3.connect(path).close()  # version 0: an empty database
    store = Store(path)
    store.create_deployment("d1")
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="newer"):
        Store(path)


def test_a_file_that_is_not_a_database_is_a_user_error(thunderops_home):
    thunderops_home.mkdir(parents=True)
    (thunderops_home / "state.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="state.db"):
        Store()


_MID_TX_WRITER = textwrap.dedent("""
    import sys, time
    from thunderops.state import Store
    from tests.test_state import small_plan
    store = Store(sys.argv[1])
    with store.transaction():
        store.add_plan("d1", small_plan(9.0), reason="new")
        store.add_event("d1", "new-state")
        store.update_node("n1", status="ready", host="10.1.1.1")
        print("MID", flush=True)
        time.sleep(60)
""")


def test_sigkill_in_the_middle_of_a_transaction_keeps_the_old_state(thunderops_home):
    store = Store()
    store.create_deployment("d1")
    store.add_plan("d1", small_plan(3.0))
    store.record_node_intent("d1", "n1", "i0", "to-d1-i0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", _MID_TX_WRITER, str(store.path)], cwd=root,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "MID"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    reopened = Store()
    assert _integrity(reopened) == "ok"
    assert reopened.plan_versions("d1") == [1] and reopened.latest_plan("d1").cost_per_hour == 3.0
    assert reopened.events("d1") == []
    assert reopened.node("n1").status == "intent" and reopened.node("n1").host is None
    reopened.add_event("d1", "after-crash")  # the killed writer's lock is gone
    assert [e.kind for e in reopened.events("d1")] == ["after-crash"]


_LOOP_WRITER = textwrap.dedent("""
    import sys
    from thunderops.state import Store
    from tests.test_state import small_plan
    store = Store(sys.argv[1])
    print("GO", flush=True)
    while True:
        with store.transaction():
            v = store.add_plan("d1", small_plan(1.0))
            store.add_event("d1", "step", payload={"after": v})
            store.record_usage("d1", [{"prompt_tokens": v, "output_tokens": 1}] * 50)
""")


def test_sigkill_at_random_moments_leaves_whole_transactions_only(thunderops_home):
    store = Store()
    store.create_deployment("d1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rng = random.Random(7)
    last = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _LOOP_WRITER, str(store.path)], cwd=root,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "GO"
            threading.Event().wait(rng.uniform(0.05, 0.4))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        s = Store()
        assert _integrity(s) == "ok"
        versions = s.plan_versions("d1")
        assert versions == list(range(1, len(versions) + 1))
        assert [e.payload["after"] for e in s.events("d1")] == versions
        assert len(s.usage("d1")) == 50 * len(versions)
        assert len(versions) >= last
        last = len(versions)
    assert last > 0  # the writers did commit something


def _integrity(store: Store) -> str:
    conn = sqlite3.connect(store.path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
