"""SEGA math per step: the pack's guidance against the reference's, fed the same tensors, on the CPU.

What is timed, per sampler step (all warmed up, momentum on: the paper's steady state, every
concept at scale 5, threshold 0.9, weight 1; guidance scale 7.5):
  reference, pipeline: diffusers' SemanticStableDiffusionPipeline with a stand-in UNet that returns
      fixed predictions, run for S steps with N editing prompts minus the same run without editing
      prompts, divided by S: the reference's whole SEGA block (its per-step CPU copies of the
      estimates, its `.to("cpu")` moves and the N extra latent copies it feeds the UNet included;
      its CFG, scheduler and UNet call cancel out).
  reference, port: harness/reference.py's `reference_step` (the torch transcription that tests/core
      checks against the pipeline): CFG + SEGA math only, no copies.
  pack: torch.stack of the N concept predictions (as nodes/patch.py receives them from ComfyUI),
      sega_core.sega_step and the CFG sum u + s_g (t - u) + edit. (ComfyUI's denoised <-> eps
      conversions are left out here; the end-to-end benchmark includes them.)
Each side runs S consecutive steps per measurement (momentum carried), interleaved with the
others; the table gives medians per step and their ratios. Target: pack at least 5x faster than
the reference at every shape. The last column checks that the pack's noise prediction equals the
port's. Video latents and inputs over 2**24 elements are run too.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import _common
from harness import reference as _reference
from sega_core import Concept, Plan, sega_step

SHAPES = [(1, 4, 64, 64), (1, 4, 128, 128), (1, 16, 128, 128), (4, 4, 128, 128)]
COUNTS = [1, 3, 8]
VIDEO = (1, 16, 21, 60, 104)  # a Wan-style video latent: 21 latent frames of 60 x 104
LARGE = (1, 4, 2080, 2080)  # 17.3 M elements per concept, over torch.quantile's old 2**24 limit


def predictions(shape, n, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g)
    t = u + 0.3 * torch.randn(shape, generator=g)
    e = u.unsqueeze(0) + 0.3 * torch.randn((n,) + tuple(shape), generator=g)
    return u.to(device), t.to(device), e.to(device)


def _synced(fn, device):
    if torch.device(device).type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()
    return run


def runners(shape, n, steps, reference_step, with_pipeline=True, device="cpu", baseline=None):
    u, t, e = predictions(shape, n, device)
    concepts = [Concept(warmup=0)] * n
    plan = Plan.build(concepts, 0.1, 0.4)
    outs = [e[k].clone() for k in range(n)]  # separate tensors, as ComfyUI's calc_cond_batch returns them
    last = {}

    def pack():
        m = None
        for i in range(steps):
            edit, m, _ = sega_step(u, torch.stack(outs), plan.rows(i), i, plan, m)
            last["pack"] = u + (7.5 * (t - u) + edit)

    def port():
        m = None
        uc, tc, ec = u.cpu(), t.cpu(), e.cpu()  # the transcription allocates on the CPU
        for i in range(steps):
            last["port"], m = reference_step(uc, tc, ec, i, concepts, 7.5, 0.1, 0.4, m)

    def before():
        m = None
        for i in range(steps):
            edit, m = baseline(u, torch.stack(outs), plan.rows(i), i, plan, m)
            last["baseline"] = u + (7.5 * (t - u) + edit)

    fns = {"pack": pack}
    if baseline is not None:
        fns["baseline"] = before
    if torch.device(device).type == "cpu":
        fns["port"] = port
    else:
        port()  # only to check the pack's numbers
    if with_pipeline:
        pipe = _reference.FixedPipeline(u, t, e, steps)
        fns["pipeline"] = lambda: pipe.run(edit=True)
        fns["pipeline without SEGA"] = lambda: pipe.run(edit=False)
    return {k: _synced(f, device) for k, f in fns.items()}, last


def baseline_step(rev: str):
    """sega_step of sega_core as committed at git revision `rev` (imported as sega_core_baseline)."""
    folder = Path(tempfile.mkdtemp()) / "sega_core_baseline"
    folder.mkdir()
    names = subprocess.check_output(["git", "ls-tree", "--name-only", rev, "sega_core/"], cwd=_common.ROOT, text=True)
    for name in names.split():
        text = subprocess.check_output(["git", "show", f"{rev}:{name}"], cwd=_common.ROOT, text=True)
        (folder / Path(name).name).write_text(text)
    sys.path.insert(0, str(folder.parent))
    try:
        return importlib.import_module("sega_core_baseline").sega_step
    finally:
        sys.path.pop(0)


def reference_failure(shape) -> str:
    """What the reference's thresholding lines do with this latent shape."""
    try:
        _reference.threshold_lines(torch.randn((1,) + tuple(shape[1:])))
        return ""
    except RuntimeError as err:
        return str(err).splitlines()[0]


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--steps", type=int, help="steps per measurement (default 5, --quick 2)")
    p.add_argument("--repeats", type=int, help="interleaved measurements per side (default 5, --quick 2)")
    p.add_argument("--device", default="cpu", help="where the tensors live (default cpu; cuda on a GPU machine)")
    p.add_argument("--baseline", metavar="REV", help="also time sega_core as committed at this git revision")
    args = p.parse_args(argv)
    _common.setup(args)
    steps = args.steps or (2 if args.quick else 5)
    repeats = args.repeats or (2 if args.quick else 5)
    reference_step = _reference.reference_step
    baseline = baseline_step(args.baseline) if args.baseline else None

    rows, worst = [], None
    cases = [(s, n, True) for s in SHAPES for n in COUNTS] + [(VIDEO, 1, False), (VIDEO, 3, False), (LARGE, 1, False)]
    for shape, n, pipeline in cases:
        big = shape in (VIDEO, LARGE)
        fns, last = runners(shape, n, 1 if big else steps, reference_step, with_pipeline=pipeline,
                             device=args.device, baseline=baseline)
        times = _common.interleaved(fns, 1 if shape == LARGE else repeats, warmup=0 if shape == LARGE else 1)
        per = {k: _common.median(v) / (1 if big else steps) for k, v in times.items()}
        diff = (last["pack"].cpu() - last["port"]).abs().max().item()
        pack_ms, port_ms = per["pack"] * 1e3, per.get("port", float("nan")) * 1e3
        if pipeline:
            ref_ms = (per["pipeline"] - per["pipeline without SEGA"]) * 1e3
            ratio = ref_ms / pack_ms
            worst = ratio if worst is None else min(worst, ratio)
            ref_cell, ratio_cell, verdict = f"{ref_ms:.2f}", f"{ratio:.1f}", _common.verdict(ratio >= 5)
        else:
            failure = reference_failure(shape)
            ref_cell = f"fails: {failure}" if failure else "runs (4-D only via port)"
            ratio_cell, verdict = "-", "handled" if torch.isfinite(last["pack"]).all() else "FAIL"
        numel = n * int(torch.tensor(shape).prod())
        timed_port = "port" in per  # on the CPU only: elsewhere the port runs once, to check the numbers
        rows.append([f"{tuple(shape)}", n, f"{numel / 1e6:.1f} M", ref_cell, f"{port_ms:.2f}" if timed_port else "-",
                     f"{pack_ms:.2f}", ratio_cell, f"{port_ms / pack_ms:.1f}" if timed_port else "-", verdict,
                     f"{diff:.1e}"])
        if baseline is not None:
            rows[-1] += [f"{per['baseline'] * 1e3:.2f}", f"{per['baseline'] / per['pack']:.1f}"]
        print(" | ".join(str(c) for c in rows[-1]), flush=True)

    headers = ["latent", "N", "concept elements", "reference pipeline ms/step", "reference port ms/step",
               "pack ms/step", "pipeline / pack", "port / pack", "target >= 5x", "max abs(pack - port)"]
    if baseline is not None:
        headers += [f"sega_core at {args.baseline} ms/step", f"{args.baseline} / pack"]
    body = _common.table(headers, rows)
    large_ok = reference_failure(LARGE) == ""
    notes = (f"Steps per measurement: {steps}; interleaved measurements per side: {repeats} (video and "
             f"{LARGE}: 1 step; {LARGE}: 1 measurement). Smallest pipeline / pack ratio: {worst:.1f}. "
             f"The reference pipeline takes only 4-D latents; its thresholding lines fail on the video latent "
             f"(shown), so the video rows compare with the port, generalised to 5-D. torch.quantile "
             f"{'accepts' if large_ok else 'refuses'} the {LARGE} input in torch {torch.__version__} (older "
             f"torch refused more than 2**24 elements); the pack selects without that limit.")
    where = "CPU" if args.device == "cpu" else args.device
    _common.finish(args, _common.section(f"2. SEGA math per step ({where})", body, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
