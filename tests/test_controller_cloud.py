"""The controller with the cloud side: the SkyPilot provider over FakeSkyCloud (the cloud boundary) for spot
preemptions and replacements, and a real node agent relaying a preemption notice from a metadata-service double."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from fakes.fake_sky import FakeSkyCloud
from provision_helpers import cheapest, max_concurrent_cost, plan_of
from test_controller import run_load, serve, wait_for

from thunderops.controller import Controller, ControllerConfig
from thunderops.provision.skypilot import SkyPilotProvider
from thunderops.serve import free_port, stop_pids
from thunderops.state import Store


def _spot_plan():
    """Three one-GPU L4 spot nodes on AWS; the budget leaves room for one on-demand replacement."""
    from thunderops.catalog import load_offers

    row = cheapest("L4", 1, cloud="aws", spot=True)
    plan = plan_of([(name, row, True) for name in ("a", "b", "c")], model="llama-2-7b")
    offers = load_offers(clouds="aws", gpus="L4")
    ondemand = float(offers[offers["gpus_per_node"] == 1]["price_ondemand"].min())
    spot = plan.instances[0].price_per_hour
    plan.budget_per_hour = round(plan.cost_per_hour - spot + ondemand + 0.01, 4)
    return plan


def test_spot_preemption_avoids_the_zone_then_falls_back_to_on_demand(tmp_path):
    cloud = FakeSkyCloud(tmp_path / "fake-sky.json")
    store = Store()
    plan = _spot_plan()
    store.create_deployment("spot", provider="skypilot", model=plan.model, budget_per_hour=plan.budget_per_hour)
    store.add_plan("spot", plan)
    prov = SkyPilotProvider(store, cloud, launch_timeout_s=10, cancel_grace_s=2)
    assert prov.up("spot", plan).ok
    s = serve(tmp_path, plan, deployment="spot", store=store, record_nodes=False)
    ctl = Controller("spot", store=store, provider=prov, launcher=s.engines,
                     config=ControllerConfig(interval_s=0.2, usage_interval_s=3600, restart_grace_s=1.0))
    try:
        def preempt(instance: str, group: str) -> None:
            rec = [r for r in store.nodes("spot") if r.instance_id == instance and r.live][-1]
            cloud.down(rec.cluster_name)  # the cloud takes the spot VM back
            os.killpg(s.engines.pids[group], signal.SIGKILL)

        def step_until(pred, what):
            return wait_for(lambda: (ctl.step(), pred())[1], 60, what)

        zone_a = plan.instance("a").zone
        preempt("a", "g0")
        first = step_until(lambda: [e for e in store.events("spot", "reprovisioned")], "first replacement")[0]
        (new_id,) = first.payload["instances"]
        repl = [r for r in store.nodes("spot") if r.instance_id == new_id][-1]
        assert repl.spot and repl.zone != zone_a  # spot again, elsewhere
        assert any(e.payload.get("preempted_zones") == [["aws", zone_a]] for e in store.events("spot", "reschedule"))
        assert [r.status for r in store.nodes("spot") if r.instance_id == "a"] == ["preempted"]
        (new_group,) = first.payload["groups"]
        preempt(new_id, new_group)
        step_until(lambda: len(store.events("spot", "reprovisioned")) >= 2, "second replacement")
        second = store.events("spot", "reprovisioned")[1]
        repl2 = [r for r in store.nodes("spot") if r.instance_id == second.payload["instances"][0]][-1]
        assert not repl2.spot  # spot kept failing for L4: on demand now
        final = store.latest_plan("spot")
        assert len(final.groups) == 3 and {i.id for i in final.instances} == {"b", "c", repl2.instance_id}
        assert max_concurrent_cost(store.nodes("spot")) <= plan.budget_per_hour + 1e-6
        assert set(s.table().replicas) == {g.id for g in final.groups}
        res = run_load(s, 40, concurrency=8)
        assert res.failures == [] and {r["decode_replica"] for r in s.usage()["records"][-40:]} >= {second.payload["groups"][0]}
    finally:
        ctl.close()
        s.stop()
        prov.down("spot")


class _EnginesFailOnce:
    """The engine boundary double for one bad start: the first `start` fails as engines that never became
    healthy do (a slow or broken node), later ones go to the real launcher."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def start(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise TimeoutError("engine(s) not healthy after 30 s")
        return self.inner.start(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_replacement_whose_engines_fail_is_torn_down_before_the_retry(tmp_path):
    cloud, store, plan, prov, s = _cloud_deployment(tmp_path, "retry")
    launcher = _EnginesFailOnce(s.engines)
    ctl = Controller("retry", store=store, provider=prov, launcher=launcher,
                     config=ControllerConfig(interval_s=0.2, usage_interval_s=3600, restart_grace_s=1.0,
                                             reprovision_backoff_s=0.3))
    try:
        rec = [r for r in store.nodes("retry") if r.instance_id == "a"][0]
        cloud.down(rec.cluster_name)  # the cloud takes the spot VM back
        os.killpg(s.engines.pids["g0"], signal.SIGKILL)
        wait_for(lambda: (ctl.step(), store.events("retry", "reprovisioned"))[1], 60, "the replacement")
        failed = store.events("retry", "reprovision-failed")
        assert len(failed) == 1 and "not healthy" in failed[0].message and launcher.calls == 2
        first = store.events("retry", "reprovision-start")[0].payload["replacements"]["a"]["id"]
        first_recs = [r for r in store.nodes("retry") if r.instance_id == first]
        assert first_recs and all(r.status == "terminated" for r in first_recs)  # not left billing
        assert all(r.cluster_name not in cloud.names() for r in first_recs)
        final = store.latest_plan("retry")
        assert len(final.groups) == 3 and first not in {i.id for i in final.instances}
        live = {r.cluster_name for r in store.nodes("retry", live_only=True)}
        assert live == cloud.names()  # nothing running that thunderops does not use or know
    finally:
        ctl.close()
        s.stop()
        prov.down("retry")


class _EnginesNeverBackOn:
    """The engine boundary double for a node with a broken GPU: engines restarted on instance `bad` never
    answer; on any other instance they start (the real launcher)."""

    def __init__(self, inner, bad: str) -> None:
        self.inner, self.bad, self.failed = inner, bad, 0

    def start(self, deployment, plan, groups, nodes):
        if any(self.bad in plan.group(g).instances for g in groups):
            self.failed += 1
            raise TimeoutError("engine(s) not healthy after 30 s")
        return self.inner.start(deployment, plan, groups, nodes)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_node_whose_engines_restarts_in_place_never_bring_back_is_replaced(tmp_path):
    """Before: after the last failed restart the controller gave up, and the node, up but serving nothing, went
    on billing for the rest of the deployment."""
    cloud, store, plan, prov, s = _cloud_deployment(tmp_path, "bad")
    launcher = _EnginesNeverBackOn(s.engines, "a")
    ctl = Controller("bad", store=store, provider=prov, launcher=launcher,
                     config=ControllerConfig(interval_s=0.2, usage_interval_s=3600, restart_grace_s=0.5,
                                             reprovision_backoff_s=0.2, max_reprovision_attempts=2))
    try:
        (rec_a,) = [r for r in store.nodes("bad") if r.instance_id == "a"]
        group = next(g.id for g in plan.groups if g.instances == ["a"])
        os.killpg(s.engines.pids[group], signal.SIGKILL)  # the engine dies; the cloud still lists the node
        wait_for(lambda: (ctl.step(), store.events("bad", "reprovisioned"))[1], 90, "the replacement")
        (abandoned,) = store.events("bad", "reprovision-abandoned")
        assert abandoned.payload["replace"] and launcher.failed == 2 and "replacing a" in abandoned.message
        assert rec_a.cluster_name not in cloud.names()  # torn down, not left billing
        (gone,) = [r for r in store.nodes("bad") if r.instance_id == "a"]
        assert gone.status == "terminated" and "restarts in place" in gone.error
        final = store.latest_plan("bad")
        assert len(final.groups) == 3 and "a" not in {i.id for i in final.instances}
        assert {r.cluster_name for r in store.nodes("bad", live_only=True)} == cloud.names()
        assert max_concurrent_cost(store.nodes("bad")) <= plan.budget_per_hour + 1e-6
    finally:
        ctl.close()
        s.stop()
        prov.down("bad")


class _Metadata(http.server.BaseHTTPRequestHandler):
    """GCP's metadata service double: instance/preempted answers FALSE until the test flips it."""

    preempted = False

    def do_GET(self):  # noqa: N802
        body = b"TRUE" if _Metadata.preempted else b"FALSE"
        self.send_response(200)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_preemption_notice_moves_traffic_off_the_node_before_it_dies(tmp_path):
    from test_controller import small_plan

    from thunderops.agent import client_tls, deployment_tls, deployment_token, token_path

    plan = small_plan(3, spot=True)
    s = serve(tmp_path, plan, deployment="ntc")
    deployment_token("ntc")
    cert, key = deployment_tls("ntc")  # the agent speaks HTTPS, as on a provisioned node
    meta = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=meta.serve_forever, daemon=True).start()
    victim = plan.groups[0]
    inst = victim.instances[0]
    port = free_port()
    agent = subprocess.Popen([sys.executable, "-m", "thunderops.agent", "--host", "127.0.0.1", "--port", str(port),
                              "--data-port", "0", "--iperf-port", "0", "--token-file", str(token_path("ntc")),
                              "--cloud", "gcp", "--metadata-url", f"http://127.0.0.1:{meta.server_port}"],
                             env={**os.environ, "THUNDEROPS_AGENT_TLS_CERT": cert, "THUNDEROPS_AGENT_TLS_KEY": key},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rec = [r for r in s.store.nodes("ntc") if r.instance_id == inst][0]
    s.store.update_node(rec.id, agent_port=port)
    try:
        wait_for(lambda: _up(f"https://127.0.0.1:{port}/v1/health", verify=client_tls(cert)), 30, "the agent")
        ctl = Controller("ntc", store=s.store, config=ControllerConfig(interval_s=0.2, notice_interval_s=0.2,
                                                                        usage_interval_s=3600))
        for _ in range(3):
            ctl.step()
        assert s.store.events("ntc", "reschedule") == []  # no notice, nothing to do
        _Metadata.preempted = True
        # GCP gives 30 s of notice: the reschedule must land well inside it (wait_for fails past 10 s); the
        # speed of the decision itself is bench/bench_reschedule*.py's business, not a wall-clock assert here
        ev = wait_for(lambda: (ctl.step(), s.store.events("ntc", "reschedule"))[1], 10, "reschedule")[0]
        assert ev.payload["lost"] == {inst: "preemption notice"}
        assert [e.payload["instance"] for e in s.store.events("ntc", "preemption-notice")] == [inst]
        assert victim.id not in s.table().replicas
        assert httpx.get(s.engines.urls[victim.id] + "/health").status_code == 200  # moved before it died
        assert [r.status for r in s.store.nodes("ntc") if r.instance_id == inst] == ["preempted"]
        ctl.close()
    finally:
        _Metadata.preempted = False
        meta.shutdown()
        stop_pids([agent.pid])
        s.stop()


def _up(url: str, verify=True) -> bool:
    try:
        httpx.get(url, timeout=0.5, verify=verify)
        return True
    except httpx.HTTPError:
        return False



def test_controller_killed_mid_reprovision_restarts_finishes_it_and_leaks_nothing(tmp_path):
    """`thunderops watch` as a process, SIGKILLed while a replacement is launching: the restarted one tears
    down the half-launched node, reprovisions once, and no decision is taken twice."""
    from thunderops.controller import save_router

    cloud = FakeSkyCloud(tmp_path / "fake-sky.json")
    store = Store()
    plan = _spot_plan()
    store.create_deployment("crash", provider="skypilot", model=plan.model, budget_per_hour=plan.budget_per_hour)
    store.add_plan("crash", plan)
    prov = SkyPilotProvider(store, cloud, launch_timeout_s=30, cancel_grace_s=2)
    assert prov.up("crash", plan).ok
    s = serve(tmp_path, plan, deployment="crash", store=store, record_nodes=False)
    save_router("crash", s.url, s.api_key, engines={"kind": "local-emulators", "engine_key": s.engines.engine_key,
                                                     "speedup": 20, "owner_pid": os.getpid()})
    env = {**os.environ, "THUNDEROPS_SKY_ADAPTER": "fakes.fake_sky:FakeSkyCloud",
           "FAKE_SKY_STATE": str(tmp_path / "fake-sky.json"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-c", "from thunderops.cli import main; main()", "watch", "crash", "--interval", "0.2"]
    logs = []

    def watch() -> subprocess.Popen:
        log = open(tmp_path / f"watch-{len(logs)}.log", "w")
        logs.append(log)
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    procs = [watch()]
    try:
        wait_for(lambda: store.events("crash", "controller-start"), 60, "the controller to start")
        cloud.set(launch_delay_s=60)  # replacements take long: time to kill the controller mid-launch
        rec = [r for r in store.nodes("crash") if r.instance_id == "a"][0]
        cloud.down(rec.cluster_name)
        os.killpg(s.engines.pids["g0"], signal.SIGKILL)
        wait_for(lambda: [r for r in store.nodes("crash") if r.instance_id.startswith("ar") and r.status == "provisioning"
                          and r.cluster_name in cloud.names()], 30, "a replacement launching")
        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait(10)
        half = [r for r in store.nodes("crash") if r.instance_id.startswith("ar")][0]
        assert half.cluster_name in cloud.names()  # the launch had made a cluster before the crash
        cloud.set(launch_delay_s=0)
        procs.append(watch())
        wait_for(lambda: store.events("crash", "reprovisioned"), 90, "the restarted controller to finish")
        assert half.cluster_name not in cloud.names()  # torn down, not leaked
        assert store.node(half.id).status == "terminated"
        assert len(store.events("crash", "orphans")) == 1
        assert len([e for e in store.events("crash", "reschedule") if e.payload["lost"]]) == 1
        keys = [e.payload["key"] for e in store.events("crash", "reprovisioned")]
        assert len(keys) == len(set(keys)) == 1
        final = store.latest_plan("crash")
        assert len(final.groups) == 3 and set(s.table().replicas) == {g.id for g in final.groups}
        live = {r.cluster_name for r in store.nodes("crash", live_only=True)}
        assert live == cloud.names()  # the store and the cloud agree: nothing running unknown to us
        assert [e.payload["restart"] for e in store.events("crash", "controller-start")] == [False, True]
    finally:
        for p in procs:
            stop_pids([p.pid])
        for log in logs:
            log.close()
        s.stop()
        prov.down("crash")


def _cloud_deployment(tmp_path, dep: str, *, nodes: int = 3):
    cloud = FakeSkyCloud(tmp_path / "fake-sky.json")
    store = Store()
    plan = _spot_plan()
    store.create_deployment(dep, provider="skypilot", model=plan.model, budget_per_hour=plan.budget_per_hour)
    store.add_plan(dep, plan)
    prov = SkyPilotProvider(store, cloud, launch_timeout_s=10, cancel_grace_s=2)
    assert prov.up(dep, plan).ok
    return cloud, store, plan, prov, serve(tmp_path, plan, deployment=dep, store=store, record_nodes=False)


def test_spend_limit_tears_everything_down_before_passing_it(tmp_path):
    cloud, store, plan, prov, s = _cloud_deployment(tmp_path, "money")
    try:
        # $/h x (elapsed + the 60 s horizon) passes the limit about 2 s from now
        limit = plan.cost_per_hour * 62 / 3600
        ctl = Controller("money", store=store, provider=prov, launcher=s.engines,
                         config=ControllerConfig(interval_s=0.2, max_spend=limit, spend_horizon_s=60,
                                                 usage_interval_s=3600))
        st = ctl.run(duration_s=30)
        ctl.close()
        assert st.state == "stopped" and "max-spend" in st.message
        assert cloud.names() == set()  # every cluster gone
        ev = store.events("money", "spend-limit")
        assert len(ev) == 1 and ev[0].payload["spend"] < limit
        assert store.spend("money") < limit
    finally:
        s.stop()
        prov.down("money")


def test_all_nodes_lost_gives_a_clear_status_and_reprovision_attempts_not_a_crash_loop(tmp_path):
    cloud, store, plan, prov, s = _cloud_deployment(tmp_path, "gone")
    try:
        cloud.add_rule("to-gone-", "capacity", times=1000)  # no capacity anywhere, any offer
        for r in store.nodes("gone"):
            cloud.down(r.cluster_name)  # every spot VM taken back at once
        s.engines.stop()
        ctl = Controller("gone", store=store, provider=prov, launcher=s.engines,
                         config=ControllerConfig(interval_s=0.1, reprovision_backoff_s=0.3, max_reprovision_attempts=3,
                                                 usage_interval_s=3600))
        st = ctl.run(duration_s=8)
        ctl.close()
        assert st.state == "all-lost" and st.replicas == [] and "every replica is lost" in st.message
        assert len(store.events("gone", "all-lost")) == 1
        kinds = [e.kind for e in store.events("gone")]
        assert kinds.count("reprovision-failed") == 2 and kinds.count("reprovision-abandoned") == 1
        assert "controller-error" not in kinds
        assert cloud.names() == set()  # failed launches left nothing behind
        assert httpx.get(s.url + "/health").status_code == 503  # the router says so too
    finally:
        s.stop()
        prov.down("gone")
