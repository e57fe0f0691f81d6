"""Training recipes from standard building blocks: weight decay and momentum, learning-rate
schedules from ``torch.optim.lr_scheduler`` with a linear warm-up, oversampling by inverse class
frequency, class weights, the monitored validation value (``best.pt``, early stopping) and the
average of the best window of epochs' weights (``averaged.pt``).

Everything here is a function of (seed, epoch) and of state saved in ``last.pt``, so that a
resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "MONITORS", "SCHEDULES", "Monitor", "MonitorState", "Recipe", "Schedule", "balanced_order",
    "batch_weights", "make_scheduler", "parse_class_weights", "rescale_lr", "step_scheduler",
]  # fmt: skip

SCHEDULES = ("none", "cosine", "step", "exponential", "plateau")
# The monitored value and whether larger is better.
MONITORS: dict[str, Literal["min", "max"]] = {
    "val_loss": "min", "val_auc": "max", "val_accuracy": "max", "val_balanced_accuracy": "max",
    "val_spearman": "max", "val_pearson": "max", "train_loss": "min",
}  # fmt: skip

# The tasks a monitored value exists for (a task: binary, multiclass or regression).
_MONITOR_TASKS = {
    "val_auc": "binary", "val_spearman": "regression", "val_pearson": "regression",
    "val_accuracy": "classification", "val_balanced_accuracy": "classification",
}  # fmt: skip


class RecipeError(ValueError):
    """A recipe option is malformed or out of range; the message names it and the fix."""


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule, stepped once per epoch after validation.

    Attributes:
        name: ``none``, ``cosine`` (to 0 over the epochs after warm-up), ``step`` (times
            ``gamma`` every ``every`` epochs), ``exponential`` (times ``gamma`` every epoch) or
            ``plateau`` (times ``gamma`` after ``every`` epochs without improvement of the
            monitored value).
    """

    name: str = "none"
    every: int = 0
    gamma: float = 0.0

    _DEFAULTS = {"step": (30, 0.1), "exponential": (0, 0.99), "plateau": (5, 0.1)}
    _FORMS = ("none", "cosine", "step[:EVERY[:GAMMA]]", "exponential[:GAMMA]",
              "plateau[:PATIENCE[:FACTOR]]")  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """``cosine``, ``step:30:0.1``, ``exponential:0.99``, ``plateau:5:0.1``, ``none``."""
        name, *args = text.strip().lower().split(":")
        forms = ", ".join(cls._FORMS)
        if name not in SCHEDULES:
            raise RecipeError(f"--schedule {text!r}: unknown schedule; use one of {forms}")
        every, gamma = cls._DEFAULTS.get(name, (0, 0.0))
        allowed = {"none": 0, "cosine": 0, "exponential": 1}.get(name, 2)
        if len(args) > allowed:
            raise RecipeError(f"--schedule {text!r}: too many values; use one of {forms}")
        try:
            if name == "exponential" and args:
                gamma = float(args[0])
            elif args:
                every = int(args[0])
                gamma = float(args[1]) if len(args) > 1 else gamma
        except ValueError:
            raise RecipeError(f"--schedule {text!r}: not a number; use one of {forms}") from None
        if name in ("step", "plateau") and every < 1:
            raise RecipeError(f"--schedule {text!r}: the epoch count must be at least 1")
        if name in cls._DEFAULTS and not 0 < gamma < 1:
            raise RecipeError(f"--schedule {text!r}: the factor must be between 0 and 1")
        return cls(name, every, gamma)

    def describe(self) -> str:
        if self.name == "step":
            return f"step: x{self.gamma:g} every {self.every} epochs"
        if self.name == "exponential":
            return f"exponential: x{self.gamma:g} per epoch"
        if self.name == "plateau":
            return f"plateau: x{self.gamma:g} after {self.every} epochs without improvement"
        return self.name


@dataclass(frozen=True)
class Recipe:
    """How a run trains beyond the plan: recorded in checkpoints, so ``--resume`` continues
    only with the same recipe.

    Attributes:
        weight_decay: the optimizer's weight decay (L2 for Adam and SGD, decoupled for AdamW;
            None: the optimizer's default, 0 for Adam and SGD, 0.01 for AdamW).
        momentum: SGD's momentum (None: 0.9).
        schedule: the learning-rate schedule.
        warmup: epochs of linear warm-up from lr/(warmup+1) to lr, before the schedule.
        balance: draw each epoch's images with replacement, by inverse class frequency.
        class_weights: the loss weight of each class (a weighted mean over the batch, as
            ``torch.nn.functional.cross_entropy(weight=...)``), or None.
        monitor: the value ``best.pt``, ``--patience``, ``plateau`` and ``--average`` follow
            (None: ``val_loss`` with validation images, else ``train_loss``; see ``resolved``).
        patience: stop after this many epochs without improvement of ``monitor`` (None: never).
        average: write ``averaged.pt``, the mean weights of the ``average`` consecutive epochs
            with the best mean ``monitor`` (0: no).
        freeze: keep every trunk parameter up to and including this module fixed
            (``tileplan.run.freeze``), or None.
        unfreeze_epoch: with ``freeze``, the 1-based epoch from which every parameter trains
            (the second phase of staged fine-tuning: a new optimizer over all parameters at
            ``lr_after`` and the schedule started again over the remaining epochs), or None.
        lr_after: the learning rate of the second phase (None: the run's ``--lr``).
    """

    weight_decay: float | None = None
    momentum: float | None = None
    schedule: Schedule = dataclasses.field(default_factory=Schedule)
    warmup: int = 0
    balance: bool = False
    class_weights: tuple[float, ...] | None = None
    monitor: str | None = None
    patience: int | None = None
    average: int = 0
    freeze: str | None = None
    unfreeze_epoch: int | None = None
    lr_after: float | None = None

    def resolved(self, has_val: bool) -> Recipe:
        """This recipe with its default monitored value made explicit."""
        if self.monitor is not None:
            return self
        return dataclasses.replace(self, monitor="val_loss" if has_val else "train_loss")

    def check(self, *, optimizer: str, epochs: int, has_val: bool, task: str,
              classes: int) -> None:  # fmt: skip
        """Refuse what cannot run, before training.

        Raises:
            RecipeError: one line naming the option and the fix.
        """
        self._check_ranges(optimizer, epochs)
        self._check_monitor(has_val, task)
        if (self.balance or self.class_weights) and task == "regression":
            raise RecipeError("--balance and --class-weights are for classification; this "
                              "run's labels are continuous")  # fmt: skip
        if self.class_weights is not None and len(self.class_weights) != classes:
            raise RecipeError(f"--class-weights has {len(self.class_weights)} values for "
                              f"{classes} classes; give one per class (or auto)")  # fmt: skip

    def _check_ranges(self, optimizer: str, epochs: int) -> None:
        if self.weight_decay is not None and self.weight_decay < 0:
            raise RecipeError(f"--weight-decay {self.weight_decay:g}: must be 0 or more")
        if self.momentum is not None and optimizer != "sgd":
            raise RecipeError(f"--momentum is SGD's; the run's optimizer is {optimizer} "
                              "(choose --optimizer sgd or leave --momentum out)")  # fmt: skip
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise RecipeError(f"--momentum {self.momentum:g}: must be in [0, 1)")
        if self.warmup < 0 or self.warmup >= epochs:
            raise RecipeError(f"--warmup {self.warmup}: must be 0 or more and below --epochs "
                              f"{epochs}")  # fmt: skip
        if self.patience is not None and self.patience < 1:
            raise RecipeError(f"--patience {self.patience}: must be at least 1")
        if self.average < 0 or self.average > epochs:
            raise RecipeError(f"--average {self.average}: must be between 0 and --epochs "
                              f"{epochs}")  # fmt: skip
        self._check_stages(epochs)

    def _check_stages(self, epochs: int) -> None:
        if self.unfreeze_epoch is not None:
            if self.freeze is None:
                raise RecipeError(f"--unfreeze-epoch {self.unfreeze_epoch} ends a --freeze "
                                  "phase; name the frozen prefix with --freeze MODULE")  # fmt: skip
            if not 2 <= self.unfreeze_epoch <= epochs:
                raise RecipeError(f"--unfreeze-epoch {self.unfreeze_epoch}: must be between 2 "
                                  f"and --epochs {epochs} (the first epoch that trains "
                                  "everything)")  # fmt: skip
        if self.lr_after is not None:
            if self.unfreeze_epoch is None:
                raise RecipeError(f"--lr-after {self.lr_after:g} is the rate after "
                                  "--unfreeze-epoch; give --unfreeze-epoch N too")  # fmt: skip
            if not self.lr_after > 0:
                raise RecipeError(f"--lr-after {self.lr_after:g}: must be positive")

    def _check_monitor(self, has_val: bool, task: str) -> None:
        if self.monitor is None:
            return
        if self.monitor not in MONITORS:
            raise RecipeError(f"--monitor {self.monitor}: use one of {', '.join(MONITORS)}")
        if self.monitor.startswith("val_") and not has_val:
            raise RecipeError(f"--monitor {self.monitor} needs validation images; pass --val "
                              "or --monitor train_loss")  # fmt: skip
        wanted = _MONITOR_TASKS.get(self.monitor)
        kind = "regression" if task == "regression" else "classification"
        if wanted is not None and wanted not in (task, kind):
            raise RecipeError(f"--monitor {self.monitor} is for {wanted} tasks; this run's "
                              f"labels make it {task}")  # fmt: skip

    def optimizer_options(self, optimizer: str) -> dict[str, float]:
        """The keyword arguments of the optimizer's constructor beyond the learning rate."""
        options: dict[str, float] = {}
        if self.weight_decay is not None:
            options["weight_decay"] = self.weight_decay
        if optimizer == "sgd":
            options["momentum"] = 0.9 if self.momentum is None else self.momentum
        return options


def parse_class_weights(text: str | None, labels: Sequence[float]) -> tuple[float, ...] | None:
    """``auto`` (n / (classes * count), torch's and scikit-learn's ``balanced``) or ``W0,W1,...``.

    Raises:
        RecipeError: a value that is not a positive number, or a class with no image (auto).
    """
    if text is None:
        return None
    classes = int(max(labels)) + 1 if labels else 0
    if text.strip().lower() == "auto":
        counts = [sum(1 for y in labels if int(y) == c) for c in range(classes)]
        if not all(counts):
            missing = [c for c, n in enumerate(counts) if not n]
            raise RecipeError(f"--class-weights auto: class {missing[0]} has no training "
                              "image; give the weights as W0,W1,...")  # fmt: skip
        return tuple(len(labels) / (classes * n) for n in counts)
    try:
        weights = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise RecipeError(f"--class-weights {text!r}: use auto or numbers W0,W1,...") from None
    if not all(w > 0 and math.isfinite(w) for w in weights):
        raise RecipeError(f"--class-weights {text!r}: every weight must be a positive number")
    return weights


def balanced_order(labels: Sequence[float], generator: torch.Generator) -> list[int]:
    """An epoch's image indices drawn with replacement, each with probability proportional to
    1 / (its class's count): every class is drawn equally often in expectation."""
    counts: dict[int, int] = {}
    for y in labels:
        counts[int(y)] = counts.get(int(y), 0) + 1
    weights = torch.tensor([1.0 / counts[int(y)] for y in labels], dtype=torch.float64)
    return torch.multinomial(weights, len(labels), replacement=True, generator=generator).tolist()


def batch_weights(labels: Sequence[float], class_weights: tuple[float, ...] | None) -> list[float]:
    """Each image's share of a global batch's loss: 1/B, or w[y] / sum of the batch's w[y]
    with class weights (the weighted mean ``cross_entropy(weight=...)`` computes)."""
    if class_weights is None:
        return [1.0 / len(labels)] * len(labels)
    w = [class_weights[int(y)] for y in labels]
    total = sum(w)
    return [v / total for v in w]


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, epochs: int) -> Any:
    """The schedule as ``torch.optim.lr_scheduler`` objects (None for ``none`` without
    warm-up); :func:`step_scheduler` steps it once per epoch."""
    s, warm = recipe.schedule, recipe.warmup
    lr_scheduler = torch.optim.lr_scheduler
    main: Any
    if s.name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs - warm, 1))
    elif s.name == "step":
        main = lr_scheduler.StepLR(optimizer, step_size=s.every, gamma=s.gamma)
    elif s.name == "exponential":
        main = lr_scheduler.ExponentialLR(optimizer, gamma=s.gamma)
    elif s.name == "plateau":
        mode = MONITORS[recipe.monitor or "train_loss"]
        main = lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=s.gamma,
                                              patience=s.every)  # fmt: skip
    else:
        main = None
    if not warm:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warm + 1), end_factor=1.0,
                                 total_iters=warm)  # fmt: skip
    return _Warmed(ramp, main, warm)


class _Warmed:
    """A linear warm-up for ``warm`` epochs, then the main schedule (which may be a plateau
    one, which ``SequentialLR`` cannot follow since it steps on a value)."""

    def __init__(self, ramp: Any, main: Any, warm: int) -> None:
        self.ramp, self.main, self.warm, self.epochs = ramp, main, warm, 0

    def step(self, value: float | None = None) -> None:
        self.epochs += 1
        if self.epochs <= self.warm:
            self.ramp.step()
        elif self.main is not None:
            step_scheduler(self.main, value)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "ramp": self.ramp.state_dict(),
                "main": self.main.state_dict() if self.main is not None else None}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = state["epochs"]
        self.ramp.load_state_dict(state["ramp"])
        if self.main is not None:
            self.main.load_state_dict(state["main"])


def rescale_lr(optimizer: torch.optim.Optimizer, scheduler: Any, ratio: float) -> None:
    """Multiply the learning rate, and every rate a schedule computes from, by ``ratio``: a
    resumed run with another ``--lr`` continues its schedule at the new rate."""
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    parts = [scheduler.ramp, scheduler.main] if isinstance(scheduler, _Warmed) else [scheduler]
    for part in parts:
        for name in ("base_lrs", "_last_lr"):
            if part is not None and getattr(part, name, None) is not None:
                setattr(part, name, [v * ratio for v in getattr(part, name)])


def step_scheduler(scheduler: Any, value: float | None) -> None:
    """Step an epoch's schedule; a plateau schedule with the monitored value (skipped when
    there is none, e.g. a validation AUC of one class)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if value is not None:
            scheduler.step(value)
    elif isinstance(scheduler, _Warmed):
        scheduler.step(value)
    else:
        scheduler.step()


@dataclass(frozen=True)
class MonitorState:
    """What the monitor remembers (rebuilt from the metrics history on ``--resume``).

    Attributes:
        best, best_epoch: the best monitored value and its epoch (1-based; 0: none yet).
        bad_epochs: epochs since the best.
        window_best, window_end: the best mean of ``average`` consecutive epochs' values, and
            the last epoch of that window (0: none yet).
    """

    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    window_best: float | None = None
    window_end: int = 0


class Monitor:
    """Follows the monitored value epoch by epoch."""

    def __init__(self, recipe: Recipe, state: MonitorState | None = None) -> None:
        self.recipe = recipe
        self.monitor = recipe.monitor or "train_loss"
        self.sign = 1.0 if MONITORS[self.monitor] == "min" else -1.0  # smaller is better
        self.state = state or MonitorState()

    def _better(self, value: float, than: float | None) -> bool:
        return than is None or self.sign * value < self.sign * than

    def update(self, epoch: int, values: Sequence[float | None]) -> tuple[bool, bool]:
        """Epoch ``epoch`` (1-based) ended; ``values`` is the monitored value of every epoch
        so far (None where it could not be computed). Returns (a new best epoch, a new best
        window of ``average`` epochs ending here)."""
        value = values[-1]
        s = self.state
        best = value is not None and self._better(value, s.best)
        if best:
            s = dataclasses.replace(s, best=value, best_epoch=epoch, bad_epochs=0)
        else:
            s = dataclasses.replace(s, bad_epochs=s.bad_epochs + 1)
        window = False
        k = self.recipe.average
        if k and len(values) >= k and all(v is not None for v in values[-k:]):
            mean = math.fsum(values[-k:]) / k  # type: ignore[arg-type]
            if self._better(mean, s.window_best):
                s = dataclasses.replace(s, window_best=mean, window_end=epoch)
                window = True
        self.state = s
        return best, window

    @property
    def exhausted(self) -> bool:
        """``--patience`` epochs passed without improvement."""
        p = self.recipe.patience
        return p is not None and self.state.bad_epochs >= p
