"""The watch loop: the Controller class (looking, dropping, rescheduling, pushing routing, spend guard,
workload shift; reprovisioning is mixed in from thunderops.controller.reprovision) and start_background."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from thunderops.agent import client_tls, deployment_tls, deployment_token
from thunderops.controller.config import GONE_STATUSES, ControllerConfig, ControllerError
from thunderops.controller.engines import EngineLauncher
from thunderops.controller.reprovision import Pending, Reprovisioning
from thunderops.controller.router_access import RouterAdmin, launcher_from, load_router, save_router
from thunderops.controller.surgery import (
    _routes_of,
    _workload_dict,
    observed_workload,
    with_fallbacks,
)
from thunderops.errors import PlanError, UserError
from thunderops.plan import Group, Instance, Plan, Route, Stage, goodput_change
from thunderops.provision import AGENT_PORT
from thunderops.state import Store, default_home, now_utc, parse_ts
from thunderops.workload import plan_workload

log = logging.getLogger(__name__)


@dataclass
class ControllerStatus:
    deployment: str
    state: str  # watching | degraded | all-lost | reprovisioning | stopped
    plan_version: int
    replicas: list[str]
    dead: list[str]
    pending_reprovision: list[str]
    spend: float  # $ so far
    cost_per_hour: float  # $/h of running nodes
    message: str = ""


class Controller(Reprovisioning):
    """Watches one deployment and acts on what it sees. `step()` is one look (for tests); `run()` loops.
    Bringing lost replicas back is in `Reprovisioning` (thunderops/controller/reprovision.py)."""

    def __init__(self, deployment: str, *, store: Store | None = None, provider: Any = None,
                 router_url: str | None = None, admin_key: str | None = None, launcher: EngineLauncher | None = None,
                 config: ControllerConfig | None = None, offers: Any = None,
                 on_event: Callable[[str, str, dict[str, Any]], None] | None = None) -> None:
        self.deployment = deployment
        self.store = store or Store()
        dep = self.store.deployment(deployment)  # one-line error for an unknown deployment
        self.config = config or ControllerConfig()
        if provider is None and dep.provider:
            from thunderops.provision import get_provider

            provider = get_provider(dep.provider, store=self.store)
        self.provider = provider
        url, key = load_router(deployment, router_url, admin_key)
        self.router = RouterAdmin(url, key, timeout_s=max(2.0, self.config.probe_timeout_s * 4))
        self.launcher: EngineLauncher = launcher or launcher_from(deployment, self.config.engine_timeout_s)
        self._offers = offers
        self.on_event = on_event
        self.urls: dict[str, str] = {}  # group id -> engine URL
        self.fails: dict[str, int] = {}  # group id -> failed probes in a row (shown in events)
        self.first_fail: dict[str, float] = {}  # group id -> wall time of the first failed probe in the row
        self.dead: set[str] = set()  # groups out of the router (engine gone)
        self.doomed: dict[str, dict[str, Any]] = {}  # instance -> preemption notice
        self.suspect: dict[str, str] = {}  # instance -> why: engines that restarts in place never brought back
        self.provider_alive: set[str] | None = None  # instances the provider last reported ready
        self.pending: dict[str, Pending] = {}
        self.avoid: dict[tuple[str, str], float] = {}  # (cloud, zone) -> avoid until (wall time)
        self.spot_failures: dict[str, int] = {}  # GPU type -> spot losses and failed spot launches
        self.state = "watching"
        self.message = ""
        self._lock = threading.RLock()  # one decision at a time (watch loop and reprovision thread)
        self._stop = threading.Event()
        self._last = {"provider": 0.0, "notice": 0.0, "usage": 0.0}
        self._probe_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="probe")
        self._worker: threading.Thread | None = None
        # engines and agents of a deployment with a TLS pair serve HTTPS with it: the one certificate trusted
        pair = deployment_tls(self.deployment, create=False)
        self._http = httpx.Client(timeout=self.config.probe_timeout_s, verify=client_tls(pair[0]) if pair else True)
        self._agents_http = (self._http, "https" if pair else "http")
        self._stopped_for_spend = False
        self._recover()

    # -- events ------------------------------------------------------------------------------------------
    def event(self, kind: str, message: str, payload: Mapping[str, Any] | None = None) -> int:
        payload = dict(payload or {})
        eid = self.store.add_event(self.deployment, kind, message, payload)
        log.info("%s: %s", kind, message)
        if self.on_event:
            try:
                self.on_event(kind, message, payload)
            except Exception:  # a display callback must never stop the controller
                log.exception("on_event failed")
        return eid

    # -- restart -----------------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Rebuild what the loop needs from the store and the router: URLs, pending reprovisions, avoided zones,
        spot failures; and make the router serve the latest plan if a crash came between storing and pushing."""
        events = self.store.events(self.deployment)
        now = time.time()
        done = {e.payload.get("key") for e in events if e.kind in ("reprovisioned", "reprovision-abandoned")}
        for e in events:
            p = e.payload
            if e.kind == "reschedule" and p.get("key") and p.get("reprovision") and p["key"] not in done:
                self.pending[p["key"]] = Pending(p["key"], [Instance(**i) for i in p["reprovision"]["instances"]],
                                                 [Group(g["id"], g["phase"], [Stage(**s) for s in g["stages"]])
                                                  for g in p["reprovision"]["groups"]])
            if e.kind == "reschedule":
                for z in p.get("preempted_zones", []):
                    until = parse_ts(e.ts).timestamp() + self.config.avoid_zone_s
                    if until > now:
                        self.avoid[(z[0], z[1])] = until
                for gpu in p.get("spot_lost", []):
                    self.spot_failures[gpu] = self.spot_failures.get(gpu, 0) + 1
            if e.kind == "reprovision-failed" and p.get("spot_gpu"):
                self.spot_failures[p["spot_gpu"]] = self.spot_failures.get(p["spot_gpu"], 0) + 1
        try:
            table = self.router.table()
        except httpx.HTTPError as e:
            raise ControllerError(f"cannot reach the router at {self.router.url} ({type(e).__name__}); "
                                  "is the deployment serving? (`thunderops status`)") from None
        self.urls = {rid: rep.url for rid, rep in table.replicas.items()}
        known = [k for k in (self.store.events(self.deployment, "controller-start")) if k]
        plan = self.store.latest_plan(self.deployment)
        in_plan = {i.id for i in plan.instances}
        orphans = [r for r in self.store.nodes(self.deployment, live_only=True) if r.instance_id not in in_plan]
        if orphans and self._can_terminate():  # launched by a reprovision that a crash interrupted (or lost, not yet torn down)
            self.event("orphans", f"tearing down {len(orphans)} node(s) outside plan v{plan.version}: "
                       f"{', '.join(r.cluster_name for r in orphans)}", {"nodes": [r.id for r in orphans]})
            self._terminate(orphans, wait=True)
        if plan.groups and all(g.id in self.urls for g in plan.groups) \
                and _routes_of(self.table_for(plan)) != _routes_of(table):
            self._push(plan, "the router was not on the latest plan")
        self.event("controller-start", f"watching plan v{plan.version} ({len(plan.groups)} replicas"
                   f"{', restarted' if known else ''})",
                   {"plan_version": plan.version, "pending": sorted(self.pending), "restart": bool(known)})

    def _can_terminate(self) -> bool:
        return self.provider is not None and (hasattr(self.provider, "down_node") or hasattr(self.provider, "cloud"))

    def _terminate(self, recs: list[Any], wait: bool = False) -> None:
        """Stop paying for nodes we no longer use: the provider's per-node teardown where it has one
        (`down_node(node_id)`, or SkyPilot's cluster down), then record them terminated."""
        if not recs or not self._can_terminate():
            return

        def run() -> None:
            for rec in recs:
                try:
                    if hasattr(self.provider, "down_node"):
                        self.provider.down_node(rec.id)
                    elif hasattr(self.provider, "cloud"):
                        self.provider.cloud.down(rec.cluster_name)
                    else:
                        continue
                    cur = self.store.node(rec.id)
                    if cur.live or not cur.terminated_at:
                        self.store.update_node(rec.id, status="terminated" if cur.status != "preempted" else "preempted",
                                               terminated_at=cur.terminated_at or now_utc())
                except Exception as e:  # keep going; `thunderops down` reconciles what is left
                    log.warning("could not tear down %s: %s", rec.cluster_name, e)

        if wait:
            run()
        else:
            threading.Thread(target=run, name="teardown", daemon=True).start()

    # -- looking -----------------------------------------------------------------------------------------
    def _probe(self, gid: str, url: str) -> bool | None:
        """True healthy, False refused (dead now), None timed out or erred (dead after fail_threshold)."""
        try:
            return self._http.get(url + "/health").status_code == 200 or None
        except httpx.ConnectError:
            return False
        except httpx.HTTPError:
            return None

    def probe_engines(self, plan: Plan) -> set[str]:
        """Groups of the plan whose engine is down now."""
        groups = [g.id for g in plan.groups if g.id in self.urls]
        results = list(self._probe_pool.map(lambda gid: self._probe(gid, self.urls[gid]), groups))
        now = time.time()
        down = set()
        for gid, ok in zip(groups, results, strict=True):
            if ok is True:
                self.fails.pop(gid, None)
                self.first_fail.pop(gid, None)
                continue
            self.fails[gid] = self.fails.get(gid, 0) + 1
            self.first_fail.setdefault(gid, now)
            if ok is False or now - self.first_fail[gid] >= self.config.fail_after_s:
                down.add(gid)
        return down

    def provider_lost(self, plan: Plan) -> dict[str, str]:
        """Plan instances the provider reports gone (instance id -> status)."""
        if self.provider is None:
            return {}
        try:
            nodes = self.provider.status(self.deployment)
        except Exception as e:  # a flaky cloud API must not stop the loop; engine probes still run
            log.warning("provider status failed: %s", e)
            return {}
        ids = {i.id for i in plan.instances}
        latest: dict[str, Any] = {}
        for n in nodes:  # the last record of each instance (relaunches append new ones)
            if n.instance_id in ids:
                latest[n.instance_id] = n
        self.provider_alive = {iid for iid, n in latest.items() if n.status == "ready"}
        return {iid: n.status for iid, n in latest.items() if n.status in GONE_STATUSES}

    def _agent_client(self) -> tuple[httpx.Client, str]:
        """The client for the deployment's agents: HTTPS pinned to its certificate where it has one."""
        return self._agents_http

    def notices(self, plan: Plan) -> dict[str, dict[str, Any]]:
        """Preemption notices from the agents of the plan's ready nodes."""
        try:
            token = deployment_token(self.deployment, create=False)
            http, scheme = self._agent_client()
        except UserError:
            return {}
        ids = {i.id for i in plan.instances}
        recs = [r for r in self.store.nodes(self.deployment) if r.status == "ready" and r.host and r.instance_id in ids]

        def ask(rec) -> tuple[str, dict[str, Any] | None]:
            try:
                r = http.get(f"{scheme}://{rec.host}:{rec.agent_port or AGENT_PORT}/v1/preemption",
                             headers={"Authorization": f"Bearer {token}"})
                return rec.instance_id, (r.json() if r.status_code == 200 else None)
            except (httpx.HTTPError, ValueError):
                return rec.instance_id, None

        out = {}
        for iid, res in self._probe_pool.map(ask, recs):
            if res and res.get("notice"):
                out[iid] = res
        return out

    # -- one step ----------------------------------------------------------------------------------------
    def step(self) -> None:
        """Look once and act on what is new."""
        with self._lock:
            plan = self.store.latest_plan(self.deployment)
            t_look = time.time()
            down = self.probe_engines(plan)
            now = time.monotonic()
            gone: dict[str, str] = {}
            if now - self._last["provider"] >= self.config.provider_interval_s:
                self._last["provider"] = now
                gone = self.provider_lost(plan)
            if now - self._last["notice"] >= self.config.notice_interval_s:
                self._last["notice"] = now
                for iid, notice in self.notices(plan).items():
                    if iid not in self.doomed:
                        self.doomed[iid] = notice
                        self.event("preemption-notice", f"{iid}: {notice.get('cloud')} notice "
                                   f"({notice.get('action') or 'preempted'})", {"instance": iid, "notice": notice})
            newly = down - self.dead
            if newly:  # out of the router at once, before any planning
                self.dead |= newly
                self._drop(newly, plan)
            lost = self._lost_instances(plan, down, gone)
            dead_in_plan = {g.id for g in plan.groups} & self.dead
            if lost or dead_in_plan:
                self._on_lost(plan, lost, dead_in_plan, t_look)
            elif not plan.groups:
                self.state = "all-lost"
            self._spend_guard(plan)
            if now - self._last["usage"] >= self.config.usage_interval_s:
                self._last["usage"] = now
                self._check_shift(plan)
        self._kick_reprovision()

    def _lost_instances(self, plan: Plan, down: set[str], gone: dict[str, str]) -> dict[str, str]:
        """Instances whose replicas must go: gone per the provider, doomed by a notice, or all of whose
        engines are down (a killed node takes its engines with it)."""
        lost = {iid: f"provider: {st}" for iid, st in gone.items()}
        ids = {i.id for i in plan.instances}
        lost.update({iid: "preemption notice" for iid in self.doomed if iid in ids})
        lost.update({iid: why for iid, why in self.suspect.items() if iid in ids})
        for inst in plan.instances:
            if self.provider_alive is not None and inst.id in self.provider_alive:
                continue  # the node is up: only its engines died (their groups restart on it)
            on = [g.id for g in plan.groups if inst.id in g.instances]
            if on and all(g in down for g in on) and inst.id not in lost:
                lost[inst.id] = "engines down"
        return lost

    def _drop(self, groups: set[str], plan: Plan) -> None:
        t0 = time.perf_counter()
        try:
            table = self.router.table()
            kept = {k: v for k, v in table.replicas.items() if k not in groups}
            pushed = False
            if kept:
                from thunderops.serve.router import RoutingTable

                routes = tuple(r for r in table.routes if r.prefill in kept and r.decode in kept)
                alive = with_fallbacks(RoutingTable(kept, routes or tuple(Route(k, k, 1.0) for k in kept),
                                                    table.version + 1))
                self.router.push(alive)
                pushed = True
        except Exception as e:  # the router still skips replicas it cannot reach; the reschedule follows
            log.warning("could not drop %s from the router: %s", groups, e)
            pushed = False
        first = min(self.first_fail.get(g, time.time()) for g in groups)
        self.event("replicas-dropped", f"{', '.join(sorted(groups))} out of the router", {
            "groups": sorted(groups), "plan_version": plan.version, "pushed": pushed,
            "first_failure_at": first, "detected_at": time.time(), "push_s": round(time.perf_counter() - t0, 4)})

    def _on_lost(self, plan: Plan, lost: dict[str, str], dead: set[str], t_look: float) -> None:
        """Lost instances (to replace) and dead groups (engines to restart): drop, reschedule, record, push."""
        from thunderops.scheduler.reschedule import reschedule

        key = f"v{plan.version}:lost:{','.join(sorted(lost))}:dead:{','.join(sorted(dead))}"
        lost_groups = [g for g in plan.groups if set(g.instances) & set(lost) or g.id in dead]
        dead_groups = {g.id for g in lost_groups}
        newly = dead_groups - self.dead
        if newly:
            self.dead |= newly
            self._drop(newly, plan)
        t0 = time.perf_counter()
        detected = min([self.first_fail.get(g, t_look) for g in dead_groups] or [t_look])
        insts = [plan.instance(i) for i in lost]
        before_goodput = plan.predicted.goodput_rps
        base = copy.deepcopy(plan)  # groups whose engines died on live nodes go too (they come back by restart)
        base.groups = [g for g in plan.groups if g.id not in dead_groups or set(g.instances) & set(lost)]
        base.routing = [r for r in plan.routing if r.prefill not in dead and r.decode not in dead]
        try:
            new = reschedule(base, lost_instances=lost, workload=plan_workload(plan))
            full = False
        except PlanError:
            new = None
            full = True
        decision_s = time.perf_counter() - t0
        restart = sorted(dead_groups - {g.id for g in plan.groups if set(g.instances) & set(lost)})
        what = "; ".join(x for x in (f"lost {', '.join(sorted(lost))}" if lost else "",
                                     f"engines of {', '.join(restart)} died" if restart else "") if x)
        preempted_zones = sorted({(i.cloud, i.zone) for i in insts if i.spot and i.zone
                                  and ("notice" in lost[i.id] or "provider" in lost[i.id])})
        spot_lost = [i.gpu for i in insts if i.spot]
        # what to bring back (with no provider, only engines on live nodes can come back)
        back = lost_groups if self.provider is not None else [g for g in lost_groups if g.id in restart]
        needed = [plan.instance(i) for i in dict.fromkeys(i for g in back for i in g.instances)]
        reprov = ({"instances": [asdict(i) for i in needed], "groups": [asdict(g) for g in back]}
                  if back and self.config.reprovision else None)
        gone_recs = [r for r in self.store.nodes(self.deployment, live_only=True) if r.instance_id in lost]
        with self.store.transaction():
            for rec in gone_recs:
                why = lost[rec.instance_id]
                # the provider saw it go (a spot VM taken back, a dead Ray node) or a notice says it will; a node
                # whose engines died may still be up and billing: `failed` until torn down
                status = ("preempted" if rec.spot else "terminated") if ("notice" in why or "provider" in why) \
                    else "failed"
                self.store.update_node(rec.id, status=status, terminated_at=now_utc(), error=why[:200])
            if new is None:
                # Nothing survives: keep the plan empty of groups so the status is plain, and reprovision all.
                empty = copy.deepcopy(plan)
                empty.instances = [i for i in plan.instances if i.id not in lost]
                empty.groups, empty.routing = [], []
                empty.cost_per_hour = round(sum(i.price_per_hour for i in empty.instances), 4)
                empty.predicted = type(plan.predicted)()
                empty.inputs = {**plan.inputs, "rescheduled": "all-lost", "lost": sorted(lost)}
                after = self.store.add_plan(self.deployment, empty, reason=f"all replicas lost ({what})")
                self.state, self.message = "all-lost", "every replica is lost; reprovisioning"
                self.event("all-lost", f"every replica is lost ({what}); "
                           "requests get 503 until replacements are up", {
                               "key": key, "before": plan.version, "after": after, "lost": lost,
                               "reprovision": reprov, "preempted_zones": preempted_zones, "spot_lost": spot_lost})
                self.event("reschedule", "no survivors: reprovisioning everything", {
                    "key": key, "before": plan.version, "after": after, "lost": lost, "light": False,
                    "decision_s": round(decision_s, 4), "detected_at": detected, "decided_at": time.time(),
                    "predicted": {"goodput_before": before_goodput, "goodput_after": 0.0},
                    "reprovision": reprov, "preempted_zones": preempted_zones, "spot_lost": spot_lost})
            else:
                after = self.store.add_plan(self.deployment, new, reason=f"light reschedule: {what}")
                self.state = "degraded"
                self.event("reschedule", f"{what}: {len(plan.groups)} -> {len(new.groups)} "
                           f"replicas, predicted goodput {goodput_change(plan.predicted, new.predicted)} "
                           f"(decided in {decision_s * 1000:.0f} ms)", {
                               "key": key, "before": plan.version, "after": after, "lost": lost, "light": not full,
                               "dead_groups": sorted(dead_groups), "restart": restart,
                               "decision_s": round(decision_s, 4), "detected_at": detected, "decided_at": time.time(),
                               "phases": {g.id: g.phase for g in new.groups},
                               "predicted": {"goodput_before": before_goodput,
                                             "goodput_after": new.predicted.goodput_rps,
                                             "tokens_per_s_after": new.predicted.tokens_per_s},
                               "reprovision": reprov, "preempted_zones": preempted_zones, "spot_lost": spot_lost})
        self._terminate(gone_recs)  # a doomed or half-dead machine may still bill: let it go now
        for z in preempted_zones:
            self.avoid[tuple(z)] = time.time() + self.config.avoid_zone_s
        for gpu in spot_lost:
            self.spot_failures[gpu] = self.spot_failures.get(gpu, 0) + 1
        for iid in lost:
            self.doomed.pop(iid, None)
            self.suspect.pop(iid, None)
        if new is not None:
            self._push(new, f"plan v{new.version}")
        if reprov:
            # A restart waits a little: the provider may yet report the node itself gone.
            grace = 0.0 if lost else self.config.restart_grace_s
            self.pending[key] = Pending(key, needed, back, next_try=time.monotonic() + grace)

    def _push(self, plan: Plan, why: str) -> None:
        """Route by `plan` (minus replicas known dead)."""
        from thunderops.serve.router import RoutingError

        groups = [g.id for g in plan.groups]
        if not groups:
            return
        try:
            current = self.router.table().version
        except Exception:
            current = plan.version
        try:
            table = self.table_for(plan, version=max(current + 1, plan.version))
            self.router.push(table)
        except (RoutingError, KeyError, httpx.HTTPError) as e:
            self.event("routing-failed", f"could not push routing for {why}: {e}", {"plan_version": plan.version})

    def table_for(self, plan: Plan, version: int | None = None):
        """The routing table that serves `plan` (replicas known dead left out, fallback routes added)."""
        from thunderops.serve.router import RoutingTable

        groups = [g.id for g in plan.groups]
        table = RoutingTable.from_plan(plan, {g: self.urls[g] for g in groups if g in self.urls}, version=version)
        if self.dead & set(groups):
            table = table.without(self.dead & set(groups))
        return with_fallbacks(table)

    # -- spend -------------------------------------------------------------------------------------------
    def _spend_guard(self, plan: Plan) -> None:
        limit = self.config.max_spend
        if limit is None or self._stopped_for_spend:
            return
        spent = self.store.spend(self.deployment)
        rate = self.store.cost_per_hour(self.deployment)
        if spent + rate * self.config.spend_horizon_s / 3600.0 < limit:
            return
        self._stopped_for_spend = True
        self.config.reprovision = False
        self.pending.clear()
        self.state, self.message = "stopped", f"spend {spent:.2f} $ reached the --max-spend {limit:.2f} $"
        self.event("spend-limit", f"spent {spent:.4f} $ of the {limit:.2f} $ limit at {rate:.2f} $/h: tearing "
                   "the deployment down", {"spend": spent, "max_spend": limit, "cost_per_hour": rate})
        if self.provider is not None:
            try:
                self.provider.down(self.deployment)
            except Exception as e:
                self.event("down-failed", f"tearing down failed: {e}; run `thunderops down {self.deployment}`", {})
        self._stop.set()

    def spend_ok(self, extra_per_hour: float) -> bool:
        """Whether adding `extra_per_hour` $/h keeps the deployment within --max-spend over the horizon."""
        limit = self.config.max_spend
        if limit is None:
            return True
        spent = self.store.spend(self.deployment)
        rate = self.store.cost_per_hour(self.deployment) + extra_per_hour
        return spent + rate * self.config.spend_horizon_s / 3600.0 < limit

    # -- workload shift ----------------------------------------------------------------------------------
    def _check_shift(self, plan: Plan) -> None:
        from thunderops.scheduler.reschedule import reschedule

        if not plan.groups:
            return
        try:
            usage = self.router.usage(self.config.shift_window)
        except (httpx.HTTPError, ValueError):
            return
        since = parse_ts(self.store.events(self.deployment, "controller-start")[0].ts).timestamp() \
            if plan.inputs.get("observed_workload") is None else plan.inputs["observed_workload"].get("since", 0)
        recs = [r for r in usage.get("records", []) if r.get("started_at", 0) >= since]
        if len(recs) < self.config.shift_min_requests:
            return
        obs = observed_workload(recs)
        if obs is None:
            return
        cur = plan_workload(plan)
        ratios = {"prompt": obs.mean_prompt / max(cur.mean_prompt, 1e-9),
                  "output": obs.mean_output / max(cur.mean_output, 1e-9)}
        th = self.config.shift_threshold
        if all(1 / (1 + th) <= r <= 1 + th for r in ratios.values()):
            return
        t0 = time.perf_counter()
        try:
            new = reschedule(plan, workload=obs)
        except PlanError as e:
            self.event("workload-shift", f"workload shifted but re-deciding failed: {e}", {"ratios": ratios})
            return
        decision_s = time.perf_counter() - t0
        new.inputs = {**new.inputs, "observed_workload": {**_workload_dict(obs), "since": time.time()},
                      "rescheduled": "workload-shift"}
        with self.store.transaction():
            after = self.store.add_plan(self.deployment, new, reason="workload shift: phases and routing re-decided")
            self.event("workload-shift", f"mean prompt x{ratios['prompt']:.2f}, output x{ratios['output']:.2f} "
                       f"vs the plan: phases and routing re-decided, predicted goodput "
                       f"{goodput_change(plan.predicted, new.predicted)}", {
                           "key": f"v{plan.version}:shift", "before": plan.version, "after": after, "ratios": ratios,
                           "observed": obs.summary(), "decision_s": round(decision_s, 4),
                           "phases": {g.id: g.phase for g in new.groups},
                           "predicted": {"goodput_before": plan.predicted.goodput_rps,
                                         "goodput_after": new.predicted.goodput_rps}})
        self._push(new, f"plan v{new.version}")

    # -- running -----------------------------------------------------------------------------------------
    def status(self) -> ControllerStatus:
        plan = self.store.latest_plan(self.deployment)
        return ControllerStatus(self.deployment, self.state, plan.version, [g.id for g in plan.groups],
                                sorted(self.dead), sorted(self.pending), round(self.store.spend(self.deployment), 6),
                                round(self.store.cost_per_hour(self.deployment), 4), self.message)

    def run(self, duration_s: float | None = None) -> ControllerStatus:
        """Loop until `stop()` (or `duration_s`, or the spend limit). Errors in one step are recorded and the loop
        goes on after a pause, so a flaky dependency never makes a crash loop."""
        end = time.monotonic() + duration_s if duration_s else None
        errors = 0
        while not self._stop.is_set() and (end is None or time.monotonic() < end):
            t = time.monotonic()
            try:
                self.step()
                errors = 0
            except Exception as e:
                errors += 1
                log.exception("controller step failed")
                if errors in (1, 10, 100):
                    try:
                        self.event("controller-error", f"{type(e).__name__}: {e}", {"consecutive": errors})
                    except Exception:
                        pass
                self._stop.wait(min(10.0, self.config.interval_s * errors))
            self._stop.wait(max(0.0, self.config.interval_s - (time.monotonic() - t)))
        if self._worker is not None:
            self._worker.join(timeout=5)
        return self.status()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.stop()
        self._probe_pool.shutdown(wait=False)
        self._http.close()  # also the agents' client
        self.router.close()


def start_background(deployment: str, *, router_url: str | None = None, admin_key: str | None = None,
                     engines: Mapping[str, Any] | None = None, max_spend: float | None = None,
                     log_path: str | Path | None = None) -> int:
    """Start `thunderops watch DEPLOYMENT` as a detached process (what `thunderops up` calls once serving is
    up; `engines` as for `save_router`). Returns its pid; its log is $THUNDEROPS_HOME/logs/<dep>-controller.log."""
    import subprocess
    import sys

    if router_url and admin_key:
        save_router(deployment, router_url, admin_key, engines)
    log_path = Path(log_path or default_home() / "logs" / f"{deployment}-controller.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-c", "from thunderops.cli import main; main()", "watch", deployment]
    if max_spend is not None:
        argv += ["--max-spend", str(max_spend)]
    with open(log_path, "ab") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    return p.pid
