"""The oracle of streamed training: the same run with conventional backprop on whole images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tests.oracle import RTOL_FLOAT64, rel_error
from tileplan.planning.model_file import load_model_file, set_batch_norm
from tileplan.run.data import Dataset
from tileplan.run.trainer import Trainer
from tileplan.settings import RunSpec


def train_conventionally(
    model_file: Path,
    spec: RunSpec,
    trainer: Trainer,
    data: Dataset,
    check: Callable[[int, torch.Tensor], None] = lambda index, image: None,
    image_of: Callable[[int, int], torch.Tensor] | None = None,
) -> nn.Module:
    """Train ``model_file``'s model in float64 with the trainer's data order, the spec's
    normalisation, loss scaling, BatchNorm mode and SGD, on every image of ``data`` read whole
    (or ``image_of(epoch, index)``: e.g. the whole image augmented first);
    ``check(index, image)`` sees each image first."""
    torch.manual_seed(0)
    ref = load_model_file(model_file).model.double().eval()
    set_batch_norm(ref, spec.batch_norm)  # BatchNorm trains with batch statistics, or not
    optimizer = torch.optim.SGD(ref.parameters(), lr=spec.lr, momentum=0.9)
    mean = torch.tensor(spec.normalization.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(spec.normalization.std, dtype=torch.float64).view(1, -1, 1, 1)
    for epoch in range(spec.epochs):
        order = trainer.order(epoch)
        for start in range(0, len(order), spec.batch):
            batch = order[start : start + spec.batch]
            optimizer.zero_grad(set_to_none=True)
            for index in batch:
                image, label = data[index]
                if image_of is not None:
                    image = image_of(epoch, index)
                check(index, image)
                x = (image.unsqueeze(0).double() / 255 - mean) / std  # written out: the oracle
                loss = torch.nn.functional.cross_entropy(ref(x), label.reshape(1).long())
                (loss / len(batch)).backward()
            optimizer.step()
    return ref


def assert_same_weights(streamed: nn.Module, ref: nn.Module) -> None:
    """Every floating-point tensor of the two state dicts (running statistics included)
    agrees to float64 precision, and every other (batch counters) exactly."""
    for (name, a), b in zip(streamed.state_dict().items(), ref.state_dict().values(),
                            strict=True):  # fmt: skip
        if a.is_floating_point():
            assert rel_error(a, b) <= RTOL_FLOAT64, name
        else:
            assert torch.equal(a, b), name
