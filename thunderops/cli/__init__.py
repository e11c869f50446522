"""`thunderops` command line. `main()` turns a UserError into one line on stderr and exit code 2."""

from __future__ import annotations

import sys

# Each module registers its commands on `app` (one module per pipeline step).
from thunderops.cli import catalog as _catalog  # noqa: F401
from thunderops.cli import deploy as _deploy  # noqa: F401
from thunderops.cli import netbench as _netbench  # noqa: F401
from thunderops.cli import perf as _perf  # noqa: F401
from thunderops.cli import plan as _plan  # noqa: F401
from thunderops.cli import report as _report  # noqa: F401
from thunderops.cli import serve as _serve  # noqa: F401
from thunderops.cli import watch as _watch  # noqa: F401
from thunderops.cli import workload as _workload  # noqa: F401
from thunderops.cli.app import app, err_console
from thunderops.errors import UserError


def main() -> None:
    try:
        app(standalone_mode=True)
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
