"""Segmented streaming as its own class, for code written before ``StreamingCNN`` took
segments itself (see [Segments] in ``executor.streaming``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from executor.streaming import SegmentSpec, StreamingCNN

__all__ = ["SegmentSpec", "SegmentedStreamingCNN"]


class SegmentedStreamingCNN(StreamingCNN):
    """``StreamingCNN(trunk, segments=segments, ...)``: a trunk streamed as a chain of
    segments, each with its own tiles.

    Args:
        trunk: the streamable part of the network (traced, never modified).
        segments: the chain, in order; every ``end`` but the last's must be a cut point of
            the traced trunk (``executor.map_cut_points``) or an end that a statistic places
            (``StreamingCNN.ends``).
        input_grad, amp_dtype, progress, preprocess, cache_last_tile: as for
            ``StreamingCNN`` (``preprocess`` applies to the image, i.e. to the first
            segment's crops; the cached tile is the last segment's).

    Raises:
        GeometryError: a segment end is not a point where a single map flows on.
        UnsupportedLayerError: a segment cannot be streamed.
    """

    def __init__(
        self,
        trunk: nn.Module,
        segments: Sequence[SegmentSpec],
        *,
        input_grad: bool = False,
        amp_dtype: torch.dtype | None = None,
        cache_last_tile: bool = True,
        progress: bool = False,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(
            trunk, segments=segments, input_grad=input_grad, amp_dtype=amp_dtype,
            cache_last_tile=cache_last_tile, progress=progress, preprocess=preprocess,
        )  # fmt: skip
