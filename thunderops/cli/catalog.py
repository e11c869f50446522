"""`thunderops catalog ...`: offers, GPU specs, models, SkyPilot export, live refresh."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from thunderops.cli.app import console, print_json, sub_app

catalog_app = sub_app("catalog", "Price catalogs, GPU specs and models.")

CatalogOpt = Annotated[
    Path | None, typer.Option("--catalog", help="Offers CSV or directory (default: the shipped/refreshed catalogs)")
]


def _clean(value):
    """JSON-safe: NaN -> null, numpy scalars -> Python."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value


def _money(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


@catalog_app.command("list")
def list_offers(
    gpu: Annotated[list[str] | None, typer.Option("--gpu", help="GPU name(s), e.g. H100, a100_80gb")] = None,
    cloud: Annotated[list[str] | None, typer.Option("--cloud", help="Cloud(s): aws, gcp, azure, lambda, ...")] = None,
    region: Annotated[list[str] | None, typer.Option("--region", help="Region(s)")] = None,
    spot: Annotated[bool | None, typer.Option("--spot/--no-spot", help="Spot prices only / on-demand")] = None,
    max_price_per_gpu: Annotated[
        float | None, typer.Option("--max-price-per-gpu", help="Keep offers at or under this $/GPU-h")
    ] = None,
    limit: Annotated[int, typer.Option(help="Rows to show in the table (0: all)")] = 30,
    catalog: CatalogOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print all matching offers as JSON")] = False,
) -> None:
    """Offers sorted by $/GPU-hour (spot price with --spot, else on-demand)."""
    from thunderops.catalog import load_offers

    df = load_offers(catalog, clouds=cloud, regions=region, gpus=gpu, spot=spot, max_price_per_gpu=max_price_per_gpu)
    if json_out:
        print_json([{k: _clean(v) for k, v in row.items()} for row in df.to_dict("records")])
        return
    basis = "spot" if spot else "on-demand"
    shown = df if limit <= 0 else df.head(limit)
    table = Table(title=f"{len(df)} offers, cheapest {basis} $/GPU-h first ($/h: on-demand per node)")
    for col in ["cloud", "region/zone", "instance type", "GPUs", "$/h", "spot $/h", "$/GPU-h", "spot $/GPU-h",
                "Gbps"]:
        table.add_column(col, justify="left" if col in ("cloud", "region/zone", "instance type", "GPUs") else "right",
                         overflow="fold")
    for r in shown.itertuples():
        where = f"{r.region}/{r.zone}" if r.zone else r.region
        table.add_row(r.cloud, where, r.instance_type, f"{r.gpus_per_node}x{r.gpu}", _money(r.price_ondemand),
                      _money(r.price_spot), _money(r.price_per_gpu_ondemand), _money(r.price_per_gpu_spot),
                      "-" if math.isnan(r.network_gbps) else f"{r.network_gbps:g}")
    console.print(table)
    more = f"; {len(df) - len(shown)} more (--limit 0 shows all)" if len(shown) < len(df) else ""
    as_of = ", ".join(sorted(df["as_of"].unique()))
    console.print(f"$/h is per node, $/GPU-h per GPU; prices as of {as_of} (see --json for each source){more}",
                  highlight=False)


@catalog_app.command("gpus")
def gpus(json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """GPU specs (datasheet memory, bandwidth, dense bf16 TFLOP/s, intra-node link) and the cheapest offer."""
    from thunderops.catalog import load_offers
    from thunderops.serve.vllm import engine_gpu_problem
    from thunderops.specs import get_gpu, gpu_names

    offers = load_offers()
    cheapest = offers.groupby("gpu")["price_per_gpu_ondemand"].min()
    clouds = offers.groupby("gpu")["cloud"].unique()
    rows = []
    for name in gpu_names():
        s = get_gpu(name)
        rows.append({"gpu": s.name, "memory_gb": s.memory_gb, "memory_gbps": s.memory_gbps,
                     "bf16_tflops": s.bf16_tflops, "intra_link": s.intra_link, "intra_link_gbps": s.intra_link_gbps,
                     "arch": s.arch, "not_servable": engine_gpu_problem(s.name),
                     "min_price_per_gpu_ondemand": _clean(float(cheapest.get(name, math.nan))),
                     "clouds": sorted(clouds.get(name, [])), "source": s.source, "as_of": s.as_of})
    if json_out:
        print_json(rows)
        return
    table = Table(title="GPU specs (datasheet values)")
    for col in ["GPU", "arch", "memory GB", "memory GB/s", "bf16 TFLOP/s", "intra-node link", "link GB/s",
                "from on-demand $/GPU-h", "clouds"]:
        table.add_column(col, justify="left" if col in ("GPU", "intra-node link", "clouds") else "right",
                         no_wrap=col == "GPU", overflow="fold")
    for r in rows:
        table.add_row(r["gpu"] + (" (not rented)" if r["not_servable"] else ""), r["arch"], f"{r['memory_gb']:g}",
                      f"{r['memory_gbps']:g}", f"{r['bf16_tflops']:g}", r["intra_link"], f"{r['intra_link_gbps']:g}", _money(r["min_price_per_gpu_ondemand"]),
                      ",".join(r["clouds"]) or "-")
    console.print(table)
    skipped = [r["not_servable"] for r in rows if r["not_servable"]]
    if skipped:
        console.print("not rented by plans (their offers stay in the catalog): " + "; ".join(skipped), highlight=False)


@catalog_app.command("models")
def models(json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Known models (shapes, parameter count, weight and KV-cache bytes)."""
    from thunderops.specs import get_model, model_names

    rows = []
    for name in model_names():
        m = get_model(name)
        rows.append({"model": m.name, "hf_id": m.hf_id, "layers": m.layers, "hidden": m.hidden, "heads": m.heads,
                     "kv_heads": m.kv_heads, "intermediate": m.intermediate, "vocab": m.vocab,
                     "experts": m.experts, "params_b": round(m.params / 1e9, 2),
                     "weights_gb": round(m.weight_bytes / 1e9, 1), "kv_kib_per_token": m.kv_bytes_per_token / 1024})
    if json_out:
        print_json(rows)
        return
    table = Table(title="models (bf16 weights; any Hugging Face config.json path also works)")
    for col in ["model", "HF id", "layers", "hidden", "heads/kv", "FFN", "vocab", "params B", "weights GB",
                "KV KiB/token"]:
        table.add_column(col, justify="left" if col in ("model", "HF id") else "right", no_wrap=col == "model",
                         overflow="fold")
    for r in rows:
        experts = f" x{r['experts']}" if r["experts"] > 1 else ""
        table.add_row(r["model"], r["hf_id"], str(r["layers"]), str(r["hidden"]), f"{r['heads']}/{r['kv_heads']}",
                      f"{r['intermediate']}{experts}", str(r["vocab"]), f"{r['params_b']:g}", f"{r['weights_gb']:g}",
                      f"{r['kv_kib_per_token']:g}")
    console.print(table)


@catalog_app.command("export-skypilot")
def export_skypilot(
    directory: Annotated[Path, typer.Argument(help="SkyPilot runtime dir to write (use as SKY_RUNTIME_DIR)")],
    cloud: Annotated[list[str] | None, typer.Option("--cloud", help="Only these clouds")] = None,
    catalog: CatalogOpt = None,
) -> None:
    """Write SkyPilot v8 catalogs from ours, so SkyPilot prices and plans offline from the same offers."""
    from thunderops.catalog import export_skypilot as export
    from thunderops.catalog import load_offers

    written = export(directory, load_offers(catalog, clouds=cloud))
    for path in written:
        console.print(f"wrote {path}", highlight=False)
    console.print(f"use it with: SKY_RUNTIME_DIR={directory} sky ...", highlight=False)


@catalog_app.command("refresh")
def refresh(
    cloud: Annotated[list[str] | None, typer.Option("--cloud", help="Only these clouds")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each network call")] = 10.0,
) -> None:
    """Fetch live prices (SkyPilot's hosted catalog, AWS spot history, GCP accelerator types) where possible."""
    from thunderops.catalog import refresh as do_refresh

    result = do_refresh(clouds=cloud, timeout=timeout)
    for line in result.lines:
        console.print(line, highlight=False, soft_wrap=True)
