"""Price catalogs: load and validate our offers, export them as SkyPilot catalogs, refresh from live sources.

An *offer* is one instance type in one region/zone of one cloud with its on-demand (and maybe spot) $/h per
node. The shipped offers live in `catalogs/offers/<cloud>.csv` (built by `scripts/build_catalogs.py`), one schema
for all clouds (`OFFER_COLUMNS`). `load_offers` returns them as a pandas DataFrame with $/GPU-h columns added.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from datetime import date
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


def offers_dir() -> Path:
    """The shipped offers: `<catalog_dir>/offers` (`$THUNDEROPS_CATALOGS` overrides the catalog dir)."""
    return catalog_dir() / "offers"


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
            for raw in reader:
                where = f"{path}:{reader.line_num}"
                row = _parse_row(raw, where)
                key = (row["cloud"], row["instance_type"], row["region"], row["zone"])
                if key in seen:
                    raise CatalogError(f"{where}: duplicate offer {'/'.join(key[:3])} {key[3]} (also at line "
                                       f"{seen[key]}); keep one row per instance type, region and zone")
                seen[key] = reader.line_num
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



