"""``tileplan view``: interactive memory charts of a plan or a run, as one HTML page.

``write_page`` loads a plan file or a run folder, checks the output path, and writes the page;
``open_in_browser`` shows it when a graphical browser is available. Every problem is a
one-line ``ViewError``.
"""

from __future__ import annotations

import logging
import os
import sys
import webbrowser
from dataclasses import dataclass
from pathlib import Path

from executor import Plan, StreamingError, load_plan
from tileplan.run.report import EpochMetrics, RunReport, load_metrics, load_report
from tileplan.units import format_shape
from tileplan.view.html import ReportSection, plan_section, run_section, write_html

__all__ = [
    "ViewError", "ViewInput", "browser_available", "default_out", "load_input", "open_in_browser",
    "write_page",
]  # fmt: skip

log = logging.getLogger(__name__)


class ViewError(StreamingError):
    """The input cannot be shown or the page cannot be written; the message says the fix."""


_RUN_FILES = ("plan.yaml", "report.yaml", "metrics.jsonl")

_HOW = (
    "pass a plan file (from `tileplan profile ... --out plan.yaml`) or a run folder "
    "(from `tileplan train ... --out RUN_DIR`)"
)


@dataclass(frozen=True)
class ViewInput:
    """What to show: a plan, and for a run folder also its report and metrics."""

    path: Path
    plan: Plan
    report: RunReport | None = None
    metrics: tuple[EpochMetrics, ...] = ()

    @property
    def is_run(self) -> bool:
        return self.report is not None


def default_out(path: Path) -> Path:
    """``plan.yaml`` -> ``plan.html`` beside it; a run folder -> ``RUN_DIR/report.html``."""
    return path / "report.html" if path.is_dir() else path.with_suffix(".html")


def _load_run(run_dir: Path) -> ViewInput:
    missing = [n for n in ("report.yaml", "plan.yaml") if not (run_dir / n).is_file()]
    if len(missing) == 2:
        raise ViewError(
            f"'{run_dir}' is a folder without report.yaml and plan.yaml, so not a run folder; "
            f"{_HOW}"
        )
    if missing == ["report.yaml"]:
        raise ViewError(
            f"run folder '{run_dir}' has no report.yaml yet (the run has not finished its "
            f"report); let `tileplan train --out {run_dir}` finish, or view its plan with "
            f"`tileplan view {run_dir / 'plan.yaml'}`"
        )
    if missing:
        raise ViewError(
            f"run folder '{run_dir}' has no plan.yaml; copy the plan the run used there "
            "(the one given to `tileplan train --plan`)"
        )
    return ViewInput(
        path=run_dir,
        plan=load_plan(run_dir / "plan.yaml"),
        report=load_report(run_dir),
        metrics=load_metrics(run_dir),
    )


def load_input(path: Path) -> ViewInput:
    """Load a plan file or a run folder (``report.yaml`` given directly means its folder).

    Raises:
        ViewError: one line naming what is wrong and the fix.
    """
    if not path.exists():
        raise ViewError(f"'{path}' does not exist; {_HOW}")
    if path.is_file() and path.name == "report.yaml":
        path = path.parent
    try:
        if path.is_dir():
            return _load_run(path)
        return ViewInput(path=path, plan=load_plan(path))
    except StreamingError as err:
        message = _one_line(err)
        if path.is_dir() and str(path) not in message:
            message += f" (in run folder '{path}')"
        raise ViewError(message) from err
    except OSError as err:
        raise ViewError(f"cannot read '{path}': {err.strerror or err}") from err


def _one_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def browser_available() -> bool:
    """Whether a graphical browser can be opened (never a console browser on a headless box)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def open_in_browser(path: Path) -> bool:
    """Open ``path`` in a graphical browser if one is available; True if it was."""
    if not browser_available():
        log.info("no display: not opening a browser")
        return False
    try:
        return bool(webbrowser.open(path.resolve().as_uri()))
    except Exception as err:  # a browser failing must never fail the command
        log.warning("could not open a browser: %s", err)
        return False


def _sections(data: ViewInput) -> list[ReportSection]:
    if data.report is None:
        return [plan_section(data.plan)]
    return [
        run_section(data.report, data.metrics, title=f"Run {data.report.run}"),
        plan_section(data.plan, title="Plan the run used"),
    ]


def _title(data: ViewInput) -> tuple[str, str]:
    image = format_shape(data.plan.image_shape_px)
    model = Path(data.plan.model.file).name
    kind = f"run {data.report.run}" if data.report is not None else "streaming plan"
    return f"tileplan: {kind}, {model} at {image} px", str(data.path)


def _check_out(out: Path, source: Path) -> None:
    if out.is_dir():
        raise ViewError(f"--out '{out}' is a folder; give a file name like report.html")
    inputs = [source / n for n in _RUN_FILES] if source.is_dir() else [source]
    if out.resolve() in {p.resolve() for p in inputs}:
        raise ViewError(f"--out '{out}' would overwrite an input; use e.g. report.html")


def write_page(source: Path, out: Path | None = None) -> Path:
    """Write the charts of a plan file or run folder as one HTML page; returns its path.

    Raises:
        ViewError: the input is missing or malformed, or the page cannot be written there.
    """
    data = load_input(source)
    target = out or default_out(data.path)
    _check_out(target, data.path)
    title, subtitle = _title(data)
    try:
        return write_html(target, title, _sections(data), subtitle=subtitle)
    except OSError as err:
        raise ViewError(f"cannot write '{target}': {err.strerror or err}") from err
