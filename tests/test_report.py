"""`edgelearn report` and the demo's report: one self-contained HTML page, one SVG per curve,
every run named; and the SVG chart helpers."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from edgelearn.cli import main
from edgelearn.demo import run_demo
from edgelearn.svgplot import Series, line_chart, nice_ticks


class Page(HTMLParser):
    """Collects what the tests check: tags, figure titles, svg count, text, external refs."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs, self.curves, self.text, self.external = 0, [], [], []
        self.open: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.svgs += tag == "svg"
        self.scripts += tag == "script"
        if tag == "figure":
            self.curves.append(a.get("data-curve"))
        for key in ("src", "href"):
            if a.get(key):
                self.external.append(a[key])
        if tag != "meta":  # the one void element the page uses
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)  # <line .../>: opened and closed at once
        self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open, tag
        assert self.open[-1] == tag, (tag, self.open[-5:])
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.open == [], page.open  # every element closed, properly nested
    return page


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The demo's three optimizers, 40 steps each (held-out scored every 2 steps)."""
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, steps=40)


def test_demo_writes_a_report_naming_its_runs(demo_runs: tuple[Path, dict]) -> None:
    out, res = demo_runs
    assert res["report"] == str(out / "report.html")
    page = parse(out / "report.html")
    names = set(res["optimizers"])
    assert names == {"zo-sgd", "tpsgd", "polystep"}
    text = " ".join(page.text)
    assert all(name in text for name in names)
    # loss and held-out accuracy / loss, each against steps and against forwards
    assert page.curves == [
        "Training loss vs step", "Training loss vs forwards",
        "Held-out accuracy vs step", "Held-out accuracy vs forwards",
        "Held-out loss vs step", "Held-out loss vs forwards"]
    assert page.svgs == len(page.curves)
    assert page.scripts == 0
    assert page.external == []  # no network: nothing linked or loaded
    # before / after accuracy, as the demo measured it
    for name in names:
        assert f"{res['accuracy_after'][name]:.3f}" in text
    assert f"{res['accuracy_before']:.3f}" in text


def test_report_cli_json_overlays_runs(capsys: pytest.CaptureFixture[str],
                                       demo_runs: tuple[Path, dict], tmp_path: Path) -> None:
    out, res = demo_runs
    runs = [str(out / n) for n in ("zo-sgd", "polystep")]
    html = tmp_path / "cmp.html"
    code = main(["report", *runs, "--out", str(html), "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    got = json.loads(stdout)
    assert got["html"] == str(html)
    assert [r["name"] for r in got["runs"]] == ["zo-sgd", "polystep"]
    for r in got["runs"]:
        assert r["steps"] == 40
        assert r["accuracy_after"] == pytest.approx(res["accuracy_after"][r["name"]], abs=0)
        assert r["accuracy_before"] == pytest.approx(res["accuracy_before"], abs=0)
        assert r["step_ms_median"] > 0
        assert r["peak_rss_mb"] > 0
    page = parse(html)
    assert page.svgs == 6
    # each chart overlays both runs: one legend entry per run
    svg = html.read_text()
    first = svg[svg.index("<svg"):svg.index("</svg>")]
    assert first.count('class="lt">zo-sgd<') == 1
    assert first.count('class="lt">polystep<') == 1
    assert first.count("<path") == 4  # per run: raw loss (faint) and its trailing mean


def test_report_refuses_what_is_not_a_run(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path, demo_runs: tuple[Path, dict]) -> None:
    code = main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("edgelearn: error: ")
    assert err.count("\n") == 1
    assert "not a run" in err
    run = demo_runs[0] / "tpsgd"
    code = main(["report", str(run), "--out", str(run / "r.html")])  # inside an input
    assert code == 2
    assert not (run / "r.html").exists()


def test_nice_ticks_cover_the_range() -> None:
    for lo, hi in ((0.0, 1.0), (0.43, 0.87), (3.0, 1503.0), (-2.5, 7.1), (5.0, 5.0)):
        ticks = nice_ticks(lo, hi)
        assert ticks[0] <= lo
        assert ticks[-1] >= hi
        assert 2 <= len(ticks) <= 12
        steps = np.diff(ticks)
        assert np.allclose(steps, steps[0], rtol=1e-9, atol=1e-12)


def test_chart_breaks_lines_at_missing_values() -> None:
    s = Series("a", "#000", np.arange(5.0), np.array([1.0, np.nan, 2.0, 3.0, np.inf]))
    svg = line_chart([s], title="t", xlabel="x", ylabel="y")
    d = svg.split(' d="', 1)[1].split('"', 1)[0]
    assert d.count("M") == 2  # a new segment after the NaN
    assert d.count("L") == 1
    assert "nan" not in svg
    assert "inf" not in svg


@pytest.mark.slow
def test_report_renders_in_headless_chromium(demo_runs: tuple[Path, dict],
                                             tmp_path: Path) -> None:
    """A real browser draws the page (skipped where chromium is not installed)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed")
    png = tmp_path / "report.png"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={png}", "--window-size=1200,1600",
           (demo_runs[0] / "report.html").as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000  # drawn, not a blank page
