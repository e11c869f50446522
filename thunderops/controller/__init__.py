"""The controller: keeps a running deployment serving through lost nodes, preemption notices and workload shifts.

One loop (`Controller.run`, `thunderops watch DEPLOYMENT`; `thunderops up` starts it in the background with
`start_background`) looks, every `interval_s`, at:
- engine health: each router replica's `/health` (a refused connection counts at once; a timeout after
  `fail_threshold` probes in a row);
- the provider's node status (Ray node liveness for `local`, SkyPilot's cluster list for clouds);
- the node agents' preemption notices (AWS spot interruption / GCP preempted flag, `GET /v1/preemption`);
- the router's usage records (prompt/output lengths, request rate) and the spend against `max_spend` ($).

On a lost or doomed node it drops that node's replicas from the router at once, runs the scheduler's
lightweight reschedule (groups and layouts kept, phases and routing re-decided), stores the new plan version,
pushes its routing table and records a `reschedule` event (before/after versions, predicted goodput). Then,
in the background, it reprovisions the same GPUs within the $/h budget (avoiding a preempted zone for a while,
on-demand once spot keeps failing), starts engines on them, measures links where agents answer, and folds the
lost groups back in on the new nodes (same layouts; phases and routing re-decided). A workload shift (mean
prompt or output length moving by more than `shift_threshold`) re-decides phases and routing likewise.

Every decision is an event in the state store (`thunderops events DEPLOYMENT`). The controller keeps no state
of its own that matters: killed and restarted, it reads the latest plan, the router's table and the events
(pending reprovisions, avoided zones, spot failures) and carries on; decisions are keyed by plan version and
instance ids, so none is taken twice.

Modules:
- config.py: ControllerConfig (the loop's knobs), ControllerError, GONE_STATUSES.
- router_access.py: save_router / load_router (router address, admin key, engine launcher kept per deployment),
  launcher_from, RouterAdmin (the router's admin API).
- engines.py: EngineLauncher and its kinds NodeEngines, LocalEmulators, RayEmulators (+ the `_EngineActor` Ray
  actor class), wait_engines.
- surgery.py: plan surgery: with_fallbacks, next_instance_id, fold_in, observed_workload (the plan's own
  workload: `thunderops.workload.plan_workload`).
- loop.py: the Controller (looking, dropping, rescheduling, routing, spend guard, workload shift), ControllerStatus,
  start_background.
- reprovision.py: Pending and the Controller's reprovisioning part (a mixin the Controller inherits).
- events.py: event_rows.
"""

from thunderops.controller.config import GONE_STATUSES, ControllerConfig, ControllerError
from thunderops.controller.engines import (
    EngineLauncher,
    LocalEmulators,
    NodeEngines,
    RayEmulators,
    wait_engines,
)
from thunderops.controller.events import event_rows
from thunderops.controller.loop import Controller, ControllerStatus, start_background
from thunderops.controller.reprovision import Pending, Reprovisioning
from thunderops.controller.router_access import RouterAdmin, launcher_from, load_router, save_router
from thunderops.controller.surgery import (
    FALLBACK_FRACTION,
    fold_in,
    next_instance_id,
    observed_workload,
    with_fallbacks,
)

__all__ = [
    "FALLBACK_FRACTION",
    "GONE_STATUSES",
    "Controller",
    "ControllerConfig",
    "ControllerError",
    "ControllerStatus",
    "EngineLauncher",
    "LocalEmulators",
    "NodeEngines",
    "Pending",
    "RayEmulators",
    "Reprovisioning",
    "RouterAdmin",
    "event_rows",
    "fold_in",
    "launcher_from",
    "load_router",
    "next_instance_id",
    "observed_workload",
    "save_router",
    "start_background",
    "wait_engines",
    "with_fallbacks",
]
