"""Does resolution matter on the demo data? Full resolution with streaming vs 16x downsampled.

The demo dataset's label is whether an image holds small rings (positives) or same-mass discs
(negatives). Both runs train the same network (examples/small_cnn.py) with the same seed,
optimizer and number of epochs:

* full resolution, streamed with a plan (tiles smaller than the image), through ``Trainer``;
* the image average-pooled 16x (what a conventional run that must fit in memory would do),
  trained conventionally.

    python bench/demo_experiment.py --n 48 --size 1024 --epochs 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from executor import load_plan
from tileplan.planning.model_file import load_model_file
from tileplan.planning.profile import ProfileRequest, profile
from tileplan.run.data import load_csv
from tileplan.run.demo_data import write_demo_dataset
from tileplan.run.trainer import Trainer, binary_auc
from tileplan.settings import RunSpec

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "small_cnn.py"


def downsampled_run(train, val, config: RunSpec, factor: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Conventional training on images average-pooled by ``factor``; (val AUC, s/epoch)."""
    torch.manual_seed(config.seed)
    model = load_model_file(MODEL).model.float().eval()
    optimizer = config.make_optimizer(model.parameters())

    def small(image: torch.Tensor) -> torch.Tensor:
        x = config.normalization.apply(image.unsqueeze(0))
        return torch.nn.functional.avg_pool2d(x, factor)

    gen = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    for _ in range(config.epochs):
        order = torch.randperm(len(train), generator=gen).tolist()
        for i in range(0, len(order), config.batch):
            optimizer.zero_grad(set_to_none=True)
            for index in order[i : i + config.batch]:
                image, label = train[index]
                loss = torch.nn.functional.cross_entropy(model(small(image)),
                                                         label.reshape(1).long())  # fmt: skip
                (loss / config.batch).backward()
            optimizer.step()
    seconds = (time.perf_counter() - start) / config.epochs
    with torch.no_grad():
        scores = [float(torch.softmax(model(small(val[i][0])), 1)[0, 1]) for i in range(len(val))]
    return binary_auc(scores, [float(val[i][1]) for i in range(len(val))]) or 0.5, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--factor", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_demo_dataset(root / "demo", n=args.n, size=args.size, seed=0)
        plan = profile(ProfileRequest(model_file=MODEL, image_shape=(args.size, args.size),
                                      tile=(args.tile, args.tile), measure=False,
                                      budget_bytes=8 * 1024**3))  # fmt: skip
        from executor import save_plan

        save_plan(plan, root / "plan.yaml")
        plan = load_plan(root / "plan.yaml")
        config = RunSpec.from_plan(plan, epochs=args.epochs, lr=1e-3, batch=4, num_workers=0,
                                   seed=0)  # fmt: skip
        train = load_csv(root / "demo" / "train.csv", target_shape=plan.image_shape_px)
        val = load_csv(root / "demo" / "val.csv", target_shape=plan.image_shape_px)
        torch.manual_seed(config.seed)
        loaded = load_model_file(MODEL)
        trainer = Trainer(model=loaded.model, trunk=loaded.trunk, head=loaded.head, plan=plan,
                          spec=config, train_data=train, val_data=val, out_dir=root / "run",
                          device=torch.device("cpu"))  # fmt: skip
        history = trainer.fit(progress=False)
        full_auc = history[-1].val_auc
        full_s = sum(h.seconds for h in history) / len(history)
        low_auc, low_s = downsampled_run(train, val, config, args.factor)
    tiles = trainer.scnn.tile_grid(plan.image_shape_px).n_tiles
    print(f"{args.n} images of {args.size}² px, {args.epochs} epochs, {len(val)} validation")
    print(f"full resolution, streamed ({tiles} tiles of {args.tile} px): val AUC {full_auc:.3f}, "
          f"{full_s:.1f} s/epoch")  # fmt: skip
    print(f"downsampled {args.factor}x to {args.size // args.factor}² px, conventional: "
          f"val AUC {low_auc:.3f}, {low_s:.1f} s/epoch")  # fmt: skip
    print("loss per epoch (streamed):", [round(h.train_loss, 3) for h in history])


if __name__ == "__main__":
    main()
