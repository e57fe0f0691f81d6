"""Training recipes: weight decay and momentum reach the optimizer, schedules follow
``torch.optim.lr_scheduler`` with warm-up, class weights give the weighted mean loss over a batch
(oracle: conventional backprop), balanced epochs, the monitored value with best.pt, early
stopping and averaged.pt, scikit-learn's metrics, exact resumption, and one-line refusals."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from executor import StreamingCNN, load_plan, streaming_step
from tests.tileplan.run.tiny_runs import StopAt, run_cli, tiny_float64_run
from tileplan.planning.model_file import load_model_file
from tileplan.run.checkpoint import load_checkpoint
from tileplan.run.data import load_csv
from tileplan.run.freeze import freeze_prefix, frozen_parameters
from tileplan.run.interrupts import RunInterruptedError
from tileplan.run.recipe import (
    Monitor,
    Recipe,
    RecipeError,
    Schedule,
    balanced_order,
    batch_weights,
    make_scheduler,
    parse_class_weights,
    step_scheduler,
)
from tileplan.run.trainer import Trainer, Validation, loss_for
from tileplan.run.weights import average_weights
from tileplan.settings import RunSpec

SIZE = 96


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (two logits), 8 demo images (6 to train on, 2 to validate) and a float64
    plan of 2x2 tiles."""
    return tiny_float64_run(tmp_path_factory.mktemp("recipe"), size=SIZE)


def _trainer(setup: Path, out: Path, recipe: Recipe, *, epochs: int = 3, batch: int = 2,
             optimizer: str = "adam", lr: float = 1e-2, val: bool = False) -> Trainer:  # fmt: skip
    plan = load_plan(setup / "plan.yaml")
    spec = RunSpec.from_plan(plan, epochs=epochs, batch=batch, lr=lr, num_workers=0, seed=7,
                             optimizer=optimizer, recipe=recipe)  # fmt: skip
    torch.manual_seed(spec.seed)
    loaded = load_model_file(setup / "tiny.py", batch_norm=spec.batch_norm)
    data = load_csv(setup / "demo" / "train.csv", target_shape=plan.image_shape_px)
    val_data = (
        load_csv(setup / "demo" / "val.csv", target_shape=plan.image_shape_px) if val else None
    )
    return Trainer(model=loaded.model, trunk=loaded.trunk, head=loaded.head, plan=plan,
                   spec=spec, train_data=data, val_data=val_data, out_dir=out,
                   device=torch.device("cpu"))  # fmt: skip


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("cosine", Schedule("cosine")), ("step", Schedule("step", 30, 0.1)),
     ("step:2:0.5", Schedule("step", 2, 0.5)),
     ("exponential", Schedule("exponential", 0, 0.99)),
     ("exponential:0.9", Schedule("exponential", 0, 0.9)),
     ("plateau:3", Schedule("plateau", 3, 0.1)), ("none", Schedule())],
)  # fmt: skip
def test_schedules_parse(text: str, expected: Schedule) -> None:
    assert Schedule.parse(text) == expected


@pytest.mark.parametrize("text", ["linear", "step:0", "step:2:1.5", "exponential:x",
                                  "cosine:3", "plateau:2:0.1:9"])  # fmt: skip
def test_a_bad_schedule_is_one_line_naming_it(text: str) -> None:
    with pytest.raises(RecipeError) as err:
        Schedule.parse(text)
    assert repr(text) in str(err.value)
    assert "\n" not in str(err.value)


def _lrs(recipe: Recipe, epochs: int, values: list[float] | None = None) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, recipe, epochs)
    lrs = []
    for e in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # an epoch's steps come before its schedule's
        step_scheduler(scheduler, values[e] if values else None)
    return lrs


def test_warmup_then_cosine_and_step_follow_torch() -> None:
    cosine = _lrs(Recipe(schedule=Schedule("cosine"), warmup=2), 6)
    assert cosine[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    # then cosine annealing over the 4 epochs after warm-up: 1, (1+cos(pi/4))/2, 1/2, ...
    assert cosine[3:] == pytest.approx([0.5 * (1 + math.cos(k * math.pi / 4)) for k in (1, 2, 3)])
    assert _lrs(Recipe(schedule=Schedule("step", 2, 0.5)), 5) == pytest.approx(
        [1, 1, 0.5, 0.5, 0.25]
    )
    assert _lrs(Recipe(schedule=Schedule("exponential", 0, 0.9)), 3) == pytest.approx(
        [1, 0.9, 0.81]
    )
    # plateau (torch's patience): x0.1 after more than 2 epochs without a better loss
    plateau = _lrs(Recipe(schedule=Schedule("plateau", 2, 0.1)), 6, [3, 2, 2, 2, 2, 2])
    assert plateau == pytest.approx([1, 1, 1, 1, 1, 0.1])


# -- monitoring --------------------------------------------------------------------------------


def test_the_monitor_finds_best_epochs_windows_and_patience() -> None:
    monitor = Monitor(Recipe(monitor="val_auc", patience=2, average=2))
    values: list[float | None] = []
    seen = []
    for epoch, v in enumerate([0.6, 0.7, 0.65, 0.9, None, 0.8, 0.5], start=1):
        values.append(v)
        seen.append(monitor.update(epoch, values))
    assert [b for b, _ in seen] == [True, True, False, True, False, False, False]
    # windows of 2 (both known): 0.65, 0.675, 0.775 best at epoch 4; none with the gap
    assert [w for _, w in seen] == [False, True, True, True, False, False, False]
    assert monitor.state.best_epoch == 4
    assert monitor.state.window_end == 4
    assert monitor.exhausted  # three epochs without a better value, patience 2


def test_validation_scores_come_from_scikit_learn_and_scipy() -> None:
    v = Validation.of("binary", 0.5, [1, 0, 1, 1], [0.9, 0.2, 0.6, 0.7], [1, 0, 0, 1])
    assert v.accuracy == pytest.approx(0.75)
    assert v.auc == pytest.approx(1.0)
    assert v.balanced_accuracy == pytest.approx(0.75)
    one_class = Validation.of("binary", 0.5, [1, 1], [0.9, 0.6], [1, 1])
    assert one_class.auc is None
    r = Validation.of("regression", 0.1, [1.0, 2.0, 3.5], [0, 0, 0], [1.0, 2.5, 3.0])
    assert r.accuracy is None
    assert r.spearman == pytest.approx(1.0)
    assert 0.9 < r.pearson < 1.0
    assert r.recall is None


def test_per_class_scores_count_by_hand() -> None:
    # truth 0 0 1 2 2 2, guess 0 1 1 2 0 2; class 3 was predicted but never present
    m = Validation.of("multiclass", 0.3, [0, 1, 1, 2, 0, 3], [0] * 6, [0, 0, 1, 2, 2, 2])
    assert m.recall == pytest.approx((1 / 2, 1 / 1, 1 / 3, 0.0))
    assert m.precision == pytest.approx((1 / 2, 1 / 2, 1 / 1, 0.0))
    f1 = [
        2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(m.precision, m.recall, strict=False)
    ]
    assert m.f1 == pytest.approx(tuple(f1))
    b = Validation.of("binary", 0.5, [1, 1], [0.9, 0.6], [1, 1])
    assert b.recall == pytest.approx((0.0, 1.0))


# -- class balance -----------------------------------------------------------------------------


def test_balanced_epochs_draw_every_class_alike() -> None:
    labels = [0.0] * 90 + [1.0] * 10
    gen = torch.Generator().manual_seed(3)
    order = balanced_order(labels, gen)
    assert len(order) == 100
    drawn = [sum(labels[i] == c for i in order) for c in (0.0, 1.0)]
    assert 35 <= drawn[1] <= 65  # expected 50 of the rare class, against 10 without
    again = balanced_order(labels, torch.Generator().manual_seed(3))
    assert again == order  # a function of the generator's seed: resumable


def test_class_weights_parse_and_share_a_batch() -> None:
    assert parse_class_weights("auto", [0, 0, 0, 1]) == pytest.approx((4 / 6, 2.0))
    assert parse_class_weights("1,3", [0, 1]) == (1.0, 3.0)
    with pytest.raises(RecipeError, match="class 1 has no training image"):
        parse_class_weights("auto", [0, 0, 2])
    with pytest.raises(RecipeError, match="positive"):
        parse_class_weights("1,-2", [0, 1])
    assert batch_weights([0, 1, 1], (1.0, 3.0)) == pytest.approx([1 / 7, 3 / 7, 3 / 7])
    assert batch_weights([0, 1], None) == [0.5, 0.5]


def test_a_class_weighted_step_equals_conventional_weighted_cross_entropy(
    setup: Path, tmp_path: Path
) -> None:
    """One SGD step (no momentum, decay 0.1) over the whole training set as one batch: the
    weights equal the conventional step on ``cross_entropy(weight=w)`` over the batch."""
    recipe = Recipe(class_weights=(1.0, 3.0), momentum=0.0, weight_decay=0.1,
                    monitor="train_loss")  # fmt: skip
    trainer = _trainer(setup, tmp_path / "run", recipe, epochs=1, batch=6, optimizer="sgd",
                       lr=0.5)  # fmt: skip
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit(progress=False)

    model = load_model_file(setup / "tiny.py").model.double().eval()
    model.load_state_dict(start)
    data = trainer.train_data
    images = torch.stack([data[i][0] for i in range(len(data))])  # (N, C, H, W) pixels
    labels = torch.tensor([int(s.label) for s in data.samples])
    x = trainer.spec.preprocess()(images)
    weight = torch.tensor([1.0, 3.0], dtype=torch.float64)
    loss = torch.nn.functional.cross_entropy(model(x), labels, weight=weight)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * (p.grad + 0.1 * p)
    got = trainer.model.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-12, msg=name)


# -- runs --------------------------------------------------------------------------------------


def test_a_run_writes_best_and_averaged_weights_and_its_learning_rates(
    setup: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    recipe = Recipe(schedule=Schedule("step", 1, 0.5), monitor="val_loss", average=3,
                    weight_decay=1e-4)  # fmt: skip
    trainer = _trainer(setup, out, recipe, val=True)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 1e-4
    trainer.fit(progress=False)
    rows = _metrics(out)
    assert [r["lr"] for r in rows] == pytest.approx([1e-2, 5e-3, 2.5e-3])
    assert all(r["val_balanced_accuracy"] is not None for r in rows)
    best_epoch = min(rows, key=lambda r: r["val_loss"])["epoch"]
    best = load_checkpoint(out / "best.pt")
    assert best.meta.epoch == best_epoch
    # the only window of 3 epochs: every epoch's weights, averaged
    files = sorted((out / "epochs").glob("epoch_*.pt"))
    assert [f.name for f in files] == ["epoch_001.pt", "epoch_002.pt", "epoch_003.pt"]
    averaged = load_checkpoint(out / "averaged.pt")
    states = [torch.load(f, weights_only=True) for f in files]
    for name, value in averaged.model.items():
        if value.is_floating_point():
            mean = sum(s[name] for s in states) / 3
            torch.testing.assert_close(value, mean, rtol=1e-12, atol=1e-14)
    assert averaged.model.keys() == average_weights(files).keys()
    last = load_checkpoint(out / "last.pt")
    assert last.model.keys() == averaged.model.keys()


def test_averaged_and_best_weights_predict(setup: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, text = run_cli("train", setup / "tiny.py", "--plan", setup / "plan.yaml", "--data",
                      setup / "demo" / "train.csv", "--val", setup / "demo" / "val.csv",
                      "--out", out, "--epochs", 2, "--batch", 2, "--num-workers", 0,
                      "--average", 2, "--monitor", "val_auc", "--no-report")  # fmt: skip
    assert code == 0, text
    image = next((setup / "demo").glob("*.tif"))
    for weights in ("best.pt", "averaged.pt"):
        code, text = run_cli("predict", setup / "tiny.py", image, "--plan", setup / "plan.yaml",
                          "--checkpoint", out / weights)  # fmt: skip
        assert code == 0, text


def test_patience_stops_the_run_early(setup: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # A learning rate of 1e-300 leaves float64 weights as they are: the validation loss of
    # epoch 2 is epoch 1's, not better, and a patience of 1 ends the run there.
    recipe = Recipe(monitor="val_loss", patience=1)
    trainer = _trainer(setup, out, recipe, epochs=5, lr=1e-300, optimizer="sgd", val=True)
    history = trainer.fit(progress=False)
    assert [row.epoch for row in history] == [1, 2]
    assert history[1].val_loss == history[0].val_loss
    assert trainer.monitor.exhausted
    # a resumed run that had stopped early has nothing left to do
    resumed = _trainer(setup, out, recipe, epochs=5, lr=1e-300, optimizer="sgd", val=True)
    resumed.resume()
    assert resumed.fit(progress=False) == history


@pytest.mark.parametrize("stop_at", [4, 9, 17])
def test_a_stopped_recipe_run_resumes_exactly(setup: Path, tmp_path: Path, stop_at: int) -> None:
    """Balanced epochs, class weights, warm-up then exponential decay, averaged weights:
    stopped mid-epoch or between epochs and resumed, the same weights and files."""
    recipe = Recipe(balance=True, class_weights=(1.0, 2.0), warmup=1,
                    schedule=Schedule("exponential", 0, 0.5), monitor="train_loss",
                    average=2)  # fmt: skip
    _trainer(setup, tmp_path / "ref", recipe).fit(progress=False)
    out = tmp_path / "stopped"
    with pytest.raises(RunInterruptedError):
        _trainer(setup, out, recipe).fit(progress=False, stop=StopAt(stop_at))
    resumed = _trainer(setup, out, recipe)
    resumed.resume()
    resumed.fit(progress=False)
    for name in ("last.pt", "averaged.pt"):
        got, ref = load_checkpoint(out / name), load_checkpoint(tmp_path / "ref" / name)
        for key, value in ref.model.items():
            assert torch.equal(got.model[key], value), (name, key)
    assert (
        load_checkpoint(out / "last.pt").scheduler
        == load_checkpoint(tmp_path / "ref" / "last.pt").scheduler
    )
    timed = ("seconds", "seconds_per_image", "peak_bytes")
    rows = [{k: v for k, v in r.items() if k not in timed} for r in _metrics(out)]
    ref_rows = [{k: v for k, v in r.items() if k not in timed} for r in _metrics(tmp_path / "ref")]
    assert rows == ref_rows


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--momentum", "0.5"], "--momentum is SGD's"),
        (["--average", "5"], "--average 5: must be between 0 and --epochs 2"),
        (["--monitor", "val_auc"], "--monitor val_auc needs validation images"),
        (["--schedule", "linear"], "unknown schedule"),
        (["--class-weights", "1,2,3"], "--class-weights has 3 values for 2 classes"),
        (["--class-weights", "one"], "use auto or numbers"),
        (["--warmup", "2"], "--warmup 2: must be 0 or more and below --epochs 2"),
    ],
)  # fmt: skip
def test_bad_recipes_are_refused_in_one_line_before_anything_is_written(
    setup: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "run"
    code, text = run_cli("train", setup / "tiny.py", "--plan", setup / "plan.yaml", "--data",
                      setup / "demo" / "train.csv", "--out", out, "--epochs", 2,
                      "--num-workers", 0, "--no-report", *args)  # fmt: skip
    assert code != 0
    assert message in text, text
    assert len(text.strip().splitlines()) == 1 or "Usage" in text, text
    assert not out.exists()


def test_a_resume_with_another_schedule_is_refused(setup: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ["train", setup / "tiny.py", "--plan", setup / "plan.yaml", "--data",
            setup / "demo" / "train.csv", "--out", out, "--num-workers", 0,
            "--no-report"]  # fmt: skip
    code, text = run_cli(*base, "--epochs", 1, "--schedule", "cosine")
    assert code == 0, text
    code, text = run_cli(*base, "--epochs", 2, "--schedule", "step:1:0.5", "--resume")
    assert code != 0
    assert "--schedule cosine, not step: x0.5 every 1 epochs" in text, text


def test_recipes_round_trip_through_checkpoints(setup: Path, tmp_path: Path) -> None:
    recipe = Recipe(schedule=Schedule("plateau", 2, 0.5), class_weights=(1.0, 2.0),
                    monitor="train_loss", patience=3, average=1, momentum=0.8)  # fmt: skip
    trainer = _trainer(setup, tmp_path / "run", recipe, epochs=1, optimizer="sgd")
    trainer.fit(progress=False)
    meta = load_checkpoint(tmp_path / "run" / "last.pt").meta
    assert meta.spec.recipe == recipe
    assert dataclasses.asdict(meta.spec) == dataclasses.asdict(trainer.spec)


# -- frozen prefix -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cut_plan(setup: Path) -> Path:
    """The tiny model's float64 plan cut after ``features.2`` (its first conv, BN and ReLU)."""
    plan = setup / "cut.yaml"
    code, out = run_cli("profile", setup / "tiny.py", "--image", SIZE, "--max-tile", 64, "--dtype",
                        "float64", "--no-measure", "--budget", "2GiB", "--cut", "features.2",
                        "--out", plan)  # fmt: skip
    assert code == 0, out
    assert len(load_plan(plan).segments) == 2
    return plan


def _frozen_step(setup: Path, plan_file: Path, freeze: str | None) -> tuple[dict, int, int]:
    """A streamed float64 step of the tiny model with its prefix up to ``freeze`` frozen:
    (each parameter's gradient, convolutions of the first layer in the whole step, in its
    forward pass alone)."""
    plan = load_plan(plan_file)
    torch.manual_seed(0)
    loaded = load_model_file(setup / "tiny.py")
    loaded.model.double().eval()
    if freeze:
        freeze_prefix(loaded.trunk, freeze)
    calls = [0]
    first = loaded.trunk.get_submodule("features.0")
    handle = first.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        scnn = StreamingCNN.from_plan(loaded.trunk, plan)
        image = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64)  # fmt: skip
        with torch.no_grad():
            scnn.forward(image)
        forward_only = calls[0]
        calls[0] = 0
        streaming_step(scnn, loaded.head, image, torch.tensor([1.0]), loss_for("binary"))
    finally:
        handle.remove()
    grads = {n: None if p.grad is None else p.grad.clone()
             for n, p in loaded.model.named_parameters()}  # fmt: skip
    return grads, calls[0], forward_only


def test_a_frozen_prefix_step_equals_conventional_backprop_and_skips_its_tiles(
    setup: Path, cut_plan: Path
) -> None:
    grads, step_calls, forward_calls = _frozen_step(setup, cut_plan, "features.2")
    # The oracle: the same weights, the same parameters frozen, conventional backprop.
    torch.manual_seed(0)
    model = load_model_file(setup / "tiny.py").model.double().eval()
    loaded = load_model_file(setup / "tiny.py")
    frozen = {id(p) for p in frozen_parameters(loaded.trunk, "features.2")}
    names = [n for n, p in loaded.model.named_parameters() if id(p) in frozen]
    assert names == ["features.0.weight", "features.0.bias", "features.1.weight",
                     "features.1.bias"]  # fmt: skip
    for name, p in model.named_parameters():
        p.requires_grad_(name not in names)
    image = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)  # fmt: skip
    loss_for("binary")(model(image), torch.tensor([1.0])).backward()
    for name, p in model.named_parameters():
        if name in names:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    # The backward pass ran no tile through the frozen segment: its first convolution ran
    # only in the forward pass; trainable, it also runs in every backward tile.
    assert step_calls == forward_calls
    _, trainable_calls, _ = _frozen_step(setup, cut_plan, None)
    assert trainable_calls > forward_calls


def test_a_frozen_run_keeps_the_prefix_and_trains_the_rest(setup: Path, cut_plan: Path,
                                                           tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "run"
    code, text = run_cli("train", setup / "tiny.py", "--plan", cut_plan, "--data",
                         setup / "demo" / "train.csv", "--out", out, "--epochs", 1,
                         "--num-workers", 0, "--no-report", "--freeze", "features.2")  # fmt: skip
    assert code == 0, text
    torch.manual_seed(0)
    before = load_model_file(setup / "tiny.py").model.state_dict()
    after = load_checkpoint(out / "last.pt").model
    # the model file seeds its own weights: the prefix is what it built, the rest moved
    for name in ("features.0.weight", "features.1.weight", "features.1.running_mean"):
        assert torch.equal(after[name], before[name].to(after[name].dtype)), name
    assert not torch.equal(after["features.3.weight"], before["features.3.weight"].double())


@pytest.mark.parametrize(
    ("bn", "freeze", "message"),
    [("frozen", "feature.2", "--freeze feature.2: the trunk has no module or node of that "
      "name; did you mean features.2"),
     ("train", "features.2", "--freeze features.2 keeps the frozen layers' BatchNorm "
      "statistics fixed, which a --bn train plan does not")],
)  # fmt: skip
def test_a_bad_freeze_is_refused_in_one_line(setup: Path, tmp_path: Path, bn: str,
                                             freeze: str, message: str) -> None:  # fmt: skip
    plan = tmp_path / "plan.yaml"
    code, text = run_cli("profile", setup / "tiny.py", "--image", SIZE, "--max-tile", 64,
                         "--dtype", "float64", "--no-measure", "--budget", "2GiB", "--cut",
                         "features.2", "--bn", bn, "--out", plan)  # fmt: skip
    assert code == 0, text
    out = tmp_path / "run"
    code, text = run_cli("train", setup / "tiny.py", "--plan", plan, "--data",
                         setup / "demo" / "train.csv", "--out", out, "--epochs", 1,
                         "--num-workers", 0, "--no-report", "--freeze", freeze)  # fmt: skip
    assert code != 0
    assert message in text, text
    assert len(text.strip().splitlines()) == 1, text
    assert not out.exists()


STAGED = Recipe(freeze="features.2", unfreeze_epoch=2, lr_after=5e-3,
                schedule=Schedule("exponential", 0, 0.5), monitor="train_loss")  # fmt: skip


def test_staged_fine_tuning_is_a_frozen_phase_then_a_second_run_from_its_weights(
    setup: Path, tmp_path: Path
) -> None:
    """The oracle: a frozen run of the first phase's epochs, then a run of everything from its
    weights at --lr-after with a fresh optimizer and schedule over the remaining epochs."""
    staged = _trainer(setup, tmp_path / "staged", STAGED, epochs=3)
    staged.fit(progress=False)
    first = _trainer(setup, tmp_path / "first", dataclasses.replace(
        STAGED, unfreeze_epoch=None, lr_after=None), epochs=1)  # fmt: skip
    first.fit(progress=False)
    torch.manual_seed(0)
    built = load_model_file(setup / "tiny.py").model.state_dict()
    after_first = first.model.state_dict()
    assert torch.equal(after_first["features.0.weight"], built["features.0.weight"].double())
    second = _trainer(setup, tmp_path / "second", dataclasses.replace(
        STAGED, freeze=None, unfreeze_epoch=None, lr_after=None), epochs=3, lr=5e-3)  # fmt: skip
    second.model.load_state_dict(after_first)
    second.epoch = 1  # epochs 2 and 3, with their own image orders
    second.fit(progress=False)
    for name, value in second.model.state_dict().items():
        assert torch.equal(staged.model.state_dict()[name], value), name
    assert not torch.equal(staged.model.state_dict()["features.0.weight"],
                           after_first["features.0.weight"])  # fmt: skip
    assert [r["lr"] for r in _metrics(tmp_path / "staged")] == [1e-2, 5e-3, 2.5e-3]


@pytest.mark.parametrize("stop_at", [4, 7, 11])
def test_a_staged_run_stopped_anywhere_resumes_exactly(setup: Path, tmp_path: Path,
                                                       stop_at: int) -> None:  # fmt: skip
    _trainer(setup, tmp_path / "ref", STAGED, epochs=3).fit(progress=False)
    out = tmp_path / "stopped"
    with pytest.raises(RunInterruptedError):
        _trainer(setup, out, STAGED, epochs=3).fit(progress=False, stop=StopAt(stop_at))
    resumed = _trainer(setup, out, STAGED, epochs=3)
    resumed.resume()
    resumed.fit(progress=False)
    got, ref = load_checkpoint(out / "last.pt"), load_checkpoint(tmp_path / "ref" / "last.pt")
    for key, value in ref.model.items():
        assert torch.equal(got.model[key], value), key
    assert got.optimizer["param_groups"][0]["lr"] == ref.optimizer["param_groups"][0]["lr"]


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--unfreeze-epoch", 2], "--unfreeze-epoch 2 ends a --freeze phase"),
     (["--freeze", "features.2", "--unfreeze-epoch", 4],
      "--unfreeze-epoch 4: must be between 2 and --epochs 3"),
     (["--lr-after", 1e-3], "--lr-after 0.001 is the rate after --unfreeze-epoch")],
)  # fmt: skip
def test_bad_stages_are_refused_in_one_line(setup: Path, tmp_path: Path, options: list,
                                            message: str) -> None:  # fmt: skip
    out = tmp_path / "run"
    code, text = run_cli("train", setup / "tiny.py", "--plan", setup / "plan.yaml", "--data",
                         setup / "demo" / "train.csv", "--out", out, "--epochs", 3,
                         "--num-workers", 0, "--no-report", *options)  # fmt: skip
    assert code == 1, text
    assert message in text, text
    assert len(text.strip().splitlines()) == 1, text
    assert not (out / "last.pt").exists()


def test_a_resume_with_another_lr_scales_the_schedule(setup: Path, tmp_path: Path) -> None:
    """A diverging run's advice is --resume with a lower --lr: the rates of the restored
    optimizer and schedule scale with it."""
    out = tmp_path / "run"
    recipe = Recipe(schedule=Schedule("step", 1, 0.5), monitor="train_loss")
    _trainer(setup, out, recipe, epochs=2, lr=1e-2).fit(progress=False)
    resumed = _trainer(setup, out, recipe, epochs=3, lr=1e-3)
    resumed.resume()
    resumed.fit(progress=False)
    assert [r["lr"] for r in _metrics(out)] == pytest.approx([1e-2, 5e-3, 2.5e-4])


def test_a_cosine_run_resumes_only_with_its_epochs(setup: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ["train", setup / "tiny.py", "--plan", setup / "plan.yaml", "--data",
            setup / "demo" / "train.csv", "--out", out, "--num-workers", 0, "--no-report",
            "--schedule", "cosine"]  # fmt: skip
    code, text = run_cli(*base, "--epochs", 2)
    assert code == 0, text
    code, text = run_cli(*base, "--epochs", 4, "--resume")
    assert code != 0
    assert "the cosine schedule anneals over the run's --epochs 2" in text, text


def test_weight_files_owed_at_a_stop_are_written_on_resume(setup: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:  # fmt: skip
    """A run that ended between an epoch's last.pt and its weight files (best.pt, the epoch
    file, averaged.pt) writes them when resumed: the files equal an uninterrupted run's."""
    recipe = Recipe(monitor="train_loss", average=2)
    _trainer(setup, tmp_path / "ref", recipe).fit(progress=False)
    keep = Trainer._keep

    def dies_after_epoch_2(self: Trainer, best: bool, window: bool) -> None:
        if self.epoch == 2:
            raise RuntimeError("killed")
        keep(self, best, window)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_keep", dies_after_epoch_2)
        with pytest.raises(RuntimeError, match="killed"):
            _trainer(setup, out, recipe).fit(progress=False)
    assert not (out / "epochs" / "epoch_002.pt").exists()
    resumed = _trainer(setup, out, recipe)
    resumed.resume()
    resumed.fit(progress=False)
    for name in ("best.pt", "averaged.pt"):
        got, ref = load_checkpoint(out / name), load_checkpoint(tmp_path / "ref" / name)
        assert got.meta.epoch == ref.meta.epoch, name
        for key, value in ref.model.items():
            assert torch.equal(got.model[key], value), (name, key)


def test_adamw_keeps_its_own_weight_decay_unless_asked(setup: Path, tmp_path: Path) -> None:
    default = _trainer(setup, tmp_path / "a", Recipe(), optimizer="adamw")
    assert default.optimizer.param_groups[0]["weight_decay"] == 0.01  # torch's default
    asked = _trainer(setup, tmp_path / "b", Recipe(weight_decay=0.0), optimizer="adamw")
    assert asked.optimizer.param_groups[0]["weight_decay"] == 0.0
