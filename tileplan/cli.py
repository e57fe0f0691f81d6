"""The ``tileplan`` command line. It parses and presents; the library computes."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from executor import Plan, StreamingError, check_plan_matches, load_plan, save_plan
from tileplan.units import format_bytes, parse_bytes, parse_shape

__all__ = ["cli", "main"]

_PATH = click.Path(dir_okay=False, path_type=Path)


class _Shape(click.ParamType):
    name = "SIZE"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_shape(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


class _Bytes(click.ParamType):
    name = "SIZE"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_bytes(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Plan and run exact streaming training of CNNs on images larger than device memory."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _fail(err: Exception) -> None:
    raise click.ClickException(str(err).splitlines()[0] if str(err) else type(err).__name__)


@cli.command(epilog="Example: tileplan profile examples/resnet34.py --image 8192 --budget 24GiB")
@click.argument("model_file", type=_PATH)
@click.option(
    "--image",
    "image",
    type=_Shape(),
    required=True,
    help="Image size in px: 8192 (square) or 6000x9000 (H x W).",
)
@click.option(
    "--channels", type=click.IntRange(min=1), default=3, show_default=True, help="Image channels."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option(
    "--budget",
    type=_Bytes(),
    default=None,
    help="Memory budget, e.g. 10GiB (default: GPU total memory, CPU available RAM).",
)
@click.option(
    "--margin",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.1,
    show_default=True,
    help="Safety margin kept free, as a fraction of the budget.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16", "float64"]),
    default="float32",
    show_default=True,
    help="Compute dtype (bf16/fp16: autocast).",
)
@click.option(
    "--tile",
    type=_Shape(),
    default=None,
    help="Evaluate only this tile (2048 or 2048x1536) instead of searching.",
)
@click.option(
    "--split",
    default="auto",
    show_default=True,
    help="Where the trunk ends: auto, or the module name after which it ends.",
)
@click.option(
    "--optimizer",
    type=click.Choice(["adam", "adamw", "sgd"]),
    default="adam",
    show_default=True,
    help="Optimizer whose state is counted.",
)
@click.option(
    "--measure/--no-measure",
    default=True,
    show_default=True,
    help="Time tiles and calibrate memory on the device (off: estimates only).",
)
@click.option(
    "--verify/--no-verify",
    default=None,
    help="Check the chosen plan with one real step (default: when predicted to take "
    "under --verify-limit).",
)
@click.option(
    "--verify-limit",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds a verification step may take by default.",
)
@click.option(
    "--out",
    type=_PATH,
    default=Path("plan.yaml"),
    show_default=True,
    help="Where to write the plan.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead of a table.")
def profile(model_file: Path, image: tuple[int, ...], channels: int, device: str,
            budget: int | None, margin: float, dtype: str, tile: tuple[int, ...] | None,
            split: str, optimizer: str, measure: bool, verify: bool | None, verify_limit: float,
            out: Path, as_json: bool) -> None:  # fmt: skip
    """Choose the tile shape for MODEL_FILE at an image size and save the plan as YAML.

    MODEL_FILE defines build_model() (or a module-level `model`) and may define
    split(model) -> (trunk, head).
    """
    from tileplan.profile import NoFeasiblePlanError, ProfileRequest, summary
    from tileplan.profile import profile as run_profile

    try:
        request = ProfileRequest(
            model_file=model_file, image_shape=image, channels=channels, device=device,
            budget_bytes=budget, margin=margin, dtype=dtype, tile=tile, split=split,
            optimizer=optimizer, measure=measure, verify=verify, verify_limit_s=verify_limit,
        )  # fmt: skip
        plan = run_profile(request, progress=sys.stderr.isatty())
    except NoFeasiblePlanError as err:
        click.echo(render_table(err.plan, chosen=False), err=True)
        _fail(err)
    except (StreamingError, ValueError, OSError) as err:
        _fail(err)
    save_plan(plan, out)
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=1))
        return
    click.echo(render_table(plan))
    click.echo(summary(plan))
    click.echo(f"verification: {plan.verified}")
    click.echo(f"plan written to {out}")


@cli.command(epilog="Example: tileplan validate plan.yaml --model examples/resnet34.py")
@click.argument("plan_file", type=_PATH)
@click.option(
    "--model",
    "model_file",
    type=_PATH,
    default=None,
    help="Check the plan against this model file (default: the plan's own).",
)
def validate(plan_file: Path, model_file: Path | None) -> None:
    """Check that PLAN_FILE is a valid plan for its model (exit 1 with the reason if not)."""
    from tileplan.model_file import load_model_file

    try:
        plan = load_plan(plan_file)
        path = model_file or Path(plan.model["file"])
        loaded = load_model_file(path, plan.model.get("split_option", "auto"))
        check_plan_matches(plan, loaded.trunk)
    except (StreamingError, OSError) as err:
        _fail(err)
    tile = "x".join(map(str, plan.tile_px))
    click.echo(f"{plan_file}: valid plan for {path} at {'x'.join(map(str, plan.image_shape_px))}"
               f" px, {plan.dtype}, tile {tile}")  # fmt: skip


def render_table(plan: Plan, *, chosen: bool = True) -> str:
    """The candidates as a fixed-width table, the chosen row marked with '>'."""
    unit = "s/image" if "measured" in plan.time_source else "rel.time"
    head = (f"  {'tile':>11} {'tiles':>7} {'overlap':>7} {'est. peak':>10} {'meas. tile':>10} "
            f"{'meas. step':>10} {unit:>9} {'fits':>4}")  # fmt: skip
    lines = [head]
    for c in plan.candidates:
        mark = ">" if chosen and c.tile_px == plan.tile_px else " "
        grid = "x".join(map(str, c.grid))
        lines.append(
            f"{mark} {'x'.join(map(str, c.tile_px)):>11} {grid:>7} {c.overlap_factor:>7.2f} "
            f"{format_bytes(c.estimated_peak_bytes):>10} {format_bytes(c.measured_tile_bytes):>10} "
            f"{format_bytes(c.measured_peak_bytes):>10} {c.predicted_time_s:>9.1f} "
            f"{'yes' if c.fits else 'no':>4}"
        )
    return "\n".join(lines)


def main() -> None:
    """Console entry point."""
    cli(prog_name="tileplan")
