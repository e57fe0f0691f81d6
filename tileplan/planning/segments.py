"""Choosing how to stream the trunk in segments: where to cut it and each segment's tiles.

Segments (``executor.streaming``, [Segments]) pay each part's halo on that part alone, at the
price of holding the maps that cross them from the forward to the backward pass. A trunk with
global-context layers is always segmented: its program (``executor.program``, [Program]) ends
a segment wherever a statistic of whole maps is taken; such forced ends are always present.
Here every way of cutting the trunk further at the candidate cuts is priced:

* Candidate cuts: the last single-map point of each stride level inside the trunk, i.e. the
  end of each stage. Its map is the smallest of its level and the halo accumulated before it
  the largest a cut there can save. ``--cut`` names others.
* Memory, by phase. ``F`` is what every phase holds (model and optimizer state, the image when
  it is in device memory, the trunk's output map and its gradient, the head). A kept map is
  alive from the forward pass of the part that makes it until the backward pass of the first
  part that reads it; its gradient from the backward pass of the last part that reads it until
  that of the part that makes it. So part ``k``'s forward phase holds the maps made before it
  and its own outputs being filled, plus one forward tile; its backward phase holds the maps
  that part ``k`` and those before it still read, the gradients in flight, plus one backward
  tile. A statistic's phases hold the transients of its reduction over the whole maps. Phases
  share no tile, so each segment gets its fastest tile that fits its own two phases: the
  choice per segment is the choice for the chain. With one segment this is exactly the
  single-segment estimate (``MemoryBreakdown.total_bytes``); with a chain of single cut maps
  it is ``S_0..S_{k-1}`` made before, ``S_k`` and ``G_k`` and ``G_{k-1}``.
* Time: a tile of one part costs ``a * s + b * p``: ``a`` and ``b`` are the whole trunk's
  measured time fit (seconds per tile, seconds per pixel), ``p`` the trunk pixels of the same
  forward FLOPs as the tile (FLOPs counted on meta tensors) and ``s`` the part's share of the
  trunk's ops (the per-tile overhead is per op launched); summed over each grid. Without a
  fit, FLOPs weigh candidates (a backward tile as three forward ones). Statistics cost a pass
  over their maps, which is small against the convolutions around them, and are not priced.
* On a GPU, kept maps that do not fit the device stay in host memory and move per tile (at a
  nominal host-to-device bandwidth).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from executor import (
    MemoryBreakdown,
    Program,
    ReducePart,
    Segment,
    Segmentation,
    StreamPart,
    TileGrid,
    TimeFit,
    TrunkGeometry,
    analyze_trunk,
    build_program,
    chain,
    find_node,
    map_cut_points,
    trace,
)
from tileplan.planning.estimate import part_flops, part_peak, pass_flops, value_shapes
from tileplan.planning.search import (
    BACKWARD_WEIGHT,
    SMALLEST_TILE,
    TILE_OVERHEAD_PX,
    candidate_tiles,
)

__all__ = ["Costs", "SegmentSearch", "candidate_cuts", "resolve_cuts"]

Shape = tuple[int, ...]

# Host <-> device copies of cut maps, bytes per second (nominal PCIe 4.0 x16 in practice).
HOST_BANDWIDTH = 12e9
# The engine's own work per forward tile (crops, calls, output writes), seconds: a floor under
# a time fit's per-tile intercept; a backward tile counts three.
ENGINE_TILE_S = 1e-3


def _where(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return f"{list(stack.values())[-1][0]} ({node.name})"
    return node.name


def candidate_cuts(trunk: nn.Module, limit: int = 6, n_axes: int = 2) -> list[tuple[str, str]]:
    """``(node name, where)`` of the last cut point of each stride level inside the trunk
    (at most ``limit``, the deepest levels kept)."""
    gm = trace(trunk)
    nodes = {n.name: n for n in gm.graph.nodes}
    cuts = map_cut_points(trunk, n_axes)
    # The stride of each cut: of the prefix ending there.
    ends: dict[tuple[int, ...], str] = {}
    for name in cuts:
        (prefix_part, _) = chain(gm, [name])
        ends[analyze_trunk(prefix_part, n_axes).output_stride] = name
    # The last level ends at the trunk's output: no cut there.
    levels = list(ends)[:-1]
    return [(ends[level], _where(nodes[ends[level]])) for level in levels][-limit:]


def resolve_cuts(trunk: nn.Module, names: Sequence[str], n_axes: int = 2,
                 option: str = "--cut") -> list[tuple[str, str]]:  # fmt: skip
    """The cut points for ``--cut`` (or ``option``'s) names: a node name, or a module (the
    last node inside it).

    Raises:
        ValueError: a name is not in the trunk, is its output, or is not a point where one map
            flows on.
    """
    gm = trace(trunk)
    nodes = list(gm.graph.nodes)
    valid = set(map_cut_points(trunk, n_axes))
    output = next(n for n in nodes if n.op == "output").args[0]
    resolved = []
    for name in names:
        node = find_node(gm, name)
        if node is None:
            raise ValueError(f"{option} {name}: no module or node of that name in the trunk")
        if node is output:
            raise ValueError(f"{option} {name}: it makes the trunk's output, so nothing would "
                             "stream after it; name a module before the trunk's last")  # fmt: skip
        if node.name not in valid:
            raise ValueError(
                f"{option} {name}: more than one value flows past it (e.g. a skip connection); "
                "choose the end of a whole block"
            )
        resolved.append((node.name, _where(node)))
    order = {n.name: i for i, n in enumerate(nodes)}
    return sorted(resolved, key=lambda c: order[c[0]])


@dataclass(frozen=True)
class Costs:
    """What every phase of a streaming step holds, and how tiles are timed and calibrated."""

    fixed: MemoryBreakdown  # F (tile fields 0): state, image if in device memory, output, head
    usable_bytes: int
    dtype: torch.dtype  # of the maps (the activation dtype)
    time_fit: TimeFit | None
    factor: float = 1.0  # calibration of tile activations (measured / estimated)
    maps_in_device_memory: bool = True  # CPU: the host is the device, maps count anyway
    host_allowed: bool = False  # GPU: cut maps may go to host memory
    max_tile: int | None = None  # largest backward tile side, in positions of a part's input


@dataclass
class _Part:
    """A segment (a stream part of the trunk's program): what it reads and makes, its
    geometry, and cost models."""

    stream: StreamPart
    index: int  # in the program's parts
    last: bool  # it makes the trunk's output
    inputs: tuple[Shape, ...]  # (N, C, ...) of each map it reads, whole
    stats: tuple[tuple[Shape, torch.dtype], ...]  # each statistic it reads
    output_shape: Shape  # (N, C, *spatial) of its first output map
    map_bytes: int  # its output maps
    costs: Costs
    flops_per_px: float  # the trunk's forward FLOPs per image pixel (N x px): the time unit
    ops_share: float  # its share of the trunk's ops: of the per-tile overhead of a time fit
    spatial: Shape  # its input maps' spatial shape (one grid)
    dims: tuple[tuple[int, ...], ...]  # each input's spatial dims
    exact: bool = False  # every crop on meta tensors (else an a + b * pixels fit of two)
    _memory: dict[tuple[tuple[int, ...], bool], int] = field(default_factory=dict)
    _flops: dict[tuple[int, ...], int] = field(default_factory=dict)
    _fits: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    _grids: list[TileGrid] = field(default_factory=list)

    @property
    def end(self) -> str | None:
        return None if self.last else self.stream.end

    @property
    def where(self) -> str:
        return "the trunk's output" if self.last else self.stream.where

    @property
    def geometry(self) -> TrunkGeometry:
        return self.stream.geometry

    @property
    def module(self) -> nn.Module:
        return self.stream.module

    @property
    def input_shape(self) -> Shape:
        """(N, C, *spatial) of its first input map."""
        return (*self.inputs[0][:2], *self.spatial)

    def crops(self, crop: Shape) -> list[Shape]:
        """Each input map's shape for a crop of ``crop`` positions."""
        shapes = []
        for shape, dims in zip(self.inputs, self.dims, strict=True):
            cropped = list(shape)
            for axis, dim in enumerate(dims):
                cropped[dim] = crop[axis]
            shapes.append(tuple(cropped))
        return shapes

    def grids(self) -> list[TileGrid]:
        """The grid of every candidate tile over its input maps, smallest tile first."""
        if not self._grids:
            limit = self.costs.max_tile
            floor = SMALLEST_TILE if limit is None else min(SMALLEST_TILE, limit)
            tiles = candidate_tiles(self.geometry, self.spatial, floor)
            self._grids = [self.geometry.tile_grid(self.spatial, t) for t in tiles]
        return self._grids

    def _samples(self) -> list[tuple[int, ...]]:
        """Crops to interpolate between: the smallest tile, one twice as large per side, and
        the whole input map (often the tile of late segments, so it is counted exactly)."""
        spatial = self.spatial
        small = tuple(min(n, self.geometry.min_tile(ax)) for ax, n in enumerate(spatial))
        large = tuple(min(n, 2 * s) for s, n in zip(small, spatial, strict=True))
        return sorted({small, large, tuple(spatial)}, key=math.prod)

    def _fitted(self, kind: str, crop: tuple[int, ...], measure: Callable[[tuple[int, ...]], int]
                ) -> float:  # fmt: skip
        """``measure(crop)``, exact or interpolated linearly in pixels between the samples
        (extrapolated from the nearest two beyond them)."""
        if self.exact:
            return float(measure(crop))
        if kind not in self._fits:
            self._fits[kind] = [(math.prod(c), float(measure(c))) for c in self._samples()]
        points = self._fits[kind]
        x = math.prod(crop)
        if len(points) == 1:
            return points[0][1] * x / points[0][0]
        k = next((i for i in range(1, len(points) - 1) if x <= points[i][0]), len(points) - 1)
        (x0, y0), (x1, y1) = points[k - 1], points[k]
        return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)

    def tile_bytes(self, crop: tuple[int, ...], grad: bool) -> int:
        def measure(c: tuple[int, ...]) -> int:
            key = (c, grad)
            if key not in self._memory:
                self._memory[key] = part_peak(self.module, self.crops(c), self.stats,
                                              self.costs.dtype, grad=grad)  # fmt: skip
            return self._memory[key]

        return round(self._fitted(f"memory {grad}", crop, measure) * self.costs.factor)

    def flops(self, crop: tuple[int, ...]) -> float:
        def measure(c: tuple[int, ...]) -> int:
            if c not in self._flops:
                self._flops[c] = part_flops(self.module, self.crops(c), self.stats,
                                            self.costs.dtype)  # fmt: skip
            return self._flops[c]

        return self._fitted("flops", crop, measure)

    def tile_cost(self, crop: tuple[int, ...], *, step: bool) -> float:
        """Seconds of one tile of this crop, or without a time fit the planner's proxy
        (``search.proxy_cost``: pixels and a per-tile overhead, a backward tile weighing three
        forward ones). A
        part's tile counts as the trunk pixels of the same FLOPs, so that parts and the whole
        trunk are priced in one unit."""
        px = self.flops(crop) / self.flops_per_px  # flops of the whole batch
        fit = self.costs.time_fit
        if fit is None:  # per tile: its share of the trunk's op launches, in pixels
            return (px + TILE_OVERHEAD_PX * self.ops_share) * (BACKWARD_WEIGHT if step else 1)
        # The fit's intercept is the per-tile overhead of running the whole trunk (one call
        # per op): a part pays its share of the ops, and at least the engine's own work per
        # tile (a fit of two crops can put its intercept near zero).
        if step:
            return max(fit.step_a_s * self.ops_share, 3 * ENGINE_TILE_S) + (
                fit.step_b_s_per_px * px
            )
        return max(fit.forward_a_s * self.ops_share, ENGINE_TILE_S) + fit.forward_b_s_per_px * px

    def grid_cost(self, grid: TileGrid, *, step: bool) -> float:
        """Seconds (or the FLOP proxy) of one pass over ``grid``: tiles grouped by crop shape
        (a grid has only a few distinct ones)."""
        lengths = [Counter(t.in_len for t in axis) for axis in grid.axes]
        return sum(
            math.prod(counts[n] for counts, n in zip(lengths, crop, strict=True))
            * self.tile_cost(crop, step=step)
            for crop in itertools.product(*(sorted(c) for c in lengths))
        )


@dataclass(frozen=True)
class _Choice:
    """A segment's chosen tiles, what they cost, and its phases' extra memory."""

    part: _Part
    grid: TileGrid
    forward_grid: TileGrid
    tile_forward_bytes: int
    tile_backward_bytes: int
    cost: float
    forward_phase: int  # kept maps alive in its forward phase (bytes on the device)
    backward_phase: int


@dataclass(frozen=True)
class _Phases:
    """Bytes of kept maps, gradients and statistics' transients alive in each phase of a
    program's parts (see the module docstring), indexed by the program's parts."""

    forward: tuple[int, ...]
    backward: tuple[int, ...]


class SegmentSearch:
    """Prices every segmentation of a trunk at the candidate cuts; see the module docstring.

    Args:
        trunk: the streamed trunk.
        image_shape: (N, C, *spatial) of the image.
        cuts: candidate cut points ``(node name, where)``, in graph order.
        costs: memory and time constants of the step.
    """

    def __init__(self, trunk: nn.Module, image_shape: tuple[int, ...],
                 cuts: Sequence[tuple[str, str]], costs: Costs, *, exact: bool = False
                 ) -> None:  # fmt: skip
        self.exact = exact
        self.trunk = trunk
        self.image_shape = image_shape
        self.n_axes = len(image_shape) - 2
        self.cuts = list(cuts)
        self.costs = costs
        self.gm = trace(trunk)
        self._programs: dict[tuple[str, ...], Program] = {}
        self._parts: dict[tuple[tuple[str, ...], tuple[str, ...]], _Part] = {}
        self._values: dict[str, tuple[Shape, torch.dtype]] = {}
        self._transients: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[int, int]] = {}
        self.flops_per_px = self._flops_per_px()

    @property
    def forced(self) -> int:
        """How many segments the trunk's statistics make it stream in, at least."""
        return len(self.program(()).streams)

    def _flops_per_px(self) -> float:
        """The whole trunk's forward FLOPs per image pixel (batch x spatial, as the time fit
        and the proxy count crops): the slope between its smallest crop and one twice as
        large per side (border effects cancel in the slope)."""
        geometry = analyze_trunk(self.trunk, self.n_axes)
        spatial = self.image_shape[2:]
        small = tuple(min(n, geometry.min_tile(ax)) for ax, n in enumerate(spatial))
        large = tuple(min(n, 2 * v) for v, n in zip(small, spatial, strict=True))
        flops = [pass_flops(self.trunk, (*self.image_shape[:2], *c), self.costs.dtype)
                 for c in (small, large)]  # fmt: skip
        pixels = [TimeFit.pixels((*self.image_shape[:2], *c)) for c in (small, large)]
        if pixels[1] > pixels[0] and flops[1] > flops[0]:
            return (flops[1] - flops[0]) / (pixels[1] - pixels[0])
        return max(flops[1], 1) / pixels[1]

    # -- programs and parts -------------------------------------------------------------------

    def program(self, cuts: Sequence[str]) -> Program:
        """The trunk's program cut at ``cuts`` as well as where its statistics end segments."""
        key = tuple(cuts)
        if key not in self._programs:
            program = build_program(self.trunk, self.n_axes, key)
            if any(n not in self._values for p in program.parts for n in p.outputs):
                self._values.update(value_shapes(program, self.image_shape, self.costs.dtype))
            self._programs[key] = program
        return self._programs[key]

    def _shape(self, name: str) -> Shape:
        return self._values[name][0]

    def _bytes(self, name: str) -> int:
        shape, dtype = self._values[name]
        return math.prod(shape) * (self.costs.dtype if dtype.is_floating_point else dtype).itemsize

    def parts(self, cuts: Sequence[str]) -> list[_Part]:
        """The segments of the program cut at ``cuts``."""
        program = self.program(cuts)
        found = []
        for index, stream in enumerate(program.parts):
            if not isinstance(stream, StreamPart):
                continue
            key = (stream.inputs, stream.outputs)
            if key not in self._parts:
                self._parts[key] = self._part(program, stream, index)
            part = self._parts[key]
            found.append(dataclasses.replace(part, index=index) if part.index != index else part)
        return found

    def _part(self, program: Program, stream: StreamPart, index: int) -> _Part:
        maps = program.maps
        first = self._shape(stream.inputs[0])
        spatial = tuple(first[d] for d in maps[stream.inputs[0]].spatial_dims)
        output = self._shape(stream.outputs[0])
        out_map = maps[stream.outputs[0]]
        output_shape = (*output[:2], *(output[d] for d in out_map.spatial_dims))
        last = stream.outputs == (program.output,)
        return _Part(
            stream, index, last, tuple(self._shape(n) for n in stream.inputs),
            tuple(self._values[n] for n in stream.stats), output_shape,
            sum(self._bytes(n) for n in stream.outputs), self.costs, self.flops_per_px,
            _n_ops(stream.module) / _n_ops(self.gm), spatial,
            tuple(maps[n].spatial_dims for n in stream.inputs), self.exact,
        )  # fmt: skip

    def part(self, start: str | None, end: str | None) -> _Part:
        """The segment from cut ``start`` (None: the image) to cut ``end`` (None: the output)
        of a trunk without statistics."""
        cuts = [c for c in (start, end) if c is not None]
        parts = self.parts(cuts)
        return parts[1] if start is not None else parts[0]

    def _reduce_transients(self, part: ReducePart) -> tuple[int, int]:
        """Bytes a statistic's forward and backward passes add to the maps they read."""
        key = (part.inputs, part.outputs)
        if key not in self._transients:
            inputs = [self._shape(n) for n in part.inputs]
            stats = [self._values[n] for n in part.stats]
            dtype = self.costs.dtype
            self._transients[key] = (
                part_peak(part.grad_module, inputs, stats, dtype, grad=False, count_inputs=False),
                part_peak(part.grad_module, inputs, stats, dtype, grad=True, count_inputs=False),
            )  # fmt: skip
        return self._transients[key]

    def phases(self, program: Program, on_host: bool, frozen: int = 0) -> _Phases:
        """Bytes alive besides ``F`` and the tiles in every phase (see the module docstring):
        kept maps (not on the device when ``on_host``), their gradients, statistics and the
        transients of their reductions. Maps made by the program's first ``frozen`` parts (a
        frozen prefix: no parameter before them trains) take no gradient."""
        parts = program.parts
        made: dict[str, int] = {}
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for k, part in enumerate(parts):
            for name in part.outputs:
                made[name] = k
            for name in (*part.inputs, *part.stats):
                first.setdefault(name, k)
                last[name] = k
        kept = [n for n in made if n != program.output]
        device = self.costs.maps_in_device_memory or not on_host
        size = {n: self._bytes(n) if (device or n not in program.maps) else 0 for n in kept}
        forward, backward = [], []
        for k, part in enumerate(parts):
            extra_f, extra_b = (0, 0)
            if isinstance(part, ReducePart):
                extra_f, extra_b = self._reduce_transients(part)
                if not device:  # the maps it reduces move to the device whole
                    extra_f += sum(self._bytes(n) for n in part.inputs if n in program.maps)
                    extra_b += 2 * sum(self._bytes(n) for n in part.inputs if n in program.maps)
            alive = sum(size[n] for n in kept if made[n] < k or (made[n] == k))
            forward.append(alive + extra_f)
            maps = sum(size[n] for n in kept if first.get(n, -1) >= 0 and first[n] <= k)
            grads = sum(size[n] for n in kept
                        if frozen <= made[n] <= k <= last.get(n, -1))  # fmt: skip
            backward.append(maps + grads + extra_b)
        return _Phases(tuple(forward), tuple(backward))

    # -- one segmentation ---------------------------------------------------------------------

    def price(self, cuts: Sequence[str], on_host: bool = False
              ) -> tuple[float, Segmentation] | None:  # fmt: skip
        """The segmentation at ``cuts`` (and where statistics end segments) with each
        segment's fastest fitting tiles, and its cost (seconds, or the FLOP proxy without a
        time fit); None when a segment has no tile that fits."""
        program = self.program(cuts)
        on_host = on_host and not self.costs.maps_in_device_memory
        phases = self.phases(program, on_host)
        choices = []
        for part in self.parts(cuts):
            choice = self._choose(part, phases.forward[part.index],
                                  phases.backward[part.index], last=part.last)  # fmt: skip
            if choice is None:
                return None
            choices.append(choice)
        # A statistic's phases hold no tile.
        reduce_peak = max(
            (max(phases.forward[k], phases.backward[k]) for k, p in enumerate(program.parts)
             if isinstance(p, ReducePart)), default=0,
        )  # fmt: skip
        if self.costs.fixed.total_bytes + reduce_peak > self.costs.usable_bytes:
            return None
        return self._segmentation(choices, on_host, reduce_peak)

    def price_frozen(self, cuts: Sequence[str], frozen: int, fixed: MemoryBreakdown,
                     on_host: bool = False) -> tuple[float, MemoryBreakdown] | None:  # fmt: skip
        """The segmentation at ``cuts`` (its tiles as ``price`` chooses them, for every
        parameter training) when its first ``frozen`` segments are a frozen prefix: they
        stream forward only (no backward tile, no gradient of the maps they make), and
        ``fixed`` holds what the frozen phase keeps (its gradients and optimizer state are
        those of the parameters that train). Returns (cost, the breakdown at its peak), or None
        when ``price`` finds no tiles."""
        program = self.program(cuts)
        on_host = on_host and not self.costs.maps_in_device_memory
        both = self.phases(program, on_host)
        # The program's parts up to the last frozen segment (statistics between them included)
        # make maps that need no gradient, and their backward passes do not run.
        boundary = self.parts(cuts)[frozen - 1].index + 1
        mine = self.phases(program, on_host, frozen=boundary)
        phases = [(max(mine.forward[k], mine.backward[k] if k >= boundary else 0), 0, 0)
                  for k, p in enumerate(program.parts) if isinstance(p, ReducePart)]  # fmt: skip
        cost = 0.0
        for n, part in enumerate(self.parts(cuts)):
            choice = self._choose(part, both.forward[part.index], both.backward[part.index],
                                  last=part.last)  # fmt: skip
            if choice is None:
                return None
            k = part.index
            phases.append((mine.forward[k], choice.tile_forward_bytes, 0))
            if n < frozen:  # the no-grad forward pass alone, keeping the maps it makes
                cost += part.grid_cost(choice.forward_grid, step=False)
            else:
                phases.append((mine.backward[k], 0, choice.tile_backward_bytes))
                cost += choice.cost
        maps, tile_forward, tile_backward = max(phases, key=sum)
        memory = replace(fixed, tile_forward_bytes=tile_forward,
                         tile_backward_bytes=tile_backward, maps_bytes=maps)  # fmt: skip
        return cost, memory

    def _choose(self, part: _Part, forward_phase: int, backward_phase: int, *, last: bool
                ) -> _Choice | None:  # fmt: skip
        """The fastest tiles of one segment that fit its forward and backward phases."""
        room = self.costs.usable_bytes - self.costs.fixed.total_bytes
        grids = part.grids()
        limit = self.costs.max_tile
        backward = [
            (g, b)
            for g in grids
            if (limit is None or max(g.tile_shape) <= limit)
            and backward_phase + (b := part.tile_bytes(g.largest_crop, grad=True)) <= room
        ]
        forward = [
            (g, f, part.grid_cost(g, step=False))
            for g in grids
            if forward_phase + (f := part.tile_bytes(g.largest_crop, grad=False)) <= room
        ]
        best: _Choice | None = None
        for grid, b_bytes in backward:
            step = part.grid_cost(grid, step=True)
            # The no-grad forward pass may use a larger tile when it fits its own phase.
            for forward_grid, f_bytes, forward_cost in forward:
                if math.prod(forward_grid.tile_shape) < math.prod(grid.tile_shape):
                    continue
                cost = step + forward_cost
                cached = last and forward_grid.tile_shape == grid.tile_shape
                if cached and self.costs.time_fit is not None:  # as TimeFit.predict counts
                    crop = tuple(axis[-1].in_len for axis in grid.axes)
                    cost -= part.tile_cost(crop, step=False)
                if best is None or cost < best.cost:
                    best = _Choice(part, grid, forward_grid, f_bytes, b_bytes, cost,
                                   forward_phase, backward_phase)  # fmt: skip
        return best

    def _segmentation(self, choices: Sequence[_Choice], on_host: bool, reduce_peak: int
                      ) -> tuple[float, Segmentation]:  # fmt: skip
        phases = [(reduce_peak, reduce_peak, 0, 0)]
        for c in choices:
            phases.append((c.forward_phase + c.tile_forward_bytes, c.forward_phase,
                           c.tile_forward_bytes, 0))  # fmt: skip
            phases.append((c.backward_phase + c.tile_backward_bytes, c.backward_phase, 0,
                           c.tile_backward_bytes))  # fmt: skip
        _, maps, tile_forward, tile_backward = max(phases)
        cost = sum(c.cost for c in choices)
        if on_host:
            cost += sum(self._transfer_s(c, n) for c, n in itertools.pairwise(choices))
        timed = self.costs.time_fit is not None
        segments = tuple(_segment(c, on_host, timed) for c in choices)
        memory = replace(self.costs.fixed, tile_forward_bytes=tile_forward,
                         tile_backward_bytes=tile_backward, maps_bytes=maps)  # fmt: skip
        option = Segmentation(
            segments=segments, memory=memory, estimated_peak_bytes=memory.total_bytes,
            predicted_time_s=round(cost, 3) if timed else None,
            fits=memory.total_bytes <= self.costs.usable_bytes,
        )  # fmt: skip
        return cost, option

    def _transfer_s(self, made: _Choice, used: _Choice) -> float:
        """Seconds to move a part's kept maps and their gradient between host and device per
        tile of the part after it."""
        size = made.part.map_bytes
        overlap = used.grid.overlap_factor + used.forward_grid.overlap_factor
        return size * (1 + overlap + 2) / HOST_BANDWIDTH

    def smallest_peak(self, cuts: Sequence[str] = ()) -> int:
        """The peak of the segmentation at ``cuts`` with every segment's smallest tiles,
        whatever the budget: what no tile choice goes below (for saying so)."""
        program = self.program(cuts)
        phases = self.phases(program, on_host=False)
        peak = max(
            (max(phases.forward[k], phases.backward[k]) for k, p in enumerate(program.parts)
             if isinstance(p, ReducePart)), default=0,
        )  # fmt: skip
        for part in self.parts(cuts):
            grid = part.grids()[0]
            peak = max(
                peak,
                phases.forward[part.index] + part.tile_bytes(grid.largest_crop, grad=False),
                phases.backward[part.index] + part.tile_bytes(grid.largest_crop, grad=True),
            )
        return self.costs.fixed.total_bytes + peak

    # -- the search ---------------------------------------------------------------------------

    def search(self, counts: Sequence[int]) -> list[tuple[float, Segmentation]]:
        """Every segmentation with a number of cuts of ``counts`` minus one (2 or more
        segments of a trunk without statistics; cuts added to where statistics end segments
        of one with them, 1 meaning none) that fits, with its cost (seconds, or the FLOP
        proxy), cheapest first."""
        names = [c for c, _ in self.cuts]
        found = []
        for k in counts:
            for cuts in itertools.combinations(names, k - 1):
                priced = self.price(cuts)
                if priced is None and self.costs.host_allowed:
                    priced = self.price(cuts, on_host=True)
                if priced is not None and len(priced[1].segments) >= 2:
                    found.append(priced)
        found.sort(key=lambda pair: (pair[0], pair[1].estimated_peak_bytes))
        # A cut where a segment ends anyway changes nothing: one of each chain.
        seen: set[tuple[str | None, ...]] = set()
        unique = []
        for cost, option in found:
            ends = tuple(s.end for s in option.segments)
            if ends not in seen:
                seen.add(ends)
                unique.append((cost, option))
        return unique


def _n_ops(gm: nn.Module) -> int:
    """Ops a call of ``gm`` runs (each a kernel launch or more)."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return 1
    return max(1, sum(n.op.startswith("call_") for n in graph.nodes))


def _segment(choice: _Choice, on_host: bool, timed: bool) -> Segment:
    part, grid = choice.part, choice.grid
    geometry = part.geometry
    return Segment(
        end=part.end, where=part.where, input_shape_px=tuple(part.spatial),
        output_shape=tuple(part.output_shape[2:]), output_stride_px=geometry.output_stride,
        halo_lo_px=geometry.halo_lo, halo_hi_px=geometry.halo_hi, align_px=geometry.align,
        tile_px=grid.tile_shape, forward_tile_px=choice.forward_grid.tile_shape,
        grid=grid.counts, n_tiles=grid.n_tiles, overlap_factor=round(grid.overlap_factor, 4),
        tile_forward_bytes=choice.tile_forward_bytes,
        tile_backward_bytes=choice.tile_backward_bytes, map_bytes=part.map_bytes,
        map_on_host=on_host and part.end is not None,
        predicted_time_s=round(choice.cost, 3) if timed else None,
        inputs=part.stream.inputs, input_stride_px=part.stream.stride,
    )  # fmt: skip
