"""The planning API: what ``tileplan profile`` does and prints, as typed values.

``profile(model, image=8192, budget="24GiB")`` plans for an ``nn.Module`` (or a model file)
and returns the ``Plan`` that the command saves; every option of ``tileplan profile`` is a
keyword of the same name (``--max-tile`` is ``max_tile``, ``--bn`` is ``bn``, ``--cut`` is
``cut``). ``memory_report(plan)`` is what the command prints after planning: the chosen tiles,
the peak against the budget and conventional backprop, the candidates' table.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from executor import Plan, StreamingError, spatial_axes
from tileplan.units import format_bytes, parse_bytes, parse_shape

__all__ = [
    "MemoryReport", "largest_image", "memory_report", "model_axes", "profile", "profile_as_command",
]  # fmt: skip

log = logging.getLogger(__name__)

SplitFn = Callable[[nn.Module], tuple[nn.Module, nn.Module]]


def profile(
    model: nn.Module | str | os.PathLike[str],
    *,
    image: int | Sequence[int] | str | None = None,
    data: str | os.PathLike[str] | None = None,
    channels: int = 3,
    device: str = "auto",
    budget: int | str | None = None,
    margin: float = 0.1,
    dtype: str = "float32",
    tile: int | Sequence[int] | str | None = None,
    split: str | SplitFn = "auto",
    optimizer: str = "adam",
    measure: bool = True,
    verify: bool | None = None,
    verify_limit: float = 60.0,
    segments: int | str = "auto",
    cut: str | Sequence[str] | None = None,
    freeze: str | None = None,
    max_tile: int | None = None,
    bn: str = "frozen",
    mpp: float | None = None,
    level: int | None = None,
    tissue: bool = False,
    spacing: Sequence[float] | None = None,
    intensity: str = "raw",
    assume_mpp: float | None = None,
    assume_spacing: Sequence[float] | None = None,
    progress: bool = False,
) -> Plan:
    """Choose the tiles (and segments) to stream ``model`` at an image size; return the plan.

    Args:
        model: the whole network (its classifier head included), or the path of a model file
            (``build_model()``, optional ``split(model)``). A module is planned on a copy; it
            is left as it was (device, dtype, train/eval).
        image: the largest image in px: ``8192``, ``(6000, 9000)`` or ``"6000x9000"``.
        data: instead of ``image``: plan for the largest image of this CSV, read at
            ``mpp``/``level`` (and cropped to its tissue with ``tissue``); for a model of 3-D
            layers, its largest volume resampled to ``spacing`` (mm). ``assume_mpp`` and
            ``assume_spacing`` state the resolution of files that record none.
        budget: device memory to plan for, bytes or text (``"24GiB"``); default: the GPU's
            memory, or the host's available RAM.
        split: ``"auto"``, the name of the module after which the trunk ends, or (for a module)
            a function ``split(model) -> (trunk, head)``.
        segments: ``"auto"``, or how many segments to stream the trunk in.
        cut: cut the trunk after these modules or graph nodes (a list, or comma-separated).
        freeze: staged fine-tuning (``tileplan train --freeze``): cut the trunk after this
            module too, and price the phase where everything up to it is frozen (its segments
            forward only) besides the phase where everything trains (``plan.frozen_phase``).
        bn: ``"frozen"`` (BatchNorm with running statistics) or ``"train"`` (batch statistics).
        measure: time tiles and calibrate memory on the device. With a module on the CPU it is
            re-created in a child process, so its classes must be importable (not defined in
            ``__main__``); ``measure=False`` plans from estimates alone.
        progress: a progress bar on stderr.

        The others are ``tileplan profile``'s options: see ``tileplan profile --help``.

    Raises:
        ValueError: a bad option value (the message names the keyword).
        executor.StreamingError: the model cannot be split or streamed, or nothing fits
            (``NoFeasiblePlanError``, with every candidate attached).

    Example:
        >>> plan = tileplan.profile(torchvision.models.resnet34(), image=8192, budget="24GiB")
        >>> plan.save("plan.yaml")
        >>> print(tileplan.memory_report(plan))
    """
    try:
        return profile_as_command(
            model, image=image, data=data, channels=channels, device=device, budget=budget,
            margin=margin, dtype=dtype, tile=tile, split=split, optimizer=optimizer,
            measure=measure, verify=verify, verify_limit=verify_limit, segments=segments, cut=cut,
            freeze=freeze, max_tile=max_tile, bn=bn, mpp=mpp, level=level, tissue=tissue,
            spacing=spacing,
            intensity=intensity, assume_mpp=assume_mpp, assume_spacing=assume_spacing,
            progress=progress,
        )  # fmt: skip
    except (ValueError, StreamingError) as err:
        # The planner's messages name the command's options: name this function's keywords.
        if err.args and isinstance(err.args[0], str):
            err.args = (_as_keywords(err.args[0]), *err.args[1:])
        raise


# An option and, when one follows, its value: a token ending an error's subject (``--bn x:``),
# a number or size (``--max-tile 48``, ``--dtype bfloat16``), or a mode word.
_OPTION = re.compile(
    r"--([a-z][a-z-]*)(?:[ =]([^\s:;,)`']+(?=:)|[\w.]*\d[\w.]*|frozen|train|auto|cpu|cuda))?"
)


def _as_keywords(text: str) -> str:
    """``--max-tile 48`` -> ``max_tile=48``, ``--bn`` -> ``bn=``: a command-line option in a
    message, as this function's keyword."""

    def keyword(match: re.Match[str]) -> str:
        name, value = match.group(1).replace("-", "_"), match.group(2)
        if value is None:
            return f"{name}="
        return f"{name}={value}" if value.isdigit() else f"{name}={value!r}"

    return _OPTION.sub(keyword, text.replace("tileplan profile", "tileplan.profile"))


def profile_as_command(
    model: nn.Module | str | os.PathLike[str], *, image: int | Sequence[int] | str | None,
    data: str | os.PathLike[str] | None, channels: int, device: str, budget: int | str | None,
    margin: float, dtype: str, tile: int | Sequence[int] | str | None, split: str | SplitFn,
    optimizer: str, measure: bool, verify: bool | None, verify_limit: float,
    segments: int | str, cut: str | Sequence[str] | None, max_tile: int | None, bn: str,
    freeze: str | None,
    mpp: float | None, level: int | None, tissue: bool, spacing: Sequence[float] | None,
    intensity: str, assume_mpp: float | None, assume_spacing: Sequence[float] | None,
    progress: bool,
) -> Plan:  # fmt: skip
    """``profile`` with every keyword given and the planner's messages as they are, naming
    ``tileplan profile``'s options (the command's own call)."""
    from tileplan.planning.profile import ProfileRequest
    from tileplan.planning.profile import profile as run_profile

    if (image is None) == (data is None):
        raise ValueError("give image= (the largest image size), or data= (a CSV) to plan for")
    reading = {"spacing": spacing, "assume_mpp": assume_mpp, "assume_spacing": assume_spacing}
    if data is None and (mpp is not None or level is not None or tissue or intensity != "raw"
                         or any(v is not None for v in reading.values())):  # fmt: skip
        raise ValueError("mpp=, level=, tissue=, spacing=, intensity= and assume_*= choose how "
                         "data= is read; give data=")  # fmt: skip
    if data is not None:
        shape, channels = largest_image(data, mpp=mpp, level=level, tissue=tissue,
                                        intensity=intensity, n_axes=model_axes(model, split),
                                        command="profile", **reading)  # type: ignore[arg-type]  # fmt: skip
    else:
        shape = _shape(image, "image")
    n_segments = _segments(segments)
    cuts = tuple(c.strip() for c in cut.split(",") if c.strip()) if isinstance(cut, str) else (
        tuple(cut or ())
    )  # fmt: skip
    with _model_file(model, split, measure or bool(verify)) as fields:
        request = ProfileRequest(
            image_shape=shape, channels=channels, device=device, budget_bytes=_bytes(budget),
            margin=margin, dtype=dtype, tile=None if tile is None else _shape(tile, "tile"),
            optimizer=optimizer, measure=measure, verify=verify, verify_limit_s=verify_limit,
            segments=n_segments, cuts=cuts, freeze=freeze, max_tile=max_tile, batch_norm=bn,
            **fields,  # type: ignore[arg-type]
        )  # fmt: skip
        return run_profile(request, progress=progress)


def model_axes(model: nn.Module | str | os.PathLike[str], split: str | SplitFn = "auto") -> int:
    """Spatial axes the model takes (``executor.spatial_axes``: 3 for ``Conv3d`` layers), from
    a module or a model file (imported and split to read them)."""
    if isinstance(model, nn.Module):
        return spatial_axes(model)
    from tileplan.planning.model_file import load_model_file

    return load_model_file(Path(model), split if isinstance(split, str) else "auto").n_axes


def largest_image(
    data: str | os.PathLike[str], *, mpp: float | None = None, level: int | None = None,
    tissue: bool = False, spacing: Sequence[float] | None = None, intensity: str = "raw",
    n_axes: int = 2, assume_mpp: float | None = None,
    assume_spacing: Sequence[float] | None = None, command: str | None = None,
) -> tuple[tuple[int, ...], int]:  # fmt: skip
    """``((H, W), channels)``: what a plan for every image of the CSV ``data`` needs, read at
    ``mpp``/``level`` (and cropped to tissue); with ``n_axes=3``, ``((D, H, W), channels)`` of
    its volumes resampled to ``spacing`` (mm)."""
    from tileplan.run.data import load_csv
    from tileplan.settings import DataSettings

    settings = DataSettings(
        mpp=mpp, level=level, tissue=tissue, intensity=intensity, assume_mpp=assume_mpp,
        spacing=None if spacing is None else tuple(spacing),
        assume_spacing=None if assume_spacing is None else tuple(assume_spacing),
    )  # fmt: skip
    dataset = load_csv(Path(data), settings=settings, n_axes=n_axes, command=command)
    largest = dataset.largest_shape
    log.info("%s: %d images at %s; planning for the largest, %s", data, len(dataset),
             settings.describe_volumes() if n_axes == 3 else settings.describe_reading(),
             "x".join(map(str, largest)))  # fmt: skip
    return largest, dataset.channels


def _shape(value: int | Sequence[int] | str, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, int)):
        try:
            return parse_shape(str(value))
        except ValueError as err:
            raise ValueError(f"{name}={value!r}: {err}") from None
    shape = tuple(value)
    if not shape or not all(isinstance(v, int) and v > 0 for v in shape):
        raise ValueError(f"{name}={value!r}: give positive sizes in px, e.g. 8192 or (6000, 9000)")
    return shape


def _bytes(value: int | str | None) -> int | None:
    if value is None or isinstance(value, int):
        if isinstance(value, int) and value <= 0:
            raise ValueError(f"budget={value}: give a positive number of bytes or e.g. '24GiB'")
        return value
    return parse_bytes(value)


def _segments(value: int | str) -> int | None:
    if value == "auto":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"segments={value!r}: give 'auto' or a count of at least 1")
    return value


@contextlib.contextmanager
def _model_file(
    model: nn.Module | str | os.PathLike[str], split: str | SplitFn, measure: bool
) -> Iterator[dict[str, object]]:
    """The request's model fields: a model file as given; or a module, planned in this
    process, and saved (with a split function) into a temporary model file only when children
    will re-create it to measure."""
    if not isinstance(model, nn.Module):
        if callable(split):
            raise ValueError("split= as a function goes with a module; a model file defines "
                             "split(model) itself")  # fmt: skip
        yield {"model_file": Path(model), "split": split}
        return
    label = f"<{type(model).__name__} module>"
    fields: dict[str, object] = {
        "module": model, "model_label": label,
        "split": "auto" if callable(split) else split,
        "split_fn": split if callable(split) else None, "model_file": None,
    }  # fmt: skip
    if not measure:
        yield fields
        return
    local = sorted({type(m).__qualname__ for m in model.modules()
                    if type(m).__module__ in ("__main__", "builtins")})  # fmt: skip
    if callable(split) and getattr(split, "__module__", None) in ("__main__", None):
        local.append(getattr(split, "__qualname__", "split"))
    if local:
        raise ValueError(
            f"measure=True re-creates the model in a child process, which cannot import "
            f"{', '.join(local)} (defined in __main__); define them in a module, or pass "
            "measure=False to plan from estimates"
        )
    with tempfile.TemporaryDirectory(prefix="tileplan-model-") as folder:
        saved = Path(folder) / "model.pt"
        try:
            torch.save({"model": model, "split": fields["split_fn"]}, saved)
        except Exception as err:  # pickling: an unpicklable attribute, a lambda, a closure
            raise ValueError(
                f"cannot save {type(model).__name__} for measuring in a child process ({err}); "
                "pass measure=False, or the path of a model file"
            ) from err
        path = Path(folder) / "model.py"
        path.write_text(
            "import torch\n"
            f"_saved = torch.load({str(saved)!r}, weights_only=False)\n"
            "model = _saved['model']\n"
            "if _saved['split'] is not None:\n"
            "    split = _saved['split']\n"
        )
        yield {**fields, "model_file": path}


@dataclass(frozen=True)
class MemoryReport:
    """What ``tileplan profile`` prints after planning, as values and lines.

    Attributes:
        plan: the plan it describes.
        peak_bytes: the plan's peak (measured when verified, else predicted).
        conventional_bytes: what conventional backprop would need (estimated or measured).
        budget_bytes: the memory planned for.
        lines: the text the command prints, line by line.
    """

    plan: Plan
    peak_bytes: int
    conventional_bytes: int
    budget_bytes: int
    lines: tuple[str, ...]

    @property
    def saving(self) -> float:
        """Conventional peak over the streamed peak (3.0: a third of the memory)."""
        return self.conventional_bytes / self.peak_bytes

    def __str__(self) -> str:
        return "\n".join(self.lines)

    def figure(self):  # noqa: ANN201 (plotly is imported lazily)
        """The interactive memory/time chart of ``tileplan view`` (a plotly Figure)."""
        from tileplan.view.charts import memory_time_figure

        return memory_time_figure(self.plan)


def memory_report(plan: Plan | str | os.PathLike[str]) -> MemoryReport:
    """The report ``tileplan profile`` prints for ``plan`` (a ``Plan`` or a plan file).

    Example:
        >>> report = tileplan.memory_report("plan.yaml")
        >>> report.peak_bytes, report.saving
    """
    from executor import load_plan
    from tileplan.text import (
        describe_frozen_phase,
        describe_segmentations,
        describe_segments,
        describe_trunk,
        describe_verification,
        render_table,
        summary,
    )

    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    lines = list(describe_trunk(plan))
    if plan.candidates:
        lines += render_table(plan.candidates, plan.tile_px).splitlines()
    elif not plan.segments:
        lines.append("no single-segment candidates were priced")
    lines += [*describe_segmentations(plan), *describe_segments(plan), summary(plan),
              *describe_frozen_phase(plan), describe_verification(plan)]  # fmt: skip
    log.debug("memory report: peak %s", format_bytes(plan.peak_bytes))
    return MemoryReport(plan, plan.peak_bytes, plan.conventional_peak_bytes, plan.budget_bytes,
                        tuple(lines))  # fmt: skip
