"""The training loop of a streamed trunk: epochs, accumulation, validation, checkpoints, resume,
data parallel.

The order of images is a pure function of ``(seed, epoch)``, checkpoints hold every RNG state,
and the metrics history lives in the checkpoint, so ``resume`` continues exactly as if the run
had not stopped. Checkpoints and metrics are written atomically at the end of each epoch: killing
the process loses at most the current epoch and never corrupts a file.

Data parallel (``torchrun --nproc-per-node N -m tileplan train ...``): every process streams its
share of each global batch; gradients are summed across processes once per optimizer step, so
the weights equal a single process with the same global batch (up to float reassociation). Only
rank 0 writes files and shows progress.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from executor import (
    GeometryError,
    ImageSource,
    Plan,
    StreamingCNN,
    StreamingError,
    streaming_step,
)
from tileplan.planning.model_file import set_batch_norm
from tileplan.run.checkpoint import (
    Checkpoint,
    CheckpointMeta,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from tileplan.run.data import FIX_ROW, Dataset, Task
from tileplan.run.report import EpochMetrics, save_metrics
from tileplan.run.sizes import refusal
from tileplan.settings import RunSpec
from tileplan.streamed import inference_engine
from tileplan.units import format_shape

__all__ = [
    "MAX_SKIPPED_STEPS", "Decision", "DivergedError", "TrainError", "Trainer", "binary_auc",
    "decide", "loss_for",
]  # fmt: skip

log = logging.getLogger(__name__)

# Settings a --resume may change: more epochs and other reader processes alter nothing that
# is computed; a run that diverged goes on from its last good checkpoint with a lower --lr.
_RESUMABLE_CHANGES = frozenset({"epochs", "num_workers", "lr"})
# Consecutive optimizer steps a float16 loss scaler may skip (non-finite gradients are normal
# while it finds its scale) before the run counts as diverged: from the initial scale 2**16,
# 24 halvings reach 2**-8, where no healthy gradient overflows.
MAX_SKIPPED_STEPS = 24


class TrainError(StreamingError):
    """Training cannot start or continue; the message says why and what to do."""


class DivergedError(TrainError):
    """A loss or gradient is not finite: the run stopped before the optimizer step, so the
    weights are the last finite ones and no checkpoint was written with non-finite values."""


def binary_auc(scores: list[float], labels: list[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); None if one class only."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y >= 0.5]
    neg = [s for s, y in zip(scores, labels, strict=True) if y < 0.5]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@dataclass(frozen=True)
class Decision:
    """What one image's head outputs say.

    Attributes:
        label: the argmax class, 1/0 for one binary logit, or the regressed value.
        probability: of the predicted label (the value itself for regression).
        positive: probability of class 1 for binary tasks (what AUC ranks), else None.
        index: the output whose gradient is the saliency map.
    """

    label: float
    probability: float
    positive: float | None
    index: int


def decide(outputs: torch.Tensor, task: Task) -> Decision:
    """Read one image's head outputs (any shape with one value per output)."""
    outputs = outputs.reshape(-1).float()
    if task == "regression":
        return Decision(float(outputs[0]), float(outputs[0]), None, 0)
    if outputs.numel() == 1:
        p = float(torch.sigmoid(outputs[0]))
        return Decision(float(p >= 0.5), max(p, 1.0 - p), p, 0)
    probs = torch.softmax(outputs, 0)
    k = int(torch.argmax(probs))
    positive = float(probs[1]) if task == "binary" else None
    return Decision(float(k), float(probs[k]), positive, k)


def loss_for(task: Task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy for class logits, BCE for one binary logit, MSE for regression; always
    computed in at least float32."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.reshape(logits.shape[0], -1)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if task == "regression":
            return nn.functional.mse_loss(logits[:, 0], target.to(logits.dtype))
        if logits.shape[1] == 1:
            return nn.functional.binary_cross_entropy_with_logits(
                logits[:, 0], target.to(logits.dtype)
            )
        return nn.functional.cross_entropy(logits, target.long())

    return loss


class Trainer:
    """Trains ``model`` (= ``head(trunk(x))``) with the trunk streamed by a plan.

    Args:
        model: the whole model; its state is what checkpoints hold. It is moved to ``device``
            and the plan's parameter dtype, and put in eval mode (frozen BatchNorm), except its
            BatchNorm layers in training steps with ``spec.batch_norm == "train"``.
        trunk, head: the split of ``model`` (sharing its parameters), traced with BatchNorm in
            the run's mode.
        frozen_trunk, frozen_head: the split traced with frozen BatchNorm, for validation
            when BatchNorm trains (default: ``trunk``, ``head``). It streams forward only,
            with the plan's first forward tile (at least its smallest tile).
        plan: the streaming plan (tiles, dtype).
        spec: the run's settings (optimizer, batch, normalisation, ...).
        train_data, val_data: datasets of images (see ``tileplan.run.data``).
        out_dir: the run folder (checkpoints, metrics, report).
        device: where the model runs; images stay on the host and tiles move.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        trunk: nn.Module,
        head: nn.Module,
        plan: Plan,
        spec: RunSpec,
        train_data: Dataset,
        val_data: Dataset | None,
        out_dir: Path,
        device: torch.device,
        frozen_trunk: nn.Module | None = None,
        frozen_head: nn.Module | None = None,
    ) -> None:
        self.model, self.trunk, self.head = model, trunk, head
        self.plan, self.spec, self.out_dir, self.device = plan, spec, Path(out_dir), device
        self.train_data, self.val_data = train_data, val_data
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if spec.batch % self.world:
            raise TrainError(
                f"--batch {spec.batch} is not divisible by the {self.world} processes; "
                "use a multiple of the process count"
            )
        if spec.dtype != plan.dtype:
            raise TrainError(f"the run's dtype {spec.dtype} is not the plan's {plan.dtype}")
        precision = spec.precision
        self.model.to(device=device, dtype=precision.param_dtype)
        self.model.eval()  # BatchNorm statistics stay frozen; the head could train() itself
        set_batch_norm(self.model, spec.batch_norm)
        self.scnn = StreamingCNN.from_plan(
            trunk, plan, preprocess=spec.preprocess(),
            progress=self.rank == 0,  # a bar over tiles, on a terminal only
        )  # fmt: skip
        self.eval_head = frozen_head or head
        self.eval_scnn = self.scnn
        if spec.batch_norm == "train":
            set_batch_norm(self.model, "frozen")
            self.eval_scnn = inference_engine(frozen_trunk or trunk, plan,
                                              preprocess=spec.preprocess())  # fmt: skip
        self.task: Task = self._task()
        for data in (train_data, val_data):
            if data is not None and data.streamed:
                reading = (spec.data.describe_volumes() if plan.n_axes == 3
                           else spec.data.describe_reading())  # fmt: skip
                check_image_sizes(self.scnn, head, data, channels=self._trunk_channels,
                                  outputs=self._head_outputs, reading=reading,
                                  resampled=spec.data.spacing is not None,
                                  planned_output=plan.output_shape)  # fmt: skip
        self.loss = loss_for(self.task)
        self.optimizer = spec.make_optimizer(p for p in self.model.parameters() if p.requires_grad)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaling)
        self.epoch = 0
        self.history: list[EpochMetrics] = []
        self._skipped = 0  # optimizer steps the float16 loss scaler skipped in a row

    # -- setup --------------------------------------------------------------------------------

    def _task(self) -> Task:
        task = self.train_data.task
        outputs = self._head_outputs
        if task == "regression" and outputs != 1:
            raise TrainError(f"regression labels need a head with 1 output, this one has {outputs}")
        if task == "multiclass" and outputs < max(self.train_data.labels) + 1:
            raise TrainError(
                f"labels go up to {max(self.train_data.labels):.0f} but the head "
                f"has only {outputs} outputs; build the model with more classes"
            )
        return task

    @functools.cached_property
    def _trunk_channels(self) -> int:
        """Output channels of the trunk, from a probe at its receptive field size."""
        dtype = self.spec.precision.param_dtype
        small = tuple(rf + 1 for rf in self.scnn.geometry.receptive_field)
        x = torch.zeros(1, self.train_data.channels, *small, device=self.device, dtype=dtype)
        with torch.no_grad():
            return int(self.trunk(x).shape[1])

    @functools.cached_property
    def _head_outputs(self) -> int:
        """Outputs of the head for the plan's output map."""
        dtype = self.spec.precision.param_dtype
        probe = torch.zeros(1, self._trunk_channels, *self.plan.output_shape, device=self.device,
                            dtype=dtype)  # fmt: skip
        with torch.no_grad():
            return int(self.head(probe).reshape(1, -1).shape[1])

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint_path(self) -> Path:
        return self.out_dir / "last.pt"

    def save_checkpoint(self) -> None:
        """Write ``last.pt`` (rank 0), never with non-finite weights: the last good one stays.

        Raises:
            DivergedError: a parameter or buffer is not finite.
        """
        if self.rank != 0:
            return
        broken = [n for n, t in self.model.state_dict().items()
                  if t.is_floating_point() and not bool(torch.isfinite(t).all())]  # fmt: skip
        if broken:
            raise DivergedError(
                f"epoch {self.epoch}: {broken[0]} is not finite, so '{self.checkpoint_path()}' "
                "was not overwritten (it holds the last good weights); continue from it with "
                "--resume and a lower --lr"
            )
        meta = CheckpointMeta(epoch=self.epoch, task=self.task, spec=self.spec, plan=self.plan,
                              history=tuple(self.history))  # fmt: skip
        checkpoint = Checkpoint(self.model.state_dict(), self.optimizer.state_dict(),
                                self.scaler.state_dict(), rng_state(), meta)  # fmt: skip
        save_checkpoint(self.checkpoint_path(), checkpoint)
        save_metrics(tuple(self.history), self.out_dir)

    def resume(self) -> None:
        """Continue from ``last.pt``: weights, optimizer, epoch, RNG states, history.

        Raises:
            TrainError: no checkpoint, or one from another model, plan or settings.
        """
        path = self.checkpoint_path()
        if not path.is_file():
            raise TrainError(f"--resume: no checkpoint at '{path}'; start without --resume")
        ckpt = load_checkpoint(path)
        meta = ckpt.meta
        if meta.plan.model.trunk_fingerprint != self.plan.model.trunk_fingerprint:
            raise TrainError(f"--resume: '{path}' was trained with another model")
        if meta.plan.to_dict() != self.plan.to_dict():
            raise TrainError(f"--resume: '{path}' was trained with another plan; pass its "
                             f"plan ({self.out_dir / 'plan.yaml'})")  # fmt: skip
        for f in dataclasses.fields(RunSpec):
            was, now = getattr(meta.spec, f.name), getattr(self.spec, f.name)
            if f.name not in _RESUMABLE_CHANGES and was != now:
                raise TrainError(
                    f"--resume: the run was started with {f.name} {was}, not {now}; pass the "
                    "same options to continue it exactly"
                )
        try:
            self.model.load_state_dict(ckpt.model)
            self.optimizer.load_state_dict(ckpt.optimizer)
            self.scaler.load_state_dict(ckpt.scaler)
        except (RuntimeError, ValueError, KeyError) as err:
            raise TrainError(f"--resume: '{path}' does not fit this model ({err})") from err
        self.epoch = meta.epoch
        self.history = list(meta.history)
        restore_rng_state(ckpt.rng)
        log.info("resumed from %s after epoch %d", path, self.epoch)

    # -- loop ---------------------------------------------------------------------------------

    def order(self, epoch: int) -> list[int]:
        """Image order of an epoch: a function of (seed, epoch) only, the same on every rank."""
        gen = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_data), generator=gen).tolist()

    def _my_batches(self, epoch: int) -> Iterator[tuple[list[int], int]]:
        """Global batches of the epoch as (this rank's share, global batch size)."""
        order = self.order(epoch)
        b = self.spec.batch
        for start in range(0, len(order), b):
            batch = order[start : start + b]
            yield batch[self.rank :: self.world], len(batch)

    def _image(self, data: Dataset, index: int) -> tuple[torch.Tensor | ImageSource, torch.Tensor]:
        if data.streamed:  # streamed from its file, region by region
            label = torch.tensor([data.samples[index].label], dtype=torch.float32)
            return data.source(index), label
        image, label = data[index]
        return image.unsqueeze(0), label.reshape(1)  # (1, C, H, W) on the host

    def _sync_gradients(self) -> None:
        """Sum gradients over ranks (each image's loss was scaled by 1/global batch size)."""
        if self.world == 1:
            return
        for p in self.model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def _images(
        self, indices: list[int]
    ) -> Iterator[tuple[torch.Tensor | ImageSource, torch.Tensor]]:
        """(1, C, *spatial) images and labels in ``indices`` order, read ahead by
        ``num_workers`` processes (slides: opened ahead by as many threads; their tiles are
        read during the passes)."""
        if self.train_data.streamed:
            yield from _opened_ahead(
                (self._image(self.train_data, i) for i in indices), self.spec.num_workers
            )
            return
        if self.spec.num_workers == 0:
            yield from (self._image(self.train_data, i) for i in indices)
            return
        loader = torch.utils.data.DataLoader(
            self.train_data, batch_size=None, sampler=indices, num_workers=self.spec.num_workers,
        )  # fmt: skip
        for image, label in loader:
            yield image.unsqueeze(0), label.reshape(1)

    def train_epoch(
        self, epoch: int, bar: Callable[[int], None]
    ) -> tuple[float, float | None, int]:
        """One epoch; returns (mean loss, accuracy or None, images seen by this rank)."""
        losses, counted, correct, seen = 0.0, 0, 0, 0  # counted: finite losses
        set_batch_norm(self.model, self.spec.batch_norm)
        batches = list(self._my_batches(epoch))
        images = self._images([i for batch, _ in batches for i in batch])
        for step, (batch, global_size) in enumerate(batches):
            self.optimizer.zero_grad(set_to_none=True)
            bad: tuple[int, float] | None = None  # (image index, its non-finite loss)
            for index in batch:
                image, target = next(images)
                loss, logits = streaming_step(
                    self.scnn, self.head, image, target, self.loss,
                    loss_scale=1.0 / global_size,
                    grad_scaler=self.scaler if self.scaler.is_enabled() else None,
                )  # fmt: skip
                if not math.isfinite(float(loss)):
                    bad = bad or (index, float(loss))
                else:
                    losses += float(loss)
                    counted += 1
                correct += int(decide(logits, self.task).label == float(target[0]))
                seen += 1
                bar(1)
            self._sync_gradients()
            self._step(epoch, step, bad)
        accuracy = correct / seen if seen and self.task != "regression" else None
        return losses / max(counted, 1), accuracy, seen

    def _step(self, epoch: int, step: int, bad: tuple[int, float] | None) -> None:
        """The optimizer step, unless a loss or gradient is not finite: then the run stops
        before it (every rank, at the same step). A float16 loss scaler skips such steps
        itself; a run of ``MAX_SKIPPED_STEPS`` skips stops the run the same way.

        Raises:
            DivergedError: naming the epoch, the step, the image and the last good checkpoint.
        """
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._skipped = self._skipped + 1 if self.scaler.get_scale() < scale else 0
            if self._skipped >= MAX_SKIPPED_STEPS:
                why = (f"the float16 loss scaler skipped {self._skipped} steps in a row "
                       "(non-finite gradients)")  # fmt: skip
                raise self._diverged(epoch, step, why)
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        flags = torch.tensor([float(bad is not None), float(not finite)], dtype=torch.float64)
        if self.world > 1:  # every rank stops at the same step
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags.any():
            if bad is not None:
                sample = self.train_data.samples[bad[0]]
                what = f"the loss of '{sample.path.name}' (row {sample.row}) is {bad[1]}"
            elif not finite:
                what = "a gradient is not finite"
            else:
                what = "another rank's loss or gradient is not finite"
            raise self._diverged(epoch, step, what)
        self.optimizer.step()

    def _diverged(self, epoch: int, step: int, what: str) -> DivergedError:
        last = (f"'{self.checkpoint_path()}' (after epoch {self.epoch}) is the last good "
                "checkpoint; continue from it with --resume and a lower --lr"
                if self.epoch else "no checkpoint was written yet; start again with a lower "
                "--lr")  # fmt: skip
        return DivergedError(f"epoch {epoch + 1}, step {step + 1}: {what}; stopped before the "
                             f"optimizer step, so the weights stay finite: {last}")  # fmt: skip

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> tuple[float, float | None, float | None]:
        """(mean loss, accuracy, AUC) over ``data`` with streamed forward passes only."""
        losses, correct, scores, labels = 0.0, 0, [], []
        set_batch_norm(self.model, "frozen")  # the running statistics, as inference uses
        for index in range(len(data)):
            image, target = self._image(data, index)
            features = self.eval_scnn.forward(image)
            with self.eval_scnn.autocast():
                logits = self.eval_head(features)
            losses += float(self.loss(logits, target.to(logits.device)))
            decision = decide(logits, self.task)
            correct += int(decision.label == float(target[0]))
            scores.append(decision.positive or 0.0)
            labels.append(float(target[0]))
        n = max(len(data), 1)
        accuracy = correct / n if self.task != "regression" else None
        auc = binary_auc(scores, labels) if self.task == "binary" else None
        return losses / n, accuracy, auc

    def fit(self, *, progress: bool = True) -> tuple[EpochMetrics, ...]:
        """Train the remaining epochs; returns the metrics history."""
        show = progress and self.rank == 0 and sys.stderr.isatty()
        for epoch in range(self.epoch, self.spec.epochs):
            start = time.perf_counter()
            total = math.ceil(len(self.train_data) / self.world)
            with tqdm(total=total, desc=f"epoch {epoch + 1}/{self.spec.epochs}",
                      disable=not show, unit="img") as bar:  # fmt: skip
                loss, accuracy, seen = self.train_epoch(epoch, bar.update)
            seconds = time.perf_counter() - start
            loss, accuracy = self._average(loss, accuracy, seen)
            val = (
                self.evaluate(self.val_data)
                if self.val_data is not None and self.rank == 0
                else None
            )
            row = EpochMetrics(
                epoch=epoch + 1, train_loss=loss, train_accuracy=accuracy,
                val_loss=val[0] if val else None, val_accuracy=val[1] if val else None,
                val_auc=val[2] if val else None, seconds=round(seconds, 3),
                seconds_per_image=round(seconds / max(seen, 1), 4),
            )  # fmt: skip
            self.history.append(row)
            self.epoch = epoch + 1
            self.save_checkpoint()
            if self.rank == 0:
                log.info("epoch %d: %s", epoch + 1, row)
        return tuple(self.history)

    def _average(
        self, loss: float, accuracy: float | None, seen: int
    ) -> tuple[float, float | None]:
        if self.world == 1:
            return loss, accuracy
        t = torch.tensor([loss * seen, (accuracy or 0.0) * seen, seen], dtype=torch.float64)
        dist.all_reduce(t)
        n = max(float(t[2]), 1.0)
        return float(t[0]) / n, (float(t[1]) / n if accuracy is not None else None)


def _opened_ahead(
    items: Iterator[tuple[ImageSource | torch.Tensor, torch.Tensor]], ahead: int
) -> Iterator[tuple[ImageSource | torch.Tensor, torch.Tensor]]:
    """Yield ``items``, opening the next ``ahead`` sources on threads meanwhile (a whole-image
    format is decoded when opened). A source closes its file when the step drops it."""

    def opened(source: ImageSource | torch.Tensor) -> ImageSource | torch.Tensor:
        return source.open() if hasattr(source, "open") else source

    pool = concurrent.futures.ThreadPoolExecutor(max(ahead, 1), "tileplan-open")
    pending: collections.deque = collections.deque()
    try:
        for source, label in items:
            pending.append((pool.submit(opened, source), label))
            while len(pending) > ahead:
                yield _finish(*pending.popleft())
        while pending:
            yield _finish(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _finish(future: concurrent.futures.Future, label: torch.Tensor
            ) -> tuple[ImageSource | torch.Tensor, torch.Tensor]:  # fmt: skip
    return future.result(), label


def check_image_sizes(
    scnn: StreamingCNN,
    head: nn.Module,
    data: Dataset,
    *,
    channels: int,
    outputs: int,
    planned_output: Sequence[int],
    reading: str = "as stored",
    resampled: bool = True,
) -> None:
    """Every image of ``data`` streams at its own size: check, before training, that the trunk
    tiles each size and that the head takes each output map of ``channels`` channels (on the
    meta device: shapes only) and gives ``outputs`` values, as it does for the plan's output
    map ``planned_output``.

    Raises:
        TrainError: naming the CSV row, the size and the fix.
    """
    where = data.csv_path or "dataset"
    meta_head = copy.deepcopy(head).to("meta")

    def head_outputs(out_shape: Sequence[int]) -> int:
        with torch.no_grad():
            probe = torch.zeros(1, channels, *out_shape, device="meta")
            return int(meta_head(probe).reshape(1, -1).shape[1])

    try:
        head_outputs(planned_output)
    except Exception as err:  # a head that cannot run on meta tensors: check in training
        log.warning(
            "cannot check the head on every image size without running it (%s: %s); "
            "a size it cannot take fails when its image comes",
            type(err).__name__,
            err,
        )
        head_outputs = None  # type: ignore[assignment]
    seen: set[tuple[int, ...]] = set()
    for index, sample in enumerate(data.samples):
        size = tuple(data.image_shape(index)[1:])
        if size in seen:
            continue
        seen.add(size)
        px = "voxels" if len(size) == 3 else "px"
        try:
            out_shape = scnn.tile_grids(size)[-1].output_shape
        except GeometryError:  # too small for the trunk: say what it needs
            problem = refusal(scnn, size, volumes=len(size) == 3, reading=reading,
                              resampled=resampled)  # fmt: skip
            raise TrainError(f"{where} row {sample.row}: '{sample.path.name}' "
                             f"{problem.render('train')}; {FIX_ROW}") from None  # fmt: skip
        if head_outputs is None:
            continue
        try:
            got = head_outputs(out_shape)
        except Exception as err:  # the head's own error, whatever it is
            raise TrainError(
                f"{where} row {sample.row}: the head cannot take the trunk's "
                f"{format_shape(out_shape)} output of this {format_shape(size)} {px} image "
                f"({type(err).__name__}); images of different sizes need a head that pools "
                "globally (e.g. AdaptiveAvgPool2d(1))"
            ) from None
        if got != outputs:
            raise TrainError(
                f"{where} row {sample.row}: the head gives {got} values for a "
                f"{format_shape(size)} {px} image but {outputs} for the plan's; pool globally "
                "before the classifier"
            )
