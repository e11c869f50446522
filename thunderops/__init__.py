"""thunderops: serve an LLM on heterogeneous rented cloud GPUs for the most throughput per dollar.

The pipeline, one module per step: catalog -> specs/perf -> scheduler -> provision -> netbench -> serve
-> controller -> report. `thunderops.plan(...)` is the notebook entry point: the `thunderops.plan` module (the
Plan dataclasses) is callable and hands the call to `thunderops.scheduler.plan`.
"""

from __future__ import annotations

from thunderops import plan

__version__ = "0.1.0"
__all__ = ["plan"]
