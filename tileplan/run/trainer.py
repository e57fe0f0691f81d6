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
import contextlib
import copy
import dataclasses
import functools
import logging
import math
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

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
    atomic_write_path,
    streaming_step,
)
from tileplan.augment import Augmentation, AugmentError
from tileplan.planning.model_file import set_batch_norm
from tileplan.run.augment_log import AUGMENTATIONS_FILE, draw_counts, save_augmentations
from tileplan.run.checkpoint import (
    Checkpoint,
    CheckpointMeta,
    EpochProgress,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from tileplan.run.data import FIX_ROW, DataError, Dataset, ImageReadError, Task
from tileplan.run.freeze import freeze_prefix, frozen_parameters
from tileplan.run.interrupts import (
    EXIT_INTERRUPTED,
    RunInterruptedError,
    StopRequest,
    stop_on_signals,
)
from tileplan.run.peaks import PeakMeter, over_plan
from tileplan.run.policy import RunPolicy
from tileplan.run.recipe import (
    Monitor,
    balanced_order,
    batch_weights,
    make_scheduler,
    rescale_lr,
    step_scheduler,
)
from tileplan.run.report import EpochMetrics, save_metrics
from tileplan.run.sizes import refusal
from tileplan.run.skips import SKIPPED_FILE, SkippedImage, save_skipped
from tileplan.run.weights import (
    AVERAGED_FILE,
    BEST_FILE,
    EPOCHS_DIR,
    average_weights,
    epoch_file,
    prune_epochs,
    save_weights,
)
from tileplan.settings import RunSpec
from tileplan.streamed import inference_engine
from tileplan.units import format_shape

__all__ = [
    "MAX_SKIPPED_STEPS", "Decision", "DivergedError", "RunInterruptedError", "TrainError",
    "Trainer", "Validation", "decide", "loss_for",
]  # fmt: skip

log = logging.getLogger(__name__)

# Settings a --resume may change: more epochs and other reader processes alter nothing that
# is computed; a run that diverged goes on from its last good checkpoint with a lower --lr.
# (How a run checkpoints and treats unreadable images is a RunPolicy, never compared.)
_RESUMABLE_CHANGES = frozenset({"epochs", "num_workers", "lr"})
# Consecutive optimizer steps a float16 loss scaler may skip (non-finite gradients are normal
# while it finds its scale) before the run counts as diverged: from the initial scale 2**16,
# 24 halvings reach 2**-8, where no healthy gradient overflows.
MAX_SKIPPED_STEPS = 24


Pair: TypeAlias = tuple[torch.Tensor | ImageSource, torch.Tensor]  # an image and its label


class TrainError(StreamingError):
    """Training cannot start or continue; the message says why and what to do."""


# What the image reader hands the loop: an image and its label, or why it could not be read.
Item: TypeAlias = "tuple[torch.Tensor | ImageSource, torch.Tensor] | DataError"


class DivergedError(TrainError):
    """A loss or gradient is not finite: the run stopped before the optimizer step, so the
    weights are the last finite ones and no checkpoint was written with non-finite values."""


@dataclass(frozen=True)
class Validation:
    """Scores of one pass over validation images (None where they do not apply), computed
    with scikit-learn and SciPy."""

    loss: float
    accuracy: float | None = None
    auc: float | None = None  # binary: ROC AUC of the positive class's probability
    balanced_accuracy: float | None = None  # classification: mean recall over classes
    pearson: float | None = None  # regression
    spearman: float | None = None  # regression
    # classification, one value per class 0, 1, ...: recall (sensitivity), precision, F1
    # (0 where a class was never predicted or never present)
    recall: tuple[float, ...] | None = None
    precision: tuple[float, ...] | None = None
    f1: tuple[float, ...] | None = None

    @classmethod
    def of(cls, task: Task, loss: float, predicted: list[float], positive: list[float],
           labels: list[float], classes: int = 0) -> Validation:  # fmt: skip
        """From each image's predicted label (value), positive-class probability and label;
        per-class scores for ``classes`` classes (at least those seen)."""
        if not labels:
            return cls(loss)
        if task == "regression":
            from scipy import stats

            varied = len(set(labels)) > 1 and len(set(predicted)) > 1  # else undefined
            return cls(loss, pearson=float(stats.pearsonr(predicted, labels)[0]) if varied
                       else None, spearman=float(stats.spearmanr(predicted, labels)[0])
                       if varied else None)  # fmt: skip
        from sklearn import metrics

        truth = [int(y) for y in labels]
        guess = [int(v) for v in predicted]
        both = task == "binary" and len(set(truth)) == 2  # AUC needs both classes
        with warnings.catch_warnings():
            # A class predicted but absent from the labels is a warning there; balanced
            # accuracy is then the mean recall over the classes present.
            warnings.simplefilter("ignore", UserWarning)
            balanced = float(metrics.balanced_accuracy_score(truth, guess))
        classes_seen = list(range(max(2, classes, max(truth) + 1, max(guess) + 1)))
        precision, recall, f1, _ = metrics.precision_recall_fscore_support(
            truth, guess, labels=classes_seen, zero_division=0.0
        )
        return cls(
            loss, accuracy=float(metrics.accuracy_score(truth, guess)),
            auc=float(metrics.roc_auc_score(truth, positive)) if both else None,
            balanced_accuracy=balanced, recall=tuple(map(float, recall)),
            precision=tuple(map(float, precision)), f1=tuple(map(float, f1)),
        )  # fmt: skip


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
        policy: checkpoint cadence and what to do with images that fail to read.
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
        policy: RunPolicy | None = None,
    ) -> None:
        self.policy = policy or RunPolicy()
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
        # best.pt follows a monitored value the user asked for, or the validation loss.
        self._keeps_best = spec.recipe.monitor is not None or val_data is not None
        if spec.recipe.monitor is None:  # the default monitored value, made explicit
            recipe = spec.recipe.resolved(has_val=val_data is not None)
            spec = dataclasses.replace(spec, recipe=recipe)
            self.spec = spec
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
        self.augmentation = self._augmentation()
        reshaped = self.augmentation.changes_shape  # crops and turns: sizes never stored
        for data in (train_data, val_data):
            if data is not None and (data.streamed or (reshaped and data is train_data)):
                reading = (spec.data.describe_volumes() if plan.n_axes == 3
                           else spec.data.describe_reading())  # fmt: skip
                check_image_sizes(self.scnn, head, data, channels=self._trunk_channels,
                                  outputs=self._head_outputs, reading=reading,
                                  resampled=spec.data.spacing is not None,
                                  planned_output=plan.output_shape,
                                  sizes=(self.augmentation.shapes
                                         if reshaped and data is train_data
                                         else None))  # fmt: skip
        self.loss = loss_for(self.task)
        self._phase_two = False  # --unfreeze-epoch reached: every parameter trains
        if spec.recipe.freeze is not None:
            self._freeze(spec.recipe.freeze)
        self.optimizer = spec.make_optimizer(p for p in self.model.parameters() if p.requires_grad)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaling)
        classes = 0 if self.task == "regression" else max(2, self._head_outputs)
        spec.recipe.check(optimizer=spec.optimizer, epochs=spec.epochs,
                          has_val=val_data is not None, task=self.task,
                          classes=classes)  # fmt: skip
        self.scheduler = make_scheduler(self.optimizer, spec.recipe, spec.epochs)
        self.monitor = Monitor(spec.recipe)
        self._labels = train_data.labels  # in sample order: the batch shares and balance
        self.epoch = 0  # completed epochs
        self.history: list[EpochMetrics] = []
        self.skipped: list[SkippedImage] = []  # images left out (--on-read-error skip)
        self._progress: EpochProgress | None = None  # where a resumed epoch goes on from
        self._scaler_skips = 0  # optimizer steps the float16 loss scaler skipped in a row
        self._saved: str | None = None  # what last.pt holds ("after epoch 2"), once written
        self._last_save = (time.perf_counter(), 0)  # (clock, optimizer steps) at the last one
        self._pending_keep: tuple[bool, bool] | None = None  # weight files owed (resume)

    # -- setup --------------------------------------------------------------------------------

    def _freeze(self, name: str) -> None:
        """``--freeze``: the trunk's parameters up to module ``name`` take no gradient."""
        if self.spec.batch_norm == "train":
            raise TrainError(f"--freeze {name} keeps the frozen layers' BatchNorm statistics "
                             "fixed, which a --bn train plan does not; make the plan with "
                             "`tileplan profile --bn frozen`")  # fmt: skip
        priced = self.plan.frozen_phase
        if priced is not None and priced.freeze != name and self.rank == 0:
            log.warning("--freeze %s: the plan priced a frozen prefix up to %s (profile "
                        "--freeze %s); its frozen-phase numbers are not this run's", name,
                        priced.freeze, name)  # fmt: skip
        n = freeze_prefix(self.trunk, name)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if self.rank == 0:
            log.info("--freeze %s: %d parameters frozen, %d train", name, n, trainable)

    def _augmentation(self) -> Augmentation:
        """``--augment``: checked against the training images before any is read."""
        spec, data = self.spec, self.train_data
        mean = spec.normalization.mean
        eight_bit = data.dtype == torch.uint8
        volumes = self.plan.n_axes == 3
        augmentation = Augmentation.parse(
            spec.augment, max_shape=tuple(self.plan.image_shape_px),
            # Cutout fills with the normalisation's mean: zero once normalised.
            fill=[round(m * 255) if eight_bit else m for m in mean],
            # Volumes: axes are permuted and rotated into each other where spacing is equal.
            spacing=spec.data.spacing if volumes else None,
        )  # fmt: skip
        if not augmentation:
            return augmentation
        try:
            augmentation.check(channels=data.channels, dtype=data.dtype,
                               where=f"the images of {data.csv_path or 'the data'}")  # fmt: skip
            if "scale" in augmentation.ops and (volumes or not data.streamed):
                raise AugmentError("--augment scale reads slides at another resolution, and "
                                   "these images are read whole or are volumes; leave scale "
                                   "out")  # fmt: skip
            if volumes and "rotate" in augmentation.ops:
                augmentation.rotation_plane(3)  # refuses volumes without two equal spacings
        except AugmentError as err:
            raise TrainError(str(err)) from None
        return augmentation

    def _augmented(self, item: Pair, epoch: int, index: int, repeat: int) -> Pair:
        """A training image augmented as its crops are read: a function of seed, epoch, image
        and how many times the epoch drew it before (``--balance`` repeats images), so the
        same on every rank and after --resume."""
        if not self.augmentation:
            return item
        image, label = item
        source = self.augmentation.apply(image, seed=self.spec.seed, epoch=epoch, index=index,
                                         repeat=repeat)  # fmt: skip
        return source, label

    def _in_phase_two(self, epoch: int) -> bool:
        """Whether 0-based ``epoch`` trains every parameter (``--unfreeze-epoch``)."""
        unfreeze = self.spec.recipe.unfreeze_epoch
        return unfreeze is not None and epoch + 1 >= unfreeze

    def _start_phase_two(self) -> None:
        """``--unfreeze-epoch``: the frozen prefix trains from now on, as a second run started
        from these weights would: a new optimizer over every parameter at ``--lr-after`` and
        the schedule again over the remaining epochs (no warm-up)."""
        recipe = self.spec.recipe
        assert recipe.freeze is not None  # --unfreeze-epoch is refused without --freeze
        for p in frozen_parameters(self.trunk, recipe.freeze):  # what the model file froze
            p.requires_grad_(True)  # itself stays frozen
        lr = recipe.lr_after or self.spec.lr
        spec = dataclasses.replace(self.spec, lr=lr)
        self.optimizer = spec.make_optimizer(p for p in self.model.parameters() if p.requires_grad)
        remaining = self.spec.epochs - (recipe.unfreeze_epoch or 1) + 1
        self.scheduler = make_scheduler(self.optimizer, dataclasses.replace(recipe, warmup=0),
                                        remaining)  # fmt: skip
        self._phase_two = True
        if self.rank == 0:
            log.info("epoch %d on: every parameter trains (--unfreeze-epoch), lr %g",
                     recipe.unfreeze_epoch, lr)  # fmt: skip

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

    def _last_good(self) -> str:
        """What the run folder holds to continue from, for messages."""
        if self._saved is None:
            return "no checkpoint was written yet"
        return f"'{self.checkpoint_path()}' ({self._saved}) is the last good checkpoint"

    def save_checkpoint(
        self, progress: Sequence[EpochProgress] = (), rng: dict[str, Any] | None = None
    ) -> None:
        """Write ``last.pt`` (rank 0), never with non-finite weights: the last good one stays.
        Every rank calls it at the same point (each hands over its RNG states; a failure on
        rank 0 stops every rank).

        Args:
            progress: each rank's progress in the epoch under way (empty at an epoch's end).
            rng: this rank's RNG states to resume with (default: now's); a checkpoint between
                the images of a step takes the states of the step's start.

        Raises:
            DivergedError: a parameter or buffer is not finite.
            TrainError: the file system refused the write (naming the path and the checkpoint
                that remains), or rank 0 could not write.
        """
        self._last_save = (time.perf_counter(), 0)
        states = self._gathered(rng or rng_state())  # each rank resumes with its own
        failure: StreamingError | None = None
        if self.rank == 0:
            try:
                self._write_checkpoint(progress, states)
            except StreamingError as err:
                failure = err
        self._fail_together(failure, "rank 0 could not write the checkpoint; see its message")

    def _fail_together(self, failure: Exception | None, elsewhere: str) -> None:
        """Raise ``failure`` where it happened and a TrainError saying ``elsewhere`` on every
        other rank, when any rank has one (no rank is left waiting in a collective)."""
        if self._agree(failure is not None)[0]:
            raise failure or TrainError(elsewhere)

    def _gathered(self, value: Any) -> list[Any]:
        """``value`` of every rank (rank order)."""
        if self.world == 1:
            return [value]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def _meta(self, progress: Sequence[EpochProgress] = ()) -> CheckpointMeta:
        return CheckpointMeta(epoch=self.epoch, task=self.task, spec=self.spec, plan=self.plan,
                              history=tuple(self.history), progress=tuple(progress),
                              skipped=tuple(self.skipped),
                              scaler_skips=self._scaler_skips)  # fmt: skip

    def _write_checkpoint(self, progress: Sequence[EpochProgress],
                          states: list[dict[str, Any]]) -> None:  # fmt: skip
        broken = [n for n, t in self.model.state_dict().items()
                  if t.is_floating_point() and not bool(torch.isfinite(t).all())]  # fmt: skip
        if broken:
            raise DivergedError(
                f"{broken[0]} is not finite (epoch {self.epoch + 1}), so "
                f"'{self.checkpoint_path()}' was not overwritten ({self._last_good()}); "
                "continue from it with --resume and a lower --lr"
            )
        meta = self._meta(progress)
        rng = {**states[0], "ranks": states} if len(states) > 1 else states[0]
        scheduler = self.scheduler.state_dict() if self.scheduler is not None else {}
        checkpoint = Checkpoint(self.model.state_dict(), self.optimizer.state_dict(),
                                self.scaler.state_dict(), rng, meta, scheduler)  # fmt: skip
        target = self.checkpoint_path()
        try:
            save_checkpoint(target, checkpoint)
            self._saved = meta.describe()
            target = self.out_dir / "metrics.jsonl"
            save_metrics(tuple(self.history), self.out_dir)
            if self.augmentation and not progress:
                target = self.out_dir / AUGMENTATIONS_FILE
                save_augmentations(target, self.augmentation, self.train_data,
                                   seed=self.spec.seed, epoch=self.epoch - 1,
                                   order=self.order(self.epoch - 1))  # fmt: skip
            if self.skipped:
                target = self.out_dir / SKIPPED_FILE
                save_skipped(target, self.skipped)
        except OSError as err:
            raise TrainError(f"cannot write '{target}' ({err.strerror or err}): "
                             f"{self._last_good()}; free space or fix the folder, then "
                             "continue with --resume") from err  # fmt: skip
        log.info("checkpoint %s: %s", self.checkpoint_path(), self._saved)

    def resume(self) -> None:
        """Continue from ``last.pt``: weights, optimizer, epoch (and step within it), RNG
        states, history, skipped images.

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
        self._check_resumable(meta, path)
        # The optimizer the checkpoint holds is that of the epoch under way, or of the last done.
        if self._in_phase_two(meta.epoch if meta.progress else meta.epoch - 1):
            self._start_phase_two()
        try:
            self.model.load_state_dict(ckpt.model)
            self.optimizer.load_state_dict(ckpt.optimizer)
            self.scaler.load_state_dict(ckpt.scaler)
            if self.scheduler is not None:
                self.scheduler.load_state_dict(ckpt.scheduler)
        except (RuntimeError, ValueError, KeyError) as err:
            raise TrainError(f"--resume: '{path}' does not fit this model ({err})") from err
        second = self._phase_two and self.spec.recipe.lr_after is not None
        if self.spec.lr != meta.spec.lr and not second:  # --lr on resume: scale the restored
            # rates with it (unless the second phase runs at its own --lr-after)
            rescale_lr(self.optimizer, self.scheduler, self.spec.lr / meta.spec.lr)
        self.epoch = meta.epoch
        self.history = list(meta.history)
        values = [getattr(row, self.monitor.monitor) for row in self.history]
        for i, row in enumerate(self.history):  # the monitor is a function of the history
            self.monitor.update(row.epoch, values[: i + 1])
        self.skipped = list(meta.skipped)
        self._progress = meta.progress[self.rank] if meta.progress else None
        self._scaler_skips = meta.scaler_skips
        ranks = ckpt.rng.get("ranks")
        restore_rng_state(ranks[self.rank] if ranks and len(ranks) == self.world else ckpt.rng)
        self._saved = meta.describe()
        if not meta.progress and self.history:
            # The weight files of the checkpoint's epoch are written after it; a run that
            # ended between the two writes them again (each write is whole or absent).
            state = self.monitor.state
            self._pending_keep = (state.best_epoch == meta.epoch, state.window_end == meta.epoch)
        log.info("resumed from %s %s", path, self._saved)

    def _check_resumable(self, meta: CheckpointMeta, path: Path) -> None:
        """Refuse a checkpoint whose settings this run may not continue with."""
        # A checkpoint from before the recipe's monitor was made explicit: the same default.
        started = dataclasses.replace(
            meta.spec, recipe=meta.spec.recipe.resolved(has_val=self.val_data is not None)
        )
        for name, was, now in _settings_changed(started, self.spec):
            hint = " (its default follows --val)" if name == "--monitor" else ""
            raise TrainError(
                f"--resume: the run was started with {name} {was}, not {now}{hint}; pass the "
                "same options to continue it exactly"
            )
        if self.spec.recipe.schedule.name == "cosine" and started.epochs != self.spec.epochs:
            raise TrainError(
                f"--resume: the cosine schedule anneals over the run's --epochs "
                f"{started.epochs}; continue it with --epochs {started.epochs}, not "
                f"{self.spec.epochs}"
            )
        if meta.progress and len(meta.progress) != self.world:
            raise TrainError(
                f"--resume: '{path}' was written {meta.describe()} by {len(meta.progress)} "
                f"processes; continue it with {len(meta.progress)} (an epoch's images are "
                f"shared among them), not {self.world}"
            )

    # -- agreement between processes ----------------------------------------------------------

    def _agree(self, *flags: bool) -> list[bool]:
        """``flags`` set on any rank (the same decision on every rank)."""
        if self.world == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t]

    def _barrier(self) -> None:
        """Every rank waits for rank 0's checkpoint before any tears its connections down."""
        if self.world > 1:
            dist.barrier()

    def _total(self, value: int) -> int:
        """``value`` summed over ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return int(t[0])

    def _checkpoint_due(self) -> bool:
        """Rank 0's clock and step count against ``--checkpoint-every``."""
        since, steps = self._last_save
        return self.rank == 0 and self.policy.checkpoint_every.due(
            steps, time.perf_counter() - since
        )

    def _stopped(self, stop: StopRequest, where: str) -> RunInterruptedError:
        """The checkpoint was written (or is being kept): the exception that ends the run."""
        signal_name = stop.signal or "a signal on another process"
        return RunInterruptedError(f"stopped by {signal_name} {where}: '{self.checkpoint_path()}' "
                           "holds the run; continue it with the same command and --resume "
                           f"(exit status {EXIT_INTERRUPTED})")  # fmt: skip

    def _stop_inside_epoch(self, stop: StopRequest, where: str, progress: EpochProgress,
                           rng: dict[str, Any] | None = None) -> RunInterruptedError:  # fmt: skip
        """Checkpoint every rank's ``progress`` (resuming with ``rng``, default now's), wait
        for rank 0's write, and return the exception that ends the run."""
        self.save_checkpoint(self._gathered(progress), rng)
        self._barrier()
        return self._stopped(stop, where)

    # -- loop ---------------------------------------------------------------------------------

    def order(self, epoch: int) -> list[int]:
        """Image order of an epoch: a function of (seed, epoch) only, the same on every rank."""
        gen = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + epoch)
        if self.spec.recipe.balance:  # drawn with replacement, by inverse class frequency
            return balanced_order(self._labels, gen)
        return torch.randperm(len(self.train_data), generator=gen).tolist()

    def _my_batches(self, epoch: int) -> Iterator[tuple[list[int], list[float], list[int]]]:
        """Global batches of the epoch as (this rank's share, each image's share of the
        batch's loss: 1/B, or by class weight, and how many times the epoch drew each image
        before: its augmentation's ``repeat``)."""
        order = self.order(epoch)
        repeats = draw_counts(order)
        b = self.spec.batch
        mine = slice(self.rank, None, self.world)
        for start in range(0, len(order), b):
            batch = order[start : start + b]
            shares = batch_weights([self._labels[i] for i in batch],
                                   self.spec.recipe.class_weights)  # fmt: skip
            yield batch[mine], shares[mine], repeats[start : start + b][mine]

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

    def _images(self, draws: list[tuple[int, int]], epoch: int) -> Iterator[Item]:
        """(1, C, *spatial) training images (augmented as ``--augment`` says) and labels in
        the order of ``draws`` ((image, repeat) pairs), or the error reading one raised, read
        ahead by ``num_workers`` processes (slides: opened ahead by as many threads; their
        tiles are read during the passes)."""
        indices = [i for i, _ in draws]
        if self.train_data.streamed:
            yield from _opened_ahead(
                (self._augmented(self._image(self.train_data, i), epoch, i, r)
                 for i, r in draws), self.spec.num_workers,
            )  # fmt: skip
            return
        if self.spec.num_workers == 0:
            for i, r in draws:
                try:
                    yield self._augmented(self._image(self.train_data, i), epoch, i, r)
                except DataError as err:
                    yield err
            return
        loader = torch.utils.data.DataLoader(
            _ReadOrError(self.train_data), batch_size=None, sampler=indices,
            num_workers=self.spec.num_workers, worker_init_fn=_ignore_stop_signals,
            # The workers' seeds come from this generator, not the global RNG, so that a run
            # resumed mid-epoch draws the same random numbers as one that never stopped.
            generator=torch.Generator().manual_seed(self.spec.seed),
        )  # fmt: skip
        for (i, r), (image, label, error) in zip(draws, loader, strict=True):
            if error is not None:
                yield DataError(error)
            else:
                yield self._augmented((image.unsqueeze(0), label.reshape(1)), epoch, i, r)

    def _snapshot(
        self, *, grads: bool = True
    ) -> tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]:
        """Gradients (or None: the step's start, where there are none) and buffers (BatchNorm
        statistics in train mode), to undo one image or a partial step."""
        saved = [None if p.grad is None or not grads else p.grad.clone()
                 for p in self.model.parameters()]  # fmt: skip
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        return saved, buffers

    def _restore(self, snapshot: tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]
                 ) -> None:  # fmt: skip
        grads, buffers = snapshot
        with torch.no_grad():
            for p, g in zip(self.model.parameters(), grads, strict=True):
                p.grad = g
            for n, b in self.model.named_buffers():
                b.copy_(buffers[n])

    def _unreadable(self, err: DataError, *, epoch: int, step: int, phase: str,
                    index: int, data: Dataset) -> SkippedImage | ImageReadError:  # fmt: skip
        """The error that stops the run at an image that failed to read (``fail``), or its
        record (``skip``)."""
        sample = data.samples[index]
        where = data.csv_path or "dataset"
        reason = " ".join(str(err).split())
        if isinstance(err, ImageReadError):  # the reader names the file, not the row
            reason = f"{where} row {sample.row}: {reason}"
        if self.policy.on_read_error == "fail":
            failure = ImageReadError(
                f"epoch {epoch + 1}: {reason}; {self._last_good()}; "
                "leave such images out with --on-read-error skip, and list them all first with "
                "`tileplan check-data`"
            )
            failure.__cause__ = err
            return failure
        log.warning("epoch %d: skipped %s", epoch + 1, reason)
        return SkippedImage(epoch + 1, step + 1 if phase == "train" else 0, phase, str(where),
                            sample.row, str(sample.path), reason)  # fmt: skip

    def _share_skips(self, mine: list[SkippedImage]) -> list[SkippedImage]:
        """Every rank's skipped images of a step (rank order)."""
        if self.world == 1 or not self._total(len(mine)):
            return mine
        return [r for part in self._gathered(mine) for r in part]

    def train_epoch(
        self,
        epoch: int,
        bar: Callable[[int], None],
        progress: EpochProgress | None = None,
        stop: StopRequest | None = None,
    ) -> EpochProgress:
        """One epoch, from ``progress`` (a resumed epoch) on; returns this rank's progress at
        its end.

        Checkpoints at step boundaries as ``--checkpoint-every`` says. Between two images, a
        stop request (SIGTERM/SIGINT on any rank) drops the step's partial accumulation,
        writes a checkpoint of the step's start and raises ``RunInterruptedError``.
        """
        progress = progress or EpochProgress()
        stop = stop or StopRequest()
        set_batch_norm(self.model, self.spec.batch_norm)
        batches = list(self._my_batches(epoch))
        slots = -(-self.spec.batch // self.world)  # images per rank per step, at most
        images = self._images([(i, r) for batch, _, repeats in batches[progress.step :]
                               for i, r in zip(batch, repeats, strict=True)], epoch)  # fmt: skip
        for step in range(progress.step, len(batches)):
            batch, shares, _ = batches[step]
            started = time.perf_counter()
            boundary = rng_state()  # a checkpoint of this step's start resumes with these
            # Train-mode BatchNorm moves its running statistics with every image: a dropped
            # partial step puts them back.
            undo_step = self._snapshot(grads=False) if self.spec.batch_norm == "train" else None
            stopping, due = self._agree(stop.requested, self._checkpoint_due())
            if stopping:
                raise self._stop_inside_epoch(stop, f"in epoch {epoch + 1} before step "
                                              f"{step + 1}", progress, boundary)  # fmt: skip
            if due:
                self.save_checkpoint(self._gathered(progress), boundary)
            self.optimizer.zero_grad(set_to_none=True)
            tally = _StepTally()
            for slot in range(slots):
                if slot and self._agree(stop.requested)[0]:  # drop the partial accumulation
                    self.optimizer.zero_grad(set_to_none=True)
                    if undo_step is not None:
                        self._restore(undo_step)
                    raise self._stop_inside_epoch(stop, f"in epoch {epoch + 1} during step "
                                                  f"{step + 1} (its images so far were "
                                                  "dropped)", progress, boundary)  # fmt: skip
                if slot < len(batch):
                    self._train_image(batch[slot], next(images), shares[slot], epoch, step, tally)
                    bar(1)
            self._fail_together(tally.failed, f"epoch {epoch + 1}, step {step + 1}: another "
                                "process stopped the run: an image failed to read (see its "
                                "message)")  # fmt: skip
            self._sync_gradients()
            self._step(epoch, step, tally.bad)
            skipped = self._share_skips(tally.skipped)
            self.skipped.extend(skipped)
            progress = EpochProgress(
                step=step + 1, loss_sum=progress.loss_sum + tally.loss_sum,
                counted=progress.counted + tally.counted, correct=progress.correct + tally.correct,
                seen=progress.seen + tally.seen,
                seconds=progress.seconds + time.perf_counter() - started,
                skipped=progress.skipped + len(skipped),
            )  # fmt: skip
            since, steps = self._last_save
            self._last_save = (since, steps + 1)
            self._check_skipped(epoch, progress.skipped)
        return progress

    def _train_image(self, index: int, item: Item, share: float, epoch: int, step: int,
                     tally: _StepTally) -> None:  # fmt: skip
        """Accumulate one image's gradient, its loss scaled by ``share`` (of the global
        batch's), into the step, or handle its read error."""
        undo = self._snapshot() if self.policy.on_read_error == "skip" else None
        try:
            if isinstance(item, Exception):
                raise item
            image, target = item
            loss, logits = streaming_step(
                self.scnn, self.head, image, target, self.loss, loss_scale=share,
                grad_scaler=self.scaler if self.scaler.is_enabled() else None,
            )  # fmt: skip
        except DataError as err:  # ImageReadError: a tile failed to decode
            record = self._unreadable(err, epoch=epoch, step=step, phase="train", index=index,
                                      data=self.train_data)  # fmt: skip
            if undo is not None:
                self._restore(undo)
            if isinstance(record, SkippedImage):
                tally.skipped.append(record)
            elif self.world == 1:
                raise record from err
            else:
                tally.failed = tally.failed or record  # every rank stops at the step's end
            return
        if not math.isfinite(float(loss)):
            tally.bad = tally.bad or (index, float(loss))
        else:
            tally.loss_sum += float(loss)
            tally.counted += 1
        tally.correct += int(decide(logits, self.task).label == float(target[0]))
        tally.seen += 1

    def _check_skipped(self, epoch: int, skipped: int) -> None:
        """Stop a run whose images fail to read past ``--max-skipped``."""
        limit = self.policy.max_skipped * len(self.train_data)
        if skipped > limit:
            if self.rank == 0:
                save_skipped(self.out_dir / SKIPPED_FILE, self.skipped)
            raise TrainError(
                f"epoch {epoch + 1}: {skipped} of {len(self.train_data)} training images failed "
                f"to read, more than --max-skipped {self.policy.max_skipped:g} allows (see "
                f"'{self.out_dir / SKIPPED_FILE}'); check the data with `tileplan check-data`"
            )

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
            self._scaler_skips = self._scaler_skips + 1 if self.scaler.get_scale() < scale else 0
            if self._scaler_skips >= MAX_SKIPPED_STEPS:
                why = (f"the float16 loss scaler skipped {self._scaler_skips} steps in a row "
                       "(non-finite gradients)")  # fmt: skip
                raise self._diverged(epoch, step, why)
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        any_bad, any_infinite = self._agree(bad is not None, not finite)
        if any_bad or any_infinite:
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
        return DivergedError(f"epoch {epoch + 1}, step {step + 1}: {what}; stopped before the "
                             f"optimizer step, so the weights stay finite: {self._last_good()}; "
                             "continue from it with --resume and a lower --lr, or start again "
                             "with a lower --lr")  # fmt: skip

    @torch.no_grad()
    def evaluate(self, data: Dataset, epoch: int = 0) -> Validation:
        """Scores over ``data`` with streamed forward passes only; an image that fails to read
        stops the run or is left out (``--on-read-error``)."""
        losses, predicted, positive, labels = 0.0, [], [], []
        set_batch_norm(self.model, "frozen")  # the running statistics, as inference uses
        for index in range(len(data)):
            try:
                image, target = self._image(data, index)
                features = self.eval_scnn.forward(image)
            except DataError as err:
                record = self._unreadable(err, epoch=epoch, step=0, phase="val", index=index,
                                          data=data)  # fmt: skip
                if isinstance(record, ImageReadError):
                    raise record from err
                self.skipped.append(record)
                continue
            with self.eval_scnn.autocast():
                logits = self.eval_head(features)
            losses += float(self.loss(logits, target.to(logits.device)))
            decision = decide(logits, self.task)
            predicted.append(decision.label)
            positive.append(decision.positive or 0.0)
            labels.append(float(target[0]))
        classes = 0 if self.task == "regression" else max(2, self._head_outputs)
        return Validation.of(self.task, losses / max(len(labels), 1), predicted, positive, labels,
                             classes=classes)  # fmt: skip

    def fit(
        self, *, progress: bool = True, stop: StopRequest | None = None
    ) -> tuple[EpochMetrics, ...]:
        """Train the remaining epochs (from inside one, after a mid-epoch checkpoint); returns
        the metrics history.

        Args:
            progress: a bar per epoch (rank 0, on a terminal).
            stop: when to stop (default: on SIGTERM/SIGINT, caught while training).

        Raises:
            RunInterruptedError: a stop was requested; the checkpoint to resume from was
                written.
        """
        show = progress and self.rank == 0 and sys.stderr.isatty()
        self._last_save = (time.perf_counter(), 0)
        catching = contextlib.nullcontext(stop) if stop is not None else stop_on_signals()
        with catching as stop:
            log.info("training from epoch %d%s; SIGTERM/SIGINT stop it at a step boundary",
                     self.epoch + 1, f" step {self._progress.step + 1}" if self._progress
                     else "")  # fmt: skip
            meter = PeakMeter(self.model, self.device)
            warned = False
            if self._pending_keep is not None:
                self._keep_together(*self._pending_keep)
                self._pending_keep = None
            if self.monitor.exhausted:  # a resumed run that had already stopped early
                return tuple(self.history)
            for epoch in range(self.epoch, self.spec.epochs):
                if self._in_phase_two(epoch) and not self._phase_two:
                    self._start_phase_two()
                meter.reset()
                resumed, self._progress = self._progress, None
                total = math.ceil(len(self.train_data) / self.world)
                with tqdm(total=total, desc=f"epoch {epoch + 1}/{self.spec.epochs}",
                          disable=not show, unit="img",
                          initial=resumed.seen if resumed else 0) as bar:  # fmt: skip
                    done = self.train_epoch(epoch, bar.update, resumed, stop)
                peak = meter.peak()  # of the training steps: validation streams forward only
                if self._agree(stop.requested)[0]:  # before validation, which may be long
                    raise self._stop_inside_epoch(stop, f"in epoch {epoch + 1} after its last "
                                                  "step", done)  # fmt: skip
                loss, accuracy = self._average(done)
                val = self._validate(epoch)
                row = EpochMetrics(
                    epoch=epoch + 1, train_loss=loss, train_accuracy=accuracy,
                    val_loss=val.loss if val else None,
                    val_accuracy=val.accuracy if val else None,
                    val_auc=val.auc if val else None, seconds=round(done.seconds, 3),
                    seconds_per_image=round(done.seconds / max(done.seen, 1), 4),
                    skipped=done.skipped, peak_bytes=peak,
                    lr=float(self.optimizer.param_groups[0]["lr"]),
                    val_balanced_accuracy=val.balanced_accuracy if val else None,
                    val_pearson=val.pearson if val else None,
                    val_spearman=val.spearman if val else None,
                    val_recall=val.recall if val else None,
                    val_precision=val.precision if val else None,
                    val_f1=val.f1 if val else None,
                )  # fmt: skip
                breach = over_plan(peak, self.plan)
                if breach and not warned and self.rank == 0:
                    log.warning("epoch %d: %s", epoch + 1, breach)
                    warned = True
                self.history.append(row)
                self.epoch = epoch + 1
                best, window = self._follow(row)
                self.save_checkpoint()
                if self.rank == 0:
                    log.info("epoch %d: %s", epoch + 1, row)
                self._keep_together(best, window)
                if self.monitor.exhausted and self.epoch < self.spec.epochs:
                    log.info("no better %s for %d epochs: stopping after epoch %d (best: "
                             "epoch %d)", self.monitor.monitor, self.monitor.state.bad_epochs,
                             self.epoch, self.monitor.state.best_epoch)  # fmt: skip
                    break
                if self._agree(stop.requested)[0] and self.epoch < self.spec.epochs:
                    raise self._stopped(stop, f"after epoch {self.epoch}")
        return tuple(self.history)

    def _follow(self, row: EpochMetrics) -> tuple[bool, bool]:
        """The monitor and the schedule after an epoch: (a new best epoch, a new best window
        of ``--average`` epochs)."""
        values = [getattr(r, self.monitor.monitor) for r in self.history]
        best, window = self.monitor.update(row.epoch, values)
        if self.scheduler is not None:
            step_scheduler(self.scheduler, values[-1])
        return best, window

    def _keep_together(self, best: bool, window: bool) -> None:
        """``_keep`` on rank 0; its failure stops every rank."""
        failure = None
        if self.rank == 0:
            try:
                self._keep(best, window)
            except TrainError as err:
                failure = err
        self._fail_together(failure, "rank 0 could not write the run's weight files; see its "
                            "message")  # fmt: skip

    def _keep(self, best: bool, window: bool) -> None:
        """Rank 0 after an epoch's checkpoint: ``best.pt`` at a new best, each epoch's weights
        while ``--average`` needs them, ``averaged.pt`` at a new best window."""
        k = self.spec.recipe.average
        try:
            if best and self._keeps_best:  # last.pt holds this epoch's end
                target = self.out_dir / BEST_FILE
                atomic_write_path(target, lambda tmp: shutil.copyfile(self.checkpoint_path(), tmp))
            if k:
                target = self.out_dir / EPOCHS_DIR / epoch_file(self.epoch)
                save_weights(target, self.model.state_dict())
                prune_epochs(self.out_dir / EPOCHS_DIR, keep_after=self.epoch - k)
            if window:
                target = self.out_dir / AVERAGED_FILE
                epochs = range(self.epoch - k + 1, self.epoch + 1)
                weights = average_weights(
                    [self.out_dir / EPOCHS_DIR / epoch_file(e) for e in epochs]
                )
                meta = self._meta()
                save_checkpoint(target, Checkpoint(weights, {}, {}, {}, meta))
        except OSError as err:
            raise TrainError(f"cannot write '{target}' ({err.strerror or err}): "
                             f"{self._last_good()}; free space or fix the folder, then "
                             "continue with --resume") from err  # fmt: skip

    def _validate(self, epoch: int) -> Validation | None:
        """Rank 0 validates and every rank gets its scores (the schedule and the monitor
        follow them everywhere); its failure stops every rank (the others wait for it)."""
        val, failure = None, None
        if self.val_data is not None and self.rank == 0:
            try:
                val = self.evaluate(self.val_data, epoch)
            except StreamingError as err:
                failure = err
        self._fail_together(failure, "rank 0 stopped during validation; see its message")
        return self._gathered(val)[0]

    def _average(self, done: EpochProgress) -> tuple[float, float | None]:
        """The epoch's mean loss and accuracy over every rank's images."""
        t = torch.tensor([done.loss_sum, done.counted, done.correct, done.seen],
                         dtype=torch.float64)  # fmt: skip
        if self.world > 1:
            dist.all_reduce(t)
        loss = float(t[0]) / max(float(t[1]), 1.0)
        accuracy = float(t[2]) / float(t[3]) if t[3] and self.task != "regression" else None
        return loss, accuracy


def _settings_changed(was: RunSpec, now: RunSpec) -> Iterator[tuple[str, Any, Any]]:
    """``(option, was, now)`` for each setting a resumed run may not change (the recipe's
    named as its options: ``--schedule``, ``--weight-decay``, ...)."""
    for f in dataclasses.fields(RunSpec):
        old, new = getattr(was, f.name), getattr(now, f.name)
        if f.name == "recipe":
            for r in dataclasses.fields(old):
                a, b = getattr(old, r.name), getattr(new, r.name)
                if a != b:
                    yield f"--{r.name.replace('_', '-')}", _shown(a), _shown(b)
        elif f.name == "augment" and old != new:
            yield "--augment", old or "none", new or "none"
        elif f.name not in _RESUMABLE_CHANGES and old != new:
            yield f.name, old, new


def _shown(value: Any) -> str:
    return value.describe() if hasattr(value, "describe") else str(value)


@dataclasses.dataclass
class _StepTally:
    """What one optimizer step's images gave on this rank."""

    loss_sum: float = 0.0  # finite losses
    counted: int = 0
    correct: int = 0
    seen: int = 0
    bad: tuple[int, float] | None = None  # (image index, its non-finite loss)
    skipped: list[SkippedImage] = dataclasses.field(default_factory=list)
    failed: ImageReadError | None = None  # fail mode, several processes: stop at the step end


class _ReadOrError(torch.utils.data.Dataset):
    """A dataset whose items are ``(image, label, None)``, or ``(None, None, message)`` when the
    image fails to read: a worker process hands the error over as a value, one line."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, Any, str | None]:
        try:
            image, label = self.data[index]
        except DataError as err:
            return None, None, str(err)
        return image, label, None


def _ignore_stop_signals(worker: int) -> None:
    """Reader processes leave SIGTERM/SIGINT to the training process, which stops at a step
    boundary and then ends them (a job scheduler signals every process of the job)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _opened_ahead(
    items: Iterator[tuple[ImageSource | torch.Tensor, torch.Tensor]], ahead: int
) -> Iterator[Item]:
    """Yield ``items``, opening the next ``ahead`` sources on threads meanwhile (a whole-image
    format is decoded when opened), or the error opening one raised. A source closes its
    file when the step drops it."""

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


def _finish(future: concurrent.futures.Future, label: torch.Tensor) -> Item:
    try:
        return future.result(), label
    except DataError as err:
        return err


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
    sizes: Callable[[tuple[int, ...]], set[tuple[int, int]]] | None = None,
) -> None:
    """Every image of ``data`` streams at its own size: check, before training, that the trunk
    tiles each size and that the head takes each output map of ``channels`` channels (on the
    meta device: shapes only) and gives ``outputs`` values, as it does for the plan's output
    map ``planned_output``.

    ``sizes`` gives the sizes an image stored at a size streams at (augmentation's crops and
    transpositions; default: its own size).

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
    streamed_at = sizes or (lambda size: {size})
    streamed = [(sample, size) for index, sample in enumerate(data.samples)
                for size in streamed_at(tuple(data.image_shape(index)[1:]))]  # fmt: skip
    for sample, size in streamed:
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
