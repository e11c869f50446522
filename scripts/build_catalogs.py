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
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from thunderops.catalog import offers_from_skypilot, write_offers  # noqa: E402

SNAPSHOT = Path("/work/shared/reference/price-snapshot")
AS_OF = "2026-11-01"  # the snapshot's date ("late 2026" in its SOURCES.md)
SOURCE = "skypilot-catalog v8 {cloud}/vms.csv (snapshot)"
CLOUDS = ["aws", "gcp", "azure", "lambda", "nebius", "oci", "vast", "cudo"]


def snapshot_rows(cloud: str, snapshot: Path) -> list[dict]:
    """The snapshot's rows for one cloud in SkyPilot's vms.csv shape (GCP host VMs as accelerator-less rows)."""
    with open(snapshot / f"{cloud}_gpu.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if cloud == "gcp":
        with open(snapshot / "gcp_gpu_host_vms.csv", newline="", encoding="utf-8") as f:
            for h in csv.DictReader(f):
                rows.append({"InstanceType": h["InstanceType"], "AcceleratorName": "", "vCPUs": h["vCPUs"],
                             "MemoryGiB": h["MemoryGiB"], "Price": h["HostPrice"], "SpotPrice": h["HostSpotPrice"],
                             "Region": h["Region"], "AvailabilityZone": h["AvailabilityZone"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", type=Path, default=SNAPSHOT)
    ap.add_argument("--out", type=Path, default=REPO / "catalogs" / "offers")
    args = ap.parse_args()
    dropped: Counter = Counter()
    for cloud in CLOUDS:
        offers, why = offers_from_skypilot(cloud, snapshot_rows(cloud, args.snapshot),
                                           source=SOURCE.format(cloud=cloud), as_of=AS_OF)
        write_offers(args.out / f"{cloud}.csv", offers)
        dropped += why
        print(f"{cloud}: {len(offers)} offers", flush=True)
    for reason, n in sorted(dropped.items()):
        print(f"  dropped {n:4d}: {reason}")


if __name__ == "__main__":
    main()
