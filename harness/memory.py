"""Measured CPU memory of a call: torch.profiler's allocation records (profile_memory=True).

`allocations(fn)` runs fn once under the profiler and replays every CPU allocation and free it
recorded, in order: the peak of the bytes allocated during the call above what was allocated
before it (tensors that exist before the call, such as its inputs and a model's weights, do not
count; what the call returns counts while it lives), and the largest single allocation. Used by
the attention-mask benchmark and tests (the capture's temporaries against one latent).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Allocations:
    peak: int  # bytes: the highest sum of the call's live allocations
    largest: int  # bytes: the largest single allocation
    count: int  # allocations made
    result: Any  # what fn returned


def allocations(fn: Callable[[], Any]) -> Allocations:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.remove(path)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    records = [e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    if not records:
        raise RuntimeError("torch.profiler recorded no CPU memory events (profile_memory=True)")
    records.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    live = peak = largest = count = 0
    for e in records:
        n = int(e["args"]["Bytes"])
        live += n
        peak = max(peak, live)
        if n > 0:
            largest = max(largest, n)
            count += 1
    return Allocations(peak, largest, count, result)
