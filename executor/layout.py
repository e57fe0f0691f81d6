"""How a trunk's code moves and selects tensor dims, and when that stays local.

A map's spatial dims may move (permute, channels-last), and the other dims may be split,
merged, selected or reduced (channel splits and shuffles, reductions over channels): each
position still depends on itself only. These handlers follow the spatial dims through such
ops and refuse the ones that merge, select or reduce along them. They are part of
``executor.classify``'s builder, which provides ``nodes``, ``env``, ``concrete``, ``refuse``,
``add``, ``pointwise`` and ``check_sizes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch.fx

from executor.values import (
    Const,
    Flat,
    Maps,
    NotConstantError,
    PositionCount,
    SizeDep,
    SpatialSize,
    Value,
    as_list,
)

if TYPE_CHECKING:
    from executor.graph import SpatialNode

__all__ = ["LayoutOps"]

GLOBAL = "it needs the whole map (global context), which a tile does not have"


class LayoutOps:
    """Handlers of dim-moving ops (a mixin of the classifier's builder)."""

    nodes: list[SpatialNode]
    grids: list[int]
    env: dict[torch.fx.Node, Value]

    def reshaped(self, node: torch.fx.Node, src: int, dims: tuple[int, ...], rank: int) -> None:
        """A pointwise node whose spatial dims moved (permute, reshape, reduction)."""
        self.add(node, [src], None, dims, rank)  # type: ignore[attr-defined]

    def permute(self, node: torch.fx.Node, src: int, method: str, args: Sequence[Any]) -> None:
        rank = self.nodes[src].rank
        old = self.nodes[src].spatial_dims
        try:
            values = [int(a) if not isinstance(a, list | tuple) else a for a in self.concrete(args)]
        except (NotConstantError, TypeError, ValueError):
            self.refuse(node, f"'{method}' with dims computed at run time")
        if method == "permute":
            order = [d % rank for d in (values[0] if len(values) == 1 else values)]
        elif method in ("movedim", "moveaxis"):
            order = list(range(rank))
            srcs, dsts = (as_list(values[0]), as_list(values[1]))
            moved = [s % rank for s in srcs]
            rest = [d for d in order if d not in moved]
            order = [-1] * rank
            for s, d in zip(moved, dsts, strict=True):
                order[d % rank] = s
            fill = iter(rest)
            order = [o if o >= 0 else next(fill) for o in order]
        else:  # transpose / swapaxes / swapdims
            a, b = values[0] % rank, values[1] % rank
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
        self.reshaped(node, src, tuple(order.index(d) for d in old), rank)

    def cat(self, node: torch.fx.Node, inputs: list[int], dim: Any, stack: bool = False) -> None:
        src = self.nodes[inputs[0]]
        rank = src.rank + int(stack)
        try:
            dim = int(self.concrete(dim)) % rank
        except (NotConstantError, TypeError, ValueError):
            self.refuse(node, "concatenation along a dim computed at run time")
        if stack:
            dims = tuple(d + 1 if d >= dim else d for d in src.spatial_dims)
            self.check_sizes(node)
            self.add(node, inputs, None, dims, rank)
            return
        if dim in src.spatial_dims or dim == 0:
            self.refuse(
                node,
                f"concatenation along dim {dim} (a spatial or batch axis)",
                "concatenate along channels only",
            )
        self.pointwise(node, inputs)

    def reduce(self, node: torch.fx.Node, src: int, what: str, dim: Any, keepdim: Any) -> None:
        """A reduction (mean, max, norm...): local when it reduces over channels only."""
        source = self.nodes[src]
        try:
            dims = self.concrete(dim)
            keep = bool(self.concrete(keepdim))
        except NotConstantError:
            self.refuse(node, f"'{what}' over dims computed at run time")
        if dims is None or dims == [] or dims == ():
            reduced = set(range(source.rank))
        else:
            reduced = {int(d) % source.rank for d in as_list(dims)}
        spatial = reduced & set(source.spatial_dims)
        if spatial == set(source.spatial_dims):
            if what in ("argmax", "argmin"):
                self.refuse(node, f"'{what}' over the positions gives a position, not a "
                            "differentiable statistic")  # fmt: skip
            self.statistic(node, src, what)  # type: ignore[attr-defined]
            return
        if spatial:
            self.refuse(
                node,
                f"'{what}' over spatial dims {tuple(sorted(spatial))} but not all of them "
                f"keeps positions along the others (e.g. coordinate attention): {GLOBAL}",
            )
        if keep:
            self.reshaped(node, src, source.spatial_dims, source.rank)
        else:
            new = tuple(d - sum(1 for r in reduced if r < d) for d in source.spatial_dims)
            self.reshaped(node, src, new, source.rank - len(reduced))

    def split(self, node: torch.fx.Node, src: int, what: str, dim: Any) -> None:
        """split/chunk/unbind along a non-spatial dim: a tuple of maps."""
        source = self.nodes[src]
        try:
            d = int(self.concrete(dim)) % source.rank
        except (NotConstantError, TypeError, ValueError):
            self.refuse(node, f"'{what}' along a dim computed at run time")
        if d in source.spatial_dims:
            self.refuse(node, f"'{what}' along spatial dim {d} cuts the map into regions")
        self.check_sizes(node)
        if what == "unbind":
            dims = tuple(x - 1 if x > d else x for x in source.spatial_dims)
            index = self.add(node, [src], None, dims, source.rank - 1)
        else:
            index = self.add(node, [src], None, source.spatial_dims, source.rank)
        self.env[node] = Maps(index)

    def index(self, node: torch.fx.Node, src: int, key: Any) -> None:
        """Indexing a map: allowed when every spatial dim is taken whole."""
        source = self.nodes[src]
        try:
            key = self.concrete(key)
        except NotConstantError:
            self.refuse(node, "indexing with values computed at run time")
        items = list(key) if isinstance(key, tuple) else [key]
        if any(isinstance(k, torch.Tensor | list) for k in items):
            self.refuse(node, "indexing with tensors or lists (advanced indexing)")
        consumed = sum(1 for k in items if k is not None and k is not Ellipsis)
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items[at : at + 1] = [slice(None)] * (source.rank - consumed)
        items += [slice(None)] * (source.rank - sum(1 for k in items if k is not None))
        dim, out, mapping = 0, 0, {}
        for k in items:
            if k is None:
                out += 1
                continue
            if dim in source.spatial_dims:
                if k != slice(None):
                    self.refuse(node, f"indexing along spatial dim {dim} selects a region")
                mapping[dim] = out
            if not isinstance(k, int):
                out += 1
            dim += 1
        self.reshaped(node, src, tuple(mapping[d] for d in source.spatial_dims), out)

    def squeeze(self, node: torch.fx.Node, src: int, method: str, args: Sequence[Any],
                kwargs: dict[str, Any]) -> None:  # fmt: skip
        """squeeze/unsqueeze of a named non-spatial dim."""
        source = self.nodes[src]
        rank, dims = source.rank, source.spatial_dims
        d = self.concrete(args[0] if args else kwargs.get("dim"))
        if d is None:
            self.refuse(node, "squeeze() of every size-1 dim may squeeze a spatial one",
                        "name the dim to squeeze")  # fmt: skip
        if method == "unsqueeze":
            d = int(d) % (rank + 1)
            self.reshaped(node, src, tuple(x + 1 if x >= d else x for x in dims), rank + 1)
            return
        d = int(d) % rank
        if d in dims:
            self.refuse(node, f"squeezing spatial dim {d}")
        self.reshaped(node, src, tuple(x - 1 if x > d else x for x in dims), rank - 1)

    def flatten(self, node: torch.fx.Node, src: int, method: str, args: Sequence[Any],
                kwargs: dict[str, Any]) -> None:  # fmt: skip
        """flatten of a range of non-spatial dims."""
        source = self.nodes[src]
        rank, dims = source.rank, source.spatial_dims
        start = int(self.concrete(args[0] if args else kwargs.get("start_dim", 0))) % rank
        end = int(self.concrete(args[1] if len(args) > 1 else kwargs.get("end_dim", -1))) % rank
        if tuple(range(start, end + 1)) == tuple(sorted(dims)) and len(dims) > 1:
            # Every spatial dim and nothing else: the map's positions in one dim.
            self.positions(node, src, "flatten to positions", start, rank - (end - start))
            return
        if end > start and any(start <= d <= end for d in dims):
            self.refuse(node, f"flattening dims {start}..{end} merges spatial positions")
        new = tuple(d - (end - start) if d > end else d for d in dims)
        self.reshaped(node, src, new, rank - max(end - start, 0))

    def reshape(self, node: torch.fx.Node, src: int, method: str, args: Sequence[Any],
                kwargs: dict[str, Any]) -> None:  # fmt: skip
        """view/reshape that keeps the map's spatial sizes, unchanged, as its last dims (e.g. a
        channel shuffle ``x.view(n, g, c // g, h, w)``)."""
        source = self.nodes[src]
        rank, dims = source.rank, source.spatial_dims
        shape = args[0] if len(args) == 1 and isinstance(args[0], list | tuple) else args
        values: list[Value] = []
        for a in shape:
            value = self.env[a] if isinstance(a, torch.fx.Node) else Const(a)
            values += list(value) if isinstance(value, tuple) else [value]
        n = len(dims)
        everything = PositionCount(self.grids[src], frozenset(range(n)))
        if values and values[-1] == everything and dims == tuple(range(rank - n, rank)):
            if any(isinstance(v, SizeDep) for v in values[:-1]):
                self.refuse(node, f"'{method}' merges spatial positions into other dims")
            self.positions(node, src, f"{method} to positions", len(values) - 1, len(values))
            return
        expected = [SpatialSize(self.grids[src], axis) for axis in range(n)]
        if dims != tuple(range(rank - n, rank)) or values[-n:] != expected:
            self.refuse(
                node,
                f"'{method}' changes the spatial dims (only reshapes of the channel dims that "
                "keep x.shape's spatial sizes as the last dims are local)",
            )
        if any(isinstance(v, SizeDep) for v in values[:-n]):
            self.refuse(node, f"'{method}' merges spatial positions into other dims")
        self.reshaped(node, src, tuple(range(len(values) - n, len(values))), len(values))

    def positions(self, node: torch.fx.Node, src: int, what: str, dim: int, rank: int) -> None:
        """A map flattened into one dim of positions (attention pooling): only whole-map
        computations may use it, so it is where the map becomes a statistic."""
        self.check_sizes(node, allowed=(PositionCount(self.grids[src], frozenset(
            range(len(self.nodes[src].spatial_dims)))),))  # fmt: skip
        self.env[node] = Flat(dim, rank)
        self.reductions[node.name] = (what, self.nodes[src].name)  # type: ignore[attr-defined]

    def narrow(self, node: torch.fx.Node, src: int, dim: Any) -> None:
        """narrow along a non-spatial dim: a pointwise selection of channels."""
        source = self.nodes[src]
        try:
            d = int(self.concrete(dim)) % source.rank
        except (NotConstantError, TypeError, ValueError):
            self.refuse(node, "narrow along a dim computed at run time")
        if d in source.spatial_dims:
            self.refuse(node, f"narrow along spatial dim {d} selects a region")
        self.pointwise(node, [src])
