"""The SkyPilot provider: every plan instance becomes one SkyPilot cluster, launched in parallel.

Money must not leak, so the order of things is fixed:
1. intent is recorded in the state store (status `intent`, cluster name, $/h) before each launch;
2. the launch runs with a timeout; its outcome (`ready` + host, or `failed` + error) is recorded after;
3. a capacity/quota failure (or a hung launch) is torn down, then the node moves to the next-best offer
   (same GPU type and count: another zone, region or cloud, or on-demand instead of spot) if the plan's total
   $/h stays within the budget; any other failure, or no offer left, gives up: every launch in flight is
   cancelled and every cluster of the deployment torn down (unless `keep_partial`);
4. block and re-plan (with a `replan` callback, which `thunderops up` gives): when a node's GPU type runs out of
   offers, the offers that failed are blocked, the GPU type is set aside in the pricings that failed, and,
   once the other launches are done, the plan is made again without them (same budget and inputs); nodes up
   whose offer and engine command lines the new plan has are kept (mapped onto its instance ids), the others
   torn down, then the rest launched. At most `max_replans`.
Cluster names are `to-<deployment>-<instance>-<attempt>`, so `down` finds clusters the store never heard of
(a crash between launch and record) in SkyPilot's own cluster list and tears them down too.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.live import Live
from rich.table import Table

from thunderops.agent import deployment_tls, deployment_token
from thunderops.errors import ProvisionError, UserError
from thunderops.plan import Instance, Plan
from thunderops.provision import (
    DownResult,
    Node,
    Ports,
    Provider,
    ProvisionResult,
    is_whole_plan,
    stored_version,
)
from thunderops.provision.sky_adapter import CapacityError, Cluster, SkyCloud, get_sky_cloud
from thunderops.provision.tasks import (
    EngineLaunch,
    accelerator_names,
    cluster_name,
    cluster_prefix,
    deployment_of,
    engine_key_name,
    engine_launches,
    engine_task,
)
from thunderops.state import Store, now_utc

_AWS_ZONE_ID = re.compile(r"^[a-z0-9-]+-az\d+$")  # use1-az1, use1-atl2-az1 (Local Zones)
BUDGET_EPS = 1e-6  # $/h: float slack when comparing sums of prices with the budget


OfferKey = tuple[str, str, str, str, bool]  # (cloud, region, zone, instance type, spot)
# replan(plan, blocked, clouds=...) -> a new plan for what `plan` was made for, without the blocked offers and on
# those clouds only (thunderops.scheduler.replan is one); raises a UserError when there is none
Replanner = Callable[..., Plan]


class _GiveUp(Exception):
    """A node cannot be brought up within the plan and budget."""


class _Exhausted(_GiveUp):
    """Capacity errors or timeouts on every offer of the node's GPU type within the budget: the type is
    unavailable (a re-plan may do without it)."""


@dataclass
class _Slot:
    """One plan instance being brought up: its current offer and launch attempt."""

    original: Instance
    current: Instance
    attempt: int = 0
    cluster: str = ""
    tried: set[tuple] = field(default_factory=set)


@dataclass
class _Run:
    """One `up` call, shared by its launch threads and re-planning rounds."""

    deployment: str
    plan: Plan  # the plan being provisioned now (a re-plan replaces it)
    wheel: Path | None
    token: str
    engine_key: str
    tls: tuple[str, str] | None  # the agents' certificate and key (PEM)
    clouds: set[str]
    regions: set[str] | None
    accel: dict[str, str]
    slots: dict[str, _Slot]
    nodes: dict[str, Node] = field(default_factory=dict)  # ready nodes of the current plan, by instance id
    engines: dict[str, tuple] = field(default_factory=dict)  # cluster -> the engine lines it was launched with
    blocked: set[OfferKey] = field(default_factory=set)  # offers that failed (capacity, timeout), all rounds
    set_aside: set[tuple[str, bool]] = field(default_factory=set)  # (GPU type, spot) that ran out, all rounds
    used: set[str] = field(default_factory=set)  # cluster names recorded for the deployment
    launched: dict[str, int] = field(default_factory=dict)  # launch attempts per instance id
    lock: threading.Lock = field(default_factory=threading.Lock)
    abort: threading.Event = field(default_factory=threading.Event)
    in_flight: set[str] = field(default_factory=set)

    def excluded(self) -> dict[str, list]:
        """What re-planning may no longer use, for events: the offers that failed and the GPU types set aside."""
        return {"blocked": [list(k) for k in sorted(self.blocked)],
                "set_aside": [{"gpu": g, "spot": sp} for g, sp in sorted(self.set_aside)]}

    def next_name(self, inst_id: str) -> str:
        """A fresh cluster name `to-<deployment>-<instance>-<n>`: n counts this instance's launches."""
        with self.lock:
            n = self.launched.get(inst_id, 0) + 1
            while cluster_name(self.deployment, inst_id, n) in self.used:
                n += 1
            self.launched[inst_id] = n
            name = cluster_name(self.deployment, inst_id, n)
            self.used.add(name)
            return name


def _engine_lines(launches: list[EngineLaunch]) -> tuple:
    """What a node's engines are, for telling whether a node launched for one plan serves another as is."""
    return tuple((tuple(e.argv), tuple(sorted(e.env.items())), e.port) for e in launches)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe_offers(keys: list[OfferKey], limit: int = 12) -> str:
    """`cloud/region/zone instance-type [spot]`, comma-separated (the first `limit`, then a count)."""
    shown = [f"{c}/{r}/{z or '-'} {t}{' spot' if s else ''}" for c, r, z, t, s in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return (", ".join(shown) or "none") + more


def offer_instance(original: Instance, row: pd.Series | dict, spot: bool) -> Instance:
    """`original` moved to another catalog offer (same id, GPU type and count)."""
    price = float(row["price_spot"] if spot else row["price_ondemand"])
    return replace(original, cloud=str(row["cloud"]), region=str(row["region"]), zone=str(row["zone"] or ""),
                   instance_type=str(row["instance_type"]), spot=spot, price_per_hour=price,
                   network_gbps=None if pd.isna(row.get("network_gbps")) else float(row["network_gbps"]),
                   source=str(row["source"]), as_of=str(row["as_of"]), host=None)


def _key(inst: Instance) -> OfferKey:
    return (inst.cloud, inst.region, inst.zone or "", inst.instance_type, bool(inst.spot))


def fallback_candidates(inst: Instance, offers: pd.DataFrame, *, clouds: set[str] | None = None,
                        regions: set[str] | None = None) -> list[Instance]:
    """Every other offer for the same GPU type and GPUs per node, cheapest first. A spot node may fall back
    to spot or on-demand; an on-demand node stays on-demand (it was chosen not to be preempted)."""
    rows = offers[(offers["gpu"] == inst.gpu) & (offers["gpus_per_node"] == inst.gpus)]
    if clouds:
        rows = rows[rows["cloud"].isin(clouds)]
    if regions:
        rows = rows[rows["region"].isin(regions)]
    out = []
    for _, row in rows.iterrows():
        if inst.spot and pd.notna(row["price_spot"]):
            out.append(offer_instance(inst, row, True))
        out.append(offer_instance(inst, row, False))
    out.sort(key=lambda i: (i.price_per_hour, _key(i)))
    return [i for i in out if _key(i) != _key(inst)]


def sky_zone(inst: Instance) -> str:
    """The zone to pin in SkyPilot. AWS catalogs list zone IDs (use1-az1), which SkyPilot maps to
    account-specific names only with credentials, so for those we pin the region and let SkyPilot pick."""
    return "" if inst.cloud == "aws" and _AWS_ZONE_ID.match(inst.zone or "") else (inst.zone or "")


class ProgressView:
    """Rich live table: one row per plan instance (offer, $/h, provisioning -> setup -> ready | failed)."""

    COLORS = {"intent": "dim", "provisioning": "yellow", "setup": "cyan", "ready": "green", "failed": "red",
              "terminated": "dim", "retrying": "magenta", "cancelled": "red"}

    def __init__(self, console: Console | None) -> None:
        self.console = console
        self.rows: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._live: Live | None = None

    def __enter__(self) -> ProgressView:
        if self.console is not None:
            self._live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(*exc)

    def update(self, inst: Instance, status: str, note: str = "") -> None:
        with self._lock:
            row = self.rows.setdefault(inst.id, {"since": time.monotonic()})
            row.update(offer=f"{inst.cloud}/{inst.region}/{inst.zone or '-'} {inst.instance_type}"
                       f"{' spot' if inst.spot else ''}", price=inst.price_per_hour, status=status, note=note)
            if self._live is not None:
                self._live.update(self._table())

    def _table(self) -> Table:
        t = Table(title="provisioning", title_justify="left")
        for col in ("node", "offer", "$/h", "status", "elapsed", "note"):
            t.add_column(col)
        for node, r in self.rows.items():
            color = self.COLORS.get(r["status"], "")
            t.add_row(node, r["offer"], f"{r['price']:.2f}", f"[{color}]{r['status']}[/]",
                      f"{time.monotonic() - r['since']:.0f}s", r["note"][:60])
        return t


class SkyPilotProvider(Provider):
    name = "skypilot"

    def __init__(self, store: Store | None = None, cloud: SkyCloud | None = None, *, console: Console | None = None,
                 launch_timeout_s: float = 1800.0, cancel_grace_s: float = 60.0, offers: pd.DataFrame | None = None,
                 pip_spec: str | None = None, max_attempts: int = 6, max_replans: int = 2) -> None:
        self.store = store or Store()
        self.cloud = cloud or get_sky_cloud()
        self.console = console
        self.launch_timeout_s = launch_timeout_s
        self.cancel_grace_s = cancel_grace_s
        self._offers = offers
        from thunderops.provision.package import resolve_pip_spec

        self.pip_spec, self.wheel_file = resolve_pip_spec(pip_spec)
        self.max_attempts = max_attempts
        self.max_replans = max_replans

    def package(self, deployment: str) -> Path | None:
        """The thunderops wheel the deployment's nodes install (built once into its work directory), or None
        when `pip_spec` says what to install instead."""
        if self.wheel_file is not None:
            return self.wheel_file
        if self.pip_spec:
            return None
        from thunderops.provision.package import build_wheel
        from thunderops.state import default_home

        return build_wheel(default_home() / "deployments" / deployment)

    # -- checks -----------------------------------------------------------------------------------------
    def check(self, plan: Plan) -> None:
        """Before anything is launched: the plan fits its budget and every cloud in it has credentials."""
        total = sum(i.price_per_hour for i in plan.instances)
        if total > plan.budget_per_hour + BUDGET_EPS:
            raise ProvisionError(f"plan costs {total:.2f} $/h, above its budget of {plan.budget_per_hour:.2f} $/h; "
                                 "raise --budget or re-plan")
        enabled = self.cloud.enabled_clouds()
        missing = sorted({i.cloud for i in plan.instances} - enabled)
        if missing:
            raise ProvisionError(f"no credentials for {', '.join(missing)}: set them up and run "
                                 f"`sky check {' '.join(missing)}` (or plan with --clouds {','.join(sorted(enabled)) or 'CLOUD'})")

    def offers(self) -> pd.DataFrame:
        if self._offers is None:
            from thunderops.catalog import load_offers

            self._offers = load_offers()
        return self._offers

    # -- up ---------------------------------------------------------------------------------------------
    def up(self, deployment: str, plan: Plan, *, keep_partial: bool = False,
           replan: Replanner | None = None) -> ProvisionResult:
        """Launch every instance of `plan` in parallel (see the module docstring). With `replan` (e.g.
        `thunderops.scheduler.replan`), a GPU type that cannot be had is not the end: the offers that failed
        are blocked, `replan(plan, blocked, clouds=...)` makes a new plan without them (at most
        `max_replans` times), nodes already up that the new plan uses are kept, the others torn down, and the
        rest of the new plan launched. Only a whole plan is re-planned (not a controller's sub-plan)."""
        store = self.store
        self.check(plan)
        if not plan.instances:
            raise ProvisionError("the plan has no instances to provision; re-plan with a larger --budget")
        wheel = self.package(deployment)  # before anything is recorded: a failed build launches nothing
        whole = is_whole_plan(store, deployment, plan)
        version = stored_version(store, deployment, plan)
        if whole:
            store.set_deployment_status(deployment, "provisioning")
        store.add_event(deployment, "provision-start", f"launching {len(plan.instances)} node(s)",
                        {"plan_version": version, "cost_per_hour": plan.cost_per_hour})
        clouds = self.cloud.enabled_clouds()
        if plan.inputs.get("clouds"):
            clouds &= {str(c).lower() for c in plan.inputs["clouds"]}
        run = _Run(deployment=deployment, plan=plan, wheel=wheel, token=deployment_token(deployment),
                   engine_key=deployment_token(engine_key_name(deployment)), tls=deployment_tls(deployment),
                   clouds=clouds,
                   regions=set(plan.inputs["regions"]) if plan.inputs.get("regions") else None,
                   accel=accelerator_names(plan), slots={i.id: _Slot(i, i) for i in plan.instances})
        for r in store.nodes(deployment):  # launches recorded before: cluster names stay unique
            run.used.add(r.cluster_name)
            run.launched[r.instance_id] = run.launched.get(r.instance_id, 0) + 1
        replans = 0
        with ProgressView(self.console) as view:
            while True:
                may_replan = replan is not None and whole and replans < self.max_replans
                errors, exhausted = self._round(run, view, may_replan)
                if errors or not exhausted or not may_replan:
                    break
                gpus = sorted({run.slots[i].original.gpu for i in exhausted})
                run.set_aside |= {(run.slots[i].original.gpu, k[4]) for i in exhausted for k in run.slots[i].tried}
                try:
                    new = replan(plan, frozenset(run.blocked | self._offers_of(run.set_aside)),
                                 clouds=set(run.clouds))
                    self.check(new)
                    if not new.instances:
                        raise ProvisionError("the new plan has no instances")
                    version = self._adopt(run, new, gpus, version, view)
                except UserError as e:
                    errors = {"replan": f"re-planning without {', '.join(gpus)} failed: {e}"}
                    break
                except Exception as e:  # a bug in the callback: still nothing may be left running
                    errors = {"replan-error": f"re-planning failed: {type(e).__name__}: {e}"}
                    break
                replans += 1

        final = replace(run.plan, instances=[replace(s.current if s.original.id in run.nodes else s.original)
                                             for s in run.slots.values()])
        final.cost_per_hour = sum(i.price_per_hour for i in final.instances)
        for inst in final.instances:
            if inst.id in run.nodes:
                inst.host = run.nodes[inst.id].host
        blocked = sorted(run.blocked)
        if errors or exhausted:
            unavailable = sorted({run.slots[i].original.gpu for i in exhausted}) if exhausted else []
            message = _one_line("; ".join({**exhausted, **errors}.values()))
            if replan is not None and whole and unavailable and not set(errors) - {"replan"}:
                aside = ", ".join(f"{g} {'spot' if sp else 'on-demand'}" for g, sp in sorted(run.set_aside))
                message = (f"{', '.join(unavailable)} unavailable after {replans} re-plan(s) (limit "
                           f"{self.max_replans}): {message}; tried and blocked: {describe_offers(blocked)}"
                           + (f"; set aside: {aside}" if aside else ""))
            store.add_event(deployment, "provision-failed", message,
                            {"errors": {**exhausted, **errors}, "keep_partial": keep_partial, "replans": replans,
                             **run.excluded()})
            if not keep_partial:
                if whole:
                    self.down(deployment)
                else:  # replacements for a running deployment: tear down only what this call launched
                    self._down_clusters(deployment, [s.cluster for s in run.slots.values() if s.cluster])
                run.nodes.clear()
            if whole:
                store.set_deployment_status(deployment, "failed")
            return ProvisionResult(deployment, final, version, list(run.nodes.values()), ok=False, message=message,
                                   blocked=blocked, replans=replans,
                                   unavailable=unavailable if not set(errors) - {"replan"} else [])
        if whole and any(_key(s.current) != _key(s.original) for s in run.slots.values()):
            new_version = store.add_plan(deployment, final, reason="provisioning fallbacks")
            store.add_event(deployment, "plan-changed", "offers replaced during provisioning",
                            {"before": version, "after": new_version})
            version = new_version
        if whole:
            store.set_deployment_status(deployment, "up")
        store.add_event(deployment, "provision-done", f"{len(run.nodes)} node(s) ready",
                        {"plan_version": version, "cost_per_hour": final.cost_per_hour, "replans": replans})
        ordered = [run.nodes[i.id] for i in final.instances]
        return ProvisionResult(deployment, final, version, ordered, ok=True, blocked=blocked, replans=replans)

    def _round(self, run: _Run, view: ProgressView, may_replan: bool) -> tuple[dict[str, str], dict[str, str]]:
        """Bring up every slot of the current plan that has no node yet, in parallel. Returns (errors,
        exhausted): instance id -> why, for failures that stop everything, and for nodes whose GPU type ran
        out of offers. With `may_replan` an exhausted node lets the others finish (their nodes may be kept);
        otherwise it stops everything as an error does."""
        store, plan, deployment = self.store, run.plan, run.deployment
        errors: dict[str, str] = {}
        exhausted: dict[str, str] = {}
        run.abort.clear()

        def total_with(inst_id: str, candidate: Instance) -> float:
            return sum(candidate.price_per_hour if s.original.id == inst_id else s.current.price_per_hour
                       for s in run.slots.values())

        def next_offer(slot: _Slot) -> Instance | None:
            with run.lock:
                for cand in fallback_candidates(slot.original, self.offers(), clouds=run.clouds, regions=run.regions):
                    if _key(cand) in slot.tried or _key(cand) in run.blocked:
                        continue
                    if total_with(slot.original.id, cand) <= plan.budget_per_hour + BUDGET_EPS:
                        slot.current = cand
                        return cand
            return None

        def bring_up(slot: _Slot) -> None:
            while not run.abort.is_set():
                inst = slot.current
                slot.tried.add(_key(inst))
                slot.attempt += 1
                if slot.attempt > self.max_attempts:
                    view.update(inst, "failed", f"no offer came up after {self.max_attempts} attempts")
                    raise _Exhausted(f"{inst.id}: no offer came up after {self.max_attempts} attempts")
                name = run.next_name(inst.id)
                slot.cluster = name
                ports = Ports()
                launches = engine_launches(plan, inst.id, ports, https=run.tls is not None)
                config = engine_task(plan, replace(inst, zone=sky_zone(inst)), deployment=deployment, node_id=name,
                                     cluster=name, accelerator=run.accel.get(inst.id) if inst.gpu == slot.original.gpu
                                     else None, ports=ports, pip_spec=self.pip_spec, launches=launches,
                                     agent_token=run.token, engine_key=run.engine_key, agent_tls=run.tls,
                                     wheel=run.wheel)
                store.record_node_intent(
                    deployment, name, inst.id, name, cloud=inst.cloud, region=inst.region, zone=inst.zone,
                    instance_type=inst.instance_type, gpu=inst.gpu, gpus=inst.gpus, spot=inst.spot,
                    price_per_hour=inst.price_per_hour, engine_port=ports.engine, kv_port=ports.kv,
                    agent_port=ports.agent)
                view.update(inst, "intent")
                with run.lock:
                    if run.abort.is_set():
                        store.update_node(name, status="terminated", terminated_at=now_utc(), error="cancelled")
                        return
                    run.in_flight.add(name)
                store.update_node(name, status="provisioning", launched_at=now_utc())
                view.update(inst, "provisioning")
                try:
                    host = self._launch_with_timeout(name, config, lambda st, n=name, i=inst: self._stage(n, i, st, view))
                except (CapacityError, TimeoutError) as e:
                    why = f"{type(e).__name__}: {e}"
                    with run.lock:
                        run.blocked.add(_key(inst))
                    self._teardown_failed(deployment, name, why)
                    view.update(inst, "failed", why)
                    if run.abort.is_set():
                        return
                    nxt = next_offer(slot)
                    if nxt is None:
                        raise _Exhausted(f"{inst.id}: {why}; no other {inst.gpus}x{inst.gpu} offer keeps the plan "
                                         f"within {plan.budget_per_hour:.2f} $/h") from None
                    store.add_event(deployment, "fallback", f"{inst.id}: {why}; trying {_key(nxt)}",
                                    {"instance": inst.id, "from": list(_key(inst)), "to": list(_key(nxt)),
                                     "price_per_hour": nxt.price_per_hour})
                    view.update(nxt, "retrying", why)
                    continue
                except Exception as e:  # SDK or setup failure: not something another offer fixes
                    why = f"{type(e).__name__}: {e}"
                    self._teardown_failed(deployment, name, why)
                    view.update(inst, "failed", why)
                    raise _GiveUp(f"{inst.id}: {why}") from None
                finally:
                    with run.lock:
                        run.in_flight.discard(name)
                rec = store.update_node(name, status="ready", host=host or None)
                run.nodes[inst.id] = Node.from_record(rec)
                run.engines[name] = _engine_lines(launches)
                view.update(inst, "ready", host or "")
                return

        todo = [s for s in run.slots.values() if s.original.id not in run.nodes]
        if not todo:
            return errors, exhausted
        with ThreadPoolExecutor(max_workers=len(todo)) as pool:
            futures = {pool.submit(bring_up, s): s for s in todo}
            for fut in as_completed(futures):
                slot = futures[fut]
                try:
                    fut.result()
                    continue
                except _Exhausted as e:
                    exhausted[slot.original.id] = str(e)
                    if may_replan:
                        continue  # the others finish; a re-plan follows
                except Exception as e:  # _GiveUp, or a bug: either way stop everything
                    errors[slot.original.id] = str(e)
                if not run.abort.is_set():
                    run.abort.set()
                    with run.lock:
                        flying = list(run.in_flight)
                    for name in flying:
                        self.cloud.cancel(name)
        return errors, exhausted

    def _offers_of(self, classes: set[tuple[str, bool]]) -> set[OfferKey]:
        """Every catalog offer of each (GPU type, spot) in `classes`. A node that ran out of offers tried its
        GPU type in several places (up to `max_attempts`) and in those pricings, so a re-plan sets the type
        aside in them wholesale: capacity shortages span zones and clouds, and each re-plan that picked the
        type again would spend a round of launches finding that out."""
        if not classes:
            return set()
        table = self.offers()
        rows = table[table["gpu"].isin({g for g, _ in classes})]
        out: set[OfferKey] = set()
        for row in rows.itertuples():
            for spot in (True, False):
                if (row.gpu, spot) in classes and pd.notna(row.price_spot if spot else row.price_ondemand):
                    out.add((str(row.cloud), str(row.region), "" if pd.isna(row.zone) else str(row.zone),
                             str(row.instance_type), spot))
        return out

    def _adopt(self, run: _Run, new: Plan, gpus: list[str], version: int, view: ProgressView) -> int:
        """Make `new` (a re-plan without the blocked offers) the plan being provisioned: store it as a new
        version, keep each node already up that has a new instance with the same offer and the same engine
        command lines (mapped onto that instance id, not relaunched), tear down the other nodes (recorded),
        and set up slots for the rest. Returns the new plan version."""
        store, deployment = self.store, run.deployment
        free = dict(run.nodes)
        kept: dict[str, Node] = {}
        for inst in new.instances:
            lines = _engine_lines(engine_launches(new, inst.id, Ports(), https=run.tls is not None))  # an unservable plan fails here
            match = next((old_id for old_id, node in free.items() if _key(run.slots[old_id].current) == _key(inst)
                          and run.engines.get(node.cluster_name) == lines), None)
            if match is not None:
                kept[inst.id] = free.pop(match)
        released = sorted(n.cluster_name for n in free.values())
        after = store.add_plan(deployment, new, reason=f"re-planned: {', '.join(gpus)} unavailable")
        store.add_event(deployment, "re-planned",
                        f"{', '.join(gpus)} unavailable: plan v{after} keeps {len(kept)} node(s), releases "
                        f"{len(released)}, launches {len(new.instances) - len(kept)}",
                        {"before": version, "after": after, "unavailable": gpus, **run.excluded(),
                         "kept": {i: n.cluster_name for i, n in kept.items()}, "released": released,
                         "cost_per_hour": new.cost_per_hour})
        if self.console is not None:
            self.console.print(f"re-planned: {', '.join(gpus)} unavailable; plan v{after} ({new.cost_per_hour:.2f} $/h) "
                               f"keeps {len(kept)} node(s), releases {len(released)}", highlight=False)
        if released:  # before anything new is launched: the $/h billed at once stays within the budget
            down = self._down_clusters(deployment, released, why="not in the re-made plan")
            for old_id in free:
                view.update(run.slots[old_id].current, "terminated", "not in the new plan")
            if down.failed:
                raise ProvisionError(f"could not tear down {', '.join(sorted(down.failed))} after re-planning: "
                                     + "; ".join(down.failed.values()))
        run.plan, run.accel = new, accelerator_names(new)
        run.slots = {i.id: _Slot(i, i) for i in new.instances}
        run.nodes = {}
        for inst_id, node in kept.items():
            run.nodes[inst_id] = Node.from_record(store.update_node(node.id, instance_id=inst_id))
            view.update(run.slots[inst_id].current, "ready", f"kept ({node.cluster_name})")
        return after

    def _stage(self, name: str, inst: Instance, stage: str, view: ProgressView) -> None:
        if stage == "setup":
            self.store.update_node(name, status="setup")
        view.update(inst, stage)

    def _launch_with_timeout(self, name: str, config: dict[str, Any], on_stage) -> str:
        result: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                result["host"] = self.cloud.launch(name, config, on_stage)
            except BaseException as e:  # handed to the caller below
                result["error"] = e
            finally:
                done.set()

        threading.Thread(target=run, name=f"launch-{name}", daemon=True).start()
        if not done.wait(self.launch_timeout_s):
            self.cloud.cancel(name)
            done.wait(self.cancel_grace_s)
            raise TimeoutError(f"launch did not finish within {self.launch_timeout_s:g} s")
        if "error" in result:
            raise result["error"]
        return result["host"]

    def _teardown_failed(self, deployment: str, name: str, why: str) -> None:
        """A failed launch may still have left machines behind: tear the cluster down, then record it."""
        self.store.update_node(name, status="failed", error=why[:500])
        self.cloud.down(name)
        self.store.update_node(name, status="terminated", terminated_at=now_utc())

    # -- status / down ----------------------------------------------------------------------------------
    def clusters(self, deployment: str | None) -> dict[str, Cluster]:
        """SkyPilot's own view: every cluster of the deployment (or all of thunderops')."""
        return {c.name: c for c in self.cloud.clusters(cluster_prefix(deployment))}

    def status(self, deployment: str) -> list[Node]:
        recs = self.store.nodes(deployment)
        live = [r for r in recs if r.live]
        seen = self.clusters(deployment) if live else {}
        out = []
        for r in recs:
            node = Node.from_record(r)
            if r.live and r.status == "ready":
                cluster = seen.get(r.cluster_name)
                if cluster is None:
                    node.status = "missing"  # the cloud no longer has it: deleted outside thunderops
                elif cluster.status != "UP":  # SkyPilot shows a preempted spot VM as STOPPED or INIT
                    node.status = "preempted" if r.spot else "missing"
            out.append(node)
        return out

    def down(self, deployment: str | None) -> DownResult:
        store = self.store
        if deployment is None:
            deps = {d.id for d in store.deployments() if d.provider in ("", self.name)}
        else:
            store.deployment(deployment)  # unknown -> one-line error (intent is recorded before any launch)
            deps = {deployment}
        clusters = self.clusters(deployment)
        recorded = {r.cluster_name: r for d in deps for r in store.nodes(d) if r.live}
        result = self._terminate(sorted(set(clusters) | set(recorded)), recorded, DownResult(deployment))
        for d in sorted(deps):
            store.add_event(d, "down", f"terminated {len([n for n in result.terminated if deployment_of(n) == d])} "
                            "cluster(s)", {"terminated": [n for n in result.terminated if deployment_of(n) == d],
                                           "unrecorded": [n for n in result.unrecorded if deployment_of(n) == d],
                                           "failed": result.failed})
            if not any(deployment_of(n) == d for n in result.failed):
                store.set_deployment_status(d, "down")
        return result

    def down_node(self, node_id: str) -> DownResult:
        """Tear down one node's cluster, whatever its record says (the controller records a lost node before it
        lets it go, and a preempted or failed cluster may still bill): only a cluster SkyPilot no longer
        lists is left alone."""
        rec = self.store.node(node_id)
        result = DownResult(rec.deployment)
        if not rec.live and rec.cluster_name not in self.clusters(rec.deployment):
            return result
        self.cloud.down(rec.cluster_name)  # raises if the cloud refuses: the record stays live for `down`
        self.store.update_node(node_id, status="terminated" if rec.live else rec.status,
                               terminated_at=rec.terminated_at or now_utc())
        self.store.add_event(rec.deployment, "node-down", f"terminated {rec.cluster_name} ({rec.instance_id})",
                             {"node": node_id, "cluster": rec.cluster_name})
        result.terminated.append(rec.cluster_name)
        return result

    def _down_clusters(self, deployment: str, names: list[str], why: str = "of a failed launch") -> DownResult:
        """Tear down some clusters of a deployment (the ones one `up` call launched), recording it."""
        recorded = {r.cluster_name: r for r in self.store.nodes(deployment) if r.live and r.cluster_name in names}
        result = self._terminate(sorted(set(names)), recorded, DownResult(deployment))
        self.store.add_event(deployment, "down", f"terminated {len(result.terminated)} cluster(s) {why}",
                             {"terminated": result.terminated, "failed": result.failed})
        return result

    def _terminate(self, targets: list[str], recorded: dict, result: DownResult) -> DownResult:
        """Down every target cluster in parallel; mark the recorded ones terminated once the cloud confirms."""
        store = self.store
        for name in targets:
            if name in recorded:
                store.update_node(recorded[name].id, status="terminating")
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(targets)))) as pool:
            outcomes = {name: pool.submit(self.cloud.down, name) for name in targets}
        for name, fut in outcomes.items():
            try:
                fut.result()
            except Exception as e:  # keep going: one stuck cluster must not keep the others up
                result.failed[name] = f"{type(e).__name__}: {e}"
                continue
            result.terminated.append(name)
            if name in recorded:
                store.update_node(recorded[name].id, status="terminated", terminated_at=now_utc())
            else:
                result.unrecorded.append(name)
        return result


