"""`thunderops` command line. `main()` turns bad input, a UserError or a usage error of the command line
(an option that does not parse, one that is missing or unknown), into one line on stderr and exit code 2."""

from __future__ import annotations

import sys

import typer

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


def _error(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)


def _usage_errors() -> type[Exception]:
    """The base class of the command line's usage errors: typer's own (typer >= 0.24 carries its own click),
    else click's."""
    base = getattr(typer, "TyperException", None)
    if base is None:
        import click

        base = click.ClickException
    return base


def main() -> None:
    usage_error = _usage_errors()
    try:
        # standalone_mode=False: usage errors come to us instead of being printed in typer's boxed form
        code = app(standalone_mode=False)
    except UserError as e:
        _error(str(e).replace("\n", " "), e.exit_code)
    except usage_error as e:  # an option that does not parse, a missing one, an unknown command
        if type(e).__name__ == "NoArgsIsHelpError":  # `thunderops serve` alone: its help
            e.show()  # type: ignore[attr-defined]
            sys.exit(2)
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _error(f"{e.format_message()}{hint}".replace("\n", " "), getattr(e, "exit_code", 2))  # type: ignore[attr-defined]
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
