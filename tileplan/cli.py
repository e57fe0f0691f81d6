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


from tileplan.view_cmd import view  # noqa: E402  (the group must exist first)

cli.add_command(view)


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


@cli.command(epilog="Example: tileplan train examples/small_cnn.py --plan plan.yaml "
             "--data demo/train.csv --val demo/val.csv --out runs/demo --epochs 3")  # fmt: skip
@click.argument("model_file", type=_PATH)
@click.option(
    "--plan", "plan_file", type=_PATH, required=True, help="Plan from `tileplan profile`."
)
@click.option("--data", type=_PATH, required=True, help="CSV with columns image,label.")
@click.option("--val", type=_PATH, default=None, help="Validation CSV (same columns).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run folder: checkpoints, metrics.jsonl, report.yaml.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option(
    "--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), default="adam", show_default=True
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Effective batch (gradients accumulated over this many images).",
)
@click.option("--amp", is_flag=True, help="Autocast with the plan's dtype (bfloat16/float16 plan).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--num-workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Image-reading worker processes.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option(
    "--report/--no-report",
    default=True,
    show_default=True,
    help="Measure the memory-savings report at the end.",
)
def train(model_file: Path, plan_file: Path, data: Path, val: Path | None, out: Path,
          epochs: int, lr: float, optimizer: str, batch: int, amp: bool, resume: bool, seed: int,
          num_workers: int, device: str, report: bool) -> None:  # fmt: skip
    """Train MODEL_FILE with the trunk streamed as PLAN says, on images listed in a CSV.

    Data parallel: torchrun --nproc-per-node N -m tileplan train ...
    """
    from executor.train import TrainConfig
    from tileplan.training import TrainRequest, run_training

    try:
        config = TrainConfig(epochs=epochs, lr=lr, optimizer=optimizer, batch=batch, amp=amp,
                             seed=seed, num_workers=num_workers)  # fmt: skip
        request = TrainRequest(model_file=model_file, plan_file=plan_file, data=data, val=val,
                               out=out, config=config, resume=resume, device=device,
                               report=report)  # fmt: skip
        history, run_report = run_training(request, progress=sys.stderr.isatty())
    except (StreamingError, OSError) as err:
        _fail(err)
    if not history:
        return
    last = history[-1]
    click.echo(
        f"epoch {last['epoch']}: train loss {last['train_loss']:.4f}"
        + (f", val loss {last['val_loss']:.4f}" if last.get("val_loss") is not None else "")
        + (f", val AUC {last['val_auc']:.3f}" if last.get("val_auc") is not None else "")
    )
    if run_report is not None:
        click.echo(render_report(run_report))


@cli.command(epilog="Example: tileplan predict examples/small_cnn.py --plan plan.yaml "
             "--checkpoint runs/demo/last.pt demo/img_000.tif --saliency maps/")  # fmt: skip
@click.argument("model_file", type=_PATH)
@click.argument("images", type=_PATH, nargs=-1, required=True)
@click.option("--plan", "plan_file", type=_PATH, required=True)
@click.option("--checkpoint", type=_PATH, required=True, help="A run's last.pt.")
@click.option(
    "--saliency",
    "saliency_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write exact saliency maps (PNG and .npy) to this folder.",
)
@click.option(
    "--out", type=_PATH, default=None, help="Write predictions CSV here (default: stdout)."
)
@click.option("--device", default="auto", show_default=True)
def predict(model_file: Path, images: tuple[Path, ...], plan_file: Path, checkpoint: Path,
            saliency_dir: Path | None, out: Path | None, device: str) -> None:  # fmt: skip
    """Predict whole IMAGES by streaming them forward (no autograd memory)."""
    from executor.fileio import atomic_write
    from tileplan.training import predict_files, predictions_csv

    try:
        results = predict_files(
            model_file=model_file,
            plan_file=plan_file,
            checkpoint=checkpoint,
            images=images,
            saliency_dir=saliency_dir,
            device=device,
        )
    except (StreamingError, OSError) as err:
        _fail(err)
    text = predictions_csv(results)
    if out is None:
        click.echo(text, nl=False)
    else:
        atomic_write(out, lambda f: f.write(text.encode()))
        click.echo(f"{len(results)} predictions written to {out}")


@cli.command(epilog="Example: tileplan report runs/demo")
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir: Path) -> None:
    """Show the memory-savings report of a training run."""
    from executor.report import load_report

    try:
        click.echo(render_report(load_report(run_dir)))
    except StreamingError as err:
        _fail(err)


@cli.command("demo-data", epilog="Example: tileplan demo-data demo --n 64 --size 2048")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--n", type=click.IntRange(min=4), default=64, show_default=True, help="Number of images."
)
@click.option(
    "--size", type=click.IntRange(min=32), default=2048, show_default=True, help="Image side (px)."
)
@click.option("--seed", type=int, default=0, show_default=True)
def demo_data(out_dir: Path, n: int, size: int, seed: int) -> None:
    """Write a synthetic dataset whose labels need full resolution (train.csv, val.csv)."""
    from executor.demo_data import write_demo_dataset

    try:
        path = write_demo_dataset(out_dir, n=n, size=size, seed=seed)
    except (StreamingError, OSError, ValueError) as err:
        _fail(err)
    click.echo(f"wrote {n} images of {size}x{size} px with train.csv and val.csv to {path}")


def render_report(r: object) -> str:
    """The memory-savings report as text."""
    from executor.report import RunReport

    assert isinstance(r, RunReport)
    kind = "measured" if r.conventional_measured else "estimated"
    lines = [
        f"run {r.run} on {r.device}: image {'x'.join(map(str, r.image_shape_px))} px, tile "
        f"{'x'.join(map(str, r.tile_px))} ({r.n_tiles} tiles)",
        f"  streaming step peak    {format_bytes(r.streaming_peak_bytes):>10}  (measured: "
        f"{r.measurement})",
        f"  conventional step peak {format_bytes(r.conventional_peak_bytes):>10}  ({kind})",
        f"  saved per image        {format_bytes(r.saved_bytes):>10}  (streaming = {r.ratio:.1%} "
        "of conventional)",
        f"  time per image         {r.streaming_time_per_image_s:>8.2f} s"
        + (f" (conventional step {r.conventional_time_per_image_s:.2f} s)"
           if r.conventional_time_per_image_s else ""),
        "  breakdown of the streaming step (estimate):",
    ]  # fmt: skip
    for key, value in r.breakdown_bytes.items():
        lines.append(f"    {key.removesuffix('_bytes'):<22} {format_bytes(value):>10}")
    return "\n".join(lines)
