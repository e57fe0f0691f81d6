"""StreamingCNN: exact tile-by-tile forward and backward passes of a CNN trunk.

Usage follows the published method's pseudocode::

    scnn = StreamingCNN(trunk, tile_shape=(1, 3, 1024, 1024))
    out = scnn.forward(image)            # (N, C, H_out, W_out), no autograd graph
    out.requires_grad_()
    loss = criterion(head(out), target)
    loss.backward()
    scnn.backward(image, out.grad)       # adds exact gradients into trunk parameters' .grad

Only one tile's activations are alive at a time. The trunk itself runs unchanged on each crop:
nothing is hooked, patched or swapped, so the user's module is never altered. Exactness rests on
[Output ownership] in ``executor.geometry``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from executor.errors import GeometryError
from executor.geometry import Tile, TileGrid, analyze_trunk
from executor.modes import check_modes, mode_signature
from executor.plan import Plan, PlanError, check_plan_matches, load_plan
from executor.sources import CropReader, ImageSource, image_version

if TYPE_CHECKING:
    from executor.chain import SegmentedStreamingCNN

__all__ = ["StreamingCNN", "spatial_tile_shape"]

log = logging.getLogger(__name__)


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
class _CachedTile:
    """The last forward tile's autograd graph, reused by the first backward tile."""

    tile: Tile
    crop: torch.Tensor
    output: torch.Tensor
    image: weakref.ref[torch.Tensor | ImageSource]
    version: int


class StreamingCNN:
    """Streams a CNN trunk over tiles with gradients equal to conventional backprop.

    Args:
        trunk: the streamable part of the network: only local ops (see README for the list);
            BatchNorm must be in eval mode. Its device is where tiles are computed.
        tile_shape: the largest input crop of the backward pass (px), as ``(H, W)``,
            ``(N, C, H, W)`` or an int for square tiles. Aligned down to a multiple of the
            trunk's output stride; the grid is balanced so that crops are about equal.
        forward_tile_shape: crop size of the no-grad forward pass, which holds no autograd
            graph and so can afford larger tiles (fewer halo recomputes). Defaults to
            ``tile_shape``.
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
        tile_shape: int | Sequence[int],
        *,
        forward_tile_shape: int | Sequence[int] | None = None,
        input_grad: bool = False,
        amp_dtype: torch.dtype | None = None,
        cache_last_tile: bool = True,
        progress: bool = False,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        output_device: torch.device | str | None = None,
        read_ahead: int = 2,
    ) -> None:
        self.trunk = trunk
        self.read_ahead = read_ahead
        self.output_device = None if output_device is None else torch.device(output_device)
        self.preprocess = preprocess
        self.tile_shape = spatial_tile_shape(tile_shape)
        self.forward_tile_shape = (
            self.tile_shape if forward_tile_shape is None
            else spatial_tile_shape(forward_tile_shape)
        )  # fmt: skip
        if len(self.forward_tile_shape) != len(self.tile_shape):
            raise GeometryError("tile_shape and forward_tile_shape need the same number of axes")
        self.input_grad = input_grad
        self.amp_dtype = amp_dtype
        self.cache_last_tile = cache_last_tile
        self.progress = progress
        self._modes = mode_signature(trunk)
        self.geometry = analyze_trunk(trunk, len(self.tile_shape))
        self._cache: _CachedTile | None = None
        self.plan: Plan | None = None

    @classmethod
    def from_plan(
        cls,
        trunk: nn.Module,
        plan: Plan | str | os.PathLike[str],
        **kwargs: Any,
    ) -> StreamingCNN | SegmentedStreamingCNN:
        """Stream ``trunk`` with the tiles of a saved plan (``tileplan profile``).

        The plan is refused (``PlanError``) if it was made for another trunk architecture or
        its geometry is not the trunk's; images of another shape are refused when a pass
        starts. A segmented plan gives a ``SegmentedStreamingCNN`` (the same interface). The
        plan's dtype sets autocast (``executor.Precision``): a bfloat16/float16 plan runs its
        tiles under autocast with that dtype. The trunk's parameters must already be in the
        plan's parameter dtype (``plan.precision.param_dtype``).

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
        if plan.segments:  # a chain of segments: the same interface (executor.chain)
            from executor.chain import SegmentedStreamingCNN, SegmentSpec  # noqa: F811

            specs = [SegmentSpec(s.end, s.tile_px, s.forward_tile_px, s.map_on_host)
                     for s in plan.segments]  # fmt: skip
            chained = SegmentedStreamingCNN(trunk, specs, **kwargs)
            chained.plan = plan
            return chained
        scnn = cls(trunk, plan.tile_px, forward_tile_shape=plan.forward_tile_px, **kwargs)
        scnn.plan = plan
        return scnn

    # -- public API ---------------------------------------------------------------------------

    def tile_grid(self, image_shape: Sequence[int], *, forward: bool = False) -> TileGrid:
        """The grid used for an image of spatial shape ``image_shape`` (px)."""
        tile = self.forward_tile_shape if forward else self.tile_shape
        return self.geometry.tile_grid(tuple(image_shape), tile)

    def forward(self, image: torch.Tensor | ImageSource) -> torch.Tensor:
        """Trunk output for the whole image, computed tile by tile, without autograd graph.

        Args:
            image: (N, C, *spatial) tensor on any device, or an ``ImageSource``; crops move to
                the trunk's device one at a time.

        Returns:
            (N, C_out, *out_spatial) on the trunk's device (or ``output_device``),
            ``requires_grad=False``.
        """
        self._prepare(image)
        self._cache = None
        grid = self.tile_grid(tuple(image.shape[2:]), forward=True)
        keep_last = (
            self.cache_last_tile
            and torch.is_grad_enabled()
            and self.forward_tile_shape == self.tile_shape
            and self._needs_graph()
        )
        with CropReader(image, self._tiles(grid, "forward"), ahead=self.read_ahead) as reader:
            return self._forward_tiles(image, reader, grid.output_shape, keep_last, grid.n_tiles)

    def _forward_tiles(self, image: torch.Tensor | ImageSource, reader: CropReader,
                       output_shape: tuple[int, ...], keep_last: bool, n_tiles: int
                       ) -> torch.Tensor:  # fmt: skip
        out: torch.Tensor | None = None
        for k, (tile, region) in enumerate(reader):
            keep = keep_last and k == n_tiles - 1
            with torch.set_grad_enabled(keep), self.autocast():
                crop = self._crop(region, requires_grad=keep and self.input_grad)
                del region
                y = self.trunk(_fed(crop))  # (N, C_out, *crop_out)
            if out is None:
                out = torch.empty((*y.shape[:2], *output_shape), dtype=y.dtype,
                                  device=self.output_device or y.device)  # fmt: skip
            out[(..., *tile.output_slices())] = y[(..., *tile.local_output_slices())].detach()
            if keep:
                self._cache = _CachedTile(tile, crop, y, weakref.ref(image), image_version(image))
        assert out is not None
        return out

    __call__ = forward

    def backward(
        self, image: torch.Tensor | ImageSource, grad_output: torch.Tensor
    ) -> torch.Tensor | None:
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
        self._prepare(image)
        shape = tuple(image.shape)  # a tensor's or a source's
        grid = self.tile_grid(shape[2:])
        expected = (*shape[:1], *grid.output_shape)
        got = (*grad_output.shape[:1], *grad_output.shape[2:])
        if grad_output.dim() != len(shape) or got != expected:
            raise GeometryError(
                f"grad_output has shape {tuple(grad_output.shape)} but the trunk's output for "
                f"this image has batch and spatial shape {expected}; pass out.grad of forward()"
            )
        cache, self._cache = self._cache, None
        if cache is not None and (
            cache.image() is not image or cache.version != image_version(image)
        ):
            cache = None
        image_grad = (
            torch.zeros(shape, dtype=self._grad_dtype(image), device=_device_of(image))
            if self.input_grad
            else None
        )
        tiles = list(reversed(list(grid)))
        if cache is not None and cache.tile == tiles[0]:
            tiles = tiles[1:]  # its crop and graph are cached: nothing to read
            todo = [(cache.tile, None)]
        else:
            cache, todo = None, []
        reader = CropReader(image, tiles, ahead=self.read_ahead)
        with reader, _restore_grads_on_error(self.trunk):
            for tile, region in self._tiles(_chained(todo, reader), "backward", len(grid)):
                if region is None:
                    assert cache is not None
                    crop, y, cache = cache.crop, cache.output, None
                else:
                    with torch.enable_grad(), self.autocast():
                        crop = self._crop(region, requires_grad=self.input_grad)
                        del region
                        y = self.trunk(_fed(crop))
                owned = y[(..., *tile.local_output_slices())]
                g = grad_output[(..., *tile.output_slices())].to(owned.device, owned.dtype)
                torch.autograd.backward(owned, g)
                if image_grad is not None and crop.grad is not None:
                    target = image_grad[(..., *tile.input_slices())]
                    target += crop.grad.to(image_grad.device, image_grad.dtype)
                del crop, y, owned, g
        return image_grad

    # -- internals ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device | None:
        for tensor in (*self.trunk.parameters(), *self.trunk.buffers()):
            return tensor.device
        return None

    def _prepare(self, image: torch.Tensor | ImageSource) -> None:
        shape = tuple(image.shape)  # a tensor's or a source's
        if len(shape) != 2 + self.geometry.n_axes:
            raise GeometryError(
                f"image has shape {shape}; expected (N, C, "
                f"{', '.join('*' * self.geometry.n_axes)}) with {self.geometry.n_axes} "
                "spatial axes"
            )
        if self.plan is not None:
            check_fits_plan(shape[2:], self.plan)
        check_modes(self.trunk)
        modes = mode_signature(self.trunk)
        if modes != self._modes:  # train()/eval() switched: traced control flow may differ
            self.geometry = analyze_trunk(self.trunk, self.geometry.n_axes)
            self._modes = modes

    def _needs_graph(self) -> bool:
        return self.input_grad or any(p.requires_grad for p in self.trunk.parameters())

    def _crop(self, region: torch.Tensor, *, requires_grad: bool) -> torch.Tensor:
        # Always a copy: the trunk may work in place on its input, and crops overlap.
        crop = region.to(device=self.device or region.device, copy=True)
        if self.preprocess is not None:
            crop = self.preprocess(crop)
        return crop.requires_grad_(requires_grad)

    def _grad_dtype(self, image: torch.Tensor | ImageSource) -> torch.dtype:
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

    def _tiles(self, tiles: Iterable[Any], what: str, total: int | None = None
               ) -> Iterator[Any]:  # fmt: skip
        n = total if total is not None else len(tiles)  # type: ignore[arg-type]
        log.debug("%s pass over %d tiles", what, n)
        show = self.progress and sys.stderr.isatty()
        return iter(tqdm(tiles, total=n, desc=f"{what} tiles", disable=not show, leave=False))


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


def _device_of(image: torch.Tensor | ImageSource) -> torch.device:
    return image.device if isinstance(image, torch.Tensor) else torch.device("cpu")


def _chained(first: list[tuple[Tile, None]], rest: Iterable[tuple[Tile, torch.Tensor]]
             ) -> Iterator[tuple[Tile, torch.Tensor | None]]:  # fmt: skip
    yield from first
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
