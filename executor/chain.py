"""Segmented streaming: a deep trunk streamed as a chain of segments, each with its own tiles.

Note: [Segments]
    A trunk cut at single-map points is a chain ``f_k ∘ ... ∘ f_1``. The forward pass streams
    ``f_1`` over the image into the cut map ``M_1`` (kept whole), ``f_2`` over ``M_1`` into
    ``M_2``, and so on; the last output is the trunk's. The backward pass streams ``f_k`` with
    its input gradient on: by [Output ownership] applied to ``f_k`` with ``M_{k-1}`` as its
    image, that gives ``dL/dM_{k-1}`` exactly, which is the output gradient of ``f_{k-1}``, and
    so on down to the image. So every parameter gradient and the input gradient are exact.
    Each segment has its own geometry and grid: a deep trunk's halo is paid per segment, where
    it is small, instead of summed over the whole trunk. The price is holding the cut maps from
    the forward pass to the backward pass, and one cut map's gradient at a time. A segment
    whose tile covers its whole input map is conventional execution of that part.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from executor.errors import GeometryError
from executor.geometry import TileGrid, TrunkGeometry, analyze_trunk
from executor.modes import mode_signature
from executor.plan import Plan
from executor.segments import chain, map_cut_points
from executor.sources import ImageSource, image_version
from executor.streaming import StreamingCNN, check_fits_plan
from executor.trace import trace

__all__ = ["SegmentSpec", "SegmentedStreamingCNN"]


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    """One segment of a chain.

    Attributes:
        end: the node of the traced trunk after which the segment ends (a cut point); None
            for the last segment, which ends with the trunk.
        tile: largest crop of its backward pass, in positions of its input map.
        forward_tile: crop of its no-grad forward pass (default: ``tile``).
        map_on_host: keep its output map (a cut map) in host memory; its parts move to and
            from the device per tile.
    """

    end: str | None
    tile: int | Sequence[int]
    forward_tile: int | Sequence[int] | None = None
    map_on_host: bool = False


@dataclass(frozen=True, slots=True)
class _Forward:
    """The cut maps of the last forward pass, kept for the backward pass."""

    image: weakref.ref[torch.Tensor | ImageSource]
    version: int
    maps: tuple[torch.Tensor, ...]


class SegmentedStreamingCNN:
    """Streams a trunk as a chain of segments; the same interface as ``StreamingCNN``.

    Args:
        trunk: the streamable part of the network (traced, never modified).
        segments: the chain, in order; every ``end`` but the last's must be a cut point of
            the traced trunk (``executor.map_cut_points``).
        input_grad, amp_dtype, progress, preprocess: as for ``StreamingCNN`` (``preprocess``
            applies to the image, i.e. to the first segment's crops).
        cache_last_tile: keep the last forward tile's graph of the last segment for its first
            backward tile (the other segments' backward passes come later; caching theirs would
            hold a tile's activations through the rest of the chain).

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
        if not segments:
            raise GeometryError("a segmented trunk needs at least one segment")
        gm = trace(trunk)
        cuts = [s.end for s in segments[:-1]]
        n_axes = len(segments[0].tile) if isinstance(segments[0].tile, Sequence) else 2
        valid = map_cut_points(trunk, n_axes)
        for end in cuts:
            if end not in valid:
                raise GeometryError(
                    f"segment end '{end}' is not a point where a single map flows on; use one "
                    f"of {', '.join(valid[-6:])} ... (executor.map_cut_points)"
                )
        order = [valid.index(end) for end in cuts]
        if any(a >= b for a, b in zip(order, order[1:], strict=False)):
            raise GeometryError(
                f"segment ends {', '.join(map(str, cuts))} must be distinct and in the order "
                "the trunk computes them"
            )
        if segments[-1].end is not None:
            raise GeometryError("the last segment ends with the trunk: give it end=None")
        self.trunk = trunk
        self.input_grad = input_grad
        self.specs = tuple(segments)
        self.amp_dtype = amp_dtype
        self.cache_last_tile = cache_last_tile
        self.progress = progress
        self.preprocess = preprocess
        self.parts = self._build(gm)
        self.geometry: TrunkGeometry = analyze_trunk(trunk, self.parts[0].geometry.n_axes)
        self.plan: Plan | None = None
        self._forward: _Forward | None = None

    def _build(self, gm: torch.fx.GraphModule) -> list[StreamingCNN]:
        """One ``StreamingCNN`` per part of the traced trunk, sharing its parameters."""
        self._modes = mode_signature(self.trunk)
        last = len(self.specs) - 1
        cuts = [s.end for s in self.specs[:-1]]
        return [
            StreamingCNN(
                part, spec.tile, forward_tile_shape=spec.forward_tile,
                input_grad=self.input_grad if i == 0 else True, amp_dtype=self.amp_dtype,
                cache_last_tile=self.cache_last_tile and i == last, progress=self.progress,
                preprocess=self.preprocess if i == 0 else None,
                output_device="cpu" if spec.map_on_host and i < last else None,
            )
            for i, (part, spec) in enumerate(zip(chain(gm, cuts), self.specs, strict=True))
        ]  # fmt: skip

    def _refresh(self) -> None:
        """Trace again after train()/eval() switched modules: the traced control flow of the
        parts may differ (a single ``StreamingCNN`` runs the trunk itself, so needs no more)."""
        if mode_signature(self.trunk) != self._modes:
            self.parts = self._build(trace(self.trunk))
            self.geometry = analyze_trunk(self.trunk, self.geometry.n_axes)
            self._forward = None

    # -- the StreamingCNN interface -------------------------------------------------------------

    @property
    def device(self) -> torch.device | None:
        return self.parts[0].device

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The autocast context of the tiles (run the head under it too)."""
        return self.parts[0].autocast()

    def tile_grids(self, image_shape: Sequence[int], *, forward: bool = False) -> list[TileGrid]:
        """Each segment's grid for an image of spatial shape ``image_shape`` (px)."""
        grids = []
        shape = tuple(image_shape)
        for part in self.parts:
            grids.append(part.tile_grid(shape, forward=forward))
            shape = part.geometry.output_shape(shape)
        return grids

    def tile_grid(self, image_shape: Sequence[int], *, forward: bool = False) -> TileGrid:
        """The first segment's grid (over the image)."""
        return self.parts[0].tile_grid(image_shape, forward=forward)

    def forward(self, image: torch.Tensor | ImageSource) -> torch.Tensor:
        """Trunk output for the whole image, segment by segment, tile by tile, no graph.

        The cut maps are kept for ``backward`` on the same image.
        """
        self._refresh()
        if self.plan is not None:
            check_fits_plan(image.shape[2:], self.plan)
        self._forward = None
        maps = []
        x: torch.Tensor | ImageSource = image
        for part in self.parts:
            x = part.forward(x)
            maps.append(x)
        self._forward = _Forward(weakref.ref(image), image_version(image), tuple(maps[:-1]))
        assert isinstance(x, torch.Tensor)
        return x

    __call__ = forward

    def backward(
        self, image: torch.Tensor | ImageSource, grad_output: torch.Tensor
    ) -> torch.Tensor | None:
        """Add the exact trunk parameter gradients for ``grad_output`` into their ``.grad``;
        return the image gradient when ``input_grad`` is set.

        Segments are streamed last to first, each passing its input gradient on; a cut map and
        its gradient are released as soon as the segment before it no longer needs them.
        """
        self._refresh()
        done, self._forward = self._forward, None
        if done is None or done.image() is not image or done.version != image_version(image):
            with torch.no_grad():
                self.forward(image)
            done, self._forward = self._forward, None
        assert done is not None
        inputs: list[torch.Tensor | ImageSource | None] = [image, *done.maps]
        del done
        grad: torch.Tensor | None = grad_output
        for i in range(len(self.parts) - 1, -1, -1):
            source = inputs[i]
            assert source is not None
            assert grad is not None
            grad = self.parts[i].backward(source, grad)
            inputs[i] = None  # the map is no longer needed: free it
        return grad if self.input_grad else None
