"""Runs one memory measurement (see ``tileplan.measure``); as a child process on CPU.

    python -m tileplan.planning.measure_child < spec.json     # prints one JSON line

On CPU the peak is the process's RSS high-water mark above its RSS after the model was loaded
and warmed up (kernels initialised), so it counts what the measured work really held. On CUDA
it is what the caching allocator reserved (or allocated, if more), since a run needs the device
memory the allocator holds, not only what its tensors occupy.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from typing import Any

import psutil
import torch

from executor import (
    Precision,
    SegmentSpec,
    StreamingCNN,
    analyze_trunk,
    build_program,
    map_cut_points,
    streaming_step,
)
from tileplan.host_allocator import use_host_allocator
from tileplan.planning.model_file import load_model_file
from tileplan.settings import OPTIMIZERS

__all__ = ["peak_rss", "reset_peak_rss", "run_measurement", "state_bytes"]

_LR = 1e-4  # the learning rate does not change memory or time


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers: in memory before a step starts, so a
    step's peak above its baseline is counted with them."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def reset_peak_rss() -> int:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); return current RSS.

    Elsewhere the high-water mark cannot be reset, and earlier peaks may hide smaller ones.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """The RSS high-water mark (bytes): VmHWM on Linux, else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_measurement(spec: Any) -> dict[str, Any]:
    """Measure ``spec`` (a MeasureSpec or its dict) in this process."""
    spec = spec if isinstance(spec, dict) else spec.__dict__
    device = torch.device(spec["device"])
    precision = Precision.of(spec["dtype"])
    shape = tuple(spec["shape"])
    loaded = load_model_file(spec["model_file"], spec["split"],
                             batch_norm=spec.get("batch_norm", "frozen"),
                             n_axes=len(shape) - 2)  # fmt: skip
    model = loaded.model.to(device=device, dtype=precision.param_dtype)
    trunk, head = loaded.trunk, loaded.head
    # Warm up forward and backward kernels on a small input, so that their one-off
    # allocations (thread pools, primitive caches) are in the baseline, not in the peak
    # (global-context layers make deep receptive fields: no larger than the image's crops).
    geometry = analyze_trunk(trunk, len(shape) - 2)
    small = min(max(geometry.receptive_field) + 1, max(512, 4 * max(geometry.output_stride)))
    small_shape = (1, shape[1], *(small,) * (len(shape) - 2))
    _tile_pass(trunk, small_shape, device, precision)
    tile_pass = _tile_pass
    if spec.get("part", -1) >= 0:  # tiles of one segment of the trunk's program
        tile_pass = _part_pass(trunk, spec["part"], tuple(spec.get("ends", ())), shape, device,
                               precision)  # fmt: skip
        tile_pass(trunk, small_shape, device, precision)
    if spec["mode"] != "tiles":  # also the head, the loss and an optimizer's step kernels
        warm = OPTIMIZERS[spec["optimizer"]].build(
            [p for p in model.parameters() if p.requires_grad], _LR
        )
        _training_step(spec, model, trunk, head, small_shape, device, precision, warm)
        del warm
    if spec["mode"] == "tiles":
        for p in trunk.parameters():  # grads are model state, allocated before a tile
            p.grad = torch.zeros_like(p)
        start = time.perf_counter()
        peaks = _tile_peaks(spec["shapes"], trunk, tile_pass, device, precision)
        return {"tiles": peaks, "seconds": time.perf_counter() - start}
    model.zero_grad(set_to_none=True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
    else:
        base = reset_peak_rss()
    # Steady state: the first step allocates gradients and optimizer state (after the tiles
    # are done); the second runs with them in memory, as every later step of a run does.
    optimizer = OPTIMIZERS[spec["optimizer"]].build(
        [p for p in model.parameters() if p.requires_grad], _LR
    )
    _training_step(spec, model, trunk, head, shape, device, precision, optimizer)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    start = time.perf_counter()  # time the steady-state step only
    with _Sampler(device, base) as sampler:
        _training_step(spec, model, trunk, head, shape, device, precision, optimizer)
        if cuda:
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    # The model's parameters were already in the baseline; a step's peak includes them.
    state = state_bytes(model)
    if cuda:
        # A run needs what the caching allocator reserves (its cached blocks and rounding
        # included), not only what tensors occupy: the step's peak is the larger.
        reserved = torch.cuda.max_memory_reserved(device)
        peak = max(torch.cuda.max_memory_allocated(device) - base + state, reserved)
    else:
        peak, reserved = peak_rss() - base + state, None
    timeline = [[t, b + state] for t, b in sampler.timeline]
    return {"peak_bytes": int(peak), "reserved_bytes": reserved, "seconds": seconds,
            "timeline": timeline}  # fmt: skip


def _tile_peaks(shapes: list[list[int]], trunk: torch.nn.Module, tile_pass: Any,
                device: torch.device, precision: Precision) -> list[list[Any]]:  # fmt: skip
    """``[crop, bytes]``: each crop's backward-tile peak above what was held before it. On
    CUDA the larger of what was allocated and what the caching allocator reserved."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        base_reserved = torch.cuda.memory_reserved(device)
    peaks = []
    # Ascending crop sizes, so that a high-water mark that cannot be reset still gives each
    # crop's own peak.
    for crop in sorted(shapes, key=lambda s: _volume(s)):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            base = reset_peak_rss()
        tile_pass(trunk, tuple(crop), device, precision)
        if cuda:
            peak = max(torch.cuda.max_memory_allocated(device) - base,
                       torch.cuda.max_memory_reserved(device) - base_reserved)  # fmt: skip
        else:
            peak = peak_rss() - base
        peaks.append([list(crop), int(peak)])
    return peaks


def _training_step(
    spec: dict[str, Any],
    model: torch.nn.Module,
    trunk: torch.nn.Module,
    head: torch.nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    precision: Precision,
    optimizer: torch.optim.Optimizer,
) -> None:
    """One training step, streaming (``spec["mode"] == "step"``) or conventional."""
    image = torch.randn(shape, dtype=precision.param_dtype)  # images stay on the host
    optimizer.zero_grad(set_to_none=False)  # gradients persist between steps, as in training
    target = torch.zeros(shape[0], dtype=torch.long)
    if spec["mode"] == "step":
        scnn: StreamingCNN
        if spec.get("segments"):
            chain = [SegmentSpec(end, tuple(tile), tuple(forward), bool(on_host))
                     for end, tile, forward, on_host in spec["segments"]]  # fmt: skip
            scnn = StreamingCNN(trunk, segments=chain, amp_dtype=precision.amp_dtype)
        else:
            scnn = StreamingCNN(
                trunk,
                spec["tile"],
                forward_tile_shape=spec["forward_tile"],
                amp_dtype=precision.amp_dtype,
            )
        streaming_step(scnn, head, image, target, _generic_loss)
    else:  # "conventional": the whole image at once
        with precision.autocast(device):
            logits = model(image.to(device))
            loss = _generic_loss(logits, target.to(device))
        loss.backward()
    optimizer.step()


class _Sampler:
    """Samples memory above ``base`` every few milliseconds in a thread while active:
    CUDA allocated bytes, or the process's RSS."""

    PERIOD_S = 0.005

    def __init__(self, device: torch.device, base: int) -> None:
        self.device, self.base = device, base
        self.timeline: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) - self.base
        return psutil.Process().memory_info().rss - self.base

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            self.timeline.append([round(time.perf_counter() - start, 4), self._read()])
            self._stop.wait(self.PERIOD_S)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _volume(shape: list[int]) -> int:
    n = 1
    for v in shape:
        n *= v
    return n


def _tile_pass(trunk: torch.nn.Module, shape: tuple[int, ...], device: torch.device,
               precision: Precision) -> None:  # fmt: skip
    """One backward tile: forward with autograd, then backward (as StreamingCNN does)."""
    x = torch.randn(shape, device=device, dtype=precision.param_dtype)
    with precision.autocast(device):
        y = trunk(x)
    y.backward(torch.ones_like(y))


def _part_pass(trunk: torch.nn.Module, index: int, ends: tuple[str, ...],
               image: tuple[int, ...], device: torch.device, precision: Precision
               ) -> Any:  # fmt: skip
    """A backward tile of segment ``index`` of the trunk's program (cut where ``ends`` says):
    its maps cropped to the spatial size of the shape it is called with, its statistics held
    (random values)."""
    from tileplan.planning.estimate import value_shapes

    points = set(map_cut_points(trunk, len(image) - 2))
    program = build_program(trunk, len(image) - 2, [e for e in ends if e in points])
    part = program.streams[index]
    values = value_shapes(program, image, precision.param_dtype)
    stats = [torch.randn(values[n][0], device=device).to(values[n][1]) for n in part.stats]

    def run(_: torch.nn.Module, shape: tuple[int, ...], device: torch.device,
            precision: Precision) -> None:  # fmt: skip
        crops = []
        for name in part.inputs:
            full = list(values[name][0])
            for axis, dim in enumerate(program.maps[name].spatial_dims):
                full[dim] = min(shape[2 + axis], full[dim])
            crops.append(torch.randn(full, device=device, dtype=precision.param_dtype))
        with precision.autocast(device):
            outputs = [o for o in part.module(*crops, *stats) if o.requires_grad]
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])

    return run


def _generic_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class logits, else a mean square (memory does not depend on it)."""
    if logits.dim() == 2 and logits.shape[1] > 1:
        return torch.nn.functional.cross_entropy(logits.float(), target)
    return logits.float().pow(2).mean()


def main() -> None:
    use_host_allocator()  # before the model is loaded: as training runs
    spec = json.loads(sys.stdin.read())
    print(json.dumps(run_measurement(spec)))


if __name__ == "__main__":
    main()
