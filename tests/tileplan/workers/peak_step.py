"""The peak of one streamed training step, in a fresh process: through ``tileplan.stream`` and
``loss.backward()`` (``dropin``) or through the engine's manual pair (``manual``).

Usage: python -m tests.tileplan.workers.peak_step MODE PLAN MODEL_SOURCE
Prints ``peak_bytes`` (live tensor storage, ``LiveBytes``) of the step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import tileplan
from executor import StreamingCNN
from tileplan.planning.estimate import LiveBytes


def main() -> None:
    mode, plan_path, source = sys.argv[1], sys.argv[2], Path(sys.argv[3]).read_text()
    namespace: dict[str, object] = {}
    exec(source, namespace)
    model: nn.Module = namespace["build_model"]()  # type: ignore[operator]
    plan = tileplan.load_plan(plan_path)
    net = tileplan.stream(model, plan).train()
    torch.manual_seed(0)
    image = torch.randn(1, plan.channels, *plan.image_shape_px)
    target = torch.tensor([1])
    scnn: StreamingCNN = net.engine
    head = net.head
    with LiveBytes() as live:
        if mode == "dropin":
            loss = nn.functional.cross_entropy(net(image), target)
            loss.backward()
        else:
            features = scnn.forward(image).requires_grad_()
            nn.functional.cross_entropy(head(features), target).backward()
            grad = features.grad
            del features
            scnn.backward(image, grad)
    print(live.peak)


if __name__ == "__main__":
    main()
