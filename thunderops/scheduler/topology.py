"""Links between instances: Gbps defaults from specs and catalogs, overridden by explicit or measured values.

Inside a node the GPU spec's interconnect (NVLink or PCIe) applies. Between nodes in one zone the instances'
network Gbps (the slower side); across zones of a region a fraction of that; across regions and clouds low
configurable defaults. Overrides (an inventory's links, a `--bandwidth` file, netbench's measured matrix) are
keyed by instance id, host or region and win over defaults.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from thunderops.errors import PlanError
from thunderops.perf import DEFAULT_NETWORK_GBPS, shared_nic_gbps
from thunderops.plan import Instance
from thunderops.specs import GpuSpec, get_gpu


@dataclass(frozen=True)
class LinkDefaults:
    """Gbps assumed where nothing better is known."""

    same_region_factor: float = 0.5  # different zones of one region, relative to the node network
    cross_region_gbps: float = 5.0
    cross_cloud_gbps: float = 2.0
    unknown_network_gbps: float = DEFAULT_NETWORK_GBPS  # a node whose network speed the catalog does not give


def intra_node_gbps(gpu: GpuSpec) -> float:
    """One direction of the GPU-to-GPU link in Gbps (datasheets give bidirectional GB/s)."""
    return gpu.intra_link_gbps * 8.0 / 2.0


class Topology:
    """Gbps between any two instances (same instance = intra-node link)."""

    def __init__(self, overrides: Mapping[tuple[str, str], float] | None = None,
                 defaults: LinkDefaults | None = None) -> None:
        self.defaults = defaults or LinkDefaults()
        self.overrides: dict[tuple[str, str], float] = {}
        for (a, b), v in (overrides or {}).items():
            self.overrides[(a, b)] = float(v)
            self.overrides.setdefault((b, a), float(v))
        self._fastest: dict[str, float] = {}  # per instance id / host: its fastest explicit link to another node
        for (a, b), v in self.overrides.items():
            if a != b:
                self._fastest[a] = max(self._fastest.get(a, 0.0), v)

    def with_overrides(self, more: Mapping[tuple[str, str], float]) -> Topology:
        merged = dict(self.overrides)
        for (a, b), v in more.items():
            merged[(a, b)] = float(v)
            merged[(b, a)] = float(v)
        return Topology(merged, self.defaults)

    def _override(self, a: Instance, b: Instance) -> float | None:
        for ka, kb in zip(link_names(a), link_names(b), strict=True):
            if ka and kb and (ka, kb) in self.overrides:
                return self.overrides[(ka, kb)]
        return None

    def gbps(self, a: Instance, b: Instance) -> float:
        if a.id == b.id:
            v = self.overrides.get((a.id, a.id))
            return v if v is not None else intra_node_gbps(get_gpu(a.gpu))
        v = self._override(a, b)
        if v is not None:
            return v
        d = self.defaults
        if a.cloud != b.cloud:
            return d.cross_cloud_gbps
        if a.region != b.region:
            return d.cross_region_gbps
        net = min(a.network_gbps or d.unknown_network_gbps, b.network_gbps or d.unknown_network_gbps)
        if a.zone and b.zone and a.zone != b.zone:
            return net * d.same_region_factor
        return net

    def nic_gbps(self, inst: Instance) -> float:
        """The node's network (Gbps each way), shared by all its links to other nodes: the catalog's figure,
        raised to the fastest link given or measured from it (a measured link cannot beat the NIC it crosses)."""
        return shared_nic_gbps(inst.network_gbps, (self._fastest.get(k, 0.0) for k in (inst.id, inst.host) if k),
                               self.defaults.unknown_network_gbps)

    def matrix(self, instances: Iterable[Instance]) -> dict[str, dict[str, float]]:
        insts = list(instances)
        return {a.id: {b.id: round(self.gbps(a, b), 3) for b in insts} for a in insts}


def load_bandwidth(path: str | Path) -> dict[tuple[str, str], float]:
    """Read a bandwidth file: JSON `{"a": {"b": gbps}}` (netbench's matrix), or CSV rows `src,dst,gbps`,
    or a square CSV matrix whose header row and first column name the instances. Values are Gbps."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PlanError(f"{path}: cannot read bandwidth file ({e.strerror})") from None
    out: dict[tuple[str, str], float] = {}
    try:
        if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("expected an object of objects")
            for a, row in data.items():
                if not isinstance(row, dict):
                    raise ValueError(f"row {a!r} is not an object")
                for b, v in row.items():
                    if v is not None:
                        out[(str(a), str(b))] = float(v)
        else:
            rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
            header = [c.strip() for c in rows[0]]
            if [h.lower() for h in header[:3]] == ["src", "dst", "gbps"]:
                for r in rows[1:]:
                    out[(r[0].strip(), r[1].strip())] = float(r[2])
            else:
                names = header[1:]
                for r in rows[1:]:
                    for b, v in zip(names, r[1:], strict=False):
                        if v.strip():
                            out[(r[0].strip(), b)] = float(v)
    except (ValueError, IndexError, json.JSONDecodeError) as e:
        raise PlanError(f"{path}: bad bandwidth file ({e}); use JSON {{\"a\": {{\"b\": gbps}}}} "
                        "or CSV src,dst,gbps") from None
    if not out:  # a header alone, or `{}`: planning would go on at the defaults, as if no file were given
        raise PlanError(f"{path}: names no link; give rows src,dst,gbps under the header, or netbench's JSON matrix")
    bad = [k for k, v in out.items() if not v > 0]
    if bad:
        raise PlanError(f"{path}: bandwidth must be positive Gbps, got {out[bad[0]]} for {bad[0][0]} -> {bad[0][1]}")
    return out


def link_names(inst: Instance) -> tuple[str | None, str | None, str | None]:
    """The names a given link may call an instance by, most specific first: its id, host, region."""
    return inst.id, inst.host, inst.region


def check_bandwidth_names(links: Mapping[tuple[str, str], float], instances: Iterable[Instance],
                          source: str | Path = "bandwidth") -> None:
    """Every name in a bandwidth matrix must be an instance id, host or region of the pool (what `Topology`
    matches it against): a typo would otherwise leave the link at its default, unnoticed."""
    insts = list(instances)
    known = {k for i in insts for k in link_names(i) if k}
    unknown = sorted({n for pair in links for n in pair} - known)
    if unknown:
        some = ", ".join(i.id for i in insts[:3]) + (", ..." if len(insts) > 3 else "")
        raise PlanError(f"{source}: {', '.join(unknown[:3])}{' and more' if len(unknown) > 3 else ''} "
                        f"{'is' if len(unknown) == 1 else 'are'} no instance, host or region to plan on "
                        f"(instances: {some}); name them as the inventory or the plan does")
