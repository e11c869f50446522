"""thunderops: serve an LLM on heterogeneous rented cloud GPUs for the most throughput per dollar.

The pipeline, one module per step: catalog -> specs/perf -> scheduler -> provision -> netbench -> serve
-> controller -> report. `thunderops.plan(...)` is the notebook entry point.
"""

from __future__ import annotations

__version__ = "0.1.0"


def plan(*args, **kwargs):
    """Find a deployment plan (see `thunderops.scheduler.plan`)."""
    from thunderops.scheduler import plan as _plan

    return _plan(*args, **kwargs)
