"""The only code that reaches a cloud: SkyPilot SDK calls for launch, status, down (and a credentials check).

`SkyCloud` is the interface the SkyPilot provider uses; `SkyPilotSDK` implements it with SkyPilot's Python
SDK (which talks to SkyPilot's local API server). Tests swap in `tests/fakes/fake_sky.FakeSkyCloud`, a double
that keeps its own cluster list. `THUNDEROPS_SKY_ADAPTER=module:callable` selects another implementation
(used by the CLI tests to run `thunderops up/down` against the double in a separate process).
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from thunderops.errors import ProvisionError


class CapacityError(Exception):
    """No capacity or quota for the requested resources: try another offer."""


class LaunchError(Exception):
    """A launch failed for another reason (SDK error, setup failure, cancelled)."""


@dataclass
class Cluster:
    """A cluster as the cloud side reports it. `status`: INIT, UP, STOPPED."""

    name: str
    status: str
    host: str | None = None


class SkyCloud(Protocol):
    def enabled_clouds(self) -> set[str]:
        """Lower-case names of clouds with working credentials."""

    def launch(self, cluster: str, task_config: dict[str, Any], on_stage: Callable[[str], None]) -> str:
        """Provision the cluster and start the task; call on_stage('setup') once machines are up, return the
        head's address when the task runs. Raises CapacityError or LaunchError. Must return (raising
        LaunchError) soon after `cancel(cluster)`."""

    def cancel(self, cluster: str) -> None:
        """Make an in-flight launch of `cluster` give up."""

    def clusters(self, prefix: str) -> list[Cluster]:
        """Every cluster whose name starts with `prefix`."""

    def down(self, cluster: str) -> None:
        """Terminate the cluster; no error when it does not exist."""


def get_sky_cloud() -> SkyCloud:
    """The configured adapter: SkyPilot's SDK, or `$THUNDEROPS_SKY_ADAPTER` (module:callable)."""
    spec = os.environ.get("THUNDEROPS_SKY_ADAPTER")
    if not spec:
        return SkyPilotSDK()
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr or "SkyCloud")()
    except (ImportError, AttributeError) as e:
        raise ProvisionError(f"THUNDEROPS_SKY_ADAPTER={spec!r} cannot be loaded ({e}); unset it to use SkyPilot") from None


class SkyPilotSDK:
    """SkyPilot's Python SDK (requests to its local API server, which `sky api stop` stops)."""

    def __init__(self) -> None:
        self._requests: dict[str, Any] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    def enabled_clouds(self) -> set[str]:
        import sky
        from sky.client import sdk

        return {str(c).lower() for c in sky.get(sdk.enabled_clouds())}

    def launch(self, cluster: str, task_config: dict[str, Any], on_stage: Callable[[str], None]) -> str:
        import sky
        from sky import exceptions as sky_exc

        task = sky.Task.from_yaml_config(task_config)
        try:
            request = sky.launch(task, cluster_name=cluster, retry_until_up=False)
            with self._lock:
                self._requests[cluster] = request
                if cluster in self._cancelled:
                    raise LaunchError(f"{cluster}: launch cancelled")
            job_id, handle = sky.get(request)
            on_stage("setup")
            host = getattr(handle, "head_ip", None)
            self._wait_job_running(cluster, job_id)
            return str(host or "")
        except sky_exc.ResourcesUnavailableError as e:
            raise CapacityError(str(e).splitlines()[0] if str(e) else "no capacity") from None
        except (sky_exc.NoCloudAccessError, sky_exc.InvalidCloudCredentials) as e:
            raise LaunchError(f"no cloud access: {e}") from None
        except sky_exc.RequestCancelled:
            raise LaunchError(f"{cluster}: launch cancelled") from None
        except LaunchError:
            raise
        except Exception as e:  # any other SDK failure is a failed launch, never an unknown state
            raise LaunchError(f"{type(e).__name__}: {e}") from None
        finally:
            with self._lock:
                self._requests.pop(cluster, None)

    def _wait_job_running(self, cluster: str, job_id: int | None) -> None:
        """The job's setup has finished once it is RUNNING (SkyPilot runs setup before the job's run)."""
        import time

        import sky

        if job_id is None:
            return
        while True:
            with self._lock:
                if cluster in self._cancelled:
                    raise LaunchError(f"{cluster}: launch cancelled")
            statuses = sky.get(sky.job_status(cluster, [job_id]))
            status = statuses.get(job_id) if isinstance(statuses, dict) else None
            name = getattr(status, "value", str(status))
            if name == "RUNNING":
                return
            if name in ("FAILED", "FAILED_SETUP", "FAILED_DRIVER", "CANCELLED", "SUCCEEDED"):
                raise LaunchError(f"{cluster}: job {job_id} ended {name} during setup; see `sky logs {cluster}`")
            time.sleep(5)

    def cancel(self, cluster: str) -> None:
        import sky

        with self._lock:
            self._cancelled.add(cluster)
            request = self._requests.get(cluster)
        if request is not None:
            try:
                sky.get(sky.api_cancel(request, silent=True))
            except Exception:  # the request may already be over
                pass

    def clusters(self, prefix: str) -> list[Cluster]:
        import sky

        records = sky.get(sky.status(refresh=sky.StatusRefreshMode.AUTO))
        out = []
        for r in records:
            name = r["name"] if isinstance(r, dict) else r.name
            if not name.startswith(prefix):
                continue
            status = r["status"] if isinstance(r, dict) else r.status
            handle = r["handle"] if isinstance(r, dict) else getattr(r, "handle", None)
            out.append(Cluster(name, getattr(status, "value", str(status)), getattr(handle, "head_ip", None)))
        return out

    def down(self, cluster: str) -> None:
        import sky
        from sky import exceptions as sky_exc

        try:
            sky.get(sky.down(cluster))
        except sky_exc.ClusterDoesNotExist:
            pass
