"""The deployment's events as plain rows (`thunderops events`)."""

from __future__ import annotations

from typing import Any

from thunderops.state import Store


def event_rows(store: Store, deployment: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The deployment's events as plain rows (what `thunderops events` prints)."""
    return [{"id": e.id, "ts": e.ts, "kind": e.kind, "message": e.message, "payload": e.payload}
            for e in store.events(deployment, kind)]
