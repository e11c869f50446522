"""Shared inventories for the scheduler benchmarks (no I/O: built in memory)."""

from __future__ import annotations

from thunderops.scheduler.inventory import Inventory, parse_inventory

# one "block" of 32 GPUs: two 8xA100-80GB servers, two 4xA40 boxes and two 4xRTX 3090 Ti boxes
BLOCK = [("A100-80GB", 8, 100.0), ("A100-80GB", 8, 100.0), ("A40", 4, 40.0), ("A40", 4, 40.0),
         ("RTX3090Ti", 4, 10.0), ("RTX3090Ti", 4, 10.0)]


def fleet(gpus: int) -> Inventory:
    """A mixed in-house fleet of `gpus` GPUs (a multiple of 32), several sites of one block each."""
    nodes = []
    for site in range(gpus // 32):
        for k, (gpu, n, gbps) in enumerate(BLOCK):
            nodes.append({"name": f"s{site}-{gpu.lower()}-{k}", "gpu": gpu, "gpus": n, "network_gbps": gbps,
                          "region": f"site{site}"})
    return parse_inventory({"nodes": nodes}, f"fleet-{gpus}")


def paper(link_gbps: float) -> Inventory:
    """The ThunderServe case study: 4xA40 + 4xRTX 3090 Ti joined by one link."""
    return parse_inventory({
        "nodes": [{"name": "a40-box", "gpu": "A40", "gpus": 4, "network_gbps": link_gbps},
                  {"name": "rtx3090ti-box", "gpu": "RTX3090Ti", "gpus": 4, "network_gbps": link_gbps}],
        "links": [{"a": "a40-box", "b": "rtx3090ti-box", "gbps": link_gbps}]}, f"paper-{link_gbps:g}gbps")
