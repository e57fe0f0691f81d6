"""CUDA: image on the host, trunk on the GPU; autocast. Run with `pytest -m gpu` on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from executor import StreamingCNN
from tests.oracle import assert_exact, compare_with_conventional

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _trunk() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
    ).eval()  # fmt: skip


def test_host_image_cuda_trunk_is_exact() -> None:
    trunk = _trunk().double().cuda()
    image = torch.randn(1, 3, 300, 260, dtype=torch.float64)  # stays on the host
    scnn = StreamingCNN(trunk, (96, 96), input_grad=True)
    out = scnn.forward(image)
    assert out.device.type == "cuda"
    grad_out = torch.randn_like(out)
    input_grad = scnn.backward(image, grad_out)
    assert input_grad is not None
    assert input_grad.device.type == "cpu"
    streamed = {n: p.grad.clone() for n, p in trunk.named_parameters()}
    trunk.zero_grad(set_to_none=True)
    x = image.cuda().requires_grad_()
    ref = trunk(x)
    ref.backward(grad_out)
    assert_exact(out, ref.detach(), "output")
    assert_exact(input_grad, x.grad.cpu(), "input grad")
    for name, p in trunk.named_parameters():
        assert_exact(streamed[name], p.grad, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cuda(dtype: torch.dtype) -> None:
    """Autocast tiles on the GPU are as accurate (vs float64) as an autocast conventional pass."""
    trunk = _trunk().cuda()
    image = torch.randn(1, 3, 256, 256, device="cuda")
    result = compare_with_conventional(trunk, image, (96, 96), dtype=torch.float32, amp_dtype=dtype)
    assert result.n_tiles > 1
