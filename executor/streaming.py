"""StreamingCNN: exact tile-by-tile forward and backward passes of a CNN trunk.

Usage follows the published method's pseudocode::

    scnn = StreamingCNN(trunk, tile_shape=(1, 3, 1024, 1024))
    out = scnn.forward(image)            # (N, C, H_out, W_out), no autograd graph
    out.requires_grad_()
    loss = criterion(head(out), target)
    loss.backward()
    scnn.backward(image, out.grad)       # adds exact gradients into trunk parameters' .grad

Only one tile's activations are alive at a time. Exactness rests on [Output ownership] in
``executor.geometry``. A trunk is run as a program of parts (``executor.program``, [Program]):
a trunk of local layers is one part, and the user's own module runs unchanged on each crop;
global-context layers (squeeze-excitation, GroupNorm, BatchNorm with batch statistics...) add
statistics of whole maps between parts ([Statistics]); a deep trunk may be cut into segments
(``segments``), each with its own tiles ([Segments]). Nothing of the user's module is hooked,
patched or swapped; running statistics are updated in place once per forward call, as
conventional training updates them.

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
    whose tile covers its whole input map is conventional execution of that part. Statistics
    make segments too: each part of the program is a segment, and several maps may cross
    between two of them (a residual block's shortcut and the map a statistic reduces).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from executor.errors import GeometryError, StreamingError
from executor.geometry import Tile, TileGrid, TrunkGeometry
from executor.modes import check_modes, mode_signature
from executor.plan import Plan, PlanError, check_plan_matches, load_plan
from executor.program import MapValue, Program, ReducePart, StreamPart, build_program
from executor.segments import map_cut_points
from executor.sources import CropReader, ImageSource, image_version

__all__ = [
    "ForwardState", "SegmentSpec", "StreamedGrads", "StreamingCNN", "check_fits_plan",
    "spatial_tile_shape",
]  # fmt: skip

log = logging.getLogger(__name__)

Image = torch.Tensor | ImageSource


def spatial_tile_shape(tile_shape: int | Sequence[int]) -> tuple[int, ...]:
    """Spatial part of a tile shape: ``T``, ``(H, W)``, ``(D, H, W)``, ``(N, C, H, W)`` or
    ``(N, C, D, H, W)`` (the published API's form; N and C are ignored)."""
    if isinstance(tile_shape, int):
        return (tile_shape, tile_shape)
    shape = tuple(int(v) for v in tile_shape)
    if len(shape) in (2, 3):
        spatial = shape
    elif len(shape) in (4, 5):
        spatial = shape[2:]
    else:
        raise GeometryError(
            f"tile_shape {shape} has {len(shape)} entries; give (H, W), (D, H, W) or (N, C, H, W)"
        )
    if min(spatial) < 1:
        raise GeometryError(f"tile_shape {shape} has a non-positive size")
    return spatial


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    """One segment of a chain (a stream part of the trunk's program, [Segments]).

    Attributes:
        end: where the segment ends: a cut point of the traced trunk (``map_cut_points``),
            or, for a segment that a statistic ends, its outputs as ``StreamingCNN.ends``
            lists them; None for the last segment, which ends with the trunk.
        tile: largest crop of its backward pass, in positions of its input map.
        forward_tile: crop of its no-grad forward pass (default: ``tile``).
        map_on_host: keep its output maps in host memory; their parts move to and from the
            device per tile.
    """

    end: str | None
    tile: int | Sequence[int]
    forward_tile: int | Sequence[int] | None = None
    map_on_host: bool = False


@dataclass(frozen=True, slots=True)
class _CachedTile:
    """The last forward tile's autograd graph, reused by the first backward tile."""

    tile: Tile
    crops: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]
    stats: tuple[Any, ...]  # the statistic leaves the tile was computed with
    stand_ins: _StandIns  # the parameter leaves it was computed with
    image: weakref.ref[Image]
    version: int


@dataclass
class ForwardState:
    """What a forward pass keeps for its backward pass: every map that crosses parts (not the
    image, not the output), every statistic, the last tile's graph (``cache_last_tile``), and
    what the trunk was then. Opaque: made by ``StreamingCNN.forward_pass``, consumed (once) by
    ``StreamingCNN.backward_pass``."""

    image: weakref.ref[Image]
    version: int
    values: dict[str, Any]
    stats: dict[str, Any]
    signature: tuple[object, ...] = ()
    input_grad: bool = False
    cache: _CachedTile | None = None


@dataclass(frozen=True)
class StreamedGrads:
    """The gradients of one streamed backward pass, returned rather than written to ``.grad``
    (so that autograd, and the hooks of DDP or a loss scaler on it, accumulates them).

    Attributes:
        params: ``(parameter, gradient)`` for every trunk parameter that got one, in the
            trunk's ``parameters()`` order; the gradient has the parameter's dtype and device.
        image: the gradient with respect to the image when it was asked for, else None.
    """

    params: tuple[tuple[nn.Parameter, torch.Tensor], ...]
    image: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class _Tiles:
    backward: tuple[int, ...]
    forward: tuple[int, ...]
    on_host: bool


class StreamingCNN:
    """Streams a CNN trunk over tiles with gradients equal to conventional backprop.

    Args:
        trunk: the streamable part of the network (see README for its layers). Global-context
            layers make statistics between segments, which this places itself; BatchNorm in
            train mode normalises with the batch's statistics and updates its running ones,
            as in conventional training. Its device is where tiles are computed.
        tile_shape: the largest input crop of the backward pass (px), as ``(H, W)``,
            ``(N, C, H, W)`` or an int for square tiles. Aligned down to a multiple of the
            trunk's output stride; the grid is balanced so that crops are about equal. A
            segment after a statistic uses the same image area in positions of its own input
            (the tile divided by its input's stride, at least its smallest tile).
        forward_tile_shape: crop size of the no-grad forward pass, which holds no autograd
            graph and so can afford larger tiles (fewer halo recomputes). Defaults to
            ``tile_shape``.
        segments: instead of ``tile_shape``, one ``SegmentSpec`` per segment with its own
            tiles (``tileplan profile`` chooses them); a spec's ``end`` may cut the trunk
            at a single-map point, and ends placed by statistics must be listed as ``ends``
            gives them.
        input_grad: also compute the exact gradient with respect to the image (saliency);
            ``backward`` then returns it.
        amp_dtype: run tiles under ``torch.autocast`` with this dtype (bfloat16/float16).
        cache_last_tile: when grad mode is on, keep the last forward tile's autograd graph
            for the first backward tile instead of recomputing it. Costs no extra peak (it is
            one backward tile) and saves one tile's forward.
        progress: show a tqdm bar over tiles (only when stderr is a terminal).
        output_device: where ``forward`` puts the output map (default: the trunk's device);
            e.g. the host for a map too large for the device (its owned parts move per tile).
        preprocess: applied to each crop on the trunk's device before the trunk, e.g. uint8
            to normalised float. It must be pointwise (per pixel), or streaming is not exact.
            With ``input_grad`` the gradient is with respect to its output.
        read_ahead: crops read in advance on a background thread when the image is an
            ``ImageSource`` (see ``executor.sources``), so that reading overlaps compute.

    Images: a tensor, or an ``ImageSource`` (e.g. a whole-slide image read region by region
    from disk), which gives bit-identical results to the tensor of its pixels. With a plan,
    any image up to the plan's image size on every axis streams at its own shape with its own
    grid of the plan's tiles (so its peak memory is at most the planned peak).

    Example:
        >>> scnn = StreamingCNN(trunk, tile_shape=(1536, 1536))
        >>> out = scnn.forward(image).requires_grad_()
        >>> head(out).sum().backward()
        >>> scnn.backward(image, out.grad)
    """

    def __init__(
        self,
        trunk: nn.Module,
        tile_shape: int | Sequence[int] | None = None,
        *,
        forward_tile_shape: int | Sequence[int] | None = None,
        segments: Sequence[SegmentSpec] | None = None,
        input_grad: bool = False,
        amp_dtype: torch.dtype | None = None,
        cache_last_tile: bool = True,
        progress: bool = False,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        output_device: torch.device | str | None = None,
        read_ahead: int = 2,
    ) -> None:
        if (tile_shape is None) == (segments is None):
            raise GeometryError("give a tile_shape or segments (one SegmentSpec per segment)")
        if segments is not None and not segments:
            raise GeometryError("a segmented trunk needs at least one segment")
        self.trunk = trunk
        self.specs = tuple(segments) if segments is not None else None
        first = tile_shape if tile_shape is not None else self.specs[0].tile  # type: ignore[index]
        self.tile_shape = spatial_tile_shape(first)
        forward = forward_tile_shape if segments is None else self.specs[0].forward_tile  # type: ignore[index]
        self.forward_tile_shape = (
            self.tile_shape if forward is None else spatial_tile_shape(forward)
        )
        if len(self.forward_tile_shape) != len(self.tile_shape):
            raise GeometryError("tile_shape and forward_tile_shape need the same number of axes")
        self.read_ahead = read_ahead
        self.output_device = None if output_device is None else torch.device(output_device)
        self.preprocess = preprocess
        self.input_grad = input_grad
        self.amp_dtype = amp_dtype
        self.cache_last_tile = cache_last_tile
        self.progress = progress
        self.plan: Plan | None = None
        self._forward: ForwardState | None = None
        self._build()

    # -- the program ----------------------------------------------------------------------------

    def _build(self) -> None:
        """Read the trunk into a program and give every segment its tiles (again when
        train()/eval() switched modules: the traced code and the statistics may differ)."""
        n_axes = len(self.tile_shape)
        self._signature = self._trunk_signature()
        cuts: list[str] = []
        if self.specs is not None and len(self.specs) > 1:
            points = set(map_cut_points(self.trunk, n_axes))
            cuts = [s.end for s in self.specs[:-1] if s.end in points]  # type: ignore[misc]
        self.program: Program = build_program(self.trunk, n_axes, cuts)
        if self.plan is not None:  # read again: the plan must still be this trunk's
            check_plan_matches(self.plan, self.trunk)
        streams = self.program.streams
        self._tiles: dict[int, _Tiles] = {}
        if self.specs is not None:
            self._check_specs(streams)
            for k, (part, spec) in enumerate(zip(streams, self.specs, strict=True)):
                tile = spatial_tile_shape(spec.tile)
                forward = (
                    tile if spec.forward_tile is None else spatial_tile_shape(spec.forward_tile)
                )
                self._tiles[id(part)] = _Tiles(
                    tile, forward, spec.map_on_host and k < len(streams) - 1
                )
        else:
            for part in streams:
                self._tiles[id(part)] = _Tiles(
                    _scaled(self.tile_shape, part), _scaled(self.forward_tile_shape, part), False
                )
        self._forward = None

    def _trunk_signature(self) -> tuple[object, ...]:
        """What the program was read from: every module's train/eval mode, and which tensors
        are the trunk's parameters and buffers (``.to()`` and ``load_state_dict(assign=True)``
        replace them, and the program's parts hold them)."""
        tensors = (*self.trunk.parameters(), *self.trunk.buffers())
        return (mode_signature(self.trunk), tuple(id(t) for t in tensors))

    def _check_specs(self, streams: Sequence[StreamPart]) -> None:
        assert self.specs is not None
        ends = [p.end for p in streams[:-1]]
        given = [s.end for s in self.specs[:-1]]
        if self.specs[-1].end is not None:
            raise GeometryError("the last segment ends with the trunk: give it end=None")
        if given == ends:
            return
        points = map_cut_points(self.trunk, len(self.tile_shape))
        bad = next((e for e in given if e not in ends and e not in points), None)
        if bad is not None and not self.program.reductions:
            raise GeometryError(
                f"segment end '{bad}' is not a point where a single map flows on; use one of "
                f"{', '.join(points[-6:])} ... (executor.map_cut_points)"
            )
        order = [points.index(e) for e in given if e in points]
        if len(order) == len(given) and any(a >= b for a, b in zip(order, order[1:], strict=False)):
            raise GeometryError(
                f"segment ends {', '.join(map(str, given))} must be distinct and in the order "
                "the trunk computes them"
            )
        raise GeometryError(
            f"this trunk streams as {len(streams)} segment(s) ending at "
            f"{', '.join(ends) or 'the output'}, then the output (statistics of whole maps "
            f"and the cuts asked for end them); give one SegmentSpec per segment with those "
            f"ends, in that order, not {', '.join(map(str, given)) or 'none'}"
        )

    @property
    def ends(self) -> tuple[str, ...]:
        """Where each segment but the last ends (the ``end`` of its ``SegmentSpec``)."""
        return tuple(p.end for p in self.program.streams[:-1])

    @property
    def geometry(self) -> TrunkGeometry:
        """The whole trunk's geometry (statistics taken as constants): output stride, halos,
        receptive field; the first segment's, when the trunk streams in one."""
        streams = self.program.streams
        return streams[0].geometry if len(streams) == 1 else self.program.geometry

    @classmethod
    def from_plan(
        cls,
        trunk: nn.Module,
        plan: Plan | str | os.PathLike[str],
        **kwargs: Any,
    ) -> StreamingCNN:
        """Stream ``trunk`` with the tiles of a saved plan (``tileplan profile``).

        The plan is refused (``PlanError``) if it was made for another trunk architecture or
        its geometry is not the trunk's; images of another shape are refused when a pass
        starts. The plan's dtype sets autocast (``executor.Precision``): a bfloat16/float16
        plan runs its tiles under autocast with that dtype. The trunk's parameters must
        already be in the plan's parameter dtype (``plan.precision.param_dtype``).

        Example:
            >>> scnn = StreamingCNN.from_plan(trunk, "plan.yaml")
        """
        if not isinstance(plan, Plan):
            plan = load_plan(plan)
        check_plan_matches(plan, trunk)
        precision = plan.precision
        params = {p.dtype for p in trunk.parameters() if p.is_floating_point()}
        if params and params != {precision.param_dtype}:
            raise PlanError(
                f"the trunk's parameters are {', '.join(sorted(map(str, params)))} but a "
                f"{plan.dtype} plan needs {precision.param_dtype}; convert the model with "
                f".to({precision.param_dtype})"
            )
        kwargs.setdefault("amp_dtype", precision.amp_dtype)
        if plan.segments:
            specs = [SegmentSpec(s.end, s.tile_px, s.forward_tile_px, s.map_on_host)
                     for s in plan.segments]  # fmt: skip
            scnn = cls(trunk, segments=specs, **kwargs)
        else:
            scnn = cls(trunk, plan.tile_px, forward_tile_shape=plan.forward_tile_px, **kwargs)
        scnn.plan = plan
        return scnn

    # -- public API ---------------------------------------------------------------------------

    def tile_grids(self, image_shape: Sequence[int], *, forward: bool = False
                   ) -> list[TileGrid]:  # fmt: skip
        """Each segment's grid for an image of spatial shape ``image_shape`` (px), over its
        own input map."""
        grids = []
        for part in self.program.streams:
            tiles = self._tiles[id(part)]
            shape = self.program.input_shape(part, image_shape)
            grids.append(
                part.geometry.tile_grid(shape, tiles.forward if forward else tiles.backward)
            )
        return grids

    def tile_grid(self, image_shape: Sequence[int], *, forward: bool = False) -> TileGrid:
        """The first segment's grid (over the image) for an image of ``image_shape`` px."""
        return self.tile_grids(image_shape, forward=forward)[0]

    def forward(self, image: Image) -> torch.Tensor:
        """Trunk output for the whole image, computed tile by tile, without autograd graph.

        With grad mode on, the maps and statistics that the backward pass needs are kept
        (in inference they are freed as soon as they are used); running statistics are
        updated once.

        Args:
            image: (N, C, *spatial) tensor on any device, or an ``ImageSource``; crops move to
                the trunk's device one at a time.

        Returns:
            (N, C_out, *out_spatial) on the trunk's device (or ``output_device``),
            ``requires_grad=False``.
        """
        self._forward = None
        keep = torch.is_grad_enabled()
        output, kept = self.forward_pass(image, keep=keep, input_grad=self.input_grad)
        if keep:
            self._forward = kept
        return output

    __call__ = forward

    def forward_pass(self, image: Image, *, keep: bool, input_grad: bool = False
                     ) -> tuple[torch.Tensor, ForwardState]:  # fmt: skip
        """The streamed forward pass, with what its backward pass needs handed to the caller
        instead of held by the engine (``executor.function`` builds autograd on this).

        Args:
            keep: keep the maps and statistics for ``backward_pass`` (else they are freed as
                soon as they are used, as inference needs).
            input_grad: the backward pass will also compute the image's gradient (the last
                tile's cached graph is built for it).

        Returns:
            ``(output, state)``: the output map, without graph, and the state to pass to
            ``backward_pass`` (empty when ``keep`` is False). Running statistics are updated
            once, as a conventional forward pass updates them.
        """
        self._prepare(image)
        with torch.no_grad():
            return self._run_forward(image, keep=keep, effects=True, input_grad=input_grad)

    def backward(self, image: Image, grad_output: torch.Tensor) -> torch.Tensor | None:
        """Add the exact trunk parameter gradients for ``grad_output`` into their ``.grad``.

        Args:
            image: the same image (tensor or source) that was passed to ``forward``.
            grad_output: gradient of the loss with respect to ``forward``'s output.

        Returns:
            The gradient with respect to ``image`` if ``input_grad`` was set, else None (on
            the image's device; on the host for a source).

        Raises:
            GeometryError: ``grad_output`` does not match the output shape for ``image``.

        On any exception the parameters' ``.grad`` are restored to what they were before.
        """
        kept, self._forward = self._forward, None
        with _restore_grads_on_error(self.trunk):
            grads = self.backward_pass(image, kept, grad_output, input_grad=self.input_grad)
            for param, grad in grads.params:
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad += grad.to(param.grad.dtype)
        return grads.image

    def backward_pass(self, image: Image, state: ForwardState | None,
                      grad_output: torch.Tensor, *, input_grad: bool = False
                      ) -> StreamedGrads:  # fmt: skip
        """The streamed backward pass: the exact gradients of the trunk's parameters (and of
        the image with ``input_grad``) for ``grad_output``, returned, not written to ``.grad``.

        Args:
            image: the image (tensor or source) of the forward pass.
            state: what ``forward_pass(image, keep=True)`` returned; it is consumed (its maps
                are freed as the pass goes). None, or the state of another image or of an
                image changed in place since, recomputes the forward pass first.
            grad_output: the gradient of the loss with respect to the output map.

        Raises:
            GeometryError: ``grad_output`` does not match the output shape for ``image``.
            StreamingError: the trunk changed (train()/eval(), ``.to()``) since the forward.
        """
        kept = state
        if kept is not None and kept.signature != self._trunk_signature():
            raise StreamingError(
                "the trunk changed between forward and backward (train()/eval() or .to()), so "
                "its gradients would be another function's; call forward again first"
            )
        self._prepare(image)
        shape = tuple(image.shape)
        out_shape = self.program.map_shape(self.program.output, shape[2:])
        expected = (*shape[:1], *out_shape)
        got = (*grad_output.shape[:1], *grad_output.shape[2:])
        if grad_output.dim() != len(shape) or got != expected:
            raise GeometryError(
                f"grad_output has shape {tuple(grad_output.shape)} but the trunk's output for "
                f"this image has batch and spatial shape {expected}; pass out.grad of forward()"
            )
        if (kept is None or kept.image() is not image or kept.version != image_version(image)
                or kept.input_grad != input_grad):  # fmt: skip
            with torch.no_grad():
                _, kept = self._run_forward(image, keep=True, effects=False,
                                            input_grad=input_grad)  # fmt: skip
        return self._run_backward(image, kept, grad_output, input_grad=input_grad)

    # -- passes -------------------------------------------------------------------------------

    def _run_forward(self, image: Image, *, keep: bool, effects: bool, input_grad: bool
                     ) -> tuple[torch.Tensor, ForwardState]:  # fmt: skip
        program = self.program
        cache: list[_CachedTile] = []
        values: dict[str, Any] = {program.image: image}
        stats: dict[str, Any] = {}
        last_use = _last_uses(program.parts)
        for k, part in enumerate(program.parts):
            if isinstance(part, StreamPart):
                last = keep and k == len(program.parts) - 1
                outputs = self._stream_forward(part, values, stats, image, input_grad=input_grad,
                                               cache=cache if last else None)  # fmt: skip
                values.update(zip(part.outputs, outputs, strict=True))
            else:
                outputs = self._reduce_forward(part, values, stats, effects=effects)
                stats.update(zip(part.outputs, outputs, strict=True))
            if not keep:  # inference: nothing is needed for a backward pass
                for name in [n for n, at in last_use.items() if at == k]:
                    if name not in (program.image, program.output):
                        values.pop(name, None)
                        stats.pop(name, None)
        output = values.pop(program.output)
        values.pop(program.image)
        if not keep:
            values, stats = {}, {}
        kept = ForwardState(weakref.ref(image), image_version(image), values, stats,
                            self._signature, input_grad, cache[0] if cache else None)  # fmt: skip
        return output, kept

    def _run_backward(self, image: Image, kept: ForwardState, grad_output: torch.Tensor, *,
                      input_grad: bool) -> StreamedGrads:  # fmt: skip
        program = self.program
        # Take the kept maps over (not a copy): each is freed as soon as no part before the
        # current one reads it, which only happens when nothing else holds it.
        values, kept.values = kept.values, {}
        cache, kept.cache = kept.cache, None
        values[program.image] = image
        needs = self._needs_grad(input_grad)
        sink = _Sums()
        grads: dict[str, torch.Tensor] = {program.output: grad_output}
        stat_grads: dict[str, torch.Tensor] = {}
        first_use = _first_uses(program.parts)
        stats = kept.stats
        for k in range(len(program.parts) - 1, -1, -1):
            part = program.parts[k]
            if isinstance(part, StreamPart):
                self._stream_backward(
                    part,
                    values,
                    stats,
                    grads,
                    stat_grads,
                    needs,
                    image,
                    sink,
                    cache if k == len(program.parts) - 1 else None,
                )
                cache = None  # its crops may view a kept map: let it go with the map
            else:
                self._reduce_backward(part, values, stats, grads, stat_grads, needs, sink)
            for name in [n for n, at in first_use.items() if at == k]:
                if name != program.image:
                    values.pop(name, None)  # no part before this one reads it: free it
        return StreamedGrads(sink.ordered(self.trunk),
                             grads.get(program.image) if input_grad else None)  # fmt: skip

    def _needs_grad(self, input_grad: bool) -> dict[str, bool]:
        """Which values need a gradient: those computed from the image (with ``input_grad``)
        or from parameters that train."""
        needs = {self.program.image: input_grad}
        for part in self.program.parts:
            module = part.module if isinstance(part, StreamPart) else part.grad_module
            flag = any(p.requires_grad for p in module.parameters()) or any(
                needs.get(n, False) for n in (*part.inputs, *part.stats)
            )
            for name in part.outputs:
                needs[name] = flag
        return needs

    # -- stream parts -------------------------------------------------------------------------

    def _fed(self, part: StreamPart, crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """What a tile's code gets: its crops, copied when they need a gradient and the code
        may change them in place (autograd forbids that on the leaves it differentiates)."""
        if self.program.local or part.changes_inputs:
            return [_fed(c) for c in crops]
        return list(crops)

    def _tile_module(self, part: StreamPart) -> nn.Module:
        """What a tile runs: the user's own module when the trunk streams as one part."""
        return self.trunk if self.program.local else part.module

    def _run_tile(self, part: StreamPart, stand_ins: _StandIns | None, args: Sequence[Any]
                  ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """A tile's outputs; with ``stand_ins``, computed with them in place of the trainable
        parameters ([Autograd node] in ``executor.function``)."""
        module = self._tile_module(part)
        out = stand_ins.call(module, args) if stand_ins is not None else module(*args)
        return (out,) if self.program.local else tuple(out)

    def _input_shape(self, part: StreamPart, values: dict[str, Any]) -> tuple[int, ...]:
        shapes = {_spatial(values[n], self.program.maps[n]) for n in part.inputs}
        if len(shapes) != 1:
            raise GeometryError(
                f"the segment ending at {part.where} reads maps of sizes {sorted(shapes)}; use "
                f"an image size that is a multiple of {'x'.join(map(str, part.stride))} px"
            )
        return shapes.pop()

    def _stream_forward(self, part: StreamPart, values: dict[str, Any], stats: dict[str, Any],
                        image: Image, *, input_grad: bool, cache: list[_CachedTile] | None
                        ) -> list[torch.Tensor]:  # fmt: skip
        """Stream a part over its tiles into whole output maps; with ``cache`` (the last part
        of a forward pass that keeps for a backward pass), the last tile's graph is put in
        it for the first backward tile."""
        tiles = self._tiles[id(part)]
        grid = part.geometry.tile_grid(self._input_shape(part, values), tiles.forward)
        keep_last = (
            cache is not None and self.cache_last_tile and tiles.forward == tiles.backward
            and (input_grad or self._trains())
        )  # fmt: skip
        originals = tuple(stats[n] for n in part.stats)
        needs = self._needs_grad(input_grad) if keep_last else {}
        stand_ins = _StandIns(self._tile_module(part)) if keep_last else None
        part_stats = (
            tuple(_stat_leaf(stats[n], needs.get(n, False)) for n in part.stats)
            if keep_last else originals
        )  # fmt: skip
        outputs: list[torch.Tensor | None] = [None] * len(part.outputs)
        maps = [self.program.maps[n] for n in part.outputs]
        on_host = tiles.on_host
        n = grid.n_tiles
        crops = self._crops(
            part,
            values,
            grid,
            "forward",
            grad_at=n - 1 if keep_last else None,
            image_grad=input_grad,
        )
        with contextlib.closing(crops):
            for k, (tile, crop) in enumerate(crops):
                keep = keep_last and k == n - 1
                with torch.set_grad_enabled(keep), self.autocast():
                    ys = self._run_tile(part, stand_ins if keep else None,
                                        [*self._fed(part, crop),
                                         *_fed_stats(part_stats, originals)])  # fmt: skip
                for j, (y, value) in enumerate(zip(ys, maps, strict=True)):
                    if outputs[j] is None:
                        final = part.outputs[j] == self.program.output
                        outputs[j] = self._allocate(y, value, grid.output_shape, on_host, final)
                    target = outputs[j]
                    assert target is not None
                    target[_index(value, tile.output_slices())] = y[
                        _index(value, tile.local_output_slices())
                    ].detach()
                if keep:
                    assert cache is not None
                    assert stand_ins is not None
                    cache.append(_CachedTile(tile, tuple(crop), tuple(ys), part_stats, stand_ins,
                                             weakref.ref(image), image_version(image)))  # fmt: skip
                del crop, ys
        assert all(o is not None for o in outputs)
        return outputs  # type: ignore[return-value]

    def _allocate(self, y: torch.Tensor, value: MapValue, spatial: tuple[int, ...],
                  on_host: bool, final: bool) -> torch.Tensor:  # fmt: skip
        shape = list(y.shape)
        for axis, dim in enumerate(value.spatial_dims):
            shape[dim] = spatial[axis]
        device = self.output_device if final else torch.device("cpu") if on_host else None
        return torch.empty(shape, dtype=y.dtype, device=device or y.device)

    def _skips_backward(self, part: StreamPart, out_grads: Sequence[torch.Tensor | None],
                        needs: dict[str, bool]) -> bool:  # fmt: skip
        """No gradient reaches the part, or nothing in it takes one: its inputs need none and
        its parameters are frozen (e.g. a frozen prefix segment), so no tile need run."""
        if all(g is None for g in out_grads):
            return True
        return not any(needs.get(n, False) for n in (*part.inputs, *part.stats)) and not any(
            p.requires_grad for p in self._tile_module(part).parameters()
        )

    def _stream_backward(
        self, part: StreamPart, values: dict[str, Any], stats: dict[str, Any],
        grads: dict[str, torch.Tensor], stat_grads: dict[str, torch.Tensor],
        needs: dict[str, bool], image: Image, sink: _Sums, cache: _CachedTile | None,
    ) -> None:  # fmt: skip
        out_grads = [grads.pop(n, None) for n in part.outputs]
        if self._skips_backward(part, out_grads, needs):
            return
        tiles = self._tiles[id(part)]
        grid = part.geometry.tile_grid(self._input_shape(part, values), tiles.backward)
        targets = [self._grad_target(n, values[n], grads) if needs.get(n) else None
                   for n in part.inputs]  # fmt: skip
        order = list(reversed(list(grid)))
        if cache is not None and (
            cache.image() is not image
            or cache.version != image_version(image) or cache.tile != order[0]
        ):  # fmt: skip
            cache = None
        originals = tuple(stats[n] for n in part.stats)
        part_stats = (
            cache.stats if cache is not None
            else tuple(_stat_leaf(stats[n], needs.get(n, False)) for n in part.stats)
        )  # fmt: skip
        maps = [self.program.maps[n] for n in part.outputs]
        inputs = [self.program.maps[n] for n in part.inputs]
        todo = order[1:] if cache is not None else order
        grad_of = [needs.get(n, False) for n in part.inputs]
        crops_iter = self._crops(
            part, values, todo, "backward", grad_all=grad_of, image_grad=needs[self.program.image]
        )
        stand_ins = _StandIns(self._tile_module(part))
        stat_leaves = [leaf for leaf in part_stats
                       if isinstance(leaf, torch.Tensor) and leaf.requires_grad]  # fmt: skip
        stat_sums = _Sums()
        with contextlib.closing(crops_iter):
            for tile, crop in _first_then(cache, crops_iter):
                used = stand_ins
                if isinstance(crop, _CachedTile):
                    crop, ys, used = list(crop.crops), crop.outputs, crop.stand_ins
                else:
                    with torch.enable_grad(), self.autocast():
                        ys = self._run_tile(part, stand_ins, [*self._fed(part, crop),
                                            *_fed_stats(part_stats, originals)])  # fmt: skip
                owned, wanted = [], []
                for y, g, value in zip(ys, out_grads, maps, strict=True):
                    if g is None or not y.requires_grad:
                        continue
                    piece = y[_index(value, tile.local_output_slices())]
                    owned.append(piece)
                    wanted.append(
                        g[_index(value, tile.output_slices())].to(piece.device, piece.dtype)
                    )
                if not owned:
                    continue
                # Gradients returned, not accumulated into .grad: the tile's leaves are the
                # part's parameters (so their hooks, e.g. DDP's, see only the pass's total).
                leaves = [c for c in crop if c.requires_grad]
                n = len(used.leaves)
                found = _grad(owned, wanted, [*used.leaves, *leaves, *stat_leaves])
                sink.add(used.params, found[:n])
                stat_sums.add(stat_leaves, found[n + len(leaves) :])
                crop_grads = dict(zip(map(id, leaves), found[n:], strict=False))
                for c, target, value in zip(crop, targets, inputs, strict=True):
                    g = crop_grads.get(id(c))
                    if target is not None and g is not None:
                        target[_index(value, tile.input_slices())] += g.to(
                            target.device, target.dtype
                        )
                del crop, ys, owned, wanted, found, crop_grads
        for name, leaf in zip(part.stats, part_stats, strict=True):
            g = stat_sums.get(leaf)
            if g is not None:
                _add(stat_grads, name, g)

    def _grad_target(self, name: str, value: Any, grads: dict[str, torch.Tensor]
                     ) -> torch.Tensor:  # fmt: skip
        """The accumulator of a map's gradient (made on first use)."""
        if name not in grads:
            if name == self.program.image:
                dtype = self._grad_dtype(value)
                device = value.device if isinstance(value, torch.Tensor) else torch.device("cpu")
            else:
                dtype, device = value.dtype, value.device
            grads[name] = torch.zeros(tuple(value.shape), dtype=dtype, device=device)
        return grads[name]

    def _crops(
        self, part: StreamPart, values: dict[str, Any], tiles: Iterable[Tile], what: str, *,
        grad_at: int | None = None, grad_all: Sequence[bool] | None = None,
        image_grad: bool = False,
    ) -> Iterator[tuple[Tile, list[torch.Tensor]]]:  # fmt: skip
        """Each tile's crops of the part's inputs: the image's read through a
        ``CropReader`` (read ahead from a source), the kept maps' sliced; always copies on
        the trunk's device (the trunk may work in place on its input, and crops overlap)."""
        tiles = list(tiles)
        image = self.program.image
        names = part.inputs
        copies = self.program.local or part.changes_inputs
        with contextlib.ExitStack() as stack:
            if image in names:
                reader: Iterable[tuple[Tile, torch.Tensor | None]] = stack.enter_context(
                    CropReader(values[image], tiles, ahead=self.read_ahead)
                )
            else:
                reader = ((t, None) for t in tiles)
            device = self.device
            for k, (tile, region) in enumerate(self._progress(reader, len(tiles), what)):
                crops = []
                for i, name in enumerate(names):
                    wants = grad_all[i] if grad_all is not None else k == grad_at
                    if name == image:
                        assert region is not None
                        crops.append(self._crop(region, requires_grad=wants and image_grad))
                    else:
                        value = values[name]
                        crop = value[_index(self.program.maps[name], tile.input_slices())]
                        # A view when the part's code leaves its inputs alone (the kept map is
                        # then read in place); a copy when it changes them in place.
                        crop = crop.to(device=device or crop.device, copy=copies).detach()
                        crops.append(crop.requires_grad_(bool(wants) and crop.is_floating_point()))
                del region
                yield tile, crops

    # -- reduce parts -------------------------------------------------------------------------

    def _whole(self, name: str, values: dict[str, Any]) -> torch.Tensor:
        """A whole map for a statistic, on the trunk's device."""
        value = values[name]
        device = self.device
        if name != self.program.image:
            return value if device is None else value.to(device)
        whole = value if isinstance(value, torch.Tensor) else value.read(
            tuple(slice(0, n) for n in value.shape[2:])
        )  # fmt: skip
        whole = whole.to(device or whole.device)
        return self.preprocess(whole) if self.preprocess is not None else whole

    def _reduce_forward(self, part: ReducePart, values: dict[str, Any], stats: dict[str, Any],
                        *, effects: bool) -> tuple[Any, ...]:  # fmt: skip
        module = part.module if effects else part.grad_module
        with torch.no_grad(), self.autocast():
            maps = [self._whole(n, values) for n in part.inputs]
            return tuple(module(*maps, *(stats[n] for n in part.stats)))

    def _reduce_backward(
        self, part: ReducePart, values: dict[str, Any], stats: dict[str, Any],
        grads: dict[str, torch.Tensor], stat_grads: dict[str, torch.Tensor],
        needs: dict[str, bool], sink: _Sums,
    ) -> None:  # fmt: skip
        out_grads = [stat_grads.pop(n, None) for n in part.outputs]
        if all(g is None for g in out_grads):
            return
        stand_ins = _StandIns(part.grad_module)
        with torch.enable_grad(), self.autocast():
            maps = [_leaf(self._whole(n, values), needs.get(n, False)) for n in part.inputs]
            leaves = [_leaf(stats[n], needs.get(n, False)) for n in part.stats]
            outputs = stand_ins.call(part.grad_module, [*maps, *leaves])
        pairs = [(o, g) for o, g in zip(outputs, out_grads, strict=True)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]  # fmt: skip
        del outputs
        if not pairs:
            return
        params = stand_ins.leaves
        named = [(n, leaf, True) for n, leaf in zip(part.inputs, maps, strict=True)] + [
            (n, leaf, False) for n, leaf in zip(part.stats, leaves, strict=True)
        ]
        named = [(n, leaf, is_map) for n, leaf, is_map in named
                 if isinstance(leaf, torch.Tensor) and leaf.requires_grad]  # fmt: skip
        found = _grad([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs],
                      [*params, *(leaf for _, leaf, _ in named)])  # fmt: skip
        del pairs
        sink.add(stand_ins.params, found[: len(params)])
        for (name, _, is_map), g in zip(named, found[len(params) :], strict=True):
            if g is None:
                continue
            if is_map:
                self._add_map_grad(grads, name, g, values[name])
            else:
                _add(stat_grads, name, g)

    def _add_map_grad(self, grads: dict[str, torch.Tensor], name: str, grad: torch.Tensor,
                      value: Any) -> None:  # fmt: skip
        if name in grads:
            grads[name] += grad.to(grads[name].device, grads[name].dtype)
        elif name == self.program.image:
            target = self._grad_target(name, value, grads)
            target += grad.to(target.device, target.dtype)
        else:
            grads[name] = grad.to(value.device, value.dtype)

    # -- internals ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device | None:
        for tensor in (*self.trunk.parameters(), *self.trunk.buffers()):
            return tensor.device
        return None

    def _prepare(self, image: Image) -> None:
        shape = tuple(image.shape)  # a tensor's or a source's
        n_axes = len(self.tile_shape)
        if len(shape) != 2 + n_axes:
            raise GeometryError(
                f"image has shape {shape}; expected (N, C, {', '.join('*' * n_axes)}) with "
                f"{n_axes} spatial axes"
            )
        if self.plan is not None:
            check_fits_plan(shape[2:], self.plan)
        check_modes(self.trunk)
        if self._trunk_signature() != self._signature:  # train()/eval() switched, or .to()
            self._build()

    def _trains(self) -> bool:
        return any(p.requires_grad for p in self.trunk.parameters())

    def _crop(self, region: torch.Tensor, *, requires_grad: bool) -> torch.Tensor:
        # Always a copy: the trunk may work in place on its input, and crops overlap.
        crop = region.to(device=self.device or region.device, copy=True)
        if self.preprocess is not None:
            crop = self.preprocess(crop)
        return crop.requires_grad_(requires_grad)

    def _grad_dtype(self, image: Image) -> torch.dtype:
        if image.dtype.is_floating_point and self.preprocess is None:
            return image.dtype
        return torch.float32

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The autocast context the tiles run under (a no-op without ``amp_dtype``).

        Run the head under it too, so that it sees the trunk's output as the whole model
        under autocast would (e.g. a bfloat16 map into a float32 Linear).
        """
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        device = self.device or torch.device("cpu")
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype)

    def _progress(self, tiles: Iterable[Any], total: int, what: str) -> Iterator[Any]:
        log.debug("%s pass over %d tiles", what, total)
        show = self.progress and sys.stderr.isatty()
        return iter(tqdm(tiles, total=total, desc=f"{what} tiles", disable=not show,
                         leave=False))  # fmt: skip


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def check_fits_plan(spatial: Sequence[int], plan: Plan) -> None:
    """Refuse an image larger than the plan's image on some axis (a smaller one streams at its
    own shape: its crops are never larger than the plan's tiles, so neither is its peak)."""
    planned = tuple(plan.image_shape_px)
    if len(spatial) != len(planned) or any(s > p for s, p in zip(spatial, planned, strict=True)):
        shape = "x".join(map(str, spatial))
        raise PlanError(
            f"image of {shape} px is larger than the plan's {'x'.join(map(str, planned))} px; "
            "crop it or re-run `tileplan profile` with a larger --image"
        )


def _scaled(tile: tuple[int, ...], part: StreamPart) -> tuple[int, ...]:
    """A tile of the image in positions of a segment's input: the same image area, at least
    the segment's smallest tile."""
    return tuple(
        max(t // s, part.geometry.min_tile(axis) if t // s < t else 1)
        for axis, (t, s) in enumerate(zip(tile, part.stride, strict=True))
    )


def _spatial(value: Any, info: MapValue) -> tuple[int, ...]:
    shape = tuple(value.shape)
    return tuple(shape[d] for d in info.spatial_dims)


def _index(value: MapValue, slices: Sequence[slice]) -> tuple[slice, ...]:
    """An index of a map that takes ``slices`` along its spatial dims, all of the others."""
    index = [slice(None)] * value.rank
    for dim, s in zip(value.spatial_dims, slices, strict=True):
        index[dim] = s
    return tuple(index)


def _leaf(value: Any, requires_grad: bool = True) -> Any:
    """A statistic or map as an autograd leaf of its own (a tile's or a recomputation's)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_(requires_grad)
    return value


def _stat_leaf(value: Any, requires_grad: bool) -> Any:
    """A statistic as the leaf its gradient is summed in over a segment's tiles: in float32
    or better (a bfloat16 sum over thousands of tiles would lose the gradient)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        wide = value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
        return wide.detach().requires_grad_(requires_grad)
    return value


def _fed_stats(leaves: Sequence[Any], originals: Sequence[Any]) -> tuple[Any, ...]:
    """The statistics a tile computes with: each leaf in its statistic's own dtype (the cast
    is part of the tile's graph, so its gradient reaches the wide leaf)."""
    return tuple(
        leaf.to(original.dtype)
        if isinstance(leaf, torch.Tensor) and leaf.dtype != original.dtype else leaf
        for leaf, original in zip(leaves, originals, strict=True)
    )  # fmt: skip


def _grad(outputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor],
          inputs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:  # fmt: skip
    """``d(outputs)/d(inputs)`` contracted with ``grad_outputs``; None where an input is not
    reached (``torch.autograd.grad`` runs no ``AccumulateGrad``: no ``.grad`` is written)."""
    if not inputs:
        torch.autograd.backward(list(outputs), list(grad_outputs))  # frees the graph
        return []
    return list(torch.autograd.grad(list(outputs), list(inputs), list(grad_outputs),
                                    allow_unused=True))  # fmt: skip


class _StandIns:
    """Hook-free leaves standing in for a module's trainable parameters while a tile runs: the
    same storage (``detach``), their own autograd identity. Their gradients are taken with
    ``torch.autograd.grad`` and handed on as the parameters', so that no hook registered on a
    parameter (``Tensor.register_hook``, DDP's) runs on one tile's share: autograd runs them
    once, on the total the streamed node returns ([Autograd node])."""

    def __init__(self, module: nn.Module) -> None:
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.leaves = [p.detach().requires_grad_() for p in self.params]
        self._by_name = {name: leaf for (name, _), leaf in zip(named, self.leaves, strict=True)}

    def call(self, module: nn.Module, args: Sequence[Any]) -> Any:
        if not self._by_name:
            return module(*args)
        return torch.func.functional_call(module, self._by_name, tuple(args))


class _Sums:
    """Gradients of leaves (parameters, statistics) summed over tiles and parts, keyed by the
    leaf."""

    def __init__(self) -> None:
        self._grads: dict[int, torch.Tensor] = {}
        self._owned: set[int] = set()

    def add(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        for p, g in zip(params, grads, strict=True):
            if g is None:
                continue
            key = id(p)
            if key not in self._grads:
                self._grads[key] = g  # may alias a tile's tensor: not changed in place
            elif key in self._owned:
                self._grads[key] += g
            else:
                self._grads[key] = self._grads[key] + g
                self._owned.add(key)

    def get(self, leaf: Any) -> torch.Tensor | None:
        return self._grads.get(id(leaf))

    def ordered(self, module: nn.Module) -> tuple[tuple[nn.Parameter, torch.Tensor], ...]:
        return tuple((p, self._grads[id(p)]) for p in module.parameters()
                     if id(p) in self._grads)  # fmt: skip


def _add(grads: dict[str, torch.Tensor], name: str, grad: torch.Tensor) -> None:
    if name in grads:
        grads[name] = grads[name] + grad.to(grads[name].device, grads[name].dtype)
    else:
        grads[name] = grad


def _last_uses(parts: Sequence[StreamPart | ReducePart]) -> dict[str, int]:
    """The index of the last part reading each value."""
    found: dict[str, int] = {}
    for k, part in enumerate(parts):
        for name in (*part.inputs, *part.stats):
            found[name] = k
    return found


def _first_uses(parts: Sequence[StreamPart | ReducePart]) -> dict[str, int]:
    """The index of the first part reading each value (the last to need it backward)."""
    found: dict[str, int] = {}
    for k, part in enumerate(parts):
        for name in (*part.inputs, *part.stats):
            found.setdefault(name, k)
    return found


def _first_then(cache: _CachedTile | None, rest: Iterator[tuple[Tile, list[torch.Tensor]]]
                ) -> Iterator[tuple[Tile, Any]]:  # fmt: skip
    if cache is not None:
        yield cache.tile, cache
    yield from rest


def _fed(crop: torch.Tensor) -> torch.Tensor:
    """What the trunk gets: the crop, or a copy of it when its gradient is wanted, since a
    trunk may work in place on its input (an in-place ReLU first), which autograd forbids on
    the leaf whose gradient it computes."""
    return crop.clone() if crop.requires_grad else crop


@contextlib.contextmanager
def _restore_grads_on_error(module: nn.Module) -> Iterator[None]:
    """Put every parameter's ``.grad`` back as it was if the block raises."""
    params = [p for p in module.parameters() if p.requires_grad]
    saved = [None if p.grad is None else p.grad.detach().clone() for p in params]
    try:
        yield
    except BaseException:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
        raise
