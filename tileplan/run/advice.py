"""Why an image cannot be used, and how to fix it, in the words of the command that met it.

The data layer says what a file has and what the run or the model needs (the *fact*: "records
no resolution, and the run reads images at 2 µm/px") and offers *fixes* that name options.
A fix is shown only where the command that prints the message has every option it names:
``tileplan predict`` reads images as its run did and has none of ``--mpp``, ``--level`` or
``--oversize``, so it never tells the user to use them. ``COMMAND_OPTIONS`` lists each
command's reading options; a test checks it against the commands themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["COMMAND_OPTIONS", "Command", "Fix", "UnusableImageError", "render"]

Command = Literal["train", "profile", "predict", "check-data"]

# The image-reading options of each command (``None``: a Python caller, who may set them all).
COMMAND_OPTIONS: dict[str, frozenset[str]] = {
    "train": frozenset({"--mpp", "--level", "--tissue", "--oversize", "--assume-mpp",
                        "--spacing", "--assume-spacing", "--intensity"}),
    "profile": frozenset({"--mpp", "--level", "--tissue", "--assume-mpp", "--spacing",
                          "--assume-spacing", "--intensity"}),
    "predict": frozenset({"--assume-mpp", "--assume-spacing"}),
}  # fmt: skip
COMMAND_OPTIONS["check-data"] = COMMAND_OPTIONS["train"]  # reads as train does
# Commands whose images come from a CSV, whose columns (level, mpp, spacing) can fix a row.
_CSV_COMMANDS = frozenset({"train", "profile", "check-data"})


@dataclass(frozen=True)
class Fix:
    """One way out. ``text`` names the options in ``needs`` (and a CSV column when ``csv``)."""

    text: str
    needs: tuple[str, ...] = ()
    csv: bool = False

    def applies(self, command: str | None) -> bool:
        if command is None:
            return True
        if self.csv and command not in _CSV_COMMANDS:
            return False
        return set(self.needs) <= COMMAND_OPTIONS.get(command, frozenset())


def render(fact: str, fixes: Sequence[Fix], command: str | None) -> str:
    """``fact; fix, or fix`` with the fixes ``command`` can use (just the fact without)."""
    shown = [f.text for f in fixes if f.applies(command)]
    return f"{fact}; {', or '.join(shown)}" if shown else fact


class UnusableImageError(ValueError):
    """Why an image cannot be used as the run asks: a fact and the fixes for it. ``str()``
    shows every fix; ``render(command)`` those of one command. Callers add file and row."""

    def __init__(self, fact: str, *fixes: Fix) -> None:
        super().__init__(render(fact, fixes, None))
        self.fact = fact
        self.fixes = fixes

    def render(self, command: str | None) -> str:
        return render(self.fact, self.fixes, command)
