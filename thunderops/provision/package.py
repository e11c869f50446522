"""The thunderops that remote nodes install: a wheel of the thunderops running here.

thunderops is not on PyPI, so `up` builds a wheel of itself into the deployment's work directory and SkyPilot
ships it to every node (`file_mounts`); the node's setup installs `<wheel>[serve]`. From a source checkout the
wheel is built with `pip wheel --no-deps`; from an installed (non-editable) copy it is repacked from the
installed files listed in the distribution's RECORD. `--pip-spec` (a git URL, an index name) overrides it.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from thunderops.errors import ProvisionError

DIST = "thunderops"
REMOTE_DIR = "thunderops-dist"  # under the node's home; setup runs `pip install` from $HOME
_built: list[Path] = []  # the wheel this process built (copied, not rebuilt, for the next deployment)


def wheel_name(version: str | None = None) -> str:
    """File name of the wheel of this thunderops (pure Python: py3-none-any)."""
    return f"{DIST}-{version or importlib.metadata.version(DIST)}-py3-none-any.whl"


def remote_path(wheel: str | Path) -> str:
    """Where a node finds the shipped wheel (the `file_mounts` destination)."""
    return f"~/{REMOTE_DIR}/{Path(wheel).name}"


def pip_spec_for(wheel: str | Path, extras: str = "") -> str:
    """The pip requirement that installs the shipped wheel, relative to the node's home (setup `cd`s there),
    so it works as a plain double-quoted value (`~` would not expand inside quotes)."""
    return f"./{REMOTE_DIR}/{Path(wheel).name}" + (f"[{extras}]" if extras else "")


def resolve_pip_spec(spec: str | None) -> tuple[str | None, Path | None]:
    """What `--pip-spec` means for the nodes: (a requirement they resolve themselves, or None) and (a local wheel
    to ship to them like thunderops' own, or None). Nodes cannot read any other local path: that is an error."""
    if not spec:
        return None, None
    bare = re.sub(r"\[[^\]]*\]$", "", spec)  # a wheel path may carry [extras]
    # pip's reading: a path only when it looks like one ("thunderops[serve]" is a requirement even if ./thunderops
    # happens to exist)
    looks_local = "://" not in bare and ("/" in bare or bare.startswith((".", "~")) or
                                         bare.endswith((".whl", ".tar.gz", ".zip")))
    local = Path(bare).expanduser()
    if looks_local:
        if local.is_file() and local.suffix == ".whl":
            return None, local.resolve()
        what = "no such file" if not local.exists() else "a local path the nodes cannot read"
        raise ProvisionError(f"--pip-spec {spec}: {what}; give a wheel file (it is shipped to the nodes), a package "
                             "name or a git URL")
    return spec, None


def source_tree() -> Path | None:
    """The source checkout thunderops runs from (editable install or a clone on sys.path), if any."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and f'name = "{DIST}"' in pyproject.read_text():
        return root
    return None


def build_wheel(dest_dir: str | Path) -> Path:
    """A wheel of the running thunderops in `dest_dir` (reused when already there: a deployment's replacement
    nodes install the same version its first nodes did). Raises ProvisionError when none can be made."""
    dest = Path(dest_dir)
    target = dest / wheel_name()
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".wheel-") as tmp:
        if _built and _built[-1].is_file() and _built[-1].name == target.name:
            built = Path(shutil.copy2(_built[-1], Path(tmp) / target.name))
        else:
            src = source_tree()
            built = _pip_wheel(src, Path(tmp)) if src else _repack_installed(Path(tmp))
        built.replace(target)  # same file system: the wheel appears whole or not at all
    _built.append(target)
    return target


def _pip_wheel(src: Path, out: Path) -> Path:
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    wheels = list(out.glob(f"{DIST}-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        last = (proc.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise ProvisionError(f"could not build a thunderops wheel from {src} ({last}); fix the build or pass "
                             "--pip-spec (e.g. git+https://...)")
    return wheels[0]


def _repack_installed(out: Path) -> Path:
    """A wheel holding exactly the installed package files and metadata (RECORD rewritten with hashes)."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ProvisionError("thunderops is neither installed nor a source checkout, so no wheel can be shipped "
                             "to the nodes; pass --pip-spec") from None
    files = [f for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in str(f)]
    info = next((f.parts[0] for f in files if f.parts[0].endswith(".dist-info")), None)
    if info is None or not files:
        raise ProvisionError("the installed thunderops lists no files (RECORD); pass --pip-spec")
    skip = {f"{info}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    path = out / wheel_name(dist.version)
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            name = str(f.as_posix())
            if name in skip:
                continue
            data = Path(dist.locate_file(f)).read_bytes()
            zf.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            writer.writerow([name, f"sha256={digest}", len(data)])
        writer.writerow([f"{info}/RECORD", "", ""])
        zf.writestr(f"{info}/RECORD", record.getvalue())
    return path
