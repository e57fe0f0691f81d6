"""One self-contained HTML page of charts: works offline, from a ``file://`` URL.

plotly.js is inlined exactly once, in the page head; each figure is a ``<div>`` plus a small
script that draws it. Pages are written atomically: a failed write never leaves half a page.
"""

from __future__ import annotations

import datetime
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

import tileplan
from executor import Plan, atomic_write
from tileplan.run.report import EpochMetrics, RunReport
from tileplan.text import describe_time, describe_verification
from tileplan.units import format_bytes, format_shape
from tileplan.view.charts import plan_charts, run_charts, tile_label

__all__ = ["ReportSection", "plan_section", "render_html", "run_section", "write_html"]

_CONFIG = {
    "responsive": True,
    "displaylogo": False,
    "scrollZoom": False,
    "toImageButtonOptions": {"format": "png", "scale": 2},
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #222; background: #f6f7f9; }
header { background: #24303f; color: #fff; padding: 18px 28px; }
header h1 { margin: 0; font-size: 22px; }
header p { margin: 4px 0 0; color: #c9d3df; font-size: 13px; }
main { max-width: 1500px; margin: 0 auto; padding: 8px 24px 40px; }
section { margin-top: 22px; }
h2 { font-size: 19px; margin: 18px 0 8px; }
table.facts { border-collapse: collapse; background: #fff; font-size: 14px; margin-bottom: 12px; }
table.facts th { text-align: left; font-weight: 600; padding: 4px 14px 4px 10px; color: #444; }
table.facts td { padding: 4px 10px; font-variant-numeric: tabular-nums; }
table.facts tr:nth-child(odd) { background: #f0f2f5; }
.figure { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; margin: 14px 0;
          padding: 6px; }
p.note { color: #555; font-size: 13px; margin: 4px 0 10px; }
footer { color: #777; font-size: 12px; text-align: center; padding: 16px; }
"""


@dataclass(frozen=True)
class ReportSection:
    """A titled part of the page: a table of facts, a note, and figures."""

    title: str
    facts: tuple[tuple[str, str], ...] = ()
    figures: tuple[go.Figure, ...] = ()
    note: str = ""


def plan_section(plan: Plan, title: str = "Plan") -> ReportSection:
    """The plan's key numbers and its charts (memory/time per tile, tile grid, layers)."""
    forward = ""
    if tuple(plan.forward_tile_px) != tuple(plan.tile_px):
        forward = f" (forward pass {format_shape(plan.forward_tile_px)})"
    peak_kind = "measured" if plan.measured_peak_bytes is not None else "predicted"
    peak = plan.peak_bytes
    conventional = "measured" if plan.conventional_measured else "estimate"
    facts = (
        ("model", f"{plan.model.file} ({plan.model.split})"),
        ("image", f"{format_shape(plan.image_shape_px)} px, {plan.channels} channels, batch "
                  f"{plan.batch}, {plan.dtype}, optimizer {plan.optimizer}"),
        ("chosen tile", f"{tile_label(plan.tile_px)} px{forward}") if not plan.segments else
        ("chosen segments", " | ".join(
            f"{tile_label(s.tile_px)} px to {s.where}" for s in plan.segments)),
        ("peak memory", f"{format_bytes(peak)} ({peak_kind}) of {format_bytes(plan.budget_bytes)}"
                        f" budget, {format_bytes(plan.usable_bytes)} usable"),
        ("conventional step", f"{format_bytes(plan.conventional_peak_bytes)} ({conventional})"),
        ("time per image", describe_time(plan)),
        ("verification", describe_verification(plan)),
        ("made by", f"{plan.provenance.tool} on {plan.provenance.device} "
                    f"({plan.provenance.device_name}), {plan.provenance.created}"),
    )  # fmt: skip
    return ReportSection(title=title, facts=facts, figures=plan_charts(plan).figures())


def run_section(
    report: RunReport, metrics: Sequence[EpochMetrics], title: str = "Run"
) -> ReportSection:
    """The run's memory savings and its charts (step timeline, per-epoch metrics)."""
    kind = "measured" if report.conventional_measured else "estimate"
    conv_time = report.conventional_time_per_image_s
    facts = [
        ("run", f"{report.run} on {report.device}"),
        ("image / tiles", f"{format_shape(report.image_shape_px)} px, tile "
                          f"{format_shape(report.tile_px)}, {report.n_tiles} tiles"),
        ("streaming peak", f"{format_bytes(report.streaming_peak_bytes)} (measured)"),
        ("conventional peak", f"{format_bytes(report.conventional_peak_bytes)} ({kind})"),
        ("saved", f"{format_bytes(report.saved_bytes)}: streaming needs "
                  f"{report.ratio:.1%} of the conventional peak"
         if report.conventional_peak_bytes else "-"),
        ("time per image", f"{report.streaming_time_per_image_s:.3g} s streaming"
         + (f", {conv_time:.3g} s conventional" if conv_time is not None else "")),
        ("measurement", report.describe_measurement()),
    ]  # fmt: skip
    if report.breakdown is not None:
        parts = [f"{name} {format_bytes(value)}"
                 for name, value in report.breakdown.categories().items()]  # fmt: skip
        facts.append(("breakdown (plan)", ", ".join(parts)))
    return ReportSection(
        title=title, facts=tuple(facts), figures=run_charts(report, metrics).figures()
    )


def _facts_html(facts: Sequence[tuple[str, str]]) -> str:
    if not facts:
        return ""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


def _figure_html(fig: go.Figure, div_id: str) -> str:
    body = fig.to_html(
        full_html=False, include_plotlyjs=False, config=_CONFIG, div_id=div_id,
        default_width="100%",
    )  # fmt: skip
    return f'<div class="figure">{body}</div>'


def _section_html(section: ReportSection, index: int) -> str:
    figures = "".join(
        _figure_html(fig, f"fig-{index}-{j}") for j, fig in enumerate(section.figures)
    )
    note = f'<p class="note">{html.escape(section.note)}</p>' if section.note else ""
    return (
        f"<section><h2>{html.escape(section.title)}</h2>{note}"
        f"{_facts_html(section.facts)}{figures}</section>"
    )


def _plotly_js() -> str:
    # A literal "</script" inside the bundle would end the tag early; escape it for safety.
    return get_plotlyjs().replace("</script", "<\\/script")


def render_html(title: str, sections: Sequence[ReportSection], *, subtitle: str = "") -> str:
    """The whole page, with plotly.js inlined once in the head."""
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(_section_html(s, i) for i, s in enumerate(sections))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        f'<script type="text/javascript">{_plotly_js()}</script></head><body>'
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
        f"<main>{body}</main>"
        f"<footer>tileplan {html.escape(tileplan.__version__)}, {made}. Hover for values, drag "
        "to zoom, double-click to reset, click legend entries to hide or show them.</footer>"
        "</body></html>\n"
    )


def write_html(
    path: str | os.PathLike[str],
    title: str,
    sections: Sequence[ReportSection],
    *,
    subtitle: str = "",
) -> Path:
    """Render the page and write it atomically to ``path``; returns the path."""
    page = render_html(title, sections, subtitle=subtitle).encode()
    return atomic_write(path, lambda f: f.write(page))
