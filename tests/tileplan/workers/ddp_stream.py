"""A DistributedDataParallel training run of ``tileplan.stream`` (launched by torchrun in
tests/tileplan/test_stream_ddp.py): gloo, ``find_unused_parameters=False``, plain SGD.

Usage: python -m torch.distributed.run --nproc-per-node 2 -m tests.tileplan.workers.ddp_stream
       MODEL_SOURCE PLAN OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import tileplan

STEPS, GLOBAL_BATCH = 3, 4


def batches(size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The run's global batches, the same in every process and in the single-process oracle."""
    gen = torch.Generator().manual_seed(7)
    shape = (GLOBAL_BATCH, 3, size, size)
    out = []
    for _ in range(STEPS):
        image = torch.randn(shape, generator=gen, dtype=torch.float64)
        out.append((image, torch.randint(0, 2, (GLOBAL_BATCH,), generator=gen)))
    return out


def build(source: str) -> nn.Module:
    namespace: dict[str, object] = {}
    exec(source, namespace)
    return namespace["build_model"]().double()  # type: ignore[operator,no-any-return]


def main() -> None:
    source, plan_path, out = Path(sys.argv[1]).read_text(), sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = build(source)
        plan = tileplan.load_plan(plan_path)
        net = DistributedDataParallel(tileplan.stream(model, plan).train(),
                                      find_unused_parameters=False)  # fmt: skip
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        for image, target in batches(plan.image_shape_px[0]):
            mine = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
            optimizer.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients: the mean over the global batch.
            loss = nn.functional.cross_entropy(net(image[mine]), target[mine])
            loss.backward()
            optimizer.step()
        if rank == 0:
            torch.save(model.state_dict(), out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
