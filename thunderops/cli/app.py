"""The Typer app and the helpers every command module shares. Commands live in sibling modules,
one per pipeline step, and stay thin: parse, call the Python API, render with Rich."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from thunderops.errors import UserError

app = typer.Typer(
    name="thunderops",
    help="Serve an LLM on heterogeneous rented cloud GPUs for the most throughput per dollar.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def output_file(path: Path | None, flag: str = "--out") -> Path | None:
    """Check before any work that `path` can be written (its folder exists and is writable), so a long
    search or measurement is not lost to a typo in the file name at the end."""
    if path is None:
        return None
    path = path.expanduser()
    parent = path.parent
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name")
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: folder {parent} does not exist; create it or pick another file")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: folder {parent} is not writable; pick another file")
    return path


def sub_app(name: str, help: str) -> typer.Typer:
    """A command group (`thunderops NAME ...`) registered on the main app."""
    sub = typer.Typer(name=name, help=help, no_args_is_help=True, pretty_exceptions_enable=False)
    app.add_typer(sub, name=name)
    return sub


def wait_until_stopped(poll_s: float = 0.5) -> None:
    """Block until Ctrl-C or SIGTERM (what `thunderops down` sends a foreground `up`); the caller cleans up."""
    import signal
    import time

    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop:
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
