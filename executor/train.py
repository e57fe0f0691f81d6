"""Training with a streamed trunk: epochs, accumulation, validation, checkpoints, resume, DDP.

The order of images is a pure function of ``(seed, epoch)``, checkpoints hold every RNG state,
and the metrics history lives in the checkpoint, so ``resume`` continues exactly as if the run
had not stopped. Checkpoints and logs are written atomically at the end of each epoch: killing
the process loses at most the current epoch and never corrupts a file.

Data parallel (``torchrun --nproc-per-node N -m tileplan train ...``): every process streams its
share of each global batch; gradients are summed across processes once per optimizer step, so
the weights equal a single process with the same global batch (up to float reassociation). Only
rank 0 writes files and shows progress.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from executor.data import Dataset, normalize_tile
from executor.errors import StreamingError
from executor.fileio import atomic_write
from executor.plan import Plan, dtype_of
from executor.steps import streaming_step
from executor.streaming import StreamingCNN

__all__ = ["Checkpoint", "EpochMetrics", "TrainConfig", "TrainError", "Trainer", "binary_auc"]

log = logging.getLogger(__name__)

Task = Literal["binary", "multiclass", "regression"]


class TrainError(StreamingError):
    """Training cannot start or continue; the message says why and what to do."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train. Sizes in images, learning rate per optimizer step."""

    epochs: int = 10
    lr: float = 1e-4
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    batch: int = 16  # effective batch: gradients accumulated over this many images
    amp: bool = False  # autocast with the plan's dtype (the plan must be bfloat16/float16)
    seed: int = 0
    num_workers: int = 2
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # per channel, on the [0, 1] scale
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch < 1 or self.lr <= 0 or self.num_workers < 0:
            raise TrainError("epochs, batch and lr must be positive and num-workers >= 0")


@dataclass(frozen=True)
class EpochMetrics:
    """One line of ``metrics.jsonl``."""

    epoch: int
    train_loss: float
    train_accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    val_auc: float | None
    seconds: float
    seconds_per_image: float


@dataclass
class Checkpoint:
    """What ``last.pt`` holds."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    epoch: int  # completed epochs
    rng: dict[str, Any]
    plan: dict[str, Any]
    config: dict[str, Any]
    task: str
    history: list[dict[str, Any]] = field(default_factory=list)


def binary_auc(scores: list[float], labels: list[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); None if one class only."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y >= 0.5]
    neg = [s for s, y in zip(scores, labels, strict=True) if y < 0.5]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _rng_state() -> dict[str, Any]:
    """Every RNG's state, in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Trains ``model`` (= ``head(trunk(x))``) with the trunk streamed by a plan.

    Args:
        model: the whole model; its state is what checkpoints hold.
        trunk, head: the split of ``model`` (sharing its parameters).
        plan: the streaming plan (tiles, dtype).
        train_data, val_data: datasets of uint8 images (see ``executor.data``).
        config: hyper-parameters.
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
        train_data: Dataset,
        val_data: Dataset | None,
        config: TrainConfig,
        out_dir: Path,
        device: torch.device,
    ) -> None:
        self.model, self.trunk, self.head = model, trunk, head
        self.plan, self.config, self.out_dir, self.device = plan, config, Path(out_dir), device
        self.train_data, self.val_data = train_data, val_data
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if config.batch % self.world:
            raise TrainError(
                f"--batch {config.batch} is not divisible by the {self.world} processes; "
                "use a multiple of the process count"
            )
        plan_dtype = dtype_of(plan.dtype)
        if config.amp and plan_dtype not in (torch.bfloat16, torch.float16):
            raise TrainError(
                f"--amp needs a plan made for bfloat16 or float16, this one is {plan.dtype}; "
                "run `tileplan profile ... --dtype bfloat16`"
            )
        channels = train_data.channels
        mean = torch.tensor(config.mean[:channels], device=device)
        std = torch.tensor(config.std[:channels], device=device)
        compute = torch.float64 if plan_dtype == torch.float64 else torch.float32

        def preprocess(crop: torch.Tensor) -> torch.Tensor:
            return normalize_tile(crop, mean, std, compute)

        self.scnn = StreamingCNN.from_plan(
            trunk, plan, dtype=plan.dtype, preprocess=preprocess,
            amp_dtype=plan_dtype if config.amp else None,
            progress=self.rank == 0,  # a bar over tiles, on a terminal only
        )  # fmt: skip
        self.model.to(device=device, dtype=compute)
        self.model.eval()  # BatchNorm statistics stay frozen; the head could train() itself
        self.task: Task = self._task()
        self.optimizer = self._optimizer()
        self.epoch = 0
        self.history: list[dict[str, Any]] = []

    # -- setup --------------------------------------------------------------------------------

    def _task(self) -> Task:
        task = self.train_data.task
        outputs = self._head_outputs()
        if task == "regression" and outputs != 1:
            raise TrainError(f"regression labels need a head with 1 output, this one has {outputs}")
        if task == "multiclass" and outputs < max(self.train_data.labels) + 1:
            raise TrainError(
                f"labels go up to {max(self.train_data.labels):.0f} but the head "
                f"has only {outputs} outputs; build the model with more classes"
            )
        return task

    @torch.no_grad()
    def _head_outputs(self) -> int:
        """Outputs of the head, from a probe through the trunk at its receptive field size."""
        dtype = next(self.model.parameters()).dtype
        small = tuple(rf + 1 for rf in self.scnn.geometry.receptive_field)
        x = torch.zeros(1, self.train_data.channels, *small, device=self.device, dtype=dtype)
        channels = self.trunk(x).shape[1]
        features = self.scnn.geometry.output_shape(self.plan.image_shape_px)
        probe = torch.zeros(1, channels, *features, device=self.device, dtype=dtype)
        return int(self.head(probe).reshape(1, -1).shape[1])

    def _optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.config.lr, momentum=0.9)
        if self.config.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.config.lr)
        return torch.optim.Adam(params, lr=self.config.lr)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy for class logits, BCE for one binary logit, MSE for regression."""
        logits = logits.reshape(logits.shape[0], -1)
        if logits.dtype in (torch.float16, torch.bfloat16):  # losses in at least float32
            logits = logits.float()
        if self.task == "regression":
            return nn.functional.mse_loss(logits[:, 0], target.to(logits.dtype))
        if logits.shape[1] == 1:
            return nn.functional.binary_cross_entropy_with_logits(
                logits[:, 0], target.to(logits.dtype)
            )
        return nn.functional.cross_entropy(logits, target.long())

    def _score(self, logits: torch.Tensor) -> tuple[float, float]:
        """(predicted class or value, probability of class 1 for binary AUC)."""
        logits = logits.reshape(-1).float()
        if self.task == "regression":
            return float(logits[0]), float(logits[0])
        if logits.numel() == 1:
            p = float(torch.sigmoid(logits[0]))
            return float(p >= 0.5), p
        probs = torch.softmax(logits, 0)
        return float(torch.argmax(probs)), float(probs[1]) if probs.numel() > 1 else 0.0

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint_path(self) -> Path:
        return self.out_dir / "last.pt"

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        ckpt = Checkpoint(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), epoch=self.epoch,
            rng=_rng_state(), plan=self.plan.to_dict(), config=asdict(self.config), task=self.task,
            history=self.history,
        )  # fmt: skip
        buffer = io.BytesIO()
        torch.save(asdict(ckpt), buffer)
        atomic_write(self.checkpoint_path(), lambda f: f.write(buffer.getvalue()))
        lines = "".join(json.dumps(row) + "\n" for row in self.history)
        atomic_write(self.out_dir / "metrics.jsonl", lambda f: f.write(lines.encode()))

    def resume(self) -> None:
        """Continue from ``last.pt``: weights, optimizer, epoch, RNG states, history."""
        path = self.checkpoint_path()
        if not path.is_file():
            raise TrainError(f"--resume: no checkpoint at '{path}'; start without --resume")
        ckpt = load_checkpoint(path)
        if ckpt["plan"].get("model", {}).get("trunk_fingerprint") != self.plan.model.get(
            "trunk_fingerprint"
        ):
            raise TrainError(f"--resume: '{path}' was trained with another model or plan")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise TrainError(f"--resume: '{path}' does not fit this model ({err})") from err
        self.epoch = int(ckpt["epoch"])
        self.history = list(ckpt["history"])
        _set_rng_state(ckpt["rng"])
        log.info("resumed from %s after epoch %d", path, self.epoch)

    # -- loop ---------------------------------------------------------------------------------

    def _order(self, epoch: int) -> list[int]:
        """Image order of an epoch: a function of (seed, epoch) only, the same on every rank."""
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_data), generator=gen).tolist()

    def _my_batches(self, epoch: int) -> Iterator[tuple[list[int], int]]:
        """Global batches of the epoch as (this rank's share, global batch size)."""
        order = self._order(epoch)
        b = self.config.batch
        for start in range(0, len(order), b):
            batch = order[start : start + b]
            yield batch[self.rank :: self.world], len(batch)

    def _image(self, data: Dataset, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = data[index]
        return image.unsqueeze(0), label.reshape(1)  # (1, C, H, W) uint8 on the host

    def _sync_gradients(self) -> None:
        """Sum gradients over ranks (each image's loss was scaled by 1/global batch size)."""
        if self.world == 1:
            return
        for p in self.model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def _images(self, indices: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(1, C, *spatial) uint8 images and labels in ``indices`` order, read ahead by
        ``num_workers`` processes."""
        if self.config.num_workers == 0:
            yield from (self._image(self.train_data, i) for i in indices)
            return
        loader = torch.utils.data.DataLoader(
            self.train_data, batch_size=None, sampler=indices,
            num_workers=self.config.num_workers,
        )  # fmt: skip
        for image, label in loader:
            yield image.unsqueeze(0), label.reshape(1)

    def train_epoch(
        self, epoch: int, bar: Callable[[int], None]
    ) -> tuple[float, float | None, int]:
        """One epoch; returns (mean loss, accuracy or None, images seen by this rank)."""
        losses, correct, seen = 0.0, 0, 0
        batches = list(self._my_batches(epoch))
        images = self._images([i for batch, _ in batches for i in batch])
        for batch, global_size in batches:
            self.optimizer.zero_grad(set_to_none=True)
            for _ in batch:
                image, target = next(images)
                loss, logits = streaming_step(
                    self.scnn, self.head, image, target, self.loss, loss_scale=1.0 / global_size
                )
                losses += float(loss)
                pred, _ = self._score(logits)
                correct += int(pred == float(target[0]))
                seen += 1
                bar(1)
            self._sync_gradients()
            self.optimizer.step()
        accuracy = correct / seen if seen and self.task != "regression" else None
        return losses / max(seen, 1), accuracy, seen

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> tuple[float, float | None, float | None]:
        """(mean loss, accuracy, AUC) over ``data`` with streamed forward passes only."""
        losses, correct, scores, labels = 0.0, 0, [], []
        for index in range(len(data)):
            image, target = self._image(data, index)
            logits = self.head(self.scnn.forward(image))
            losses += float(self.loss(logits, target.to(logits.device)))
            pred, score = self._score(logits)
            correct += int(pred == float(target[0]))
            scores.append(score)
            labels.append(float(target[0]))
        n = max(len(data), 1)
        accuracy = correct / n if self.task != "regression" else None
        auc = binary_auc(scores, labels) if self.task == "binary" else None
        return losses / n, accuracy, auc

    def fit(self, *, progress: bool = True) -> list[dict[str, Any]]:
        """Train the remaining epochs; returns the metrics history."""
        show = progress and self.rank == 0 and sys.stderr.isatty()
        for epoch in range(self.epoch, self.config.epochs):
            start = time.perf_counter()
            total = math.ceil(len(self.train_data) / self.world)
            with tqdm(total=total, desc=f"epoch {epoch + 1}/{self.config.epochs}",
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
            self.history.append(asdict(row))
            self.epoch = epoch + 1
            self.save_checkpoint()
            if self.rank == 0:
                log.info("epoch %d: %s", epoch + 1, json.dumps(asdict(row)))
        return self.history

    def _average(
        self, loss: float, accuracy: float | None, seen: int
    ) -> tuple[float, float | None]:
        if self.world == 1:
            return loss, accuracy
        t = torch.tensor([loss * seen, (accuracy or 0.0) * seen, seen], dtype=torch.float64)
        dist.all_reduce(t)
        n = max(float(t[2]), 1.0)
        return float(t[0]) / n, (float(t[1]) / n if accuracy is not None else None)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint; a corrupt or foreign file is a one-line TrainError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds for a damaged file
        raise TrainError(
            f"checkpoint '{path}' is unreadable or corrupt ({type(err).__name__})"
        ) from err
    required = {"model", "optimizer", "epoch", "rng", "plan", "history"}
    if not isinstance(ckpt, dict) or not required <= set(ckpt):
        raise TrainError(f"'{path}' is not a tileplan checkpoint")
    return ckpt
