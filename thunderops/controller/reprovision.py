"""Reprovisioning: Pending (replicas to bring back) and the Reprovisioning part of the Controller."""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from thunderops.controller.surgery import fold_in, next_instance_id
from thunderops.plan import Group, Instance, goodput_change

if TYPE_CHECKING:
    from thunderops.controller.config import ControllerConfig
    from thunderops.controller.engines import EngineLauncher
    from thunderops.state import Store

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """Replicas to bring back (groups as they were before the loss) and the specs of every instance they
    need. When it runs, instances still in the plan are reused (an engine restart) and the others replaced."""

    key: str
    instances: list[Instance]
    groups: list[Group]
    attempts: int = 0
    next_try: float = 0.0


class Reprovisioning:
    """The controller's reprovisioning part (mixed into Controller, whose state it uses: see Controller.__init__):
    bring lost replicas back on the same GPUs within the $/h budget, in a background thread."""

    # Set by Controller.__init__ (annotations only, for readers and type checkers); it also supplies
    # event(), spend_ok() and _push().
    deployment: str
    store: Store
    provider: Any
    config: ControllerConfig
    launcher: EngineLauncher
    urls: dict[str, str]
    dead: set[str]
    pending: dict[str, Pending]
    suspect: dict[str, str]
    avoid: dict[tuple[str, str], float]
    spot_failures: dict[str, int]
    state: str
    message: str
    _offers: Any
    _lock: threading.RLock
    _worker: threading.Thread | None
    _terminate: Any  # Controller._terminate(records, wait): the provider's per-node teardown

    # -- reprovisioning ----------------------------------------------------------------------------------
    def _kick_reprovision(self) -> None:
        if not self.pending or not self.config.reprovision:
            return
        if self._worker is not None and self._worker.is_alive():
            return
        due = [p for p in self.pending.values() if p.next_try <= time.monotonic()
               and not any(i.id in self.suspect for i in p.instances)]  # a suspect node goes first
        if not due:
            return
        self._worker = threading.Thread(target=self._reprovision, args=(due[0],), name="reprovision", daemon=True)
        self._worker.start()

    def offers(self):
        if self._offers is None:
            from thunderops.catalog import load_offers

            self._offers = load_offers()
        return self._offers

    def replacement(self, inst: Instance, new_id: str, headroom: float) -> Instance | None:
        """The offer to replace `inst` with: same GPU type and count, not in an avoided zone, spot only while
        spot has not kept failing for that GPU, cheapest that fits `headroom` $/h. Local nodes come back as is."""
        if getattr(self.provider, "name", "") == "local":
            return replace(inst, id=new_id, host=None) if inst.price_per_hour <= headroom + 1e-9 else None
        from thunderops.provision.skypilot import fallback_candidates

        now = time.time()
        spot_ok = inst.spot and self.spot_failures.get(inst.gpu, 0) < self.config.spot_failures_for_on_demand
        cands = [inst, *fallback_candidates(replace(inst, spot=True) if inst.spot else inst, self.offers())]
        for c in sorted(cands, key=lambda c: c.price_per_hour):
            if c.spot and not spot_ok:
                continue
            if self.avoid.get((c.cloud, c.zone), 0) > now:
                continue
            if c.price_per_hour <= headroom + 1e-9:
                return replace(c, id=new_id, host=None)
        return None

    def _reprovision(self, pend: Pending) -> None:
        t0 = time.perf_counter()
        pend.attempts += 1
        try:
            self._reprovision_once(pend, t0)
        except Exception as e:  # retried with back-off; never a crash loop
            log.exception("reprovision failed")
            spot_gpu = next((i.gpu for i in pend.instances if i.spot), None)
            if spot_gpu:
                self.spot_failures[spot_gpu] = self.spot_failures.get(spot_gpu, 0) + 1
            give_up = pend.attempts >= self.config.max_reprovision_attempts
            with self._lock:
                # engines restarted in place on nodes still in the plan that never came back: the node itself is
                # suspect (a bad GPU, a broken driver) and bills for nothing: it goes as a lost node, replaced
                in_place = give_up and self.provider is not None and {i.id for i in pend.instances} <= {
                    i.id for i in self.store.latest_plan(self.deployment).instances}
                self.event("reprovision-abandoned" if give_up else "reprovision-failed",
                           f"attempt {pend.attempts}: {type(e).__name__}: {e}"
                           + (("; replacing " + ", ".join(i.id for i in pend.instances) + ", whose engines "
                               "restarts in place did not bring back") if in_place else
                              "; giving up" if give_up else f"; retrying in {self.config.reprovision_backoff_s:g} s"),
                           {"key": pend.key, "attempt": pend.attempts, "spot_gpu": spot_gpu, "replace": in_place})
                if give_up:
                    self.pending.pop(pend.key, None)
                if in_place:  # the watch loop lets the suspects go as lost nodes; then these replicas come back
                    for i in pend.instances:
                        self.suspect[i.id] = f"engines not back after {pend.attempts} restarts in place"
                    key = f"{pend.key}:replace"
                    self.pending[key] = Pending(key, list(pend.instances), list(pend.groups))
                else:
                    pend.next_try = time.monotonic() + self.config.reprovision_backoff_s * pend.attempts

    def _reprovision_once(self, pend: Pending, t0: float) -> None:
        with self._lock:
            plan = self.store.latest_plan(self.deployment)
            budget = plan.budget_per_hour or float("inf")
            headroom = budget - self.store.cost_per_hour(self.deployment)
            taken = {n.instance_id for n in self.store.nodes(self.deployment)} | {i.id for i in plan.instances}
            have = {i.id for i in plan.instances}
            specs = {i.id: i for i in pend.instances}
            need = [i for i in dict.fromkeys(s.instance for g in pend.groups for s in g.stages) if i not in have]
            if need and self.provider is None:
                raise RuntimeError(f"{', '.join(need)} lost and no provider to replace them with")
            repl: dict[str, Instance] = {}
            for iid in need:
                new_id = next_instance_id(iid, taken)
                taken.add(new_id)
                r = self.replacement(specs[iid], new_id, headroom - sum(x.price_per_hour for x in repl.values()))
                if r is None:
                    raise RuntimeError(f"no offer for {iid} ({specs[iid].gpus}x{specs[iid].gpu}) fits the "
                                       f"{headroom:.2f} $/h left of the {budget:.2f} $/h budget")
                repl[iid] = r
            extra = sum(i.price_per_hour for i in repl.values())
            if not self.spend_ok(extra):
                raise RuntimeError(f"adding {extra:.2f} $/h would pass --max-spend {self.config.max_spend:.2f} $")
            folded, added = fold_in(plan, pend.groups, repl)
            if not added:
                raise RuntimeError("no lost group fits on the replacements and survivors")
            self.state = "reprovisioning"
            self.event("reprovision-start", f"restarting {', '.join(added)}" + (f"; replacing {', '.join(repl)} with " if repl else "")
                       + ", ".join(f"{r.id} ({r.cloud} {r.zone or r.region} {'spot' if r.spot else 'on-demand'} "
                                   f"{r.price_per_hour:.2f} $/h)" for r in repl.values()),
                       {"key": pend.key, "replacements": {k: asdict(v) for k, v in repl.items()},
                        "groups": added, "headroom_per_hour": headroom})
        # Provision only the new instances (and the groups that run on them) without storing a plan version:
        # the plan that folds them in is stored below once they serve.
        sub = copy.deepcopy(folded)
        sub.instances = list(repl.values())
        new_ids = {i.id for i in sub.instances}
        sub.groups = [g for g in folded.groups if g.id in added and set(g.instances) <= new_ids]
        sub.routing = []
        sub.budget_per_hour = headroom
        sub.cost_per_hour = extra
        try:
            urls = self._bring_up(sub, folded, added)
        except Exception:  # the retry replaces them afresh: new nodes that serve nothing must not bill meanwhile
            gone = [r for r in self.store.nodes(self.deployment) if r.instance_id in new_ids and r.live]
            self._terminate(gone, wait=True)
            raise
        measured = self._measure(list(repl.values()))
        if measured:
            from thunderops.netbench import merge_bandwidth

            folded.bandwidth_gbps = merge_bandwidth(folded.bandwidth_gbps, measured)
        from thunderops.scheduler.reschedule import reschedule

        with self._lock:
            self.urls.update(urls)
            latest = self.store.latest_plan(self.deployment)
            if latest.version != plan.version:  # something else happened meanwhile: fold into that plan
                bw = folded.bandwidth_gbps
                folded, _ = fold_in(latest, [folded.group(g) for g in added], {r.id: r for r in repl.values()},
                                    keep_ids=True)
                folded.bandwidth_gbps = bw
            new = reschedule(folded)  # at the plan's workload, the observed one first (`plan_workload`)
            after = self.store.add_plan(self.deployment, new, reason=f"reprovisioned: {', '.join(urls)} back")
            self.dead -= set(urls)
            self.pending.pop(pend.key, None)
            self.state = "degraded" if self.pending else "watching"
            self.message = ""
            self.event("reprovisioned", f"{', '.join(sorted(urls))} serving"
                       + (f" on {', '.join(sorted(new_ids))}" if new_ids else " again") + ": "
                       f"{len(new.groups)} replicas, predicted goodput {goodput_change(latest.predicted, new.predicted)}"
                       f" ({time.perf_counter() - t0:.1f} s)", {
                           "key": pend.key, "before": latest.version, "after": after, "groups": sorted(urls),
                           "instances": sorted(new_ids), "measured_links": bool(measured),
                           "phases": {g.id: g.phase for g in new.groups},
                           "cost_per_hour": new.cost_per_hour, "seconds": round(time.perf_counter() - t0, 3),
                           "predicted": {"goodput_before": latest.predicted.goodput_rps,
                                         "goodput_after": new.predicted.goodput_rps}})
            self._push(new, f"plan v{new.version}")

    def _bring_up(self, sub: Any, folded: Any, added: list[str]) -> dict[str, str]:
        """Provision `sub`'s new instances (setting their hosts in `folded`) and start the `added` groups'
        engines; their URLs."""
        nodes = {}
        if sub.instances:
            res = self.provider.up(self.deployment, sub, keep_partial=True)
            if not res.ok:
                raise RuntimeError(f"provisioning failed: {res.message}")
            nodes = {n.instance_id: n for n in res.nodes}
        for inst in folded.instances:
            if inst.id in nodes:
                inst.host = nodes[inst.id].host
        known = self.provider.status(self.deployment) if self.provider is not None else []
        all_nodes = {r.instance_id: r for r in known} | nodes
        return self.launcher.start(self.deployment, folded, added, all_nodes)

    def _measure(self, new: list[Instance]) -> dict[str, dict[str, float]]:
        """Links between the new nodes and the others, where their agents answer (best effort)."""
        try:
            from thunderops.netbench import endpoints_for_deployment, measure

            eps = endpoints_for_deployment(self.deployment, self.store)
            if not any(e.name in {i.id for i in new} for e in eps):
                return {}
            return measure(eps, duration_s=self.config.netbench_duration_s).bandwidth_gbps()
        except Exception as e:  # no agents (emulated nodes) or a failed run: keep the planned figures
            log.info("no link measurement for %s: %s", [i.id for i in new], e)
            return {}
