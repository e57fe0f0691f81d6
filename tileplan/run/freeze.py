"""``--freeze NAME``: every trunk parameter up to and including module NAME stays fixed.

"Up to" is the order the trunk computes in (its traced graph), not the order modules were
registered in: the frozen parameters are those the trunk's graph uses up to the last node of
NAME. Frozen parameters take no gradient and no optimizer state; with the frozen prefix as
its own segment of the plan (``tileplan profile --cut NAME``), the streamed backward pass never
runs a tile through it (the engine skips parts whose inputs and parameters need no gradient).
"""

from __future__ import annotations

import difflib

from torch import nn

from executor import find_node, prefix, traced_trunk
from tileplan.run.recipe import RecipeError

__all__ = ["freeze_prefix", "frozen_parameters"]


def frozen_parameters(trunk: nn.Module, name: str) -> list[nn.Parameter]:
    """The trunk's parameters that its graph uses up to and including module (or node)
    ``name``, in ``trunk.parameters()`` order.

    Raises:
        RecipeError: ``name`` is no module or node of the trunk (the nearest names offered).
    """
    traced = traced_trunk(trunk)
    node = find_node(traced.gm, name)
    if node is None:
        names = [n for n, _ in trunk.named_modules() if n]
        near = difflib.get_close_matches(name, names, n=3) or names[:3]
        raise RecipeError(f"--freeze {name}: the trunk has no module or node of that name; "
                          f"did you mean {', '.join(near)}?")  # fmt: skip
    used = {id(p) for p in prefix(traced.gm, node.name).parameters()}
    return [p for p in trunk.parameters() if id(p) in used]


def freeze_prefix(trunk: nn.Module, name: str) -> int:
    """Stop the gradient of ``frozen_parameters(trunk, name)``; returns how many elements
    were frozen."""
    frozen = frozen_parameters(trunk, name)
    for p in frozen:
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen)
