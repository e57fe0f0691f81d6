"""Runs one memory measurement (see ``tileplan.measure``); as a child process on CPU.

    python -m tileplan._measure_child < spec.json     # prints one JSON line

On CPU the peak is the process's RSS high-water mark above its RSS after the model was loaded
and warmed up (kernels initialised), so it counts what the measured work really held.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import psutil
import torch

from executor import StreamingCNN, analyze_trunk, streaming_step
from executor.plan import dtype_of
from tileplan.model_file import load_model_file

OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-4),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-4),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
}


def _reset_peak_rss() -> int:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); return current RSS.

    Elsewhere the high-water mark cannot be reset, and earlier peaks may hide smaller ones.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
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
    dtype = dtype_of(spec["dtype"])
    loaded = load_model_file(spec["model_file"], spec["split"])
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    amp = dtype if dtype in (torch.bfloat16, torch.float16) else None
    model = loaded.model.to(device=device, dtype=compute)
    trunk, head = loaded.trunk, loaded.head
    shape = tuple(spec["shape"])
    # Warm up forward and backward kernels on a small input, so that their one-off
    # allocations (thread pools, primitive caches) are in the baseline, not in the peak.
    small = max(analyze_trunk(trunk).receptive_field) + 1
    _tile_pass(trunk, (1, shape[1], *(small,) * (len(shape) - 2)), device, compute, amp)
    cuda = device.type == "cuda"
    if spec["mode"] == "tiles":
        for p in trunk.parameters():  # grads are model state, allocated before a tile
            p.grad = torch.zeros_like(p)
    else:
        model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _reset_peak_rss()
    start = time.perf_counter()
    if spec["mode"] == "tiles":
        # Ascending crop sizes, so that a high-water mark that cannot be reset still gives
        # each crop's own peak.
        peaks = []
        for crop in sorted(spec["shapes"], key=lambda s: _volume(s)):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            else:
                base = _reset_peak_rss()
            _tile_pass(trunk, tuple(crop), device, compute, amp)
            peak = torch.cuda.max_memory_allocated(device) if cuda else _peak_rss()
            peaks.append([list(crop), int(peak - base)])
        return {"tiles": peaks, "seconds": time.perf_counter() - start}
    else:
        image = torch.randn(shape, dtype=compute)  # images stay on the host
        if not cuda:
            image = image.to(device)
        scnn = StreamingCNN(trunk, spec["tile"], forward_tile_shape=spec["forward_tile"],
                            amp_dtype=amp)  # fmt: skip
        optimizer = OPTIMIZERS[spec["optimizer"]](
            [p for p in model.parameters() if p.requires_grad]
        )
        target = torch.zeros(shape[0], dtype=torch.long)
        streaming_step(scnn, head, image, target, _generic_loss)
        optimizer.step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
        reserved = torch.cuda.max_memory_reserved(device)
    else:
        peak, reserved = _peak_rss() - base, None
    # The model's parameters were already in the baseline; a step's peak includes them.
    peak += sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return {"peak_bytes": int(peak), "reserved_bytes": reserved, "seconds": seconds}


def _volume(shape: list[int]) -> int:
    n = 1
    for v in shape:
        n *= v
    return n


def _tile_pass(trunk: torch.nn.Module, shape: tuple[int, ...], device: torch.device,
               dtype: torch.dtype, amp: torch.dtype | None) -> None:  # fmt: skip
    """One backward tile: forward with autograd, then backward (as StreamingCNN does)."""
    x = torch.randn(shape, device=device, dtype=dtype)
    with torch.autocast(device.type, dtype=amp) if amp else torch.enable_grad():
        y = trunk(x)
    y.backward(torch.ones_like(y))


def _generic_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class logits, else a mean square (memory does not depend on it)."""
    if logits.dim() == 2 and logits.shape[1] > 1:
        return torch.nn.functional.cross_entropy(logits.float(), target)
    return logits.float().pow(2).mean()


def main() -> None:
    spec = json.loads(sys.stdin.read())
    print(json.dumps(run_measurement(spec)))


if __name__ == "__main__":
    main()
