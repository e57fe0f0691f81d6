"""The slide workflow end to end: demo slides -> profile --data --mpp -> train -> predict.

Slides of different sizes are streamed from disk at their own size (never padded up to the
plan's), at a resolution chosen by mpp, cropped to their tissue. The oracle for training is
conventional float64 training on the same pixels (each slide's whole region read into memory):
the weights after two epochs must agree to float64 precision.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from executor import load_plan
from tests.tileplan.run.conventional import assert_same_weights, train_conventionally
from tileplan.cli import cli
from tileplan.planning.model_file import load_model_file
from tileplan.run.checkpoint import load_checkpoint
from tileplan.run.data import load_csv
from tileplan.run.trainer import Trainer
from tileplan.settings import DataSettings, RunSpec

SETTINGS = DataSettings(mpp=0.5, tissue=True)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four demo slides (svs and tif, 0.25 µm/px, 400-640 px per side) and a float64 plan for
    the largest of them at 0.5 µm/px (tissue boxes), tiles of 64 px."""
    from tests.tileplan.conftest import TINY_MODEL

    root = tmp_path_factory.mktemp("slides")
    cache = root / "cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("TILEPLAN_CACHE", str(cache))
    (root / "tiny.py").write_text(TINY_MODEL)
    code, out = _run("demo-data", root / "slides", "--slides", "--n", 4, "--size", 640,
                     "--seed", 2)  # fmt: skip
    assert code == 0, out
    code, out = _run("profile", root / "tiny.py", "--data", root / "slides" / "train.csv",
                     "--mpp", 0.5, "--tissue", "--tile", 64, "--dtype", "float64",
                     "--no-measure", "--budget", "2GiB", "--out", root / "plan.yaml")  # fmt: skip
    assert code == 0, out
    assert "planning for the largest" in out
    yield root
    mp.undo()


@pytest.fixture(autouse=True)
def _cache(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILEPLAN_CACHE", str(ws / "cache"))


def test_demo_slides_are_slides_of_different_sizes(ws: Path) -> None:
    import openslide

    rows = _rows(ws / "slides" / "train.csv") + _rows(ws / "slides" / "val.csv")
    assert len(rows) == 4
    assert {Path(r["image"]).suffix for r in rows} == {".svs", ".tif"}
    svs = next(ws / "slides" / r["image"] for r in rows if r["image"].endswith(".svs"))
    assert openslide.OpenSlide.detect_format(svs) == "aperio"
    data = load_csv(ws / "slides" / "train.csv", settings=SETTINGS)
    assert len({data.image_shape(i) for i in range(len(data))}) == len(data) > 1


def test_the_plan_is_for_the_largest_slide(ws: Path) -> None:
    """``profile --data`` plans for the largest height and the largest width of the CSV's
    images as they will be streamed (at the mpp, tissue-cropped)."""
    plan = load_plan(ws / "plan.yaml")
    train = load_csv(ws / "slides" / "train.csv", settings=SETTINGS)
    shapes = [train.image_shape(i)[1:] for i in range(len(train))]
    assert plan.image_shape_px == (max(h for h, _ in shapes), max(w for _, w in shapes))
    assert plan.image_shape_px not in shapes or len(set(shapes)) > 1


def test_variable_size_training_equals_conventional(ws: Path, tmp_path: Path) -> None:
    plan = load_plan(ws / "plan.yaml")
    data = load_csv(ws / "slides" / "train.csv", target_shape=plan.image_shape_px,
                    settings=SETTINGS)  # fmt: skip
    shapes = [data.image_shape(i)[1:] for i in range(len(data))]
    assert len(set(shapes)) > 1, "the slides should differ in size"
    spec = RunSpec.from_plan(plan, epochs=2, batch=2, lr=1e-2, optimizer="sgd", num_workers=1,
                             seed=5, data=SETTINGS)  # fmt: skip
    torch.manual_seed(0)
    streamed = load_model_file(ws / "tiny.py")
    trainer = Trainer(model=streamed.model, trunk=streamed.trunk, head=streamed.head, plan=plan,
                      spec=spec, train_data=data, val_data=None, out_dir=tmp_path / "s",
                      device=torch.device("cpu"))  # fmt: skip
    assert all(trainer.scnn.tile_grid(s).n_tiles > 1 for s in shapes)
    trainer.fit(progress=False)

    def same_shape(index: int, image: torch.Tensor) -> None:  # the whole region, in one piece
        assert tuple(image.shape[1:]) == shapes[index]

    ref = train_conventionally(ws / "tiny.py", spec, trainer, data, same_shape)
    assert_same_weights(streamed.model, ref)


def test_train_and_predict_on_slides_through_the_cli(ws: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out = _run("train", ws / "tiny.py", "--plan", ws / "plan.yaml", "--data",
                     ws / "slides" / "train.csv", "--val", ws / "slides" / "val.csv",
                     "--out", run, "--epochs", 1, "--batch", 2, "--mpp", 0.5, "--tissue",
                     "--no-report", "--num-workers", 1)  # fmt: skip
    assert code == 0, out
    meta = load_checkpoint(run / "last.pt").meta
    assert meta.spec.data == SETTINGS  # recorded with the run
    regions = _rows(run / "regions.csv")
    assert len(regions) == 4
    assert all(int(r["h"]) < int(r["scaled_h"]) or int(r["w"]) < int(r["scaled_w"])
               for r in regions), "tissue boxes should leave glass out"  # fmt: skip
    slide = ws / "slides" / regions[0]["image"]
    maps = tmp_path / "maps"
    code, out = _run("predict", ws / "tiny.py", slide, "--plan", ws / "plan.yaml",
                     "--checkpoint", run / "last.pt", "--saliency", maps)  # fmt: skip
    assert code == 0, out
    raw = np.load(maps / f"{slide.stem}.saliency.npy")
    assert raw.shape == (3, int(regions[0]["h"]), int(regions[0]["w"]))
    overlay = np.asarray(Image.open(maps / f"{slide.stem}.overlay.png"))
    assert overlay.ndim == 3
    assert overlay.shape[2] == 3
    assert max(overlay.shape[:2]) <= 2048


def test_a_head_that_needs_one_size_is_refused_before_training(ws: Path, tmp_path: Path) -> None:
    """Images of different sizes need a head that takes any map size: a flatten + Linear
    head sized for the plan's map is refused naming the row, before any step."""
    plan = load_plan(ws / "plan.yaml")
    out_h, out_w = plan.output_shape
    model = tmp_path / "fixed_head.py"
    model.write_text(f"""
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * {out_h} * {out_w}, 2),
    )

def split(model):
    return model[:7], model[7:]
""")
    code, out = _run("profile", model, "--image", "x".join(map(str, plan.image_shape_px)),
                     "--tile", 64, "--no-measure", "--budget", "2GiB", "--out",
                     tmp_path / "plan.yaml")  # fmt: skip
    assert code == 0, out
    code, out = _run("train", model, "--plan", tmp_path / "plan.yaml", "--data",
                     ws / "slides" / "train.csv", "--out", tmp_path / "run", "--mpp", 0.5,
                     "--tissue", "--num-workers", 0)  # fmt: skip
    assert code != 0
    assert "need a head that pools globally" in out
    assert "train.csv row" in out
    assert not (tmp_path / "run" / "last.pt").exists()


def test_profile_data_options_are_checked(ws: Path) -> None:
    code, out = _run("profile", ws / "tiny.py", "--image", 256, "--mpp", 1.0)
    assert code != 0
    assert "give --data" in out
    code, out = _run("profile", ws / "tiny.py")
    assert code != 0
    assert "give --image SIZE, or --data CSV" in out
    code, out = _run("profile", ws / "tiny.py", "--data", ws / "slides" / "train.csv",
                     "--mpp", 0.5, "--level", 1)  # fmt: skip
    assert code != 0
    assert "either --level or --mpp" in out
