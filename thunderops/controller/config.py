"""The controller's knobs and its error: ControllerConfig, ControllerError, GONE_STATUSES."""

from __future__ import annotations

from dataclasses import dataclass

from thunderops.errors import UserError

# Provider node statuses that mean the machine is gone (or going) and its replicas with it.
GONE_STATUSES = {"missing", "dead", "failed", "preempted", "terminated", "terminating"}


class ControllerError(UserError):
    """The controller cannot watch this deployment (no router address or key, unknown deployment)."""


@dataclass
class ControllerConfig:
    """Knobs of the watch loop. Times in seconds, money in $ (max_spend) and $/h (the plan's budget)."""

    interval_s: float = 0.5
    probe_timeout_s: float = 1.0
    # A refused connection means the engine process is gone: dead at once. Probes that time out (a frozen or
    # unreachable node, or just a busy machine) count only once they have failed in a row for this long.
    fail_after_s: float = 2.5
    provider_interval_s: float = 1.0
    notice_interval_s: float = 2.0
    usage_interval_s: float = 5.0
    max_spend: float | None = None  # $ over the deployment's life; None = no limit
    spend_horizon_s: float = 120.0  # act this long before the limit would be reached at the current $/h
    reprovision: bool = True
    reprovision_backoff_s: float = 30.0
    restart_grace_s: float = 3.0  # wait before restarting engines on a node the provider still calls alive
    max_reprovision_attempts: int = 5
    avoid_zone_s: float = 1800.0  # keep away from a zone this long after a preemption there
    spot_failures_for_on_demand: int = 2  # spot losses/failures of one GPU type before replacing on demand
    shift_threshold: float = 0.3  # relative change of mean prompt/output length that re-decides phases
    shift_min_requests: int = 200
    shift_window: int = 2000  # usage records looked at
    netbench_duration_s: float = 1.0
    engine_timeout_s: float = 120.0
