"""Streamed training with PyTorch Lightning, automatic optimization.

The LightningModule wraps its network with ``tileplan.stream``: the trunk streams tile by tile
and ``loss.backward()`` (Lightning's) gives the exact gradients through autograd, so mixed
precision, gradient accumulation, clipping and DDP are Lightning's own. Install Lightning with
``pip install -e '.[lightning]'``, then::

    tileplan profile examples/small_cnn.py --image 1024 --out plan.yaml
    python examples/lightning_train.py examples/small_cnn.py plan.yaml \
        --precision bf16-mixed --accumulate 4 --clip 1.0
    python examples/lightning_train.py examples/small_cnn.py plan.yaml --devices 2 --strategy ddp

The images are made up (a bright disc or not) so that the example runs anywhere; replace
``disc_images`` with your dataset of (C, H, W) images up to the plan's size. ``--conventional``
trains the same network without streaming, for comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tileplan

Split = Callable[[nn.Module], tuple[nn.Module, nn.Module]]


class StreamedClassifier(L.LightningModule):
    """A classifier whose trunk streams as ``plan`` says (or conventionally with
    ``streamed=False``); everything else is an ordinary LightningModule."""

    def __init__(self, model: nn.Module, plan: tileplan.Plan | None, *, split: Split | None = None,
                 lr: float = 1e-2, streamed: bool = True) -> None:  # fmt: skip
        super().__init__()
        frozen = plan is None or plan.batch_norm == "frozen"
        self.net = tileplan.stream(model, plan, split=split) if streamed else _Conventional(
            model, frozen_batch_norm=frozen
        )  # fmt: skip
        self.lr = lr

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images).float(), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> None:
        images, labels = batch
        logits = self(images).float()  # no_grad here: the streamed forward pass only
        self.log("val_loss", nn.functional.cross_entropy(logits, labels), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == labels).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class _Conventional(nn.Module):
    """The model unstreamed, with BatchNorm kept in eval mode in training when the plan
    freezes it (as ``tileplan.stream`` does): the baseline the streamed run must equal."""

    def __init__(self, model: nn.Module, *, frozen_batch_norm: bool) -> None:
        super().__init__()
        self.model = model
        self.frozen_batch_norm = frozen_batch_norm
        self.train(model.training)

    def train(self, mode: bool = True) -> _Conventional:
        super().train(mode)
        if mode and self.frozen_batch_norm:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def load_model_file(path: str | Path) -> tuple[nn.Module, Split | None]:
    """``build_model()`` (or ``model``) and ``split`` of a tileplan model file."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python model file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build_model() if hasattr(module, "build_model") else module.model
    return model, getattr(module, "split", None)


def disc_images(n: int, size: Sequence[int], *, seed: int, dtype: torch.dtype = torch.float32
                ) -> TensorDataset:  # fmt: skip
    """``n`` noisy images of ``size`` px, label 1 when they hold a bright disc (the same
    pixels in every ``dtype``: drawn in float32)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    images = torch.randn(n, 3, h, w, generator=gen).to(dtype) * 0.5
    labels = torch.arange(n) % 2
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for i in range(n):
        if labels[i]:
            cy, cx = (torch.rand(2, generator=gen) * torch.tensor([h, w])).tolist()
            images[i] += 2.0 * ((ys - cy) ** 2 + (xs - cx) ** 2 < (min(h, w) / 6) ** 2)
    return TensorDataset(images, labels)


def train(model_file: str | Path, plan_path: str | Path | None, *, epochs: int = 1,
          batch: int = 2, images: int = 8, precision: str = "32-true", accumulate: int = 1,
          clip: float | None = None, devices: int = 1, strategy: str = "auto",
          lr: float = 1e-2, seed: int = 0, streamed: bool = True, out: str | Path | None = None,
          ) -> StreamedClassifier:  # fmt: skip
    """Train on made-up images; returns the trained module (weights saved to ``out``)."""
    L.seed_everything(seed, verbose=False)
    model, split = load_model_file(model_file)
    plan = tileplan.load_plan(plan_path) if plan_path is not None else None
    if precision.startswith("64"):
        model = model.double()  # the plan's parameters are float64 (`--dtype float64`)
    size = plan.image_shape_px if plan is not None else (256, 256)
    dtype = torch.float64 if precision.startswith("64") else torch.float32
    module = StreamedClassifier(model, plan, split=split, lr=lr, streamed=streamed)
    train_set = disc_images(images, size, seed=seed, dtype=dtype)
    val_set = disc_images(max(images // 4, 2), size, seed=seed + 1, dtype=dtype)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=devices, strategy=strategy,
        precision=precision, accumulate_grad_batches=accumulate, gradient_clip_val=clip,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    trainer.fit(module, DataLoader(train_set, batch_size=batch),
                DataLoader(val_set, batch_size=batch))  # fmt: skip
    if out is not None:
        # Every rank writes its own weights (``NAME.rankR.pt``): DDP keeps them equal.
        path = Path(out)
        torch.save(model.state_dict(), path.with_suffix(f".rank{trainer.global_rank}.pt"))
    if torch.distributed.is_initialized():
        # Lightning leaves the process group up; a process that exits with gloo's threads
        # still running can abort ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return module


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_file")
    parser.add_argument("plan")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=8, help="made-up training images")
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed, 64-true")
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--clip", type=float, default=None, help="gradient_clip_val")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help="e.g. ddp")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conventional", action="store_true", help="train without streaming")
    parser.add_argument("--out", default=None, help="save the weights here (one file per rank)")
    args = parser.parse_args(argv)
    train(args.model_file, args.plan, epochs=args.epochs, batch=args.batch, images=args.images,
          precision=args.precision, accumulate=args.accumulate, clip=args.clip,
          devices=args.devices, strategy=args.strategy, lr=args.lr, seed=args.seed,
          streamed=not args.conventional, out=args.out)  # fmt: skip


if __name__ == "__main__":
    main()
