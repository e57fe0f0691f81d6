"""``tileplan view``: interactive memory charts of a plan or a run, as one HTML page."""

from __future__ import annotations

import logging
import os
import sys
import webbrowser
from dataclasses import dataclass
from pathlib import Path

import click

from executor import Plan, StreamingError, load_plan
from executor.report import RunReport, load_metrics, load_report
from tileplan.html_report import ReportSection, plan_section, run_section, write_html

__all__ = ["ViewInput", "browser_available", "default_out", "load_input", "view"]

log = logging.getLogger(__name__)

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
    metrics: tuple[dict, ...] = ()

    @property
    def is_run(self) -> bool:
        return self.report is not None


def default_out(path: Path) -> Path:
    """``plan.yaml`` -> ``plan.html`` beside it; a run folder -> ``RUN_DIR/report.html``."""
    return path / "report.html" if path.is_dir() else path.with_suffix(".html")


def _load_run(run_dir: Path) -> ViewInput:
    missing = [n for n in ("report.yaml", "plan.yaml") if not (run_dir / n).is_file()]
    if len(missing) == 2:
        raise click.ClickException(
            f"'{run_dir}' is a folder without report.yaml and plan.yaml, so not a run folder; "
            f"{_HOW}"
        )
    if missing == ["report.yaml"]:
        raise click.ClickException(
            f"run folder '{run_dir}' has no report.yaml yet (the run has not finished its "
            f"report); let `tileplan train --out {run_dir}` finish, or view its plan with "
            f"`tileplan view {run_dir / 'plan.yaml'}`"
        )
    if missing:
        raise click.ClickException(
            f"run folder '{run_dir}' has no plan.yaml; copy the plan the run used there "
            "(the one given to `tileplan train --plan`)"
        )
    metrics = load_metrics(run_dir)
    for number, row in enumerate(metrics, start=1):
        if not isinstance(row, dict):
            raise click.ClickException(
                f"'{run_dir / 'metrics.jsonl'}' line {number} is not a JSON object; "
                'each line must be one epoch\'s {"epoch": ..., "train_loss": ...}'
            )
    return ViewInput(
        path=run_dir,
        plan=load_plan(run_dir / "plan.yaml"),
        report=load_report(run_dir),
        metrics=tuple(metrics),
    )


def load_input(path: Path) -> ViewInput:
    """Load a plan file or a run folder (``report.yaml`` given directly means its folder).

    Raises:
        click.ClickException: one line naming what is wrong and the fix.
    """
    if not path.exists():
        raise click.ClickException(f"'{path}' does not exist; {_HOW}")
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
        raise click.ClickException(message) from err
    except OSError as err:
        raise click.ClickException(f"cannot read '{path}': {err.strerror or err}") from err


def _one_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def browser_available() -> bool:
    """Whether a graphical browser can be opened (never a console browser on a headless box)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _open(path: Path) -> bool:
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
    image = "x".join(map(str, data.plan.image_shape_px))
    model = Path(str(data.plan.model.get("file", "model"))).name
    kind = f"run {data.report.run}" if data.report is not None else "streaming plan"
    return f"tileplan: {kind}, {model} at {image} px", str(data.path)


def _check_out(out: Path, source: Path) -> None:
    if out.is_dir():
        raise click.ClickException(f"--out '{out}' is a folder; give a file name like report.html")
    inputs = [source / n for n in _RUN_FILES] if source.is_dir() else [source]
    if out.resolve() in {p.resolve() for p in inputs}:
        raise click.ClickException(f"--out '{out}' would overwrite an input; use e.g. report.html")


@click.command(epilog="Example: tileplan view plan.yaml   or   tileplan view runs/demo")
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="HTML file to write (default: plan.html beside the plan, or RUN_DIR/report.html).",
)
@click.option(
    "--open/--no-open",
    "open_browser",
    default=True,
    show_default=True,
    help="Open the page in a browser when one is available.",
)
def view(source: Path, out: Path | None, open_browser: bool) -> None:
    """Interactive memory charts of a plan file or a run folder, as one offline HTML page.

    SOURCE is a plan (PLAN.yaml) or a run folder (RUN_DIR with plan.yaml, report.yaml and
    metrics.jsonl).
    """
    data = load_input(source)
    target = out or default_out(data.path)
    _check_out(target, data.path)
    title, subtitle = _title(data)
    try:
        written = write_html(target, title, _sections(data), subtitle=subtitle)
    except OSError as err:
        raise click.ClickException(f"cannot write '{target}': {err.strerror or err}") from err
    click.echo(f"charts written to {written}")
    if open_browser and not _open(written):
        click.echo(f"open {written.resolve().as_uri()} in a browser to see them")
