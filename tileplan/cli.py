"""The ``tileplan`` command line. It parses and presents; the library computes.

Every command turns the library's errors (``StreamingError``, bad values, unreadable files)
into one line on stderr and exit status 1; click's own usage errors exit with 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from executor import DTYPE_NAMES, OPTIMIZER_NAMES, StreamingError, atomic_write
from tileplan.run.policy import DEFAULT_CHECKPOINT_EVERY, Cadence
from tileplan.units import format_shape, parse_bytes, parse_shape, parse_spacing

if TYPE_CHECKING:
    from tileplan.run.recipe import Recipe
    from tileplan.settings import DataSettings

__all__ = ["cli", "main"]

_PATH = click.Path(dir_okay=False, path_type=Path)
_FOLDER = click.Path(file_okay=False, path_type=Path)


class _Parsed(click.ParamType):
    """A value parsed from text by ``parse``, whose ValueError becomes click's usage error."""

    def __init__(self, name: str, parse: Callable[[str], object]) -> None:
        self.name = name
        self.parse = parse

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> object:
        if not isinstance(value, str):
            return value  # a default, already parsed
        try:
            return self.parse(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def _floats(text: str) -> tuple[float, ...]:
    """``0.485,0.456,0.406`` -> a tuple of floats (one per channel)."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"'{text}' is not a comma-separated list of numbers") from None


_SIZE = _Parsed("SIZE", parse_shape)
_BYTES = _Parsed("SIZE", parse_bytes)
_FLOATS = _Parsed("V[,V...]", _floats)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """The library's errors as one line and exit status 1."""
    from tileplan.run.interrupts import RunInterruptedError

    try:
        yield
    except RunInterruptedError:
        raise  # not an error: the caller says where the run stopped and exits with its code
    except (StreamingError, ValueError, OSError) as err:
        text = str(err).strip()
        raise click.ClickException(text.splitlines()[0] if text else type(err).__name__) from err


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Plan and run exact streaming training of CNNs on images larger than device memory."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    """Console entry point."""
    cli(prog_name="tileplan")


def _largest_image(
    data: Path, mpp: float | None, level: int | None, tissue: bool, *, model_file: Path,
    split: str, spacing: tuple[float, ...] | None, intensity: str, assume_mpp: float | None,
    assume_spacing: tuple[float, ...] | None,
) -> tuple[tuple[int, ...], int]:  # fmt: skip
    """``((H, W) or (D, H, W), channels)`` a plan for every image of the CSV ``data`` needs;
    volumes when the model's layers take three spatial axes."""
    from tileplan.api import largest_image, model_axes

    n_axes = model_axes(model_file, split)
    largest, channels = largest_image(data, mpp=mpp, level=level, tissue=tissue, spacing=spacing,
                                      intensity=intensity, n_axes=n_axes, assume_mpp=assume_mpp,
                                      assume_spacing=assume_spacing,
                                      command="profile")  # fmt: skip
    unit = "voxels" if n_axes == 3 else "px"
    click.echo(f"{data}: planning for the largest image, {format_shape(largest)} {unit}", err=True)
    return largest, channels


Decorator = Callable[[Callable[..., None]], Callable[..., None]]


_ASSUME_MPP = click.option(
    "--assume-mpp", type=click.FloatRange(min=0, min_open=True), default=None,
    help="Microns per pixel of files that record none (PNG, plain TIFF); a CSV 'mpp' column "
    "states it per row.")  # fmt: skip
_ASSUME_SPACING = click.option(
    "--assume-spacing", type=_Parsed("MM", parse_spacing), default=None,
    help="Volumes: voxel spacing in mm (2 or 3x1x1) of files that record none; a CSV "
    "'spacing' column states it per row.")  # fmt: skip


def _data_settings(params: dict[str, Any]) -> DataSettings:
    """The ``DataSettings`` that ``_slide_options``' values (a command's parameters) say."""
    from tileplan.settings import DataSettings

    return DataSettings(**{f.name: params[f.name] for f in dataclasses.fields(DataSettings)})


def _recipe_options() -> Decorator:
    """How `train` trains beyond the plan: regularisation, schedule, balance, monitoring."""
    from tileplan.augment import DEFAULT_SPEC, OPS
    from tileplan.run.recipe import MONITORS, Schedule

    options = [
        click.option("--weight-decay", type=click.FloatRange(min=0), default=None,
                     help="The optimizer's weight decay (decoupled for adamw) [default: the "
                     "optimizer's, 0 for adam and sgd, 0.01 for adamw]."),
        click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="SGD's momentum [default: 0.9]."),
        click.option("--schedule", type=_Parsed("SCHEDULE", Schedule.parse), default="none",
                     show_default=True, help="Learning rate per epoch: none, cosine, "
                     "step[:EVERY[:GAMMA]] (30, 0.1), exponential[:GAMMA] (0.99) or "
                     "plateau[:PATIENCE[:FACTOR]] (5, 0.1; follows --monitor)."),
        click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Epochs of linear warm-up to --lr before the schedule."),
        click.option("--balance", is_flag=True, help="Draw each epoch's images with "
                     "replacement by inverse class frequency (oversample the rare classes)."),
        click.option("--class-weights", default=None, metavar="auto|W0,W1,...",
                     help="Weight the loss by class: auto (inverse frequency) or one weight "
                     "per class."),
        click.option("--monitor", type=click.Choice(list(MONITORS)), default=None,
                     help="The value best.pt, --patience, --average and a plateau schedule "
                     "follow [default: val_loss with --val (best.pt kept), else train_loss "
                     "(no best.pt)]."),
        click.option("--patience", type=click.IntRange(min=1), default=None,
                     help="Stop after this many epochs without a better --monitor value."),
        click.option("--freeze", default=None, metavar="MODULE",
                     help="Keep every trunk parameter up to and including MODULE fixed (e.g. "
                     "layer3); profile with --cut MODULE so that no backward tile runs "
                     "through the frozen part."),
        click.option("--augment", type=_Parsed("SPEC", _augment_spec), default="none",
                     show_default=True, metavar="SPEC",
                     help="Augment each training image as its crops are read: 'default' "
                     f"({DEFAULT_SPEC}) or a comma-separated list of NAME[:STRENGTH] from "
                     f"{', '.join(OPS)} (validation and predict never augment)."),
        click.option("--unfreeze-epoch", type=click.IntRange(min=1), default=None, metavar="N",
                     help="With --freeze: from epoch N (1-based) every parameter trains, with a "
                     "new optimizer at --lr-after and the schedule started again."),
        click.option("--lr-after", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="The learning rate from --unfreeze-epoch on [default: --lr]."),
        click.option("--average", type=click.IntRange(min=0), default=0, show_default=True,
                     metavar="K", help="Also write averaged.pt: the mean weights of the K "
                     "consecutive epochs with the best mean --monitor value."),
    ]  # fmt: skip

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _augment_spec(text: str) -> str:
    from tileplan.augment import canonical

    return canonical(text)


def _recipe(params: dict[str, Any]) -> Recipe:
    """The ``Recipe`` that ``_recipe_options``' values say (class weights stay text until the
    labels are read)."""
    from tileplan.run.recipe import Recipe

    return Recipe(weight_decay=params["weight_decay"], momentum=params["momentum"],
                  schedule=params["schedule"], warmup=params["warmup"],
                  balance=params["balance"], monitor=params["monitor"], patience=params["patience"],
                  average=params["average"], freeze=params["freeze"],
                  unfreeze_epoch=params["unfreeze_epoch"],
                  lr_after=params["lr_after"])  # fmt: skip


def _slide_options(*, oversize: bool = True) -> Decorator:
    """--mpp, --level, --tissue (and --oversize): how images, whole slides above all, are read."""
    options = [
        click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Read every slide at this many microns per pixel (from its metadata: "
                     "the nearest finer level, area-averaged down exactly)."),
        click.option("--level", type=click.IntRange(min=0), default=None,
                     help="Read this pyramid level (0 = full resolution); a CSV 'level' column "
                     "overrides it per row."),
        click.option("--tissue", is_flag=True,
                     help="Crop each image to the bounding box of its tissue (Otsu on "
                     "saturation of a thumbnail; cached per slide)."),
        click.option("--spacing", type=_Parsed("MM", parse_spacing), default=None,
                     help="Volumes: resample every volume to this voxel spacing in mm (2, or "
                     "3x1x1 as D x H x W; exact area averages, coarser than stored only)."),
        _ASSUME_MPP,
        _ASSUME_SPACING,
        click.option("--intensity", default="raw", show_default=True,
                     help="Volumes: raw (values as stored), zscore (per volume and channel) "
                     "or window:LO,HI (clip, map to [0, 1]; e.g. window:-1000,400 for CT)."),
    ]  # fmt: skip
    if oversize:
        options.append(click.option(
            "--oversize", type=click.Choice(["crop", "refuse"]), default="crop",
            show_default=True, help="An image larger than the plan's: stream its centre (with a "
            "warning) or refuse it before training."))  # fmt: skip

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@cli.command(
    epilog="Example: tileplan profile examples/resnet34.py --image 8192 --budget 24GiB"
    "   or   tileplan profile examples/resnet18.py --data slides/train.csv --mpp 1"
)
@click.argument("model_file", type=_PATH)
@click.option(
    "--image",
    type=_SIZE,
    default=None,
    help="Largest image size in px: 8192 (square) or 6000x9000 (H x W); smaller images stream "
    "at their own size.",
)
@click.option(
    "--data",
    type=_PATH,
    default=None,
    help="Instead of --image: plan for the largest image of this CSV, read at "
    "--mpp/--level (and --tissue).",
)
@click.option(
    "--channels", type=click.IntRange(min=1), default=3, show_default=True, help="Image channels."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option(
    "--budget",
    type=_BYTES,
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
    type=click.Choice(DTYPE_NAMES),
    default="float32",
    show_default=True,
    help="Compute dtype (bfloat16/float16: float32 weights under autocast).",
)
@click.option(
    "--tile",
    type=_SIZE,
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
    type=click.Choice(OPTIMIZER_NAMES),
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
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds a verification step may take by default.",
)
@click.option(
    "--segments",
    default="auto",
    show_default=True,
    help="Stream the trunk in this many segments (1: one tile shape), or auto: the planner "
    "cuts deep trunks where that is faster under the budget.",
)
@click.option(
    "--cut",
    "cuts",
    default=None,
    help="Cut the trunk after these modules or graph nodes (comma-separated, in order) "
    "instead of choosing cuts.",
)
@click.option(
    "--freeze",
    default=None,
    metavar="MODULE",
    help="Plan staged fine-tuning (train --freeze MODULE): cut the trunk after MODULE too, and "
    "price the phase where the trunk up to MODULE is frozen (it streams forward only) "
    "besides the one where everything trains.",
)
@click.option(
    "--max-tile",
    type=click.IntRange(min=1),
    default=None,
    help="Largest backward tile side, px of each segment's input (e.g. to keep tiles small "
    "on a device shared with other work).",
)
@click.option(
    "--out",
    type=_PATH,
    default=Path("plan.yaml"),
    show_default=True,
    help="Where to write the plan.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead of a table.")
@click.option(
    "--bn",
    "batch_norm",
    type=click.Choice(["frozen", "train"]),
    default="frozen",
    show_default=True,
    help="BatchNorm with its running statistics (frozen) or with batch statistics (train: "
    "every BatchNorm ends a segment, its input kept whole); train with the same --bn.",
)
@_slide_options(oversize=False)
def profile(model_file: Path, image: tuple[int, ...] | None, data: Path | None, channels: int,
            device: str, budget: int | None, margin: float, dtype: str,
            tile: tuple[int, ...] | None, split: str, optimizer: str, measure: bool,
            verify: bool | None, verify_limit: float, segments: str, cuts: str | None,
            freeze: str | None, max_tile: int | None, out: Path, as_json: bool, batch_norm: str,
            mpp: float | None,
            level: int | None, tissue: bool, spacing: tuple[float, ...] | None,
            assume_mpp: float | None, assume_spacing: tuple[float, ...] | None,
            intensity: str) -> None:  # fmt: skip
    """Choose the tile shape for MODEL_FILE at an image size and save the plan as YAML.

    MODEL_FILE defines build_model() (or a module-level `model`) and may define
    split(model) -> (trunk, head).
    """
    from executor import save_plan
    from tileplan.api import memory_report
    from tileplan.api import profile_as_command as plan_for
    from tileplan.planning.profile import NoFeasiblePlanError
    from tileplan.text import render_table

    if segments != "auto" and not (segments.isdigit() and int(segments) >= 1):
        raise click.BadParameter(
            f"{segments!r}: give auto or a count of at least 1", param_hint="--segments"
        )
    cut_names = tuple(c.strip() for c in cuts.split(",") if c.strip()) if cuts else ()
    if (image is None) == (data is None):
        raise click.UsageError("give --image SIZE, or --data CSV to plan for its largest image")
    if data is None and (mpp is not None or level is not None or tissue or spacing is not None
                         or intensity != "raw" or assume_mpp is not None
                         or assume_spacing is not None):  # fmt: skip
        raise click.UsageError("--mpp, --level, --tissue, --spacing, --intensity and --assume-* "
                               "choose how --data is read; give --data")  # fmt: skip
    try:
        with _one_line_errors():
            if data is not None:
                image, channels = _largest_image(data, mpp, level, tissue, model_file=model_file,
                                                 split=split, spacing=spacing, intensity=intensity,
                                                 assume_mpp=assume_mpp,
                                                 assume_spacing=assume_spacing)  # fmt: skip
            plan = plan_for(
                model_file, image=image, channels=channels, device=device, budget=budget,
                margin=margin, dtype=dtype, tile=tile, split=split, optimizer=optimizer,
                measure=measure, verify=verify, verify_limit=verify_limit, segments=segments,
                cut=cut_names, freeze=freeze, max_tile=max_tile, bn=batch_norm, data=None,
                mpp=None,
                level=None, tissue=False, spacing=None, intensity="raw", assume_mpp=None,
                assume_spacing=None, progress=sys.stderr.isatty(),
            )  # fmt: skip
            save_plan(plan, out)
    except click.ClickException as err:
        if isinstance(err.__cause__, NoFeasiblePlanError) and err.__cause__.candidates:
            click.echo(render_table(err.__cause__.candidates), err=True)
        raise
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=1))
        return
    click.echo(str(memory_report(plan)))
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
    """Check PLAN_FILE: its own consistency, and every geometry number it states against the
    model (exit 1 with the reason if anything differs)."""
    from executor import check_plan_matches, load_plan
    from tileplan.planning.model_file import load_model_file

    with _one_line_errors():
        plan = load_plan(plan_file)
        path = model_file or Path(plan.model.file)
        loaded = load_model_file(
            path, plan.model.split_option, batch_norm=plan.batch_norm, n_axes=plan.n_axes
        )
        check_plan_matches(plan, loaded.trunk)
    click.echo(f"{plan_file}: valid plan for {path} at {format_shape(plan.image_shape_px)} px, "
               f"{plan.dtype}, tile {format_shape(plan.tile_px)}")  # fmt: skip


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


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
    type=_FOLDER,
    required=True,
    help="Run folder: checkpoints, metrics.jsonl, report.yaml.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZER_NAMES),
    default=None,
    help="Optimizer (default: the one the plan counted).",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Effective batch (gradients accumulated over this many images).",
)
@click.option(
    "--mean",
    type=_FLOATS,
    default=None,
    help="Per-channel mean on the [0, 1] scale (default: ImageNet's for 3 channels, "
    "0.5 otherwise).",
)
@click.option(
    "--std",
    type=_FLOATS,
    default=None,
    help="Per-channel std (default: ImageNet's for 3 channels, 0.5 otherwise).",
)
@click.option(
    "--amp",
    is_flag=True,
    help="Check that the plan is mixed precision (bfloat16/float16); the plan's dtype "
    "decides how the run computes.",
)
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
@click.option(
    "--bn",
    "batch_norm",
    type=click.Choice(["frozen", "train"]),
    default=None,
    help="Train BatchNorm with batch statistics (train: validation and checkpoints use the "
    "running statistics it updates) or keep its statistics frozen (default: the plan's "
    "--bn; a plan is made for one of them).",
)
@click.option(
    "--checkpoint-every", type=_Parsed("EVERY", Cadence.parse),
    default=str(DEFAULT_CHECKPOINT_EVERY), show_default=True,
    help="Also checkpoint inside epochs: every N optimizer steps (500) or a duration (90s, "
    "30m, 2h); --resume continues mid-epoch exactly.")  # fmt: skip
@click.option(
    "--on-read-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
    help="An image that fails to read mid-run (a corrupt tile, a truncated file): stop, naming "
    "it, or leave it out of the epoch and list it in skipped.csv.")  # fmt: skip
@click.option(
    "--max-skipped", type=click.FloatRange(0, 1), default=0.05, show_default=True,
    help="With --on-read-error skip: stop once more than this fraction of an epoch's "
    "training images failed to read.")  # fmt: skip
@_recipe_options()
@_slide_options()
def train(model_file: Path, plan_file: Path, data: Path, val: Path | None, out: Path,
          epochs: int, lr: float, optimizer: str | None, batch: int,
          mean: tuple[float, ...] | None, std: tuple[float, ...] | None, amp: bool, resume: bool,
          seed: int, num_workers: int, device: str, report: bool, batch_norm: str | None,
          checkpoint_every: Cadence, on_read_error: str, max_skipped: float,
          mpp: float | None, level: int | None, tissue: bool, spacing: tuple[float, ...] | None,
          assume_mpp: float | None, assume_spacing: tuple[float, ...] | None, intensity: str,
          oversize: str, **recipe: Any) -> None:  # fmt: skip
    """Train MODEL_FILE with the trunk streamed as PLAN says, on images listed in a CSV.

    Data parallel: torchrun --nproc-per-node N -m tileplan train ...

    SIGTERM or SIGINT (preemption, Ctrl-C) stops the run between two images: it writes a
    checkpoint of the last finished optimizer step, prints where, and exits with status 75;
    the same command with --resume continues exactly. A second signal exits at once.
    """
    from tileplan.run.interrupts import EXIT_INTERRUPTED, RunInterruptedError
    from tileplan.text import render_report

    try:
        history, run_report = _train(**{k: v for k, v in locals().items() if k != "recipe"},
                                     **recipe)  # fmt: skip
    except RunInterruptedError as stopped:
        click.echo(str(stopped), err=True)
        sys.exit(EXIT_INTERRUPTED)
    if not history:
        return
    last = history[-1]
    click.echo(
        f"epoch {last.epoch}: train loss {last.train_loss:.4f}"
        + (f", val loss {last.val_loss:.4f}" if last.val_loss is not None else "")
        + (f", val AUC {last.val_auc:.3f}" if last.val_auc is not None else "")
        + (f", {last.skipped} images skipped" if last.skipped else "")
    )
    if run_report is not None:
        click.echo(render_report(run_report))


def _train(model_file: Path, plan_file: Path, data: Path, val: Path | None, out: Path,
           epochs: int, lr: float, optimizer: str | None, batch: int,
           mean: tuple[float, ...] | None, std: tuple[float, ...] | None, amp: bool,
           resume: bool, seed: int, num_workers: int, device: str, report: bool,
           batch_norm: str | None, checkpoint_every: Cadence, on_read_error: str,
           max_skipped: float, mpp: float | None, level: int | None, tissue: bool,
           spacing: tuple[float, ...] | None, assume_mpp: float | None,
           assume_spacing: tuple[float, ...] | None, intensity: str, oversize: str,
           **recipe: Any) -> tuple:  # fmt: skip
    """``tileplan train`` without the presentation: the request, run; one-line errors."""
    from tileplan.run.launch import TrainRequest, run_training
    from tileplan.run.policy import RunPolicy

    with _one_line_errors():
        settings = _data_settings(locals())
        options = {"lr": lr, "optimizer": optimizer, "batch": batch, "mean": mean, "std": std,
                   "epochs": epochs, "seed": seed, "num_workers": num_workers,
                   "data": settings, "batch_norm": batch_norm,
                   "recipe": _recipe(recipe), "augment": recipe["augment"]}  # fmt: skip
        policy = RunPolicy(checkpoint_every=checkpoint_every, on_read_error=on_read_error,  # type: ignore[arg-type]
                           max_skipped=max_skipped)  # fmt: skip
        request = TrainRequest(model_file=model_file, plan_file=plan_file, data=data, val=val,
                               out=out, options=options, resume=resume, device=device,
                               report=report, require_mixed_precision=amp,
                               policy=policy,
                               class_weights=recipe.get("class_weights"))  # fmt: skip
        return run_training(request, progress=sys.stderr.isatty())


@cli.command("check-data", epilog="Example: tileplan check-data slides/train.csv --plan "
             "plan.yaml --mpp 0.5 --tissue --out bad.csv")  # fmt: skip
@click.argument("data", type=_PATH)
@click.option("--plan", "plan_file", type=_PATH, required=True,
              help="The plan training will use (the largest image, 2-D or volumes).")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=1), default=os.cpu_count() or 1,
              show_default="all cores", help="Reading processes.")  # fmt: skip
@click.option("--out", type=_PATH, default=None,
              help="Write the blocks that fail as a CSV (csv,row,image,reason).")  # fmt: skip
@_slide_options()
def check_data(data: Path, plan_file: Path, workers: int, out: Path | None, mpp: float | None,
               level: int | None, tissue: bool, spacing: tuple[float, ...] | None,
               assume_mpp: float | None, assume_spacing: tuple[float, ...] | None,
               intensity: str, oversize: str) -> None:  # fmt: skip
    """Read every image of the CSV DATA as `tileplan train` with the same options would, block
    by block in parallel, and list the files and regions that fail to decode.

    Exits with status 1 when any block fails, so a script can stop before a long run.
    """
    from tileplan.run.check_data import check_data as run_check
    from tileplan.run.check_data import save_bad_reads

    with _one_line_errors():
        settings = _data_settings(locals())
        result = run_check(data, plan_file=plan_file, settings=settings, workers=workers,
                           progress=sys.stderr.isatty())  # fmt: skip
        if out is not None:
            save_bad_reads(out, result.bad)
    for bad in result.bad:
        click.echo(f"{bad.csv} row {bad.row}: {bad.reason}")
    rate = result.pixels / 1e6 / max(result.seconds, 1e-9)
    click.echo(f"{result.images} images, {result.blocks} blocks, {result.pixels / 1e6:.1f} Mpx "
               f"read in {result.seconds:.1f} s ({rate:.1f} Mpx/s): {len(result.bad)} blocks "
               f"of {result.bad_images} images failed", err=True)  # fmt: skip
    if result.bad:
        sys.exit(1)


@cli.command(epilog="Example: tileplan predict examples/small_cnn.py --plan plan.yaml "
             "--checkpoint runs/demo/last.pt demo/img_000.tif --saliency maps/")  # fmt: skip
@click.argument("model_file", type=_PATH)
@click.argument("images", type=_PATH, nargs=-1, required=True)
@click.option("--plan", "plan_file", type=_PATH, required=True)
@click.option(
    "--checkpoint", type=_PATH, required=True, help="A run's last.pt, best.pt or averaged.pt."
)
@click.option(
    "--saliency",
    "saliency_dir",
    type=_FOLDER,
    default=None,
    help="Write exact saliency maps (PNG and .npy) to this folder.",
)
@click.option(
    "--out", type=_PATH, default=None, help="Write predictions CSV here (default: stdout)."
)
@click.option("--device", default="auto", show_default=True)
@click.option("--tta", is_flag=True, help="Average the prediction over the 8 symmetries of the "
              "square (flips, rotations by 90 degrees; transposed ones where they fit the "
              "plan): 8 forward passes per image.")  # fmt: skip
@_ASSUME_MPP
@_ASSUME_SPACING
def predict(model_file: Path, images: tuple[Path, ...], plan_file: Path, checkpoint: Path,
            saliency_dir: Path | None, out: Path | None, device: str, tta: bool,
            assume_mpp: float | None,
            assume_spacing: tuple[float, ...] | None) -> None:  # fmt: skip
    """Predict whole IMAGES by streaming them forward (no autograd memory), read as the run
    read its images (resolution, tissue, spacing, intensity)."""
    from tileplan.run.predict import predict_files, predictions_csv

    with _one_line_errors():
        results = predict_files(model_file=model_file, plan_file=plan_file,
                                checkpoint=checkpoint, images=images, saliency_dir=saliency_dir,
                                device=device, assume_mpp=assume_mpp,
                                assume_spacing=assume_spacing, tta=tta)  # fmt: skip
        text = predictions_csv(results)
        if out is not None:
            atomic_write(out, lambda f: f.write(text.encode()))
    if out is None:
        click.echo(text, nl=False)
    else:
        click.echo(f"{len(results)} predictions written to {out}")


@cli.command(epilog="Example: tileplan report runs/demo")
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir: Path) -> None:
    """Show the memory-savings report of a training run."""
    from tileplan.run.report import load_report
    from tileplan.text import render_report

    with _one_line_errors():
        click.echo(render_report(load_report(run_dir)))


@cli.command("demo-data", epilog="Example: tileplan demo-data demo --n 64 --size 2048")
@click.argument("out_dir", type=_FOLDER)
@click.option(
    "--n", type=click.IntRange(min=4), default=64, show_default=True, help="Number of images."
)
@click.option(
    "--size", type=click.IntRange(min=32), default=2048, show_default=True, help="Image side (px)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--slides",
    is_flag=True,
    help="Write whole-slide images instead: pyramidal JPEG slides of different sizes (up to "
    "--size per side), tissue on glass, as Aperio .svs and pyramidal .tif at 0.25 µm/px.",
)
@click.option(
    "--volumes",
    is_flag=True,
    help="Write 3-D volumes instead: CT-like int16 NIfTI (.nii.gz, Hounsfield units, 2.5x0.8x0.8 "
    "mm voxels) of --size/4 x --size x --size voxels.",
)
def demo_data(out_dir: Path, n: int, size: int, seed: int, slides: bool, volumes: bool) -> None:
    """Write a synthetic dataset whose labels need full resolution (train.csv, val.csv)."""
    from tileplan.run.demo_data import write_demo_dataset
    from tileplan.run.demo_slides import demo_slide_sizes, write_demo_slides

    with _one_line_errors():
        if slides and volumes:
            raise click.UsageError("give --slides or --volumes, not both")
        if volumes:
            from tileplan.run.demo_volumes import write_demo_volumes

            depth = max(16, size // 4)
            write_demo_volumes(out_dir, n=n, depth=depth, side=size, seed=seed)
            click.echo(f"wrote {n} volumes of {depth}x{size}x{size} voxels with train.csv and "
                       f"val.csv to {out_dir}")  # fmt: skip
            return
        if slides:
            sizes = demo_slide_sizes(n, size)
            path = write_demo_slides(out_dir, n=n, sizes=sizes, seed=seed)
            click.echo(f"wrote {n} slides from {min(min(s) for s in sizes)} to {size} px per "
                       f"side with train.csv and val.csv to {path.parent}")  # fmt: skip
            return
        path = write_demo_dataset(out_dir, n=n, size=size, seed=seed)
    click.echo(f"wrote {n} images of {size}x{size} px with train.csv and val.csv to {path}")


# --------------------------------------------------------------------------------------------
# Looking at it
# --------------------------------------------------------------------------------------------


@cli.command(epilog="Example: tileplan view plan.yaml   or   tileplan view runs/demo")
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=_PATH,
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
    from tileplan.view.page import open_in_browser, write_page

    with _one_line_errors():
        written = write_page(source, out)
    click.echo(f"charts written to {written}")
    if open_browser and not open_in_browser(written):
        click.echo(f"open {written.resolve().as_uri()} in a browser to see them")
