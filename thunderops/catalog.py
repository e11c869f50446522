"""Price catalogs: load and validate our offers, export them as SkyPilot catalogs, refresh from live sources.

An *offer* is one instance type in one region/zone of one cloud with its on-demand (and maybe spot) $/h per
node. The shipped offers live in `catalogs/offers/<cloud>.csv` (built by `scripts/build_catalogs.py`), one schema
for all clouds (`OFFER_COLUMNS`). `load_offers` returns them as a pandas DataFrame with $/GPU-h columns added.
"""

from __future__ import annotations

import ast
import csv
import io
import math
import os
import re
import shutil
import socket
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import pandas as pd

from thunderops.errors import CatalogError, SpecError, suggest
from thunderops.specs import catalog_dir, get_gpu, norm

# The offer schema, in file order. host_price_* are set only where a cloud publishes the host and the GPUs as
# separate prices (GCP): price_* is always the whole node, host_price_* the host part of it.
OFFER_COLUMNS = [
    "cloud", "region", "zone", "instance_type", "accelerator", "gpu", "gpus_per_node", "vcpus", "memory_gib",
    "gpu_memory_gib", "price_ondemand", "price_spot", "host_price_ondemand", "host_price_spot", "network_gbps",
    "source", "as_of",
]
REQUIRED_COLUMNS = [c for c in OFFER_COLUMNS if not c.startswith("host_price_")]
DERIVED_COLUMNS = ["price_per_gpu_ondemand", "price_per_gpu_spot"]
_TEXT = ["cloud", "region", "zone", "instance_type", "accelerator", "gpu", "source", "as_of"]
_OPTIONAL_NUMBERS = ["vcpus", "memory_gib", "gpu_memory_gib", "price_spot", "host_price_ondemand",
                     "host_price_spot", "network_gbps"]
_PRICES = {"price_ondemand", "price_spot"}  # node prices; a host part may be 0 (GCP a4 bundles it)


def shipped_offers_dir() -> Path:
    """The offers shipped with thunderops: `<catalog_dir>/offers`."""
    return catalog_dir() / "offers"


def refreshed_offers_dir() -> Path:
    """Where `refresh()` writes live offers: `$THUNDEROPS_HOME/catalogs/offers` (default ~/.thunderops)."""
    home = Path(os.environ.get("THUNDEROPS_HOME") or Path.home() / ".thunderops").expanduser()
    return home / "catalogs" / "offers"


def offers_dir() -> Path:
    """The default offers: a refreshed copy when there is one (and `$THUNDEROPS_CATALOGS` is unset), else the
    shipped snapshot."""
    refreshed = refreshed_offers_dir()
    if not os.environ.get("THUNDEROPS_CATALOGS") and any(refreshed.glob("*.csv")):
        return refreshed
    return shipped_offers_dir()


# ---------------------------------------------------------------------------------------------- loading


def _catalog_files(path_or_dir: str | Path | None) -> list[Path]:
    path = Path(path_or_dir) if path_or_dir is not None else offers_dir()
    if path.is_dir():
        files = sorted(p for p in path.glob("*.csv") if not p.name.startswith("."))
        if not files:
            raise CatalogError(f"{path}: no offer files (*.csv) here; run scripts/build_catalogs.py or pass a CSV")
        return files
    if path.is_file():
        return [path]
    raise CatalogError(f"{path}: no such catalog file or directory; pass an offers CSV or a directory of them")


def _number(value: str, col: str, where: str, *, required: bool) -> float:
    text = (value or "").strip()
    if not text:
        if required:
            raise CatalogError(f"{where}: missing {col}; every offer needs an on-demand $/h price")
        return math.nan
    try:
        x = float(text)
    except ValueError:
        raise CatalogError(f"{where}: {col}={text!r} is not a number; write a plain decimal like 3.67") from None
    if not math.isfinite(x) or x < 0 or (col in _PRICES and x == 0):
        what = "a positive $/h price" if col in _PRICES else "a finite number >= 0"
        raise CatalogError(f"{where}: {col}={text!r} must be {what}; fix or drop the row")
    return x


def _parse_row(raw: dict, where: str) -> dict:
    if None in raw or any(v is None for v in raw.values()):
        raise CatalogError(f"{where}: wrong number of fields; every row needs the {len(raw) - (None in raw)} "
                           "header columns (quote values that contain commas)")
    row: dict = {c: (raw.get(c) or "").strip() for c in _TEXT}
    for col, value in row.items():
        if any(ch < " " for ch in value):
            raise CatalogError(f"{where}: {col} contains a line break or control character; put it on one line")
    for col in ("cloud", "region", "instance_type", "gpu", "source", "as_of"):
        if not row[col]:
            raise CatalogError(f"{where}: empty {col}; fill it in (source and as_of say where a price comes from)")
    row["cloud"] = row["cloud"].lower()
    try:
        date.fromisoformat(row["as_of"])
    except ValueError:
        raise CatalogError(f"{where}: as_of={row['as_of']!r} is not a date; write YYYY-MM-DD") from None
    try:
        row["gpu"] = get_gpu(row["gpu"]).name
    except SpecError as e:
        raise CatalogError(f"{where}: {e}") from None
    if not row["accelerator"]:
        row["accelerator"] = row["gpu"]
    count = _number(raw.get("gpus_per_node", ""), "gpus_per_node", where, required=True)
    if count < 1 or count != int(count):
        raise CatalogError(f"{where}: gpus_per_node={raw['gpus_per_node']!r} must be a whole number >= 1")
    row["gpus_per_node"] = int(count)
    row["price_ondemand"] = _number(raw.get("price_ondemand", ""), "price_ondemand", where, required=True)
    for col in _OPTIONAL_NUMBERS:
        row[col] = _number(raw.get(col, ""), col, where, required=False)
    return row


def _read_file(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise CatalogError(f"{path}: missing column(s) {', '.join(missing)}; the header must include "
                                   f"{','.join(REQUIRED_COLUMNS)}")
            reader.fieldnames = header
            rows, seen = [], {}
            end = reader.line_num
            for raw in reader:
                line, end = end + 1, reader.line_num  # where the row starts (a quoted value may span lines)
                where = f"{path}:{line}"
                row = _parse_row(raw, where)
                key = (row["cloud"], row["instance_type"], row["region"], row["zone"])
                if key in seen:
                    raise CatalogError(f"{where}: duplicate offer {'/'.join(key[:3])} {key[3]} (also at line "
                                       f"{seen[key]}); keep one row per instance type, region and zone")
                seen[key] = line
                rows.append(row)
            return rows
    except UnicodeDecodeError:
        raise CatalogError(f"{path}: not UTF-8 text; save the catalog as UTF-8 CSV") from None
    except csv.Error as e:
        raise CatalogError(f"{path}: malformed CSV ({e}); check quoting") from None


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    items = [s.strip() for item in items for s in str(item).split(",") if s.strip()]
    return items or None


def _match_names(wanted: list[str], available: Iterable[str], what: str) -> set[str]:
    """Forgiving exact match (case and separators ignored); unknown names raise with the nearest ones."""
    by_key = {norm(a): a for a in available}
    out = set()
    for name in wanted:
        hit = by_key.get(norm(name))
        if hit is None:
            raise CatalogError(f"unknown {what} '{name}'{suggest(name, sorted(by_key.values()))}; "
                               f"`thunderops catalog list` shows the {what}s on offer")
        out.add(hit)
    return out


def load_offers(
    path_or_dir: str | Path | None = None,
    clouds: str | Iterable[str] | None = None,
    regions: str | Iterable[str] | None = None,
    gpus: str | Iterable[str] | None = None,
    spot: bool | None = None,
    max_price_per_gpu: float | None = None,
) -> pd.DataFrame:
    """Load and validate offers, filter them, and sort by $/GPU-h (cheapest first).

    `path_or_dir`: one offers CSV or a directory of them (default: the shipped `catalogs/offers/`).
    `clouds`, `regions`, `gpus`: names or lists (comma-separated text works too); case and separators do not
    matter, GPU aliases resolve (`a100_80gb`). `spot=True` keeps offers with a spot price and prices them at
    spot; `False`/`None` price on demand. `max_price_per_gpu` ($/GPU-h) applies to that same price.

    Returns one row per offer with `OFFER_COLUMNS` plus `price_per_gpu_ondemand` and `price_per_gpu_spot`
    ($/GPU-h; NaN where no spot price). Raises CatalogError (file:line and the fix) on any bad row, and when a
    filter names something unknown or leaves nothing.
    """
    rows = [row for path in _catalog_files(path_or_dir) for row in _read_file(path)]
    if not rows:
        raise CatalogError(f"{path_or_dir or offers_dir()}: no offers in the catalog; add rows or rebuild it")
    df = pd.DataFrame(rows, columns=OFFER_COLUMNS)
    df["gpus_per_node"] = df["gpus_per_node"].astype(int)
    df["price_per_gpu_ondemand"] = df["price_ondemand"] / df["gpus_per_node"]
    df["price_per_gpu_spot"] = df["price_spot"] / df["gpus_per_node"]

    filters = []
    if (wanted := _as_list(clouds)) is not None:
        df = df[df["cloud"].isin(_match_names(wanted, df["cloud"].unique(), "cloud"))]
        filters.append(f"cloud={','.join(wanted)}")
    if (wanted := _as_list(regions)) is not None:
        df = df[df["region"].isin(_match_names(wanted, df["region"].unique(), "region"))]
        filters.append(f"region={','.join(wanted)}")
    if (wanted := _as_list(gpus)) is not None:
        names = {get_gpu(g).name for g in wanted}  # unknown GPU -> SpecError with the nearest names
        df = df[df["gpu"].isin(names)]
        filters.append(f"gpu={','.join(sorted(names))}")
    price_col = "price_per_gpu_spot" if spot else "price_per_gpu_ondemand"
    if spot:
        df = df[df["price_spot"].notna()]
        filters.append("spot")
    if max_price_per_gpu is not None:
        if not (isinstance(max_price_per_gpu, int | float) and max_price_per_gpu > 0):
            raise CatalogError(f"max price per GPU {max_price_per_gpu!r} must be a positive $/GPU-h number")
        df = df[df[price_col] <= max_price_per_gpu]
        filters.append(f"max {max_price_per_gpu:g} $/GPU-h")
    if df.empty:
        raise CatalogError(f"no offers match {', '.join(filters)}; loosen a filter "
                           "(`thunderops catalog list` shows what is on offer)")
    return df.sort_values([price_col, "cloud", "region", "zone", "instance_type"]).reset_index(drop=True)





def offer_key(row: pd.Series | dict) -> str:
    """A stable id for one offer: cloud/region/zone/instance_type (zone may be empty)."""
    return "/".join(str(row[c]) for c in ("cloud", "region", "zone", "instance_type"))


# ------------------------------------------------------------------------------ SkyPilot's catalog format
# SkyPilot v8 `<cloud>/vms.csv`: one row per instance type and region (and zone on AWS/GCP/OCI), prices in $/h
# per node. Column order differs per cloud; these are the orders SkyPilot's own fetchers write
# (sky/catalog/data_fetchers), which its catalog modules read by column name.
SKYPILOT_COLUMNS = {
    "aws": ["InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "GpuInfo", "Price",
            "SpotPrice", "Region", "AvailabilityZone", "Arch"],
    "gcp": ["InstanceType", "vCPUs", "MemoryGiB", "AcceleratorName", "AcceleratorCount", "GpuInfo", "Region",
            "AvailabilityZone", "Price", "SpotPrice"],
    "azure": ["InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "GpuInfo", "Price",
              "SpotPrice", "Region", "Generation"],
    "oci": ["InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "GpuInfo", "Price",
            "SpotPrice", "Region", "AvailabilityZone"],
    "vast": ["InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "GpuInfo", "Price",
             "SpotPrice", "Region"],
    **{c: ["InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "Price", "Region",
           "GpuInfo", "SpotPrice"] for c in ("lambda", "nebius", "cudo")},
}
SKYPILOT_CLOUDS = list(SKYPILOT_COLUMNS)

# SkyPilot's GCP accelerator -> {count: host VM} for the families whose host is priced separately and listed
# in our sources (sky/catalog/gcp_catalog.py `_ACC_INSTANCE_TYPE_DICTS`; L4 on the smallest g2 per count).
# T4/V100 ride on n1 hosts that SkyPilot sizes per request; we do not offer them on GCP (docs/catalog.md).
GCP_HOSTS = {
    "A100": {1: "a2-highgpu-1g", 2: "a2-highgpu-2g", 4: "a2-highgpu-4g", 8: "a2-highgpu-8g", 16: "a2-megagpu-16g"},
    "A100-80GB": {1: "a2-ultragpu-1g", 2: "a2-ultragpu-2g", 4: "a2-ultragpu-4g", 8: "a2-ultragpu-8g"},
    "H100": {1: "a3-highgpu-1g", 2: "a3-highgpu-2g", 4: "a3-highgpu-4g", 8: "a3-highgpu-8g"},
    "H100-MEGA": {8: "a3-megagpu-8g"},
    "H200": {8: "a3-ultragpu-8g"},
    "B200": {8: "a4-highgpu-8g"},
    "L4": {1: "g2-standard-4", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"},  # smallest g2
}

# Node NIC in Gbps from vendor documentation (full nodes only; anything else stays empty = unknown).
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
    "nebius": [(r"gpu-h[12]00-sxm_8gpu-.*", 3200)],  # 3.2 Tb/s InfiniBand
}

# Upstream data fixes, each checked against the vendor's own page.
GPU_COUNT_FIX = {("azure", "Standard_ND96isr_H100_v5"): 8}  # learn.microsoft.com ND H100 v5: 8 x H100
_NVL = re.compile(r"Standard_NC\d+adi?s_H100_v5|H100_NVL")  # H100 NVL 94 GB parts SkyPilot calls "H100"


def _float(value) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    if not text or text.lower() == "nan":
        return None
    return float(text)


def _num(x: float | None) -> str:
    return "" if x is None else f"{round(x, 6):.6f}".rstrip("0").rstrip(".")


def network_gbps(cloud: str, instance_type: str) -> float | None:
    """The node NIC in Gbps where the vendor documents it, else None."""
    for pattern, gbps in NETWORK_GBPS.get(cloud, []):
        if re.fullmatch(pattern, instance_type):
            return gbps
    return None


def _gpu_memory_mib(row: dict) -> float | None:
    if (mib := _float(row.get("GpuMemoryMiB"))) is not None:
        return mib
    info = row.get("GpuInfo")
    if isinstance(info, str) and info.startswith("{"):
        try:
            return float(ast.literal_eval(info)["Gpus"][0]["MemoryInfo"]["SizeInMiB"])
        except (ValueError, SyntaxError, KeyError, IndexError, TypeError):
            return None
    return None


def offers_from_skypilot(cloud: str, rows: Iterable[dict], *, source: str, as_of: str) -> tuple[list[dict], Counter]:
    """Turn SkyPilot vms.csv rows (dicts) into our offer rows; returns (offers, why-dropped counts).

    GCP rows with an InstanceType and no accelerator are host VMs; GPU-only rows are priced onto the host that
    SkyPilot launches for that accelerator and count in the same zone (VM price = host + GPUs). Rows may give
    GPU memory as SkyPilot's GpuInfo or as GpuMemoryMiB (the reference snapshot's reduction).
    """
    rows = list(rows)
    dropped: Counter = Counter()
    hosts = {}
    if cloud == "gcp":
        for r in rows:
            if (r.get("InstanceType") or "") and not (r.get("AcceleratorName") or ""):
                hosts[(r["InstanceType"], r["Region"], r.get("AvailabilityZone") or "")] = r
    out: list[dict] = []
    seen: set = set()
    for r in rows:
        acc = str(r.get("AcceleratorName") or "").strip()
        count = _float(r.get("AcceleratorCount"))
        if not acc or count is None or count <= 0:
            continue  # CPU-only rows and GCP hosts
        if count != int(count):
            dropped[f"{cloud}: fractional GPU count ({r.get('InstanceType')})"] += 1
            continue
        if acc.lower().startswith("tpu"):
            continue
        try:
            get_gpu(acc)
        except SpecError:
            dropped[f"{cloud}: no spec for GPU {acc}"] += 1
            continue
        price, spot = _float(r.get("Price")), _float(r.get("SpotPrice"))
        instance_type, vcpus, memory = str(r.get("InstanceType") or ""), r.get("vCPUs"), r.get("MemoryGiB")
        host_price = host_spot = None
        zone = str(r.get("AvailabilityZone") or "")
        if cloud == "gcp":
            instance_type = GCP_HOSTS.get(acc, {}).get(int(count), "")
            if not instance_type:
                dropped[f"gcp: {acc} x{int(count)} needs an n1 host sized per request; not offered"] += 1
                continue
            host = hosts.get((instance_type, r["Region"], zone))
            if host is None or _float(host.get("Price")) is None:
                dropped[f"gcp: no host price for {instance_type}"] += 1
                continue
            vcpus, memory = host.get("vCPUs"), host.get("MemoryGiB")
            host_price, host_spot = _float(host["Price"]), _float(host.get("SpotPrice"))
            if price is not None:
                price += host_price
            spot = spot + host_spot if spot is not None and host_spot is not None else None
            host_spot = host_spot if spot is not None else None
        if price is None or price <= 0:
            dropped[f"{cloud}: no on-demand price ({instance_type})"] += 1
            continue
        key = (instance_type, r["Region"], zone)
        if key in seen:
            dropped[f"{cloud}: duplicate row ({instance_type})"] += 1
            continue
        seen.add(key)
        count = GPU_COUNT_FIX.get((cloud, instance_type), count)
        mem_mib = _gpu_memory_mib(r)
        gpu = get_gpu(acc).name
        if acc == "H100" and (_NVL.search(instance_type) or (mem_mib or 0) > 90_000):
            gpu = get_gpu("H100-NVL").name
        out.append({
            "cloud": cloud, "region": r["Region"], "zone": zone, "instance_type": instance_type,
            "accelerator": acc, "gpu": gpu, "gpus_per_node": int(count),
            "vcpus": _num(_float(vcpus)), "memory_gib": _num(_float(memory)),
            # Datasheet "80 GB" is what SkyPilot lists as 81920 MiB, so the spec value stands in for GiB.
            "gpu_memory_gib": _num(mem_mib / 1024 if mem_mib else get_gpu(gpu).memory_gb),
            "price_ondemand": _num(price), "price_spot": _num(spot if spot and spot > 0 else None),
            "host_price_ondemand": _num(host_price), "host_price_spot": _num(host_spot),
            "network_gbps": _num(network_gbps(cloud, instance_type)), "source": source, "as_of": as_of,
        })
    out.sort(key=lambda o: (o["gpu"], o["instance_type"], o["region"], o["zone"]))
    return out, dropped


def write_offers(path: Path, offers: list[dict]) -> None:
    """Write offer rows atomically (temp file + rename), after checking they load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=OFFER_COLUMNS, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for o in offers:
            w.writerow({k: _num(_float(v)) if isinstance(v, float) else v for k, v in o.items()})
    try:
        _read_file(tmp)
    except CatalogError:
        tmp.unlink()
        raise
    tmp.replace(path)


def _gpu_info(accelerator: str, gpu: str, count: int, mem_gib: float) -> str:
    mib = int(round(mem_gib * 1024))
    maker = "AMD" if gpu.startswith("MI") else "NVIDIA"
    info = {"Gpus": [{"Name": accelerator, "Manufacturer": maker, "Count": float(count),
                      "MemoryInfo": {"SizeInMiB": mib}}], "TotalGpuMemoryInMiB": mib * count}
    return str(info)  # SkyPilot stores a Python-literal dict (it reads it back with ast.literal_eval)


def skypilot_rows(cloud: str, offers: pd.DataFrame) -> pd.DataFrame:
    """Our offers of one cloud as SkyPilot vms.csv rows (GCP split back into host rows and GPU-only rows)."""
    rows = []
    gpu_rows: dict[tuple, dict] = {}
    for o in offers.to_dict("records"):
        gpu_info = _gpu_info(o["accelerator"], o["gpu"], o["gpus_per_node"], o["gpu_memory_gib"])
        spot = None if pd.isna(o["price_spot"]) else o["price_spot"]
        base = {"InstanceType": o["instance_type"], "AcceleratorName": o["accelerator"],
                "AcceleratorCount": float(o["gpus_per_node"]), "vCPUs": o["vcpus"], "MemoryGiB": o["memory_gib"],
                "GpuInfo": gpu_info, "Price": o["price_ondemand"], "SpotPrice": spot, "Region": o["region"],
                "AvailabilityZone": o["zone"] or None}
        if cloud == "aws":
            base["Arch"] = "x86_64"
        elif cloud == "azure":
            base["GpuInfo"] = o["accelerator"]  # SkyPilot's Azure catalog names the GPU here, nothing more
            base["Generation"] = "V1,V2"
        if cloud != "gcp":
            rows.append(base)
            continue
        # GCP: host row (no accelerator) + GPU-only row (no instance type); SkyPilot adds them back up.
        host = 0.0 if pd.isna(o["host_price_ondemand"]) else o["host_price_ondemand"]
        host_spot = None if spot is None else (0.0 if pd.isna(o["host_price_spot"]) else o["host_price_spot"])
        rows.append({**base, "AcceleratorName": None, "AcceleratorCount": None, "GpuInfo": None,
                     "Price": host, "SpotPrice": host_spot})
        key = (o["accelerator"], o["gpus_per_node"], o["region"], o["zone"])
        gpu_rows.setdefault(key, {**base, "InstanceType": None, "vCPUs": None, "MemoryGiB": None,
                                  "Price": round(o["price_ondemand"] - host, 6),
                                  "SpotPrice": None if spot is None else round(spot - host_spot, 6)})
    rows.extend(gpu_rows.values())
    return pd.DataFrame(rows, columns=SKYPILOT_COLUMNS[cloud])


# How SkyPilot writes each cloud's name in common/accelerators.csv (`str(sky.CLOUD_REGISTRY.from_str(c))`).
SKYPILOT_CLOUD_NAMES = {"aws": "AWS", "gcp": "GCP", "azure": "Azure", "lambda": "Lambda", "nebius": "Nebius",
                        "oci": "OCI", "vast": "Vast", "cudo": "Cudo"}


def skypilot_common_tables(offers: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """SkyPilot's `common/accelerators.csv` (AcceleratorName, Clouds) and `common/metadata.csv` (GPU, MemoryGB,
    Manufacturer) for the accelerators in `offers`."""
    accels = offers.dropna(subset=["accelerator"])
    clouds = accels.groupby("accelerator")["cloud"].agg(
        lambda cs: ",".join(sorted({SKYPILOT_CLOUD_NAMES.get(c, c) for c in cs})))
    memory = accels.groupby("accelerator")["gpu_memory_gib"].max()
    return {
        "common/accelerators.csv": pd.DataFrame({"AcceleratorName": clouds.index, "Clouds": clouds.values}),
        "common/metadata.csv": pd.DataFrame({
            "GPU": memory.index, "MemoryGB": memory.values,
            "Manufacturer": ["AMD" if str(a).upper().startswith("MI") else "NVIDIA" for a in memory.index]}),
    }


def skypilot_catalog_dir(runtime_dir: str | Path) -> Path:
    """Where SkyPilot reads its catalogs when SKY_RUNTIME_DIR=runtime_dir (sky/catalog/common.py)."""
    return Path(runtime_dir) / ".sky" / "catalogs" / "v8"


def export_skypilot(runtime_dir: str | Path, offers: pd.DataFrame | None = None) -> list[Path]:
    """Write SkyPilot v8 catalogs (`<dir>/.sky/catalogs/v8/<cloud>/vms.csv`) from our offers, and the common
    files SkyPilot reads besides them (`common/accelerators.csv`: accelerator -> clouds, used to canonicalize
    accelerator names; `common/metadata.csv`: GPU memory, for `{GPU: N}`-by-memory requests).

    Run SkyPilot with `SKY_RUNTIME_DIR=<dir>` and its optimizer prices, picks instance types and lists regions
    from our catalog without downloading anything: a file without a `.meta/<path>.md5` beside it counts as
    user-modified, which SkyPilot never overwrites. Returns the files written.
    """
    offers = load_offers() if offers is None else offers
    unknown = sorted(set(offers["cloud"]) - set(SKYPILOT_COLUMNS))
    if unknown:
        raise CatalogError(f"cannot export cloud(s) {', '.join(unknown)} to SkyPilot; it knows "
                           f"{', '.join(SKYPILOT_CLOUDS)}")
    base = skypilot_catalog_dir(runtime_dir)
    tables = {f"{cloud}/vms.csv": skypilot_rows(cloud, group) for cloud, group in offers.groupby("cloud")}
    tables.update(skypilot_common_tables(offers))
    written = []
    try:
        for name, table in tables.items():
            path = base / name
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            table.to_csv(tmp, index=False)
            tmp.replace(path)
            stale_md5 = base / ".meta" / f"{name}.md5"
            if stale_md5.exists():  # an md5 would mark the file as SkyPilot's own download, free to replace
                stale_md5.unlink()
            written.append(path)
    except OSError as e:
        raise CatalogError(f"{runtime_dir}: cannot write SkyPilot catalogs there ({e.strerror}); "
                           "pass a writable directory") from None
    return written


# ------------------------------------------------------------------------------------------------- refresh
# GCP's accelerator type ids for SkyPilot's names (cloud.google.com/compute/docs/gpus).
GCP_ACCELERATOR_TYPES = {"A100": "nvidia-tesla-a100", "A100-80GB": "nvidia-a100-80gb", "H100": "nvidia-h100-80gb",
                         "H100-MEGA": "nvidia-h100-mega-80gb", "H200": "nvidia-h200-141gb", "B200": "nvidia-b200"}


@dataclass
class RefreshResult:
    """What `refresh()` did: one line per step, and the offer files it rewrote."""

    lines: list[str] = field(default_factory=list)
    changed: list[Path] = field(default_factory=list)


def skypilot_catalog_url() -> str:
    """SkyPilot's hosted catalog for the schema version it reads (sky.skylet.constants), or a mirror of it
    named by `$THUNDEROPS_SKYPILOT_CATALOG_URL` (the directory holding `<cloud>/vms.csv`)."""
    if mirror := os.environ.get("THUNDEROPS_SKYPILOT_CATALOG_URL"):
        return mirror
    from sky.skylet import constants

    return f"{constants.HOSTED_CATALOG_DIR_URL}/{constants.CATALOG_SCHEMA_VERSION}"


def _reachable(url: str, timeout: float) -> str | None:
    """None when the URL's host accepts a TCP connection, else why not."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"cannot reach {parts.hostname}:{port} ({e.strerror or e})"


def aws_spot_prices(client, instance_types: Iterable[str]) -> dict[tuple[str, str], float]:
    """Current Linux spot $/h per (instance type, AZ id) in the client's region, from
    `ec2.describe_spot_price_history` (the newest entry per AZ wins)."""
    now = datetime.now(UTC)
    request = {"InstanceTypes": sorted(set(instance_types)), "ProductDescriptions": ["Linux/UNIX"],
               "StartTime": now}
    newest: dict[tuple[str, str], tuple[datetime, float]] = {}
    while True:
        page = client.describe_spot_price_history(**request)
        for p in page.get("SpotPriceHistory", []):
            key = (p["InstanceType"], p.get("AvailabilityZoneId") or p["AvailabilityZone"])
            stamp = p.get("Timestamp") or now
            if key not in newest or stamp > newest[key][0]:
                newest[key] = (stamp, float(p["SpotPrice"]))
        token = page.get("NextToken")
        if not token:
            return {k: v[1] for k, v in newest.items()}
        request["NextToken"] = token


def gcp_accelerator_zones(client, project: str) -> set[tuple[str, str]]:
    """(accelerator type id, zone) pairs GCP offers now, from compute_v1 `acceleratorTypes.aggregatedList`."""
    pairs = set()
    for scope, scoped in client.aggregated_list(project=project):
        zone = scope.rsplit("/", 1)[-1]
        for accelerator in scoped.accelerator_types:
            pairs.add((accelerator.name, zone))
    return pairs


def _refresh_aws_spot(offers: list[dict], timeout: float, session=None) -> str:
    import boto3
    from botocore.config import Config

    session = session or boto3.Session()
    if session.get_credentials() is None:
        return "aws spot: no AWS credentials; spot prices stay as the catalog has them"
    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 2})
    by_region: dict[str, list[dict]] = {}
    for o in offers:
        by_region.setdefault(o["region"], []).append(o)
    updated, failed = 0, []
    for region, group in sorted(by_region.items()):
        try:
            prices = aws_spot_prices(session.client("ec2", region_name=region, config=config),
                                     [o["instance_type"] for o in group])
        except Exception as e:  # noqa: BLE001 - a region we cannot query keeps its prices; say which
            failed.append(f"{region} ({type(e).__name__})")
            continue
        for o in group:
            if (price := prices.get((o["instance_type"], o["zone"]))) is not None and price > 0:
                o["price_spot"] = _num(price)
                o["source"] = f"{o['source']}; spot: ec2 DescribeSpotPriceHistory"
                o["as_of"] = date.today().isoformat()
                updated += 1
    return f"aws spot: {updated} offers repriced from DescribeSpotPriceHistory" + (
        f"; kept old prices in {', '.join(failed)}" if failed else "")


def _refresh_gcp_accelerators(offers: list[dict], client=None, project: str | None = None) -> tuple[list[dict], str]:
    if client is None:
        try:
            import google.auth
            from google.cloud import compute_v1

            credentials, project = google.auth.default()
        except Exception as e:  # noqa: BLE001 - no ADC, no project: say so and move on
            return offers, f"gcp: no Google Cloud credentials ({type(e).__name__}); accelerator zones not checked"
        if not project:
            return offers, "gcp: no default project; set GOOGLE_CLOUD_PROJECT to check accelerator zones"
        client = compute_v1.AcceleratorTypesClient(credentials=credentials)
    available = gcp_accelerator_zones(client, project)
    kept = [o for o in offers if (GCP_ACCELERATOR_TYPES.get(o["accelerator"]), o["zone"]) in available]
    return kept, f"gcp: {len(offers) - len(kept)} offers dropped (accelerator not offered in that zone any more)"


def refresh(
    clouds: str | Iterable[str] | None = None,
    *,
    out_dir: str | Path | None = None,
    base_url: str | None = None,
    timeout: float = 10.0,
    aws_session=None,
    gcp_client=None,
    gcp_project: str | None = None,
) -> RefreshResult:
    """Fetch live offers into `out_dir` (default `refreshed_offers_dir()`, which `load_offers` then prefers).

    Per cloud: SkyPilot's hosted v8 catalog (`base_url`, default SkyPilot's own), converted like the shipped
    snapshot; then AWS spot prices from `describe_spot_price_history` where AWS credentials exist, and GCP offers
    checked against the zones' accelerator types (google-cloud-compute) where Google credentials exist.
    Offline, it returns one line saying so and writes nothing. Each file is replaced whole, after validation.
    """
    out = Path(out_dir) if out_dir is not None else refreshed_offers_dir()
    base_url = (base_url or skypilot_catalog_url()).rstrip("/")
    wanted = _as_list(clouds) or SKYPILOT_CLOUDS
    unknown = [c for c in wanted if c.lower() not in SKYPILOT_CLOUDS]
    if unknown:
        raise CatalogError(f"unknown cloud '{unknown[0]}'{suggest(unknown[0], SKYPILOT_CLOUDS)}; refresh knows "
                           f"{', '.join(SKYPILOT_CLOUDS)}")
    wanted = [c.lower() for c in wanted]
    if (why := _reachable(base_url, timeout)) is not None:
        return RefreshResult([f"offline: {why}; catalogs unchanged (using offers from {offers_dir()})"])

    result = RefreshResult()
    today = date.today().isoformat()
    staged: dict[str, list[dict]] = {}
    for cloud in wanted:
        url = f"{base_url}/{cloud}/vms.csv"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - https catalog URL
                text = resp.read().decode("utf-8")
            offers, _ = offers_from_skypilot(cloud, csv.DictReader(io.StringIO(text)),
                                             source=f"{url} (live)", as_of=today)
        except (OSError, ValueError, KeyError, csv.Error) as e:
            result.lines.append(f"{cloud}: download failed ({e}); kept the previous offers")
            continue
        if not offers:
            result.lines.append(f"{cloud}: the live catalog has no GPU offers we can use; kept the previous ones")
            continue
        staged[cloud] = offers
        result.lines.append(f"{cloud}: {len(offers)} offers from {url}")
    if "aws" in staged:
        result.lines.append(_refresh_aws_spot(staged["aws"], timeout, aws_session))
    if "gcp" in staged:
        staged["gcp"], line = _refresh_gcp_accelerators(staged["gcp"], gcp_client, gcp_project)
        result.lines.append(line)

    try:
        out.mkdir(parents=True, exist_ok=True)
        for path in shipped_offers_dir().glob("*.csv"):  # start a refreshed dir from the full shipped set
            if not (out / path.name).exists() and path.stem not in staged:
                shutil.copyfile(path, out / path.name)
        for cloud, offers in staged.items():
            if offers:
                write_offers(out / f"{cloud}.csv", offers)
                result.changed.append(out / f"{cloud}.csv")
    except OSError as e:
        raise CatalogError(f"{out}: cannot write refreshed offers ({e.strerror}); set THUNDEROPS_HOME to a "
                           "writable directory") from None
    result.lines.append(f"wrote {len(result.changed)} catalog file(s) to {out}")
    return result
