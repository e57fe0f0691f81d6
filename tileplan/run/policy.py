"""How a training run copes with the world: when it checkpoints, and what it does with an image
that fails to read. None of it changes what the run computes, so a ``--resume`` may change
every setting here (``RunSpec`` holds the ones that do)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["DEFAULT_CHECKPOINT_EVERY", "Cadence", "ReadErrorPolicy", "RunPolicy"]

ReadErrorPolicy = Literal["fail", "skip"]

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600}
_CADENCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|steps?)?\s*$")


@dataclass(frozen=True)
class Cadence:
    """Checkpoint every ``steps`` optimizer steps or every ``seconds`` of training (one of
    them), counted from the last checkpoint. Epoch ends always checkpoint."""

    steps: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.seconds is None):
            raise ValueError("a checkpoint cadence is a number of steps or a duration")
        if (self.steps is not None and self.steps < 1) or (
            self.seconds is not None and not self.seconds > 0
        ):
            raise ValueError("a checkpoint cadence must be positive")

    @classmethod
    def parse(cls, text: str) -> Cadence:
        """``500`` or ``500 steps`` (optimizer steps), ``90s``, ``30m``, ``2h`` (a duration).

        Raises:
            ValueError: naming the text and the forms it may take.
        """
        match = _CADENCE.match(text)
        if match is None or float(match.group(1)) <= 0:
            raise ValueError(
                f"'{text}' is not a checkpoint cadence; give optimizer steps (500) or a "
                "duration (90s, 30m, 2h)"
            )
        number, unit = match.group(1), match.group(2) or "steps"
        if unit.startswith("step"):
            if "." in number:
                raise ValueError(f"'{text}': a number of steps is a whole number")
            return cls(steps=int(number))
        return cls(seconds=float(number) * _UNITS[unit])

    def due(self, steps: int, seconds: float) -> bool:
        """Whether ``steps`` optimizer steps and ``seconds`` since the last checkpoint call
        for the next one."""
        if self.steps is not None:
            return steps >= self.steps
        assert self.seconds is not None
        return seconds >= self.seconds

    def __str__(self) -> str:
        if self.steps is not None:
            return f"{self.steps} steps"
        assert self.seconds is not None
        for unit, size in (("h", 3600), ("m", 60)):
            if self.seconds >= size and self.seconds % size == 0:
                return f"{self.seconds / size:g}{unit}"
        return f"{self.seconds:g}s"


DEFAULT_CHECKPOINT_EVERY = Cadence(seconds=30 * 60)


@dataclass(frozen=True, kw_only=True)
class RunPolicy:
    """Attributes:
    checkpoint_every: the mid-epoch checkpoint cadence.
    on_read_error: ``fail`` stops the run at an image that fails to read (naming it);
        ``skip`` leaves it out of that epoch and records it in ``skipped.csv``.
    max_skipped: with ``skip``, the run stops once more than this fraction of an epoch's
        training images were skipped (a broken disk is not a few bad slides).
    """

    checkpoint_every: Cadence = DEFAULT_CHECKPOINT_EVERY
    on_read_error: ReadErrorPolicy = "fail"
    max_skipped: float = 0.05

    def __post_init__(self) -> None:
        if self.on_read_error not in get_args(ReadErrorPolicy):
            raise ValueError(f"--on-read-error {self.on_read_error}: use fail or skip")
        if not 0.0 <= self.max_skipped <= 1.0:
            raise ValueError(f"--max-skipped {self.max_skipped}: give a fraction in [0, 1]")
