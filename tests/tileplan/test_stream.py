"""``tileplan.stream``: a streamed model trained by ``loss.backward()`` in an ordinary loop.

Oracle: the same model run conventionally, ``model(image); loss.backward()``: output, every
parameter gradient, the input gradient and running statistics (float64 to 1e-10; autocast by
the oracle's low-precision rule).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import tileplan
from executor import PlanError, StreamingError, TensorSource
from tests.oracle import assert_as_accurate, assert_exact
from tests.tileplan.conftest import TINY_GLOBAL_MODEL, TINY_MODEL

SIZE = 96


def _build(source: str) -> nn.Module:
    namespace: dict[str, object] = {}
    exec(source, namespace)  # a model defined in Python, as in a notebook
    model = namespace["build_model"]()  # type: ignore[operator]
    assert isinstance(model, nn.Module)
    return model


# (model source, profile options): one segment; cut into two; statistics (BatchNorm trained
# with batch statistics, squeeze-excitation, GroupNorm) making four segments.
CASES = {
    "single": (TINY_MODEL, {"tile": 48}),
    "segmented": (TINY_MODEL, {"cut": "features.2", "max_tile": 32}),
    "statistics": (TINY_GLOBAL_MODEL, {"bn": "train", "max_tile": 32}),
}


def _plan(case: str, dtype: str = "float64") -> tuple[nn.Module, tileplan.Plan]:
    source, options = CASES[case]
    model = _build(source)
    plan = tileplan.profile(model, image=SIZE, budget="2GiB", measure=False, dtype=dtype,
                            **options)  # fmt: skip
    if case == "single":
        assert not plan.segments
        assert plan.tile_grids()[0].n_tiles > 1
    else:
        assert len(plan.segments) >= 2
    return (model.double() if dtype == "float64" else model), plan


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, target) + 0.1 * (out**2).mean()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(model: nn.Module, ref: nn.Module, *, grads: bool = True) -> None:
    """Every parameter gradient and floating buffer of ``model`` equals ``ref``'s."""
    got, want = _grads(model), _grads(ref)
    assert set(got) == set(want)
    assert bool(want) == grads
    largest = 0.0 if not grads else max(g.abs().max().item() for g in want.values())
    for name, g in want.items():
        assert_exact(got[name], g, f"grad of {name}", largest)
    buffers = dict(ref.named_buffers())
    for name, b in model.named_buffers():
        if b.is_floating_point():
            assert_exact(b, buffers[name], f"buffer {name}")
        else:
            assert torch.equal(b, buffers[name]), name


def _same_modes(ref: nn.Module, streamed: tileplan.StreamedModel) -> None:
    """``ref`` in the same train/eval state as the streamed model's layers."""
    for a, b in zip(streamed.model.modules(), ref.modules(), strict=True):
        b.train(a.training)


def _streamed(case: str) -> tuple[nn.Module, tileplan.Plan, tileplan.StreamedModel, nn.Module]:
    """``(model, plan, streamed model in train mode, conventional copy in its modes)``."""
    model, plan = _plan(case)
    ref = copy.deepcopy(model)
    net = tileplan.stream(model, plan).train()
    _same_modes(ref, net)
    return model, plan, net, ref


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_backward_is_exact(case: str, batch: int) -> None:
    model, plan, net, ref = _streamed(case)
    assert [id(p) for p in net.parameters()] == [id(p) for p in model.parameters()]
    torch.manual_seed(1)
    image = torch.randn(batch, 3, SIZE, SIZE, dtype=torch.float64)
    target = torch.randint(0, 2, (batch,))

    x = image.clone().requires_grad_()
    out = net(x)
    assert out.grad_fn is not None
    _loss(out, target).backward()
    x_ref = image.clone().requires_grad_()
    out_ref = ref(x_ref)
    _loss(out_ref, target).backward()

    assert_exact(out.detach(), out_ref.detach(), "output")
    assert_exact(x.grad, x_ref.grad, "input grad")
    _assert_same(model, ref)


def test_gradients_accumulate_over_three_backward_calls() -> None:
    model, plan, net, ref = _streamed("statistics")
    torch.manual_seed(2)
    for _ in range(3):
        image = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
        target = torch.randint(0, 2, (2,))
        (_loss(net(image), target) / 3).backward()
        (_loss(ref(image), target) / 3).backward()
    _assert_same(model, ref)


def test_retain_graph_backward_twice_equals_conventional() -> None:
    """A second backward through a retained graph recomputes the kept maps: the gradients
    are summed twice, as autograd sums them."""
    model, plan, net, ref = _streamed("segmented")
    image = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    target = torch.tensor([1])
    for m, inp in ((net, image), (ref, image)):
        loss = _loss(m(inp), target)
        loss.backward(retain_graph=True)
        loss.backward()
    _assert_same(model, ref)


def test_grad_scaler_and_clipping_see_conventional_gradients() -> None:
    model, plan, net, ref = _streamed("statistics")
    image = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    target = torch.tensor([0, 1])
    norms = []
    for m in (model, ref):
        runner = net if m is model else ref
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        scaler.scale(_loss(runner(image), target)).backward()
        scaler.unscale_(optimizer)
        norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), 1e9)))
    assert norms[0] == pytest.approx(norms[1], rel=1e-10)
    _assert_same(model, ref)


def test_bfloat16_plan_is_as_accurate_as_conventional_autocast() -> None:
    model, plan = _plan("segmented", dtype="bfloat16")
    assert plan.precision.amp_dtype == torch.bfloat16
    ref, reference = copy.deepcopy(model), copy.deepcopy(model).double()
    net = tileplan.stream(model, plan).train()
    for other in (ref, reference):
        _same_modes(other, net)
    torch.manual_seed(3)
    image = torch.randn(1, 3, SIZE, SIZE)
    target = torch.tensor([0])
    _loss(net(image).float(), target).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref = ref(image)
    _loss(out_ref.float(), target).backward()
    _loss(reference(image.double()), target).backward()
    want, low, high = _grads(model), _grads(ref), _grads(reference)
    for name in high:
        assert_as_accurate(want[name], low[name], high[name], torch.bfloat16, f"grad of {name}")


def test_no_grad_streams_forward_only() -> None:
    model, plan, net, ref = _streamed("statistics")
    image = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        out, out_ref = net(image), ref(image)
    assert out.grad_fn is None
    assert_exact(out, out_ref, "output")
    _assert_same(model, ref, grads=False)  # running statistics updated once, conventionally
    with torch.inference_mode():
        net.eval()
        ref.eval()
        assert_exact(net(image), ref(image), "eval output")


def test_a_slide_source_streams_like_its_pixels() -> None:
    model, plan, net, ref = _streamed("segmented")
    image = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    target = torch.tensor([1])
    _loss(net(TensorSource(image)), target).backward()
    _loss(ref(image), target).backward()
    _assert_same(model, ref)


@pytest.mark.parametrize(
    ("what", "act", "error"),
    [
        ("image larger than the plan's",
         lambda net: net(torch.randn(1, 3, SIZE + 32, SIZE, dtype=torch.float64)), PlanError),
        ("double backward", lambda net: torch.autograd.grad(
            net(torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)).sum(),
            list(net.parameters())[0], create_graph=True)[0].sum().backward(), RuntimeError),
        ("BatchNorm trained under a frozen plan", lambda net: (net.model.train(), net(
            torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64))), PlanError),
    ],
)  # fmt: skip
def test_refusals(what: str, act: Callable[[tileplan.StreamedModel], object],
                  error: type[Exception]) -> None:  # fmt: skip
    model, plan = _plan("segmented")
    net = tileplan.stream(model, plan).train()
    with pytest.raises(error):
        act(net)


def test_a_plan_for_another_model_is_refused() -> None:
    _, plan = _plan("segmented")
    other = _build(TINY_GLOBAL_MODEL).double()
    with pytest.raises(PlanError, match="different model"):
        tileplan.stream(other, plan)


def test_an_optimizer_step_between_forward_and_backward_is_refused() -> None:
    model, plan = _plan("single")
    net = tileplan.stream(model, plan).train()
    optimizer = torch.optim.SGD(net.trunk.parameters(), lr=0.1)  # the head is left alone
    loss = net(torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)).sum()
    for p in net.trunk.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    with pytest.raises(StreamingError, match="changed in place"):
        loss.backward()


@pytest.mark.parametrize(
    ("source", "options"),
    [(TINY_MODEL, ["--tile", "192"]), (TINY_GLOBAL_MODEL, ["--bn", "train", "--max-tile", "128"])],
)
def test_peak_of_loss_backward_equals_the_manual_pair(
    tmp_path: Path, source: str, options: list[str]
) -> None:
    """Measured in fresh processes (live tensor bytes of one step): the autograd node keeps
    nothing the engine's manual forward/backward pair does not (a scalar's bytes aside)."""
    from click.testing import CliRunner

    from tileplan.cli import cli

    (tmp_path / "model.py").write_text(source)
    result = CliRunner().invoke(cli, ["profile", str(tmp_path / "model.py"), "--image", "512",
                                      *options, "--no-measure", "--budget", "2GiB", "--out",
                                      str(tmp_path / "plan.yaml")])  # fmt: skip
    assert result.exit_code == 0, result.output
    peaks = {}
    for mode in ("dropin", "manual"):
        run = subprocess.run(
            [sys.executable, "-m", "tests.tileplan.workers.peak_step", mode,
             str(tmp_path / "plan.yaml"), str(tmp_path / "model.py")],
            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2],
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[mode] = int(run.stdout.split()[-1])
    assert peaks["manual"] > 1 << 20
    assert abs(peaks["dropin"] - peaks["manual"]) <= 1024, peaks


def test_a_deep_copy_streams_its_own_model() -> None:
    """An EMA or SWA copy (``copy.deepcopy``) trains its own parameters, not the original's."""
    model, plan = _plan("segmented")
    net = tileplan.stream(model, plan).train()
    image = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    net(image).sum().backward()  # engines built
    twin = copy.deepcopy(net)
    model.zero_grad(set_to_none=True)
    twin(image).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    grads = [p.grad for p in twin.parameters()]
    assert all(g is not None for g in grads)


def test_parameter_hooks_run_once_on_the_whole_gradient() -> None:
    """A hook on a trunk parameter (``register_hook``) sees the total, as conventionally:
    the tiles run with hook-free stand-ins of the parameters."""
    model, plan, net, ref = _streamed("segmented")
    seen: dict[str, int] = {"streamed": 0, "conventional": 0}
    for m, key in ((model, "streamed"), (ref, "conventional")):
        bias = m.features[0].bias

        def hook(g: torch.Tensor, key: str = key) -> torch.Tensor:
            seen[key] += 1
            return g * 2

        bias.register_hook(hook)
    image = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    _loss(net(image), torch.tensor([0])).backward()
    _loss(ref(image), torch.tensor([0])).backward()
    assert seen == {"streamed": 1, "conventional": 1}
    _assert_same(model, ref)


def test_autocast_around_backward_alone_does_not_change_the_gradients() -> None:
    """The backward pass recomputes tiles under the forward's autocast state, not under one
    opened only around ``backward()``."""
    model, plan, net, ref = _streamed("segmented")
    image = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    loss = _loss(net(image), torch.tensor([1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss.backward()
    _loss(ref(image), torch.tensor([1])).backward()
    _assert_same(model, ref)


def test_weights_loaded_by_assignment_are_the_ones_trained() -> None:
    """``load_state_dict(assign=True)`` (or ``.to()``) replaces the model's tensors: the
    streamed model traces the trunk again and trains the new ones."""
    model, plan = _plan("statistics")
    net = tileplan.stream(model, plan).train()
    image = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    net(image).sum().backward()  # engines built on the old tensors
    torch.manual_seed(9)
    other = _build(TINY_GLOBAL_MODEL).double()
    model.load_state_dict(other.state_dict(), assign=True)
    ref = copy.deepcopy(model)
    _same_modes(ref, net)
    model.zero_grad(set_to_none=True)
    net(image).sum().backward()
    ref(image).sum().backward()
    _assert_same(model, ref)


def test_misuse_of_the_image_is_refused() -> None:
    model, plan = _plan("segmented")
    net = tileplan.stream(model, plan).train()
    image = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    loss = net(image).sum()
    image.add_(1.0)  # changed between forward and backward: other gradients
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    normalising = tileplan.stream(model, plan, preprocess=lambda crop: crop * 2.0)
    with pytest.raises(StreamingError, match="preprocess"):
        normalising(image.clone().requires_grad_())


def test_eval_mode_of_a_batch_statistics_plan_still_refuses() -> None:
    """Validation streams the eval-mode trunk with the plan's tiles: a plan for another model
    and an image larger than the plan's are refused there too."""
    model, plan = _plan("statistics")
    assert plan.batch_norm == "train"
    net = tileplan.stream(model, plan).eval()
    with pytest.raises(PlanError, match="larger than the plan"):
        net(torch.randn(1, 3, SIZE, SIZE + 8, dtype=torch.float64))
    other = _build(TINY_MODEL).double().eval()
    with pytest.raises(PlanError, match="different model"):
        tileplan.stream(other, plan)
