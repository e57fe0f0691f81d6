"""tileplan: plan and run streaming training of CNNs on images larger than device memory.

The Python API (the command line is a thin layer over it)::

    import tileplan

    plan = tileplan.profile(model, image=8192, budget="24GiB")   # what `tileplan profile` does
    plan.save("plan.yaml")
    print(tileplan.memory_report(plan))                         # what it prints
    net = tileplan.stream(model, plan)                          # an nn.Module: model, streamed
    loss = criterion(net(image), target)
    loss.backward()                                             # exact gradients, via autograd

On CPU, call ``tileplan.use_host_allocator()`` at the start of a training script for its
peak to be the plan's (the allocator setting the planner measures under; see
``tileplan.host_allocator``).
"""

from executor import Plan, PlanError, StreamingError, load_plan, save_plan
from tileplan.api import MemoryReport, largest_image, memory_report, profile
from tileplan.host_allocator import use_host_allocator
from tileplan.streamed import StreamedModel, stream

__version__ = "0.1.0"

__all__ = [
    "MemoryReport",
    "Plan",
    "PlanError",
    "StreamedModel",
    "StreamingError",
    "largest_image",
    "load_plan",
    "memory_report",
    "profile",
    "save_plan",
    "stream",
    "use_host_allocator",
]
