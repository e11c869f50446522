"""Inventory files: GPUs you already have (in-house servers, the paper's setups), as YAML.

```yaml
nodes:
  - name: a40-box            # unique; becomes the instance id
    gpu: A40                 # any name `thunderops catalog gpus` knows
    gpus: 4
    host: 10.0.0.11          # optional: address for the local provider
    price_per_hour: 0        # optional: what the node costs you, $/h
    network_gbps: 40         # optional: the node's network
    region: lab-1            # optional: cloud, region, zone (default local, local, "")
links:                       # optional: Gbps between node pairs (both directions)
  - {a: a40-box, b: 3090-box, gbps: 5}
```
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import yaml

from thunderops.errors import PlanError, SpecError, suggest
from thunderops.plan import Instance
from thunderops.specs import get_gpu

NODE_KEYS = {"name", "gpu", "gpus", "host", "price_per_hour", "network_gbps", "cloud", "region", "zone"}


@dataclass
class Inventory:
    instances: list[Instance]
    links: dict[tuple[str, str], float]
    source: str = ""


def parse_inventory(data: object, source: str = "inventory", as_of: str = "") -> Inventory:
    """Validate a parsed inventory document (see the module doc for the schema)."""
    where = source
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) or not data["nodes"]:
        raise PlanError(f"{where}: expected a 'nodes:' list with at least one node (name, gpu, gpus)")
    instances: list[Instance] = []
    seen: set[str] = set()
    for n, node in enumerate(data["nodes"], start=1):
        if not isinstance(node, dict):
            raise PlanError(f"{where}: node {n} must be a mapping with name, gpu, gpus")
        name = str(node.get("name") or f"node{n}")
        unknown = sorted(set(map(str, node)) - NODE_KEYS)
        if unknown:  # a typo (price_per_hr) would otherwise leave the field at its default, silently
            raise PlanError(f"{where}: node '{name}' has unknown key {unknown[0]!r}{suggest(unknown[0], NODE_KEYS)}; "
                            f"a node takes {', '.join(sorted(NODE_KEYS))}")
        if name in seen:
            raise PlanError(f"{where}: node name '{name}' appears twice; names must be unique")
        seen.add(name)
        if "gpu" not in node:
            raise PlanError(f"{where}: node '{name}' has no 'gpu:' (e.g. gpu: A100)")
        try:
            gpu = get_gpu(str(node["gpu"]))
        except SpecError as e:
            raise PlanError(f"{where}: node '{name}': {e}") from None
        if isinstance(node.get("gpus", 1), float) and not float(node["gpus"]).is_integer():
            raise PlanError(f"{where}: node '{name}': gpus must be a whole number, got {node['gpus']}")
        try:
            gpus = int(node.get("gpus", 1))
            price = float(node.get("price_per_hour", 0.0))
            net = node.get("network_gbps")
            net = float(net) if net is not None else None
        except (TypeError, ValueError):
            raise PlanError(f"{where}: node '{name}': gpus, price_per_hour and network_gbps must be numbers") from None
        if gpus < 1 or price < 0 or (net is not None and net <= 0):
            raise PlanError(f"{where}: node '{name}': need gpus >= 1, price_per_hour >= 0, network_gbps > 0")
        instances.append(Instance(
            id=name, cloud=str(node.get("cloud", "local")), region=str(node.get("region", "local")),
            zone=str(node.get("zone", "")), instance_type=f"{gpus}x{gpu.name}", gpu=gpu.name, gpus=gpus,
            spot=False, price_per_hour=price, network_gbps=net, source=f"inventory {source}", as_of=as_of,
            host=str(node["host"]) if node.get("host") else None,
        ))
    links: dict[tuple[str, str], float] = {}
    for k, link in enumerate(data.get("links") or [], start=1):
        try:
            if isinstance(link, dict):
                a, b, g = str(link["a"]), str(link["b"]), float(link["gbps"])
            else:
                a, b, g = str(link[0]), str(link[1]), float(link[2])
        except (KeyError, IndexError, TypeError, ValueError):
            raise PlanError(f"{where}: link {k} must be {{a: NODE, b: NODE, gbps: NUMBER}}") from None
        for end in (a, b):
            if end not in seen:
                raise PlanError(f"{where}: link {k} names unknown node '{end}'; nodes are {', '.join(sorted(seen))}")
        if g <= 0:
            raise PlanError(f"{where}: link {k} ({a} - {b}) needs gbps > 0")
        links[(a, b)] = g
        links[(b, a)] = g
    return Inventory(instances, links, source)


def load_inventory(path: str | Path) -> Inventory:
    """Read and validate an inventory YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
        as_of = dt.date.fromtimestamp(path.stat().st_mtime).isoformat()
    except OSError as e:
        raise PlanError(f"{path}: cannot read inventory ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise PlanError(f"{path}: not valid YAML{at}; see docs/scheduler.md for the inventory format") from None
    return parse_inventory(data, str(path), as_of)
