"""`thunderops catalog ...` (owned by the catalog step)."""

from __future__ import annotations

from thunderops.cli.app import sub_app

catalog_app = sub_app("catalog", "Price catalogs, GPU specs and models.")
