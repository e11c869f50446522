"""Build `catalogs/offers/<cloud>.csv` from the reference price snapshot (a one-off builder).

    python scripts/build_catalogs.py [--snapshot DIR] [--out catalogs/offers]

Reads `<snapshot>/<cloud>_gpu.csv` (SkyPilot v8 catalog rows reduced to one schema, see SOURCES.md there) and
writes one curated file per cloud in our offer schema (`thunderops.catalog.OFFER_COLUMNS`). Nothing in the
product reads the snapshot at run time; re-run this script to rebuild the shipped catalogs.

Curation (also in docs/catalog.md):
- GCP: a VM price is host + GPUs. GPU-only rows are matched to the host VM that SkyPilot would launch for that
  accelerator and count (a2/a3/a4 families, same zone); the host part is kept in host_price_* so the SkyPilot
  export can split it back. L4/T4/V100 (g2/n1 hosts, absent from the snapshot), a3-highgpu-2g/4g (no host price)
  and a3-edgegpu-8g (SkyPilot never picks it) are dropped.
- Dropped everywhere: GPUs without a spec in catalogs/gpus.csv (B300, GB200, RTX5090, ...), fractional GPU
  counts (AWS g6f, Azure NV*ads_A10_v5), rows without an on-demand price (AWS p5e: capacity blocks only).
- Corrected: Azure Standard_ND96isr_H100_v5 has 8 GPUs (the snapshot says 12); H100 NVL parts (Azure
  NC*ads_H100_v5, 94 GB Vast offers) map to our H100-NVL spec while keeping SkyPilot's accelerator name.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from thunderops.catalog import OFFER_COLUMNS  # noqa: E402
from thunderops.errors import SpecError  # noqa: E402
from thunderops.specs import get_gpu  # noqa: E402

SNAPSHOT = Path("/work/shared/reference/price-snapshot")
AS_OF = "2026-11-01"  # the snapshot's date ("late 2026" in SOURCES.md)
SOURCE = "skypilot-catalog v8 {cloud}/vms.csv (snapshot)"
CLOUDS = ["aws", "gcp", "azure", "lambda", "nebius", "oci", "vast", "cudo"]

# Node NIC in Gbps, from SOURCES.md "Inter-node network per node" (vendor docs). Keys are instance-type
# regexes; only full nodes the vendors document are listed, everything else stays empty (unknown).
NETWORK_GBPS: dict[str, list[tuple[str, float]]] = {
    "aws": [
        (r"p5\.48xlarge|p5e\.48xlarge|p5en\.48xlarge|p6-b200\.48xlarge", 3200),
        (r"p4de?\.24xlarge", 400),
        (r"p3dn\.24xlarge", 100),
        (r"p3\.16xlarge", 25),
        (r"g6e\.48xlarge", 400),
        (r"g5\.48xlarge|g6\.48xlarge|g4dn\.metal", 100),
    ],
    "gcp": [
        (r"a3-highgpu-8g", 1000),
        (r"a3-megagpu-8g", 1800),
        (r"a3-ultragpu-8g|a4-highgpu-8g", 3200),
        (r"a2-highgpu-8g|a2-megagpu-16g|a2-ultragpu-8g", 100),
    ],
    "azure": [
        (r"Standard_ND96isr_H(100|200)_v5", 3200),  # 8 x 400 Gb/s NDR InfiniBand
        (r"Standard_ND96a(m)?sr(_A100)?_v4", 1600),  # 8 x 200 Gb/s HDR InfiniBand
    ],
    "nebius": [(r"gpu-h[12]00-sxm_8gpu-.*", 3200)],
}

# SkyPilot's GCP accelerator -> {count: host VM} (sky/catalog/gcp_catalog.py _ACC_INSTANCE_TYPE_DICTS, the
# families whose host prices the snapshot has).
GCP_HOSTS = {
    "A100": {1: "a2-highgpu-1g", 2: "a2-highgpu-2g", 4: "a2-highgpu-4g", 8: "a2-highgpu-8g", 16: "a2-megagpu-16g"},
    "A100-80GB": {1: "a2-ultragpu-1g", 2: "a2-ultragpu-2g", 4: "a2-ultragpu-4g", 8: "a2-ultragpu-8g"},
    "H100": {1: "a3-highgpu-1g", 2: "a3-highgpu-2g", 4: "a3-highgpu-4g", 8: "a3-highgpu-8g"},
    "H100-MEGA": {8: "a3-megagpu-8g"},
    "H200": {8: "a3-ultragpu-8g"},
    "B200": {8: "a4-highgpu-8g"},
}

GPU_COUNT_FIX = {("azure", "Standard_ND96isr_H100_v5"): 8}
NVL_INSTANCES = re.compile(r"Standard_NC\d+adi?s_H100_v5|H100_NVL")


def _f(value: str) -> float | None:
    value = (value or "").strip()
    return float(value) if value else None


def _num(x: float | None) -> str:
    """Compact decimal text; empty for None."""
    if x is None:
        return ""
    return f"{round(x, 6):g}" if abs(x) < 1e6 else str(round(x, 6))


def network_gbps(cloud: str, instance_type: str) -> float | None:
    for pattern, gbps in NETWORK_GBPS.get(cloud, []):
        if re.fullmatch(pattern, instance_type):
            return gbps
    return None


def gpu_name(instance_type: str, accelerator: str, gpu_mem_mib: float | None) -> str:
    """Our spec name for SkyPilot's accelerator name (H100 NVL told apart by instance type or 94 GB memory)."""
    if accelerator == "H100" and (NVL_INSTANCES.search(instance_type) or (gpu_mem_mib or 0) > 90_000):
        return get_gpu("H100-NVL").name
    return get_gpu(accelerator).name


def offer(cloud: str, row: dict, *, instance_type: str, vcpus, memory, price, spot, host=(None, None)) -> dict:
    acc = row["AcceleratorName"]
    count = float(row["AcceleratorCount"])
    count = GPU_COUNT_FIX.get((cloud, instance_type), count)
    mem_mib = _f(row.get("GpuMemoryMiB", ""))
    gpu = gpu_name(instance_type, acc, mem_mib)
    gpu_mem_gib = mem_mib / 1024 if mem_mib else get_gpu(gpu).memory_gb  # datasheet "GB" are GiB-ish (80 -> 81920 MiB)
    return {
        "cloud": cloud,
        "region": row["Region"],
        "zone": row.get("AvailabilityZone", "") or "",
        "instance_type": instance_type,
        "accelerator": acc,
        "gpu": gpu,
        "gpus_per_node": int(count),
        "vcpus": _num(vcpus),
        "memory_gib": _num(memory),
        "gpu_memory_gib": _num(gpu_mem_gib),
        "price_ondemand": _num(price),
        "price_spot": _num(spot),
        "host_price_ondemand": _num(host[0]),
        "host_price_spot": _num(host[1]),
        "network_gbps": _num(network_gbps(cloud, instance_type)),
        "source": SOURCE.format(cloud=cloud),
        "as_of": AS_OF,
    }


def build_cloud(cloud: str, snapshot: Path, dropped: Counter) -> list[dict]:
    rows = list(csv.DictReader(open(snapshot / f"{cloud}_gpu.csv", newline="", encoding="utf-8")))
    hosts = {}
    if cloud == "gcp":
        for h in csv.DictReader(open(snapshot / "gcp_gpu_host_vms.csv", newline="", encoding="utf-8")):
            hosts[(h["InstanceType"], h["Region"], h["AvailabilityZone"])] = h
    out = []
    for row in rows:
        acc, count = row["AcceleratorName"], float(row["AcceleratorCount"])
        if count != int(count):
            dropped[f"{cloud}: fractional GPU count ({row['InstanceType']})"] += 1
            continue
        try:
            get_gpu(acc)
        except SpecError:
            dropped[f"{cloud}: no spec for GPU {acc}"] += 1
            continue
        price, spot = _f(row["Price"]), _f(row["SpotPrice"])
        if cloud != "gcp":
            if price is None:
                dropped[f"{cloud}: no on-demand price ({row['InstanceType']})"] += 1
                continue
            out.append(offer(cloud, row, instance_type=row["InstanceType"], vcpus=_f(row["vCPUs"]),
                             memory=_f(row["MemoryGiB"]), price=price, spot=spot))
            continue
        host_type = GCP_HOSTS.get(acc, {}).get(int(count))
        if host_type is None:
            dropped[f"gcp: {acc} needs an n1/g2 host VM, not in the snapshot"] += 1
            continue
        host = hosts.get((host_type, row["Region"], row["AvailabilityZone"]))
        if host is None:
            dropped[f"gcp: no host price for {host_type}"] += 1
            continue
        if price is None:
            dropped[f"gcp: no on-demand price ({acc} x{int(count)})"] += 1
            continue
        hp, hs = _f(host["HostPrice"]), _f(host["HostSpotPrice"])
        vm_spot = spot + hs if spot is not None and hs is not None else None
        out.append(offer(cloud, row, instance_type=host_type, vcpus=_f(host["vCPUs"]), memory=_f(host["MemoryGiB"]),
                         price=price + hp, spot=vm_spot, host=(hp, hs if vm_spot is not None else None)))
    # One row per (instance type, region, zone): the snapshot repeats a few; keep the first.
    seen, unique = set(), []
    for o in out:
        key = (o["instance_type"], o["region"], o["zone"])
        if key in seen:
            dropped[f"{cloud}: duplicate row ({o['instance_type']})"] += 1
            continue
        seen.add(key)
        unique.append(o)
    unique.sort(key=lambda o: (o["gpu"], o["instance_type"], o["region"], o["zone"]))
    return unique


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", type=Path, default=SNAPSHOT)
    ap.add_argument("--out", type=Path, default=REPO / "catalogs" / "offers")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dropped: Counter = Counter()
    for cloud in CLOUDS:
        offers = build_cloud(cloud, args.snapshot, dropped)
        tmp = args.out / f".{cloud}.csv.tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=OFFER_COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows(offers)
        tmp.replace(args.out / f"{cloud}.csv")
        print(f"{cloud}: {len(offers)} offers")
    for reason, n in sorted(dropped.items()):
        print(f"  dropped {n:4d}: {reason}")


if __name__ == "__main__":
    main()
