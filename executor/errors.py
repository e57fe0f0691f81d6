"""Errors raised by the streaming executor.

Every error names what is wrong and how to fix it in one line, so that the CLI can print
``str(err)`` as is.
"""

from __future__ import annotations

__all__ = ["ContractError", "GeometryError", "StreamingError", "UnsupportedLayerError"]


class StreamingError(Exception):
    """Base class of all executor errors."""


class UnsupportedLayerError(StreamingError):
    """A module or operation inside the trunk cannot be streamed exactly.

    Attributes:
        where: qualified name of the module (or the operation) that was refused.
        reason: why streaming it would not be exact.
        fix: what the user can do about it.
        node: the name of the refused node in the traced graph, when there is one (what an
            automatic split looks for).
    """

    def __init__(self, where: str, reason: str, fix: str, node: str | None = None) -> None:
        self.where = where
        self.reason = reason
        self.fix = fix
        self.node = node
        super().__init__(f"cannot stream '{where}': {reason}; {fix}")


class GeometryError(StreamingError):
    """The tile or image shape does not fit the trunk's geometry."""


class ContractError(StreamingError, ValueError):
    """A typed record (plan, report, checkpoint metadata) is malformed or breaks an invariant.

    Raised when a record is built in code and when one is read from a file, naming the key
    path and what is wrong.
    """
