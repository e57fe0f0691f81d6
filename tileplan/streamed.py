"""A drop-in streamed model: ``tileplan.stream(model, plan)`` trains in any training loop.

``StreamedModel(image)`` is ``model(image)`` with the trunk streamed as the plan says and the
head run conventionally. The trunk is one autograd node (``executor.stream_trunk``): one
``loss.backward()`` runs the exact streamed backward pass and autograd accumulates every
trunk gradient, so ``DistributedDataParallel``, ``GradScaler``, clipping, accumulation and
Lightning's automatic optimization work as they do for the model itself.

The wrapper holds ``model`` (not a copy): its parameters, buffers and ``state_dict`` (under
``model.``) are the model's. Splitting follows the plan (``plan.model.split_option``, or a
``split`` function); a split is traced per train/eval state of the model's layers, since
code such as timm's ``BatchNormAct2d`` reads ``self.training`` while it is traced.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from executor import (
    ImageSource,
    Plan,
    PlanError,
    StreamingCNN,
    check_fits_plan,
    check_same_model,
    load_plan,
    stream_trunk,
)

__all__ = ["StreamedModel", "inference_engine", "stream"]

log = logging.getLogger(__name__)

SplitFn = Callable[[nn.Module], tuple[nn.Module, nn.Module]]
Image = torch.Tensor | ImageSource


def stream(
    model: nn.Module,
    plan: Plan | str | os.PathLike[str],
    *,
    split: SplitFn | None = None,
    **engine: Any,
) -> StreamedModel:
    """Wrap ``model`` so that its trunk streams as ``plan`` says (see ``StreamedModel``).

    Args:
        model: the whole network the plan was made for, in the plan's parameter dtype.
        plan: a ``Plan`` or the path of a plan file (``tileplan profile``).
        split: the model file's ``split(model) -> (trunk, head)`` when the plan was made with
            one (default: split as the plan says).
        engine: keyword arguments of ``StreamingCNN`` (``progress``, ``preprocess``,
            ``output_device``, ``read_ahead``, ``cache_last_tile``).

    Raises:
        PlanError: the plan is for another model, or a geometry the trunk does not have.

    Example:
        >>> net = tileplan.stream(model, "plan.yaml")
        >>> loss = criterion(net(image), target)
        >>> loss.backward()  # exact gradients in model's parameters' .grad
    """
    return StreamedModel(model, plan, split=split, **engine)


class StreamedModel(nn.Module):
    """``model`` with its trunk streamed tile by tile; an ``nn.Module`` like any other.

    ``forward(image)`` takes an (N, C, *spatial) tensor (on any device: the host with the model
    on a GPU streams crop by crop) or an ``ImageSource`` (a slide read region by region), up to
    the plan's image size on every axis. With grad mode on, the trunk's backward is the exact
    streamed backward; under ``torch.no_grad()`` only the streamed forward runs. An image
    that requires grad gets its exact gradient (saliency).

    ``train()`` puts the model in train mode with BatchNorm as the plan says: a plan made with
    ``--bn frozen`` keeps BatchNorm layers in eval mode (running statistics, affine weights
    still trained); ``--bn train`` trains them with batch statistics. ``eval()`` streams the
    eval-mode model (running statistics) with the plan's forward tile.
    """

    def __init__(self, model: nn.Module, plan: Plan | str | os.PathLike[str], *,
                 split: SplitFn | None = None, **engine: Any) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.plan = plan if isinstance(plan, Plan) else load_plan(plan)
        self._split_fn = split
        self._engine_kwargs = engine
        # One (engine, head) per train/eval state of the model's layers (traced in that state),
        # for the model's tensors as they are (``.to()`` or an assigning load replaces them).
        self._engines: dict[tuple[bool, ...], tuple[StreamingCNN, nn.Module]] = {}
        self._tensors: tuple[int, ...] = ()
        self.train(model.training)
        self._parts()  # refuse a plan for another model now, not at the first step

    # -- nn.Module ------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles (``copy.deepcopy`` for an EMA, ``ddp_spawn``) leave the engines
        behind: a copy builds its own, on its own model, at its first forward."""
        return {**self.__dict__, "_engines": {}}

    def train(self, mode: bool = True) -> StreamedModel:
        """Train mode, with BatchNorm in the plan's mode (see the class docstring)."""
        from tileplan.planning.model_file import set_batch_norm

        super().train(mode)
        if mode and self.plan.batch_norm == "frozen":
            set_batch_norm(self.model, "frozen")
        return self

    def forward(self, image: Image) -> torch.Tensor:
        """``model(image)``, the trunk streamed; see the class docstring."""
        scnn, head = self._parts()
        check_fits_plan(tuple(image.shape)[2:], self.plan)
        features = stream_trunk(scnn, image)
        with scnn.autocast():  # a bfloat16/float16 plan: the head as under whole-model autocast
            return head(features)

    # -- the parts ------------------------------------------------------------------------------

    @property
    def engine(self) -> StreamingCNN:
        """The streaming engine for the model's current train/eval state."""
        return self._parts()[0]

    @property
    def trunk(self) -> nn.Module:
        return self._parts()[0].trunk

    @property
    def head(self) -> nn.Module:
        return self._parts()[1]

    def features(self, image: Image) -> torch.Tensor:
        """The trunk's output map for ``image`` (streamed, differentiable)."""
        return stream_trunk(self._parts()[0], image)

    def _parts(self) -> tuple[StreamingCNN, nn.Module]:
        tensors = tuple(map(id, (*self.model.parameters(), *self.model.buffers())))
        if tensors != self._tensors:  # traced code holds the tensors it read: trace again
            self._engines.clear()
            self._tensors = tensors
        key = tuple(m.training for m in self.model.modules())
        found = self._engines.get(key)
        if found is None:
            found = self._engines[key] = self._build()
        return found

    def _build(self) -> tuple[StreamingCNN, nn.Module]:
        from tileplan.planning.model_file import split_model

        plan = self.plan
        trains_bn = any(m.training for m in self.model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm))  # fmt: skip
        if trains_bn and plan.batch_norm == "frozen":
            raise PlanError(
                "the model's BatchNorm layers are in train mode but the plan keeps them frozen "
                "(planned with --bn frozen); call .train() on the streamed model (not on the "
                "model inside it), or plan with `tileplan profile --bn train`"
            )
        if self._split_fn is not None:
            trunk, head = self._split_fn(self.model)
        else:
            option = plan.model.split_option
            parts = split_model(self.model, None if option == "auto" else option, plan.n_axes)
            trunk, head = parts.trunk, parts.head
        if trains_bn or plan.batch_norm == "frozen":
            scnn = StreamingCNN.from_plan(trunk, plan, **self._engine_kwargs)
        else:  # eval mode of a model planned with batch statistics: validation, prediction
            scnn = inference_engine(trunk, plan, **self._engine_kwargs)
        log.debug("streamed model: trunk traced with %s", "train" if self.training else "eval")
        return scnn, head


def inference_engine(trunk: nn.Module, plan: Plan, **kwargs: Any) -> StreamingCNN:
    """An engine for the eval-mode trunk of a plan made for BatchNorm with batch statistics
    (validation, prediction, saliency): the plan's segments do not fit the frozen trunk's, so
    every segment streams the plan's first tiles (backward and forward) in its own positions,
    each at least its smallest tile. Without autograd a forward tile holds less than the
    planned backward tiles."""
    if plan.batch_norm == "frozen":
        return StreamingCNN.from_plan(trunk, plan, **kwargs)
    check_same_model(plan, trunk)  # its segments are another trunk's: the model must match
    kwargs.setdefault("amp_dtype", plan.precision.amp_dtype)
    probe = StreamingCNN(trunk, plan.tile_px, forward_tile_shape=plan.forward_tile_px, **kwargs)
    first = probe.program.streams[0].geometry

    def floor(tile: Sequence[int]) -> tuple[int, ...]:
        return tuple(max(t, first.min_tile(axis)) for axis, t in enumerate(tile))

    tile, forward = floor(plan.tile_px), floor(plan.forward_tile_px)
    if (tile, forward) == (tuple(plan.tile_px), tuple(plan.forward_tile_px)):
        return probe
    return StreamingCNN(trunk, tile, forward_tile_shape=forward, **kwargs)
