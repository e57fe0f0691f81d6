"""The one rule from a plan's dtype to how tiles are computed.

* ``float64`` and ``float32``: parameters and activations in that dtype, no autocast.
* ``bfloat16`` and ``float16``: parameters stay ``float32`` (the optimizer updates them in full
  precision) and every pass that touches activations, the trunk's tiles *and* the head, runs
  under ``torch.autocast`` with that dtype. ``float16`` also needs gradient scaling in training
  (its range underflows small gradients); ``bfloat16`` has float32's range and does not.

Everything that turns a dtype name into tensors (the executor's ``from_plan``, the planner's
estimates and measurements, training, prediction) asks ``Precision.of`` and nothing else.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, get_args

import torch

__all__ = ["DTYPE_NAMES", "DtypeName", "Precision"]

DtypeName = Literal["float32", "float64", "bfloat16", "float16"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)


@dataclass(frozen=True, slots=True)
class Precision:
    """How a plan's dtype is computed.

    Attributes:
        name: the plan's dtype name.
        param_dtype: dtype of parameters, buffers, and of images converted to floating point.
        amp_dtype: autocast dtype for the trunk and the head, or None.
    """

    name: DtypeName
    param_dtype: torch.dtype
    amp_dtype: torch.dtype | None

    @classmethod
    def of(cls, name: str | torch.dtype) -> Precision:
        """The precision of a dtype name (``"bfloat16"``) or torch dtype.

        Raises:
            ValueError: not one of ``DTYPE_NAMES``.
        """
        text = name if isinstance(name, str) else str(name).removeprefix("torch.")
        if text not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {text!r}; use one of {', '.join(DTYPE_NAMES)}")
        dtype = getattr(torch, text)
        if dtype in (torch.bfloat16, torch.float16):
            return cls(text, torch.float32, dtype)  # type: ignore[arg-type]
        return cls(text, dtype, None)  # type: ignore[arg-type]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in (the autocast dtype when there is one)."""
        return self.amp_dtype or self.param_dtype

    @property
    def grad_scaling(self) -> bool:
        """Whether training needs a loss scale (float16's narrow range)."""
        return self.amp_dtype == torch.float16

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager[object]:
        """``torch.autocast`` for this precision on ``device``, or a no-op."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.amp_dtype)
