"""Shared helpers of the benchmarks: side-by-side timing, the machine, markdown tables, arguments.

Timing rule: every figure is a ratio of runs measured in the same process, interleaved
(A, B, A, B, ...) after a warm-up, and summarised by medians, so that a machine shared with
other jobs slows both sides alike. Absolute times are printed for context only.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller runs (a smoke test)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for every measurement (default 1: steadier on a shared machine)")
    p.add_argument("--markdown", help="also write this script's results section to this file")
    return p


def setup(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Seconds per call of each function, run in turn A, B, C, A, B, C, ... (warm-up rounds dropped)."""
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average %.1f" % os.getloadavg()[0]
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{load}{gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)")


def command() -> str:
    """The command line that produced these results (output paths left out)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    words, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.startswith(("--markdown=", "--output=")):
            skip = False
            continue
        if a in ("--markdown", "--output"):
            skip = True
            continue
        words.append(shlex.quote(a))
    return " ".join(["python", str(script)] + words)


def table(headers: list, rows: list) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def section(title: str, body: str, notes: str = "") -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = (f"### {title}\n\nCommand: `{command()}`  \nDate: {when}  \nMachine: {machine()}\n\n{body}\n")
    return text + (f"\n{notes}\n" if notes else "")


def finish(args, text: str) -> None:
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"
