"""``tileplan view``: the page it writes, its refusals, and the page rendered in real Chromium.

The browser test opens the written file from a ``file://`` URL in headless Chromium (CI installs
Debian's ``chromium``), with networking off, and checks that every chart rendered, that the
console stayed clean, and that a screenshot is not blank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import webbrowser
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from plotly.offline import get_plotlyjs

from executor import load_plan, save_plan
from tests.plans import METRICS, make_plan, make_report, segmented_plan
from tileplan.cli import cli
from tileplan.run.report import save_report

GIB = 1024**3
PLAN_FIGURES = 3  # memory + time, tile grid, layers
RUN_FIGURES = 2  # timeline, metrics


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["view", *args])
    return result.exit_code, result.output


def _plan_file(tmp_path: Path) -> Path:
    return save_plan(make_plan(), tmp_path / "plan.yaml")


def _run_dir(tmp_path: Path, *, metrics: bool = True) -> Path:
    run = tmp_path / "runs" / "demo"
    save_plan(make_plan(), run / "plan.yaml")
    conventional = ((0.0, GIB), (2.0, 30 * GIB), (4.0, 2 * GIB))
    save_report(make_report(conventional_timeline=conventional, conventional_measured=True),
                run / "report.yaml")  # fmt: skip
    if metrics:
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS))
    return run


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# -- the page ---------------------------------------------------------------------------------


def test_plan_page_is_self_contained(tmp_path: Path) -> None:
    plan = _plan_file(tmp_path)
    code, output = _invoke(str(plan), "--no-open")
    assert code == 0, output
    page = (tmp_path / "plan.html").read_text()
    assert output.startswith(f"charts written to {tmp_path / 'plan.html'}")
    bundle = get_plotlyjs()
    assert page.count(bundle) == 1  # plotly.js inlined exactly once ...
    assert page.count("* plotly.js v") == 1
    assert page.index(bundle) < page.index("</head>")  # ... in the head
    rest = page.replace(bundle, "")
    assert rest.count("Plotly.newPlot(") == PLAN_FIGURES
    assert not re.search(r"<script[^>]+src=|<link|https?://", rest)  # nothing to fetch
    assert "3072 px (forward pass 4096x4096)" in page
    assert _files(tmp_path) == {"plan.yaml", "plan.html"}  # no temp files left


def test_run_folder_page_has_run_and_plan_charts(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    code, output = _invoke(str(run), "--no-open")
    assert code == 0, output
    page = (run / "report.html").read_text().replace(get_plotlyjs(), "")
    assert page.count("Plotly.newPlot(") == RUN_FIGURES + PLAN_FIGURES
    assert "40.0 GiB (estimate)" in page
    assert page.index("Run demo") < page.index("Plan the run used")
    # report.yaml given directly means its folder; --out elsewhere.
    out = tmp_path / "elsewhere" / "r.html"
    code, output = _invoke(str(run / "report.yaml"), "--out", str(out), "--no-open")
    assert code == 0, output
    assert out.read_text().replace(get_plotlyjs(), "").count("Plotly.newPlot(") == 5


def test_run_folder_without_metrics(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, metrics=False)
    code, output = _invoke(str(run), "--no-open")
    assert code == 0, output
    assert "no per-epoch metrics yet" in (run / "report.html").read_text()


def _corrupt(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A bad input and the words its error must contain."""
    if case == "missing":
        return tmp_path / "nope.yaml", "does not exist"
    if case == "not_yaml":
        (tmp_path / "plan.yaml").write_text("tile_px: [1, 2\n  - ]]")
        return tmp_path / "plan.yaml", "not valid YAML"
    if case == "not_a_plan":
        (tmp_path / "plan.yaml").write_text("hello: 1\n")
        return tmp_path / "plan.yaml", "schema_version"
    if case == "empty_folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", "without report.yaml and plan.yaml"
    run = _run_dir(tmp_path)
    if case == "no_report":
        (run / "report.yaml").unlink()
        return run, "no report.yaml"
    if case == "no_plan":
        (run / "plan.yaml").unlink()
        return run, "no plan.yaml"
    if case == "bad_report":
        (run / "report.yaml").write_text("schema_version: 7\n")
        return run, "not a tileplan run report"
    if case == "bad_timeline":
        text = (run / "report.yaml").read_text().replace("timeline:\n", "timeline: [1, 2]\nx:\n", 1)
        (run / "report.yaml").write_text(text)
        return run, "report.yaml' is malformed"
    first = json.dumps(METRICS[0])
    if case == "metrics_not_objects":
        (run / "metrics.jsonl").write_text(f"{first}\n[1, 2]\n")
        return run, "line 2: expected a mapping"
    if case == "metrics_missing_key":
        (run / "metrics.jsonl").write_text(f"{first}\n" + '{"epoch": 2}\n')
        return run, "line 2: missing key"
    assert case == "bad_metrics"
    (run / "metrics.jsonl").write_text(f"{first}\n{{oops\n")
    return run, "line 2 is not JSON"


CASES = ["missing", "not_yaml", "not_a_plan", "empty_folder", "no_report", "no_plan",
         "bad_report", "bad_timeline", "metrics_not_objects", "metrics_missing_key",
         "bad_metrics"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    source, words = _corrupt(tmp_path, case)
    before = _files(tmp_path)
    code, output = _invoke(str(source), "--no-open")
    assert code == 1
    assert output.startswith("Error: ")
    assert output.count("\n") == 1, output  # one line
    assert words in output
    assert _files(tmp_path) == before  # nothing written, not even half a page


def test_out_may_not_overwrite_an_input(tmp_path: Path) -> None:
    plan = _plan_file(tmp_path)
    code, output = _invoke(str(plan), "--out", str(plan), "--no-open")
    assert code == 1
    assert "would overwrite an input" in output
    assert plan.read_text().startswith("# tileplan streaming plan")


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan_file(tmp_path)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    code, output = _invoke(str(plan), "--no-open")
    assert code == 1
    assert "cannot write" in output
    assert "No space left" in output
    assert _files(tmp_path) == {"plan.yaml"}


def test_open_uses_a_browser_only_when_there_is_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan_file(tmp_path)
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    code, output = _invoke(str(plan))
    assert code == 0, output
    assert opened == []
    assert f"open {(tmp_path / 'plan.html').resolve().as_uri()} in a browser" in output
    monkeypatch.setenv("DISPLAY", ":0")
    code, output = _invoke(str(plan))
    assert code == 0, output
    assert opened == [(tmp_path / "plan.html").resolve().as_uri()]
    assert "in a browser" not in output

    def broken_open(url: str) -> bool:
        raise webbrowser.Error("no runnable browser")

    monkeypatch.setattr(webbrowser, "open", broken_open)
    code, output = _invoke(str(plan))
    assert code == 0, output  # a failing browser never fails the command
    assert "in a browser" in output


# -- the page in a real browser -------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
         "--window-size=1400,3000"]  # fmt: skip
# Set TILEPLAN_SCREENSHOT_DIR to keep the screenshots (default: the test's tmp_path).
SCREENSHOT_DIR = os.environ.get("TILEPLAN_SCREENSHOT_DIR")


def _render(page: Path, profile: Path, screenshot: Path) -> tuple[str, list[str]]:
    """The DOM after scripts ran, and the console messages, of ``page`` opened by file URL."""
    assert CHROMIUM is not None
    args = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={screenshot}",
            "--dump-dom", page.resolve().as_uri()]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return done.stdout, console


def _rendered_plots(dom: str) -> list[str]:
    """Ids of the figure divs that plotly turned into a plot with an SVG inside."""
    ids = re.findall(r'<div id="(fig-[0-9]+-[0-9]+)" class="([^"]*)"', dom)
    rendered = []
    for index, (div_id, classes) in enumerate(ids):
        start = dom.index(f'id="{div_id}"')
        stop = dom.index(f'id="{ids[index + 1][0]}"') if index + 1 < len(ids) else len(dom)
        if "js-plotly-plot" in classes.split() and 'class="main-svg"' in dom[start:stop]:
            rendered.append(div_id)
    return rendered


def _check_screenshot(path: Path) -> None:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        assert rgb.size == (1400, 3000)
        colors = rgb.getcolors(maxcolors=1 << 20)
    assert colors is not None
    assert len(colors) > 200, "screenshot looks blank"
    top = max(count for count, _ in colors)
    assert top < 0.9 * 1400 * 3000, "screenshot is mostly one colour"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (CI installs it)")
def test_segmented_plan_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    plan = segmented_plan()
    source = save_plan(plan, tmp_path / "plan.yaml")
    code, output = _invoke(str(source), "--no-open")
    assert code == 0, output
    screenshot = Path(SCREENSHOT_DIR or tmp_path) / "tileplan_view_segmented.png"
    dom, console = _render(tmp_path / "plan.html", tmp_path / "chromium-profile", screenshot)
    assert console == [], console
    # memory + time, segmentations, one grid per segment, layers
    assert len(_rendered_plots(dom)) == 3 + len(plan.segments)
    assert "cut maps" in dom
    assert f"Tile grid of segment {len(plan.segments)} of {len(plan.segments)}" in dom
    _check_screenshot(screenshot)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (CI installs it)")
@pytest.mark.parametrize("kind", ["plan", "run"])
def test_page_renders_in_headless_chromium(tmp_path: Path, kind: str) -> None:
    source = _plan_file(tmp_path) if kind == "plan" else _run_dir(tmp_path)
    expected = PLAN_FIGURES if kind == "plan" else PLAN_FIGURES + RUN_FIGURES
    code, output = _invoke(str(source), "--no-open")
    assert code == 0, output
    page = tmp_path / "plan.html" if kind == "plan" else source / "report.html"
    screenshot = Path(SCREENSHOT_DIR or tmp_path) / f"tileplan_view_{kind}.png"
    dom, console = _render(page, tmp_path / "chromium-profile", screenshot)
    assert console == [], console
    assert len(_rendered_plots(dom)) == expected
    assert "tile activations" in dom  # legends drawn
    assert "Tile grid of the image: 12 tiles (3x4)" in dom
    if kind == "run":
        assert "Memory over one training step" in dom
    _check_screenshot(screenshot)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (CI installs it)")
def test_plan_of_a_trunk_with_statistics_renders_in_headless_chromium(tmp_path: Path) -> None:
    """A trunk whose statistics end segments (BatchNorm with batch statistics,
    squeeze-excitation, GroupNorm) has no single-tile candidates: the page shows its
    segmentations, one grid per segment and the statistics' cuts."""
    from tests.tileplan.conftest import TINY_GLOBAL_MODEL

    model = tmp_path / "global.py"
    model.write_text(TINY_GLOBAL_MODEL)
    source = tmp_path / "plan.yaml"
    done = CliRunner().invoke(cli, ["profile", str(model), "--image", "160", "--bn", "train",
                                    "--max-tile", "48", "--no-measure", "--budget", "2GiB",
                                    "--out", str(source)])  # fmt: skip
    assert done.exit_code == 0, done.output
    code, output = _invoke(str(source), "--no-open")
    assert code == 0, output
    screenshot = Path(SCREENSHOT_DIR or tmp_path) / "tileplan_view_statistics.png"
    dom, console = _render(tmp_path / "plan.html", tmp_path / "chromium-profile", screenshot)
    assert console == [], console
    plan = load_plan(source)
    assert len(_rendered_plots(dom)) == 3 + len(plan.segments)
    assert "before features.4 (mean)" in dom
    _check_screenshot(screenshot)
