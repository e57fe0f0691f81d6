"""CUDA paths of the planner and of training: allocator measurements, a verified plan, training
under autocast (bfloat16, and float16 with a loss scale), the report and prediction.

Run with ``pytest -m gpu`` on a machine with a CUDA device (``bench/gpu_check.sh`` does).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from executor import VerifyStatus, load_plan
from tileplan.cli import cli
from tileplan.planning.estimate import pass_peak
from tileplan.planning.measure import MeasureSpec, device_info, measure_peak
from tileplan.planning.model_file import load_model_file
from tileplan.run.report import load_metrics, load_report

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROOT = Path(__file__).resolve().parents[2]
RESNET18 = ROOT / "examples" / "resnet18.py"


def _run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def test_device_info_reads_the_gpu() -> None:
    info = device_info("cuda")
    assert info.device == "cuda:0"
    assert info.total_bytes > 0
    assert 0 < info.available_bytes <= info.total_bytes


def test_allocator_measurements_of_tiles_and_steps() -> None:
    """Backward tiles measured with the caching allocator are near the meta-tensor estimate,
    and a whole streaming step's peak includes the model state."""
    crops = ((1, 3, 1024, 1024), (1, 3, 1536, 1536))
    spec = MeasureSpec(model_file=str(RESNET18), split="auto", mode="tiles", shape=crops[0],
                       dtype="float32", device="cuda:0", shapes=crops)  # fmt: skip
    measured = measure_peak(spec)
    assert measured.ok, measured.error
    trunk = load_model_file(RESNET18).trunk
    for crop, peak in measured.tiles:
        estimate = pass_peak(trunk, crop, torch.float32, grad=True)[0]
        print(f"tile {crop[2]} px: measured {peak / 2**20:.0f} MiB, estimate "
              f"{estimate / 2**20:.0f} MiB ({peak / estimate - 1:+.1%})")  # fmt: skip
        assert 0.5 < peak / estimate < 2.0  # the +-10% bar is measured by bench_planner
    step = MeasureSpec(model_file=str(RESNET18), split="auto", mode="step",
                       shape=(1, 3, 2048, 2048), dtype="bfloat16", device="cuda:0",
                       tile=(1024, 1024), forward_tile=(1024, 1024))  # fmt: skip
    result = measure_peak(step)
    assert result.ok, result.error
    assert result.peak_bytes is not None
    assert result.peak_bytes > sum(p.numel() * 4 for p in trunk.parameters())
    assert result.reserved_bytes is not None
    # A step's peak is what the caching allocator reserved, when that is more than allocated.
    assert result.peak_bytes >= result.reserved_bytes
    assert result.timeline


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpu")
    code, out = _run("demo-data", root / "demo", "--n", 8, "--size", 512, "--seed", 2)
    assert code == 0, out
    return root


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_plan_verify_train_report_predict_on_cuda(workspace: Path, dtype: str) -> None:
    plan_file = workspace / f"plan_{dtype}.yaml"
    code, out = _run("profile", RESNET18, "--image", 512, "--device", "cuda", "--dtype", dtype,
                     "--budget", "2GiB", "--verify", "--out", plan_file)  # fmt: skip
    assert code == 0, out
    plan = load_plan(plan_file)
    assert plan.verification.status == VerifyStatus.VERIFIED
    assert plan.verification.device == "cuda:0"
    assert plan.time_fit is not None
    run = workspace / f"run_{dtype}"
    code, out = _run("train", RESNET18, "--plan", plan_file, "--data",
                     workspace / "demo" / "train.csv", "--val", workspace / "demo" / "val.csv",
                     "--out", run, "--epochs", 2, "--batch", 2, "--num-workers", 0,
                     "--device", "cuda", "--lr", 1e-4)  # fmt: skip
    assert code == 0, out
    assert all(math.isfinite(m.train_loss) for m in load_metrics(run))
    report = load_report(run)
    assert report.measurement == "cuda_allocator"
    assert report.device == "cuda:0"
    assert report.conventional_measured  # a 512 px conventional step fits any GPU
    image = sorted((workspace / "demo").glob("*.tif"))[0]
    code, out = _run("predict", RESNET18, image, "--plan", plan_file, "--checkpoint",
                     run / "last.pt", "--device", "cuda", "--saliency",
                     workspace / f"maps_{dtype}")  # fmt: skip
    assert code == 0, out
    assert (workspace / f"maps_{dtype}" / f"{image.stem}.saliency.npy").is_file()


def test_a_slide_streams_from_disk_to_the_gpu_as_its_pixels_do(tmp_path: Path) -> None:
    """Crops read from a JPEG slide on the host feed a trunk on the GPU: the same output and
    gradients, bit for bit, as the slide's pixels held as one host tensor."""
    from executor import StreamingCNN
    from tileplan.run.demo_slides import write_svs
    from tileplan.run.slides import SlideSource, choose_region, open_pyramid

    pyramid = open_pyramid(write_svs(tmp_path / "s.svs", 3000, 2600, mpp=0.25, seed=3))
    source = SlideSource(pyramid, choose_region(pyramid, mpp=0.5))
    pixels = source.read_all()
    trunk = load_model_file(RESNET18).trunk.cuda()
    results = []
    for image in (pixels, source):
        scnn = StreamingCNN(trunk, 768, preprocess=lambda c: c.float() / 255)
        trunk.zero_grad(set_to_none=True)
        out = scnn.forward(image).requires_grad_()
        out.square().mean().backward()
        scnn.backward(image, out.grad)
        results.append((out.detach(), [p.grad.clone() for p in trunk.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert out_a.is_cuda
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


def test_stream_with_the_image_on_the_host_equals_conventional_on_the_gpu() -> None:
    """``tileplan.stream`` with the trunk on the GPU and the image on the host (crops move one
    at a time): output and every gradient equal the conventional pass on the GPU (float64)."""
    import copy

    import tileplan
    from tests.oracle import assert_exact
    from tests.tileplan.conftest import TINY_GLOBAL_MODEL

    namespace: dict[str, object] = {}
    exec(TINY_GLOBAL_MODEL, namespace)
    model = namespace["build_model"]().double()  # type: ignore[operator]
    plan = tileplan.profile(model, image=256, budget="2GiB", measure=False, dtype="float64",
                            max_tile=96, bn="train", device="cuda")  # fmt: skip
    model = model.cuda()
    ref = copy.deepcopy(model)
    net = tileplan.stream(model, plan).train()
    ref.train()
    image = torch.randn(2, 3, 256, 256, dtype=torch.float64)  # on the host
    target = torch.tensor([0, 1], device="cuda")
    out = net(image)
    torch.nn.functional.cross_entropy(out, target).backward()
    out_ref = ref(image.cuda())
    torch.nn.functional.cross_entropy(out_ref, target).backward()
    assert_exact(out.detach(), out_ref.detach(), "output")
    grads = {n: p.grad for n, p in ref.named_parameters()}
    largest = max(g.abs().max().item() for g in grads.values())
    for name, p in model.named_parameters():
        assert_exact(p.grad, grads[name], f"grad of {name}", largest)
