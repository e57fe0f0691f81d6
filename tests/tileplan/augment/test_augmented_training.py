"""Training with ``--augment``: the oracle is conventional float64 training on each image
augmented whole first (the same parameters: a function of seed, epoch and image), and an
uninterrupted run for a resumed one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from executor import load_plan
from tests.tileplan.conftest import TINY_MODEL
from tests.tileplan.run.conventional import assert_same_weights, train_conventionally
from tests.tileplan.run.tiny_runs import StopAt, run_cli, tiny_float64_run
from tileplan.augment import canonical
from tileplan.planning.model_file import load_model_file
from tileplan.run.checkpoint import load_checkpoint
from tileplan.run.data import load_csv
from tileplan.run.interrupts import RunInterruptedError
from tileplan.run.trainer import Trainer
from tileplan.settings import DataSettings, RunSpec

SETTINGS = DataSettings(mpp=0.5, tissue=True)
SPEC = "scale:0.2,crop:0.9,dihedral,rotate:15,hed,brightness,contrast,saturation,hue,noise,cutout"


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four demo slides and a float64 plan of 64 px tiles for the largest at 0.5 µm/px."""
    root = tmp_path_factory.mktemp("augslides")
    mp = pytest.MonkeyPatch()
    mp.setenv("TILEPLAN_CACHE", str(root / "cache"))
    (root / "tiny.py").write_text(TINY_MODEL)
    code, out = run_cli("demo-data", root / "slides", "--slides", "--n", 4, "--size", 640,
                        "--seed", 2)  # fmt: skip
    assert code == 0, out
    code, out = run_cli("profile", root / "tiny.py", "--data", root / "slides" / "train.csv",
                        "--mpp", 0.5, "--tissue", "--tile", 64, "--dtype", "float64",
                        "--no-measure", "--budget", "2GiB",
                        "--out", root / "plan.yaml")  # fmt: skip
    assert code == 0, out
    yield root
    mp.undo()


def test_augmented_slide_training_equals_conventional_training_on_augmented_images(
    slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TILEPLAN_CACHE", str(slides / "cache"))
    plan = load_plan(slides / "plan.yaml")
    data = load_csv(slides / "slides" / "train.csv", target_shape=plan.image_shape_px,
                    settings=SETTINGS)  # fmt: skip
    spec = RunSpec.from_plan(plan, epochs=2, batch=2, lr=1e-2, optimizer="sgd", num_workers=1,
                             seed=5, data=SETTINGS, augment=SPEC)  # fmt: skip
    torch.manual_seed(0)
    streamed = load_model_file(slides / "tiny.py")
    trainer = Trainer(model=streamed.model, trunk=streamed.trunk, head=streamed.head, plan=plan,
                      spec=spec, train_data=data, val_data=None, out_dir=tmp_path / "s",
                      device=torch.device("cpu"))  # fmt: skip
    trainer.fit(progress=False)
    augmented: dict[tuple[int, int], tuple[int, ...]] = {}

    def image_of(epoch: int, index: int) -> torch.Tensor:
        whole = trainer.augmentation.apply(data.source(index), seed=spec.seed, epoch=epoch,
                                           index=index).read_all()[0]  # fmt: skip
        augmented[epoch, index] = tuple(whole.shape)
        assert trainer.scnn.tile_grid(whole.shape[1:]).n_tiles > 1
        return whole

    ref = train_conventionally(slides / "tiny.py", spec, trainer, data, image_of=image_of)
    assert_same_weights(streamed.model, ref)
    # Epochs and images were augmented differently (sizes from scale and crop differ).
    assert len(set(augmented.values())) > 2
    assert load_checkpoint(tmp_path / "s" / "last.pt").meta.spec.augment == canonical(SPEC)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_float64_run(tmp_path_factory.mktemp("augtiny"), size=80)


def _trainer(root: Path, out: Path, augment: str) -> Trainer:
    plan = load_plan(root / "plan.yaml")
    spec = RunSpec.from_plan(plan, epochs=3, batch=2, lr=1e-2, num_workers=0, seed=3,
                             augment=augment)  # fmt: skip
    torch.manual_seed(spec.seed)
    loaded = load_model_file(root / "tiny.py", batch_norm=spec.batch_norm)
    data = load_csv(root / "demo" / "train.csv", target_shape=plan.image_shape_px)
    return Trainer(model=loaded.model, trunk=loaded.trunk, head=loaded.head, plan=plan,
                   spec=spec, train_data=data, val_data=None, out_dir=out,
                   device=torch.device("cpu"))  # fmt: skip


@pytest.mark.parametrize("stop_at", [3, 8])
def test_a_stopped_augmented_run_resumes_exactly(tiny: Path, tmp_path: Path, stop_at: int) -> None:
    spec = "default,noise,cutout,elastic:4"
    _trainer(tiny, tmp_path / "ref", spec).fit(progress=False)
    out = tmp_path / "stopped"
    with pytest.raises(RunInterruptedError):
        _trainer(tiny, out, spec).fit(progress=False, stop=StopAt(stop_at))
    resumed = _trainer(tiny, out, spec)
    resumed.resume()
    resumed.fit(progress=False)
    got, ref = load_checkpoint(out / "last.pt"), load_checkpoint(tmp_path / "ref" / "last.pt")
    for key, value in ref.model.items():
        assert torch.equal(got.model[key], value), key
    # The record of what was drawn: every image of every epoch, the same after a resume.
    record = (tmp_path / "ref" / "augmentations.csv").read_text()
    assert (out / "augmentations.csv").read_text() == record
    lines = record.splitlines()
    assert len(lines) == 1 + 3 * 6
    for what in ("symmetry=", "hed_scale=", "noise_key=", "elastic_max="):
        assert what in lines[1], lines[1]
    # And augmentation changed the run: without it, other weights.
    _trainer(tiny, tmp_path / "plain", "").fit(progress=False)
    plain = load_checkpoint(tmp_path / "plain" / "last.pt")
    assert any(not torch.equal(plain.model[k], v) for k, v in ref.model.items())


def test_bad_augment_options_are_refused_in_one_line(tiny: Path, tmp_path: Path) -> None:
    base = ["train", tiny / "tiny.py", "--plan", tiny / "plan.yaml", "--data",
            tiny / "demo" / "train.csv", "--num-workers", 0, "--no-report"]  # fmt: skip
    code, text = run_cli(*base, "--out", tmp_path / "a", "--augment", "flip,blur")
    assert code == 2
    assert "unknown augmentation 'blur'" in text
    assert not (tmp_path / "a").exists()
    code, text = run_cli(*base, "--out", tmp_path / "b", "--augment", "noise:0.7")
    assert code == 2
    assert "noise takes a strength 0 < S <= 0.5" in text
    run = tmp_path / "run"
    code, text = run_cli(*base, "--out", run, "--epochs", 1, "--augment", "flip")
    assert code == 0, text
    code, text = run_cli(*base, "--out", run, "--epochs", 2, "--augment", "flip,hed", "--resume")
    assert code == 1
    assert "--resume: the run was started with --augment flip, not flip,hed:0.05" in text


def test_predict_tta_is_the_mean_over_the_eight_symmetries(tiny: Path, tmp_path: Path) -> None:
    """Oracle: the 8 symmetric images written to disk and predicted one by one, their class
    probabilities averaged."""
    import tifffile

    from tileplan.run.predict import predict_files

    run = tmp_path / "run"
    code, text = run_cli("train", tiny / "tiny.py", "--plan", tiny / "plan.yaml", "--data",
                         tiny / "demo" / "train.csv", "--out", run, "--epochs", 1,
                         "--num-workers", 0, "--no-report")  # fmt: skip
    assert code == 0, text
    image = tifffile.imread(tiny / "demo" / "img_001.tif")  # (H, W, 3)
    views = []
    for k in range(8):
        view = image.swapaxes(0, 1) if k & 4 else image
        view = view[::-1] if k & 2 else view
        view = view[:, ::-1] if k & 1 else view
        path = tmp_path / f"view_{k}.tif"
        tifffile.imwrite(path, np.ascontiguousarray(view))
        views.append(path)
    common = {"model_file": tiny / "tiny.py", "plan_file": tiny / "plan.yaml",
              "checkpoint": run / "last.pt", "saliency_dir": None, "device": "cpu"}  # fmt: skip
    ((_, tta),) = predict_files(images=[tiny / "demo" / "img_001.tif"], tta=True, **common)
    one_by_one = predict_files(images=views, **common)
    probs = torch.stack([torch.softmax(torch.tensor(p.outputs), 0) for _, p in one_by_one])
    mean = probs.mean(0)
    assert tta.label == float(mean.argmax())
    assert abs(tta.score - float(mean.max())) < 1e-9
    logits = torch.tensor([p.outputs for _, p in one_by_one]).mean(0)
    assert torch.allclose(torch.tensor(tta.outputs), logits, rtol=0, atol=1e-9)
    assert len({p.outputs for _, p in one_by_one}) > 1  # the views do differ
    code, text = run_cli("predict", tiny / "tiny.py", tiny / "demo" / "img_001.tif", "--plan",
                         tiny / "plan.yaml", "--checkpoint", run / "last.pt", "--tta",
                         "--saliency", tmp_path / "maps")  # fmt: skip
    assert code == 1
    assert "--tta and --saliency" in text
