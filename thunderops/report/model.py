"""The `Report` dataclass: named tables, notes and chart data; its JSON and CSV exports and reading them back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from thunderops.report.money import SCHEMAS, _export, _typed_frame


@dataclass
class Report:
    """One report: named tables (see SCHEMAS), notes on what they cover, and chart data."""

    title: str
    deployment: str | None  # None for a plan file's pre-launch view
    start: str | None  # the window covered, ISO UTC (None for a plan view)
    end: str | None
    tables: dict[str, pd.DataFrame]
    notes: list[str] = field(default_factory=list)
    series: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)  # chart data, not exported
    status: str | None = None  # the deployment's status when reported

    def total(self, metric: str) -> Any:
        t = self.tables["totals"]
        row = t[t["metric"] == metric]
        if row.empty:
            raise KeyError(metric)
        return row["value"].iloc[0]

    # -- exports ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "deployment": self.deployment, "status": self.status, "start": self.start,
                "end": self.end, "notes": list(self.notes),
                "tables": {name: [{k: _export(v) for k, v in row.items()} for row in df.to_dict("records")]
                           for name, df in self.tables.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        tables = {name: _typed_frame(name, pd.DataFrame(rows, columns=list(SCHEMAS.get(name, {})) or None))
                  for name, rows in d["tables"].items()}
        return cls(d["title"], d.get("deployment"), d.get("start"), d.get("end"), tables, list(d.get("notes", [])),
                   status=d.get("status"))

    def csv_texts(self) -> dict[str, str]:
        """One CSV per table (money in $ to the micro-dollar, times ISO UTC)."""
        return {name: df.map(_export).to_csv(index=False, lineterminator="\n") for name, df in self.tables.items()}

    @classmethod
    def read_csv(cls, directory: Path, title: str = "", deployment: str | None = None) -> Report:
        tables = {}
        for name in SCHEMAS:
            path = Path(directory) / f"{name}.csv"
            if path.exists():
                tables[name] = _typed_frame(name, pd.read_csv(path, dtype=str, keep_default_na=False))
        return cls(title, deployment, None, None, tables)
