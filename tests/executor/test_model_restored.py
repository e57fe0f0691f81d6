"""The user's model is left exactly as it was: after a pass, and after an exception mid-pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from executor import StreamingCNN


class FailOnCall(nn.Module):
    """ReLU that raises on its ``fail_at``-th call (counted from arming)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.fail_at = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return torch.relu(x)


def _trunk() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), FailOnCall(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(inplace=True),
    ).eval()  # fmt: skip


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "modules": [type(m) for m in model.modules()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def _assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    for key in ("modes", "requires_grad", "hooks", "modules"):
        assert before[key] == after[key], key
    for k, v in before["state"].items():  # type: ignore[union-attr]
        assert torch.equal(v, after["state"][k]), k  # type: ignore[index]
    for g0, g1 in zip(before["grads"], after["grads"], strict=True):  # type: ignore[call-overload]
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)


def test_pass_leaves_model_unchanged_but_its_grads() -> None:
    trunk = _trunk()
    before = _snapshot(trunk)
    scnn = StreamingCNN(trunk, (24, 24))
    image = torch.randn(1, 3, 64, 48)
    out = scnn.forward(image)
    scnn.backward(image, torch.ones_like(out))
    after = _snapshot(trunk)
    before["grads"] = after["grads"]  # gradients are the intended effect
    _assert_same(before, after)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("when", ["forward", "backward"])
def test_exception_mid_stream_restores_everything(when: str) -> None:
    trunk = _trunk()
    # Earlier accumulated gradients (e.g. from the previous image of a batch) must survive.
    for p in trunk.parameters():
        p.grad = torch.full_like(p, 0.25)
    scnn = StreamingCNN(trunk, (24, 24))
    image = torch.randn(1, 3, 64, 48)
    out = scnn.forward(image) if when == "backward" else None
    before = _snapshot(trunk)
    fail = trunk[2]
    fail.calls, fail.fail_at = 0, 3  # third tile of the pass
    run = scnn.forward if out is None else lambda im: scnn.backward(im, torch.ones_like(out))
    with pytest.raises(RuntimeError, match="boom"):
        run(image)
    assert torch.is_grad_enabled()
    fail.calls, fail.fail_at = 0, -1
    _assert_same(before, _snapshot(trunk))

    # And the next pass is still exact after the failure.
    out = scnn.forward(image)
    assert torch.allclose(out, trunk(image), atol=1e-6)
