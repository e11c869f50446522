"""Errors that reach users. Each carries one line: what is wrong and how to fix it.

The CLI turns any `UserError` into that line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""

    exit_code = 2


class CatalogError(UserError):
    """A malformed catalog file or row."""


class SpecError(UserError):
    """An unknown or invalid GPU/model spec."""


class WorkloadError(UserError):
    """A bad workload, trace file or rate."""


class PlanError(UserError):
    """No feasible plan, or a plan that does not fit."""


class StateError(UserError):
    """Unknown deployment, corrupted state row."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' (did you mean: a, b?)' for the nearest names, or '' when none is close."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean: " + ", ".join(lowered[c] for c in close) + "?)"


class ProvisionError(UserError):
    """Cannot provision: unknown cloud/region, no credentials, budget below the cheapest feasible plan."""


class NetbenchError(UserError):
    """A node agent or network benchmark that cannot run: no token, a bad host list, ports in use."""


class ReportError(UserError):
    """A report that cannot be made: an empty store, a bad --since, an unreadable plan file."""
