"""The trunk as a program: streamed parts and, between them, statistics of whole maps.

Note: [Program]
    Every node of the traced trunk (``executor.classify``) is a feature map (local: a tile
    computes it), a statistic (``Stat``/``Flat``: it needs whole maps), an effect (a running-
    statistics update) or free (constants and metadata, recomputed wherever they are used).
    A statistic needs the whole of every map it reads, so it is computed after them; a map
    that uses a statistic is computed after it. That orders the nodes in *levels*:

    * a map's level is the highest level of what it reads (the image is level 0);
    * a statistic's level is one more than the level of the maps it reads, and at least the
      level of the statistics it reads.

    The program runs, for level 0, 1, 2, ...: the statistics of that level (a *reduce part*:
    conventional code on whole maps, run once per pass), then the maps of that level (a
    *stream part*: streamed tile by tile). Whatever a part reads from an earlier one is kept
    whole between them: the maps a statistic reduces, and the maps a later stream part reads
    (a residual block's shortcut). A trunk without statistics is one stream part.

    A stream part's outputs must lie on one position grid (they are owned together); one whose
    outputs have different strides (a downsampling shortcut next to the main branch) becomes
    one part per stride, each computing what it needs. Its inputs must share one grid too.
    Where a user cuts the trunk (``cuts``: points where one map flows on) a stream part is cut
    in two, as segments always were.

    Backward runs the parts in reverse (``executor.streaming``): a stream part streams with its
    outputs' gradients and gives its input maps' gradients and, summed over its tiles, its
    statistics' gradients; a reduce part runs again with autograd on its whole input maps and
    chain-rules its statistics' gradients onto them (see [Statistics]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from executor.classify import Classified, classify, traced_trunk
from executor.errors import GeometryError, UnsupportedLayerError
from executor.geometry import TrunkGeometry
from executor.trace import INPLACE_VIEW
from executor.values import Flat, Maps, Stat

__all__ = ["MapValue", "Program", "ReducePart", "Reduction", "StreamPart", "build_program"]


@dataclass(frozen=True, slots=True)
class MapValue:
    """A map that crosses parts (or the image): kept whole between them.

    Attributes:
        name: its node in the traced trunk.
        node: its index in the whole trunk's spatial graph.
        spatial_dims, rank: its layout.
        stride: image px per position, per axis.
    """

    name: str
    node: int
    spatial_dims: tuple[int, ...]
    rank: int
    stride: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Reduction:
    """Where a statistic is taken: node ``node`` computes ``kind`` over the whole map
    ``source`` (for people: ``where``, the module)."""

    node: str
    kind: str
    source: str
    where: str


@dataclass(frozen=True)
class StreamPart:
    """Maps computed tile by tile: ``module(*input maps, *stats) -> tuple of output maps``.

    Attributes:
        inputs: the map values it reads (its crops), on one position grid.
        stats: the statistics it reads (the same for every tile).
        outputs: the map values it produces, on one position grid.
        geometry: its streaming geometry, in positions of its inputs.
        stride: image px per position of its inputs.
        where: the module where it ends, for people.
        level: its level (see [Program]).
        changes_inputs: its code changes an input map in place (a module built with
            ``inplace=True`` applied to one): its crops must be copies.
    """

    module: torch.fx.GraphModule
    inputs: tuple[str, ...]
    stats: tuple[str, ...]
    outputs: tuple[str, ...]
    geometry: TrunkGeometry
    stride: tuple[int, ...]
    where: str
    level: int
    changes_inputs: bool = True

    @property
    def end(self) -> str:
        """Its outputs, as a plan names where a segment ends."""
        return ",".join(self.outputs)


@dataclass(frozen=True)
class ReducePart:
    """Statistics of whole maps: ``module(*maps, *stats) -> tuple of statistics``, run
    conventionally; it also runs the running-statistics updates (``effects``), which
    ``grad_module`` (its recomputation for the backward pass) leaves out."""

    module: torch.fx.GraphModule
    grad_module: torch.fx.GraphModule
    inputs: tuple[str, ...]
    stats: tuple[str, ...]
    outputs: tuple[str, ...]
    reductions: tuple[Reduction, ...]
    level: int
    effects: int  # how many buffer updates it runs


Part = StreamPart | ReducePart


@dataclass(frozen=True)
class Program:
    """A trunk as parts (see [Program]).

    Attributes:
        parts: in the order the forward pass runs them.
        maps: every map value that crosses parts, and the image.
        image: the image's value name.
        output: the trunk output's value name.
        geometry: the whole trunk's geometry with statistics as constants (its output
            stride, output shape and the lengths of every map).
        reductions: every statistic's reduction, in graph order.
    """

    parts: tuple[Part, ...]
    maps: dict[str, MapValue]
    image: str
    output: str
    geometry: TrunkGeometry
    reductions: tuple[Reduction, ...]

    @property
    def streams(self) -> tuple[StreamPart, ...]:
        return tuple(p for p in self.parts if isinstance(p, StreamPart))

    @property
    def local(self) -> bool:
        """One stream part reading the image: the trunk itself streams."""
        return len(self.parts) == 1

    def map_shape(self, name: str, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of map ``name`` for an image of spatial shape ``image_shape``."""
        node = self.maps[name].node
        return tuple(
            self.geometry.node_lengths(axis, n)[node] for axis, n in enumerate(image_shape)
        )

    def input_shape(self, part: StreamPart, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of a stream part's inputs (one grid) for an image shape.

        Raises:
            GeometryError: its inputs differ in size for this image.
        """
        shapes = {self.map_shape(name, image_shape) for name in part.inputs}
        if len(shapes) > 1:
            raise GeometryError(
                f"the segment ending at {part.where} reads maps of sizes "
                f"{sorted(shapes)} for an image of {'x'.join(map(str, image_shape))} px; use an "
                f"image size that is a multiple of {'x'.join(map(str, part.stride))} px"
            )
        return shapes.pop()


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _strides(found: Classified) -> list[tuple[int, ...]]:
    """Image px per position of every node of the whole trunk's spatial graph."""
    strides: list[tuple[int, ...]] = []
    for node in found.graph.nodes:
        if not node.inputs:
            strides.append((1,) * found.graph.n_axes)
            continue
        stride = strides[node.inputs[0]]
        if node.windows is not None:
            stride = tuple(s * w.stride for s, w in zip(stride, node.windows, strict=True))
        strides.append(stride)
    return strides


class _Builder:
    """Partitions a classified trunk into parts (see [Program])."""

    def __init__(self, found: Classified, cuts: Sequence[str]) -> None:
        self.found = found
        self.gm = found.gm
        self.nodes = [n for n in self.gm.graph.nodes if n.op != "output"]
        self.order = {n: i for i, n in enumerate(self.nodes)}
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        result = output.args[0]
        assert isinstance(result, torch.fx.Node)  # classify refused anything else
        self.result = result
        self.image = next(n for n in self.nodes if n.op == "placeholder")
        self.kind = {n: self._kind(n) for n in self.nodes}
        self.live = self._live()
        self.stream_level: dict[torch.fx.Node, int] = {}
        self.global_level: dict[torch.fx.Node, int] = {}
        self.level: dict[torch.fx.Node, int] = {}
        for node in self.nodes:
            self._place(node)
        self.strides = _strides(found)
        self.whole = TrunkGeometry.from_graph(found.graph)
        self.cuts = set(cuts)

    def _kind(self, node: torch.fx.Node) -> str:
        value = self.found.values.get(node.name)
        if node.name in self.found.effects:
            return "effect"
        if isinstance(value, int | Maps) or (
            isinstance(value, tuple) and any(isinstance(v, int | Maps) for v in value)
        ):
            return "map"
        if isinstance(value, Stat | Flat):
            return "stat"
        return "free"

    def _live(self) -> set[torch.fx.Node]:
        """The result, the effects, and everything they read (asserts and dead code go)."""
        live: set[torch.fx.Node] = set()
        todo = [self.result, *(n for n in self.nodes if self.kind[n] == "effect")]
        while todo:
            node = todo.pop()
            if node in live:
                continue
            live.add(node)
            todo.extend(node.all_input_nodes)
        return live

    def _place(self, node: torch.fx.Node) -> None:
        """Its level, and from which stream / reduce level its value is available."""
        args = node.all_input_nodes
        kind = self.kind[node]
        if kind == "map":
            level = max((self.stream_level[a] for a in args), default=0)
            self.level[node] = level
            self.stream_level[node], self.global_level[node] = level, level + 1
        elif kind in ("stat", "effect"):
            level = max((self.global_level[a] for a in args), default=1)
            self.level[node] = level
            self.stream_level[node] = self.global_level[node] = level
        else:  # free: available wherever what it reads is
            self.stream_level[node] = max((self.stream_level[a] for a in args), default=0)
            self.global_level[node] = max((self.global_level[a] for a in args), default=0)

    # -- groups of nodes ----------------------------------------------------------------------

    def groups(self) -> list[tuple[str, int, list[torch.fx.Node]]]:
        """``(kind, level, own nodes)`` of every part before splitting by stride, in run
        order: per level, its statistics, then its maps (cut at ``cuts``)."""
        levels = sorted({self.level[n] for n in self.nodes if n in self.live and n in self.level})
        groups = []
        for level in levels:
            own = [
                n
                for n in self.nodes
                if n in self.live and self.level.get(n) == level and n is not self.image
            ]
            stats = [n for n in own if self.kind[n] != "map"]
            if stats:
                groups.append(("reduce", level, stats))
            chunk: list[torch.fx.Node] = []
            for node in (n for n in own if self.kind[n] == "map"):
                chunk.append(node)
                if node.name in self.cuts and node is not self.result:
                    groups.append(("stream", level, chunk))
                    chunk = []
            if chunk:
                groups.append(("stream", level, chunk))
        return groups

    def closure(
        self, own: Sequence[torch.fx.Node]
    ) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
        """The nodes a part runs (its own and the free ones they read), and what it reads
        from other parts, both in graph order."""
        mine = set(own)
        runs: set[torch.fx.Node] = set(own)
        reads: set[torch.fx.Node] = set()
        todo = list(own)
        while todo:
            for arg in todo.pop().all_input_nodes:
                if arg in runs or arg in reads:
                    continue
                if self.kind[arg] == "free" and arg.op != "placeholder" and arg not in mine:
                    runs.add(arg)
                    todo.append(arg)
                elif arg not in mine:
                    reads.add(arg)
        return sorted(runs, key=self.order.get), sorted(reads, key=self.order.get)

    def map_value(self, node: torch.fx.Node) -> MapValue:
        value = self.found.values[node.name]
        if not isinstance(value, int):
            raise UnsupportedLayerError(
                self._where(node),
                "a tuple of maps would have to be kept whole across a statistic",
                "end the trunk before it, or return single maps from that module",
                node.name,
            )
        spatial = self.found.graph.nodes[value]
        return MapValue(node.name, value, spatial.spatial_dims, spatial.rank,
                        self.strides[value])  # fmt: skip

    def _reduction_where(self, node: torch.fx.Node) -> str:
        """The module where a statistic is taken and what it computes: 'layer1.0.se (mean)'."""
        kind = self.found.reductions[node.name][0]
        if node.op == "call_module":
            return f"{node.target} ({kind})"
        stack = node.meta.get("nn_module_stack")
        path = list(stack.values())[-1][0] if stack else ""
        return f"{path} ({kind})" if path else f"{kind} (at {node.name})"

    def _where(self, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack")
        if stack:
            return f"{list(stack.values())[-1][0]} ({node.name})"
        return node.name

    # -- building -----------------------------------------------------------------------------

    def build(self, n_axes: int) -> Program:
        groups = self.groups()
        wanted = self.wanted(groups)
        # A stream part owns its outputs together, so they must share a grid: one part per
        # stride; and it reads one grid: coarser inputs are recomputed from finer ones.
        split: list[tuple[str, int, list[torch.fx.Node]]] = []
        hands_on: list[set[torch.fx.Node]] = []  # what each part may hand on
        for kind, level, own in groups:
            if kind == "reduce":
                split.append((kind, level, own))
                hands_on.append(set(own))
                continue
            for outputs in self.by_stride([n for n in own if n in wanted]):
                split.append((kind, level, self.one_grid(self._ancestors(own, outputs))))
                hands_on.append(set(outputs))
        wanted = self.wanted(split)
        self.designate(split, hands_on, wanted)
        # Where a segment that a statistic ends ends, for people: before that statistic.
        before: dict[torch.fx.Node, str] = {}
        for kind, _, own in split:
            if kind == "reduce":
                first = next((n for n in own if n.name in self.found.reductions), None)
                for read in self.closure(own)[1]:
                    if first is not None:
                        before.setdefault(read, f"before {self._reduction_where(first)}")
        parts: list[Part] = []
        maps: dict[str, MapValue] = {self.image.name: self.map_value(self.image)}
        for (kind, level, own), mine in zip(split, hands_on, strict=True):
            outputs = [n for n in own if n in wanted and n in mine]
            if kind == "reduce":
                parts.append(self.reduce_part(own, outputs, level))
            elif outputs:
                where = next((before[n] for n in outputs if n in before), None)
                part, values = self.stream_part(own, outputs, level, n_axes, where)
                parts.append(part)
                maps.update(values)
        if len(parts) > 1:
            self.refuse_views()
        geometry = self.whole
        reductions = tuple(
            Reduction(name, kind, source, self._reduction_where(self._node(name)))
            for name, (kind, source) in self.found.reductions.items()
            if self._node(name) in self.live
        )  # fmt: skip
        return Program(tuple(parts), maps, self.image.name, self.result.name, geometry,
                       reductions)  # fmt: skip

    def designate(
        self,
        split: Sequence[tuple[str, int, list[torch.fx.Node]]],
        hands_on: list[set[torch.fx.Node]],
        wanted: set[torch.fx.Node],
    ) -> None:
        """Give every wanted map a part that hands it on: one that computes it among maps of
        its own grid (recomputing a coarse map from a finer one makes a part read maps that
        no part handed on before)."""
        given = set().union(*hands_on)
        for node in wanted:
            if node in given or self.kind[node] != "map" or node is self.image:
                continue
            key = self._key(node)
            for (kind, _, own), mine in zip(split, hands_on, strict=True):
                if kind == "stream" and node in own and all(self._key(n) == key for n in mine):
                    mine.add(node)
                    break
            else:
                raise UnsupportedLayerError(
                    self._where(node), "no segment computes it on the grid of the maps it hands "
                    "on", "end the trunk before it (split the model there)", node.name,
                )  # fmt: skip

    def _key(self, node: torch.fx.Node) -> tuple[object, ...]:
        value = self.map_value(node)
        return (value.stride, self._lengths(value.node))

    def refuse_views(self) -> None:
        """An in-place change of part of a map (``x[:, :8].relu_()``) changes the map it
        views; parts that keep maps whole and crop them would not see it."""
        for node in self.nodes:
            if node.meta.get(INPLACE_VIEW):
                raise UnsupportedLayerError(
                    self._where(node),
                    "it changes part of a map in place (a view or slice), which the segments "
                    "that statistics of whole maps make would not see",
                    "make it out of place (e.g. torch.cat of the changed and unchanged parts)",
                    node.name,
                )

    def wanted(self, groups: Sequence[tuple[str, int, list[torch.fx.Node]]]
               ) -> set[torch.fx.Node]:  # fmt: skip
        """What some part reads from another (and the result): what parts hand on."""
        wanted: set[torch.fx.Node] = {self.result}
        for _, _, own in groups:
            wanted.update(self.closure(own)[1])
        return wanted

    def one_grid(self, own: list[torch.fx.Node]) -> list[torch.fx.Node]:
        """``own`` and, when it reads maps of several strides, the nodes that recompute the
        coarser ones from maps of the finest stride it reads (e.g. a downsampling shortcut
        from the block's input)."""
        reads = [n for n in self.closure(own)[1] if self.kind[n] == "map"]
        strides = {n: self.map_value(n).stride for n in reads}
        if len(set(strides.values())) <= 1:
            return own
        target = min(strides.values(), key=lambda s: (math.prod(s), s))
        mine = set(own)
        todo = [n for n in reads if strides[n] != target]
        while todo:
            node = todo.pop()
            if node in mine:
                continue
            value = self.found.values.get(node.name)
            if not isinstance(value, int):
                return own  # a tuple of maps: refused later
            stride = self.strides[value]
            if stride == target:
                continue
            if node is self.image or any(a < t for a, t in zip(stride, target, strict=True)):
                return own  # no map of that stride to recompute it from: refused later
            mine.add(node)
            todo.extend(a for a in node.all_input_nodes if self.kind[a] == "map")
        return sorted(mine, key=self.order.get)

    def _node(self, name: str) -> torch.fx.Node:
        return next(n for n in self.nodes if n.name == name)

    def by_stride(self, outputs: Sequence[torch.fx.Node]) -> list[list[torch.fx.Node]]:
        """Outputs grouped by their stride and length (each group is owned together, so its
        maps must have one size whatever the image's: an unpadded convolution next to a
        padded one is another group)."""
        groups: dict[tuple[object, ...], list[torch.fx.Node]] = {}
        for node in outputs:
            groups.setdefault(self._key(node), []).append(node)
        return list(groups.values())

    def _lengths(self, index: int) -> tuple[int, ...]:
        """A map's lengths for a run of image sizes (one period of every stride, far from
        the smallest): equal for maps of one size whatever the image's."""
        geometry = self.whole
        lengths = []
        for axis, align in enumerate(geometry.align):
            for n in range(64 * align, 66 * align):
                try:
                    lengths.append(geometry.node_lengths(axis, n)[index])
                except GeometryError:
                    lengths.append(-1)
        return tuple(lengths)

    def _ancestors(self, own: Sequence[torch.fx.Node], outputs: Sequence[torch.fx.Node]
                   ) -> list[torch.fx.Node]:  # fmt: skip
        """The part of ``own`` that ``outputs`` need."""
        mine = set(own)
        needed: set[torch.fx.Node] = set()
        todo = list(outputs)
        while todo:
            node = todo.pop()
            if node in needed:
                continue
            needed.add(node)
            todo.extend(a for a in node.all_input_nodes if a in mine)
        return [n for n in own if n in needed]

    def stream_part(self, own: Sequence[torch.fx.Node], outputs: Sequence[torch.fx.Node],
                    level: int, n_axes: int, where: str | None = None,
                    ) -> tuple[StreamPart, dict[str, MapValue]]:  # fmt: skip
        own = self._ancestors(own, outputs)
        runs, reads = self.closure(own)
        inputs = [n for n in reads if self.kind[n] == "map"]
        stats = [n for n in reads if self.kind[n] != "map"]
        values = {n.name: self.map_value(n) for n in (*inputs, *outputs)}
        strides = {values[n.name].stride for n in inputs}
        last = self._where(outputs[-1])
        if len(strides) > 1:
            raise UnsupportedLayerError(
                last,
                f"the maps it reads after a statistic have different strides "
                f"{sorted(strides)}, and a segment streams one position grid",
                "end the trunk before it (split the model there), or open an issue with the model",
                outputs[-1].name,
            )
        module = _module(self.gm, runs, [*inputs, *stats], outputs, f"Stream{level}")
        graph = self.found.graph
        inner = sorted(i for n in own if (i := self._spatial(n)) is not None)
        sub = graph.subgraph([values[n.name].node for n in inputs], inner,
                             [values[n.name].node for n in outputs])  # fmt: skip
        geometry = TrunkGeometry.from_graph(sub)
        part = StreamPart(
            module, tuple(n.name for n in inputs), tuple(n.name for n in stats),
            tuple(n.name for n in outputs), geometry, values[inputs[0].name].stride,
            where or last, level, _changes_inputs(module),
        )  # fmt: skip
        return part, values

    def _spatial(self, node: torch.fx.Node) -> int | None:
        """The spatial node that ``node`` made, if any (a map, or a tuple of maps)."""
        value = self.found.values.get(node.name)
        index = value.node if isinstance(value, Maps) else value
        if isinstance(index, int) and self.found.graph.nodes[index].name == node.name:
            return index
        return None

    def reduce_part(self, own: Sequence[torch.fx.Node], outputs: Sequence[torch.fx.Node],
                    level: int) -> ReducePart:  # fmt: skip
        runs, reads = self.closure(own)
        inputs = [n for n in reads if self.kind[n] == "map"]
        stats = [n for n in reads if self.kind[n] != "map"]
        module = _module(self.gm, runs, [*inputs, *stats], outputs, f"Statistics{level}")
        effects = [n for n in own if self.kind[n] == "effect"]
        pure = self._ancestors(own, outputs)
        grad_runs, _ = self.closure(pure)
        # The same signature as ``module``: inputs that only the effects read are ignored.
        grad_module = _module(self.gm, grad_runs, [*inputs, *stats], outputs,
                              f"Statistics{level}")  # fmt: skip
        mine = {n.name for n in own}
        reductions = tuple(
            Reduction(name, kind, source, self._reduction_where(self._node(name)))
            for name, (kind, source) in self.found.reductions.items()
            if name in mine
        )  # fmt: skip
        return ReducePart(module, grad_module, tuple(n.name for n in inputs),
                          tuple(n.name for n in stats), tuple(n.name for n in outputs),
                          reductions, level, len(effects))  # fmt: skip


def _module(gm: torch.fx.GraphModule, runs: Sequence[torch.fx.Node],
            inputs: Sequence[torch.fx.Node], outputs: Sequence[torch.fx.Node], name: str
            ) -> torch.fx.GraphModule:  # fmt: skip
    """A graph module of ``runs`` (in order) taking ``inputs`` and returning ``outputs`` as a
    tuple; it shares ``gm``'s parameters and buffers."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
    for node in runs:
        if node.op == "placeholder":
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    return torch.fx.GraphModule(gm, graph, class_name=name)


def _changes_inputs(module: torch.fx.GraphModule) -> bool:
    """Whether a part's code changes one of its inputs in place. In-place operations on
    computed values were made out of place (``executor.trace.functionalize``); what is left
    is a module built with ``inplace=True`` applied to an input, and changes of views."""
    for node in module.graph.nodes:
        if node.meta.get(INPLACE_VIEW):
            return True
        source = node.args[0] if node.args else None
        if node.op != "call_module" or not isinstance(source, torch.fx.Node):
            continue
        if source.op == "placeholder" and getattr(module.get_submodule(str(node.target)),
                                                  "inplace", False) is True:  # fmt: skip
            return True
    return False


def build_program(trunk: nn.Module, n_axes: int = 2, cuts: Sequence[str] = ()) -> Program:
    """The trunk as a program of parts (see [Program]).

    Args:
        trunk: the streamed trunk (traced, never modified).
        n_axes: spatial axes of its input.
        cuts: nodes after which to cut a stream part in two (points where one map flows on,
            ``executor.map_cut_points``); cuts at the end of a part change nothing.

    Raises:
        UnsupportedLayerError: the trunk cannot be streamed, not even with statistics.
    """
    found = classify(traced_trunk(trunk), n_axes)
    return _Builder(found, cuts).build(n_axes)
