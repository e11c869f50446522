"""The HTML report in a real headless browser (Chromium): the figures are in its tables and the charts render.
Installs Debian's chromium when missing and running as root (a clean CI machine); skips otherwise."""

from __future__ import annotations

import base64
import io
import re
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from conftest import system_tool  # tests/ is on sys.path under pytest
from PIL import Image
from test_report import make_deployment

from thunderops.state import Store

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--hide-scrollbars"]
# matplotlib's first colours (tab:blue, tab:orange, tab:green): the stacked spend chart uses them; the tables do not
CHART_COLOURS = {"blue": (31, 119, 180), "orange": (255, 127, 14), "green": (44, 160, 44)}


@pytest.fixture
def browser() -> str:
    return system_tool(BROWSERS, "chromium")


class Page(HTMLParser):
    """Tables (id -> rows of cell texts) and images (id -> src) of a DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: dict[str, str] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "img":
            self.images[a.get("id", f"img{len(self.images)}")] = a.get("src", "")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def run(exe: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)


def test_html_report_renders_in_a_browser(browser, thunderops_cli, tmp_path):
    make_deployment(Store(), ended="13:00")
    out = tmp_path / "out"
    res = run(thunderops_cli, "report", "chat1", "--format", "html", "--out", str(out))
    assert res.returncode == 0, res.stderr
    url = (out / "report.html").as_uri()

    dom = run(browser, *FLAGS, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page()
    page.feed(dom.stdout)
    totals = {row[0]: row[1:] for row in page.tables["totals-chat1"][1:]}
    assert totals["spend"][:2] == ["9.80", "$"]
    assert totals["$ per 1M prompt tokens"][0] == "1,266.6667"
    assert totals["$ per 1M output tokens"][0] == "10,000.0000"
    assert totals["preemptions"][0] == "1" and totals["downtime"][0] == "1,200"
    nodes = {row[0]: row for row in page.tables["nodes-chat1"][1:]}
    head = page.tables["nodes-chat1"][0]
    assert nodes["nb"][head.index("$")] == "6.00" and nodes["nc"][head.index("replaces")] == "na"
    baselines = [row[0] for row in page.tables["baselines-chat1"][1:]]
    assert {"vllm", "melange", "hexgen"} <= set(baselines)
    # every chart is an embedded PNG that decodes to a real picture
    assert set(page.images) == {"chart-spend", "chart-unit_cost", "chart-baselines"}
    for src in page.images.values():
        m = re.fullmatch(r"data:image/png;base64,(.+)", src, flags=re.S)
        assert m
        img = Image.open(io.BytesIO(base64.b64decode(m.group(1))))
        assert img.format == "PNG" and img.width > 300 and img.height > 150

    # the browser draws them: the spend chart's colours are on screen
    shot = tmp_path / "shot.png"
    res = run(browser, *FLAGS, f"--screenshot={shot}", "--window-size=1000,1400", url)
    assert shot.exists(), res.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    for name, rgb in CHART_COLOURS.items():
        near = (np.abs(px - np.array(rgb)).sum(axis=1) < 30).sum()
        assert near > 2000, f"no {name} area from the spend chart on screen ({near} pixels)"
