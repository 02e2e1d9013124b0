"""On a GPU: SEGA's steps never wait for the device, and the SEGA math's share of a sampling step.

Without CUDA this prints one SKIP line and exits 0 (`--dry-run` runs the same code on the CPU,
with small sizes and no sync checks, to test the script itself).

1. Core: sega_step on device tensors (all warmed up; partly warmed up; per-concept thresholds;
   first step; a 5-D video latent; float16), each after one warm-up call, inside
   torch.cuda.set_sync_debug_mode("error"): any device-to-host sync raises.
2. Sampler: ComfyUI's sampler with SEGA Apply (2 concepts) on a small SD1.5 UNet on the GPU, in
   sync debug mode "warn"; the warnings are attributed to the file that made the call. Syncs
   made from the pack may happen once per run (reading the sigma schedule, the final NaN check)
   but never per step: the pack's count must be the same for 8 and 16 steps.
3. Share: a full-size SD1.5 UNet (random weights, float16) samples a 128x128 latent with N = 3
   concepts (5 rows per call); CUDA events around every sega_step call give the SEGA math's share
   of the run's GPU time (the host glue's conversions are not in that share).
4. End to end: the same full-size UNet samples a 64x64 latent (512 px) for 20 steps with plain CFG
   and with SEGA Apply (N = 1, 2, 4, warm-up 4, momentum 0.1), runs interleaved, medians compared:
   time ratio against the row ratio (the work SEGA has to add), as bench/end_to_end.py does on the
   CPU. Target: time ratio <= 1.05 x row ratio.
5. The reference end to end: diffusers' SemanticStableDiffusionPipeline with the same UNet
   architecture (diffusers' UNet2DConditionModel in the SD1.5 configuration, random weights,
   float16), stand-ins for the tokenizer and text encoder (77 tokens of 768), 64x64 latent, 20
   steps, DDIM, with and without N = 1, 2, 4 editing prompts (the same SEGA settings): its time
   ratio beside the pack's from 4. Both add the same rows (momentum on: every concept every step).
"""
from __future__ import annotations

import sys
import time
import warnings

import torch

import _common
import _comfy
from harness.tiny import unet_config
from sega_core import Concept, Plan, sega_step

SD15_FULL = {"model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1}
SD15_SMALL = {"model_channels": 320, "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
              "transformer_depth_output": [1, 1], "transformer_depth_middle": -2}


def core_cases(device):
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    warm = Plan.build([Concept(warmup=0)] * 3)
    staggered = Plan.build([Concept(warmup=0), Concept(warmup=5, reverse=True), Concept(warmup=1, cooldown=3)])
    mixed = Plan.build([Concept(warmup=0, threshold=0.9), Concept(warmup=0, threshold=0.5, scale=3.0)])
    return {
        "3 concepts, all warmed up": (r(1, 4, 128, 128), r(3, 1, 4, 128, 128), [0, 1, 2], 5, warm, r(1, 4, 128, 128)),
        "partly warmed up": (r(1, 4, 64, 64), r(3, 1, 4, 64, 64), [0, 1, 2], 2, staggered, r(1, 4, 64, 64)),
        "per-concept thresholds": (r(2, 4, 64, 64), r(2, 2, 4, 64, 64), [0, 1], 3, mixed, r(2, 4, 64, 64)),
        "first step (no momentum yet)": (r(1, 4, 64, 64), r(3, 1, 4, 64, 64), [0, 1, 2], 0, warm, None),
        "video (1, 16, 5, 30, 52)": (r(1, 16, 5, 30, 52), r(3, 1, 16, 5, 30, 52), [0, 1, 2], 5, warm,
                                     r(1, 16, 5, 30, 52)),
        "float16": (r(1, 4, 64, 64, dtype=torch.float16), r(3, 1, 4, 64, 64, dtype=torch.float16), [0, 1, 2], 5, warm,
                    r(1, 4, 64, 64, dtype=torch.float16)),
    }


def check_core(device, dry_run):
    rows = []
    for name, args in core_cases(device).items():
        sega_step(*args)  # warm-up: lazy initialisation and the constants' one-time copies
        try:
            if not dry_run:
                torch.cuda.set_sync_debug_mode("error")
            sega_step(*args)
            result = "PASS"
        except RuntimeError as err:
            result = f"FAIL: {str(err).splitlines()[0]}"
        finally:
            if not dry_run:
                torch.cuda.set_sync_debug_mode("default")
        rows.append([name, result])
    return rows


def unet(device, full: bool, dtype):
    import comfy.model_patcher
    import comfy.supported_models

    cfg = unet_config(comfy.supported_models.SD15, num_classes=None, dtype=dtype, use_temporal_resblock=False,
                      **(SD15_FULL if full else SD15_SMALL))
    model = comfy.supported_models.SD15(cfg).get_model({}, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device), offload_device=torch.device("cpu"))


def cond(seed):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def count_syncs(model, steps, dry_run, pos, neg):
    """(syncs from the pack's files, syncs elsewhere, pack locations) during one sampling run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if not dry_run:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            _comfy.sample(model, pos, neg, steps, size=16)
        finally:
            if not dry_run:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    ours = [w for w in syncs if str(_common.ROOT) in str(w.filename) and "/bench/" not in str(w.filename)]
    where = sorted({f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in ours})
    return len(ours), len(syncs) - len(ours), where


def check_sampler(device, dry_run):
    model = unet(device, full=False, dtype=torch.float32)
    pos, neg = cond(1), cond(2)
    patched = _comfy.sega(model, _comfy.concepts([cond(3), cond(4)], [{"warmup": 2}, {"warmup": 1, "cooldown": 6}]))
    _comfy.sample(patched, pos, neg, 2, size=16)  # warm-up
    rows, counts = [], {}
    for name, m, steps in [("plain CFG", model, 8), ("SEGA", patched, 8), ("SEGA", patched, 16)]:
        ours, other, where = count_syncs(m, steps, dry_run, pos, neg)
        counts[(name, steps)] = ours
        rows.append([name, steps, ours, other, ", ".join(where) or "-"])
    per_step_free = counts[("SEGA", 8)] == counts[("SEGA", 16)]
    return rows, per_step_free


def sega_share(device, dry_run, steps=10):
    patch = _comfy.pack_module("nodes.patch")
    full = not dry_run
    model = unet(device, full=full, dtype=torch.float16 if full else torch.float32)
    size = 128 if full else 16
    calls = []
    original = patch.sega_step

    def timed(*args, **kwargs):
        if dry_run:
            start = time.perf_counter()
            out = original(*args, **kwargs)
            calls.append(time.perf_counter() - start)
            return out
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = original(*args, **kwargs)
        end.record()
        calls.append((begin, end))
        return out

    patched = _comfy.sega(model, _comfy.concepts([cond(3), cond(4), cond(5)], [{"warmup": 2}] * 3))
    _comfy.sample(patched, cond(1), cond(2), 2, size=size)  # warm-up (loads the model)
    patch.sega_step = timed
    try:
        calls.clear()
        if dry_run:
            start = time.perf_counter()
            _comfy.sample(patched, cond(1), cond(2), steps, size=size)
            total = time.perf_counter() - start
            sega = sum(calls)
        else:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            _comfy.sample(patched, cond(1), cond(2), steps, size=size)
            end.record()
            torch.cuda.synchronize()
            total = begin.elapsed_time(end) / 1e3
            sega = sum(b.elapsed_time(e) for b, e in calls) / 1e3
    finally:
        patch.sega_step = original
    what = "full-size SD1.5 UNet, float16" if full else "small SD1.5 UNet (dry run)"
    return [[what, f"{size}x{size}", 3, steps, f"{total / steps * 1e3:.1f}", f"{sega / steps * 1e3:.2f}",
             f"{100 * sega / total:.1f}%"]]


def end_to_end(device, dry_run):
    full = not dry_run
    model = unet(device, full=full, dtype=torch.float16 if full else torch.float32)
    size, steps, repeats = (64, 20, 5) if full else (8, 4, 1)
    pos, neg = cond(1), cond(2)
    models = {"plain CFG": model}
    for n in (1, 2, 4):
        models[f"SEGA N={n}"] = _comfy.sega(model, _comfy.concepts([cond(10 + k) for k in range(n)],
                                                                   [{"warmup": steps // 5}] * n), 0.1)
    table_rows = []
    for name, rows, row_ratio, t, time_ratio, passed in _comfy.against_plain(
            models, pos, neg, steps, size, repeats, sync=None if dry_run else torch.cuda.synchronize):
        table_rows.append([name, rows, f"{row_ratio:.3f}", f"{t * 1e3:.0f}", f"{time_ratio:.3f}",
                           f"{time_ratio / row_ratio:.3f}", "-" if name == "plain CFG" else _common.verdict(passed)])
    return table_rows, f"{size}x{size}", steps


def reference_end_to_end(device, dry_run):
    """{N: time ratio} of the reference pipeline with N editing prompts against itself without."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from harness.reference import EmbeddingTextEncoder, Tokenizer, pipeline

    full = not dry_run
    dtype = torch.float16 if full else torch.float32
    size, steps, repeats = (64, 20, 5) if full else (8, 4, 1)
    config = {} if full else {"block_out_channels": (32, 64), "layers_per_block": 1,
                              "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=size, cross_attention_dim=768, **config).to(device=device, dtype=dtype)
    table = torch.randn(200, 768, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    # 77 tokens of 768, as SD1.5's CLIP gives them
    pipe = pipeline(unet, tokenizer=Tokenizer(77), text_encoder=EmbeddingTextEncoder(table),
                    scheduler=DDIMScheduler(num_train_timesteps=1000))

    def run(n):
        kw = {}
        if n:
            kw = dict(editing_prompt=[f"concept{k}" for k in range(n)], edit_guidance_scale=5.0,
                      edit_warmup_steps=steps // 5, edit_threshold=0.9, edit_momentum_scale=0.1, edit_mom_beta=0.4)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            pipe(prompt="prompt", height=8 * size, width=8 * size, num_inference_steps=steps, guidance_scale=7.5,
                 output_type="latent", generator=torch.Generator(device).manual_seed(0), **kw)
        if not dry_run:
            torch.cuda.synchronize()

    times = _common.interleaved({n: (lambda n=n: run(n)) for n in (0, 1, 2, 4)}, repeats, warmup=1)
    plain = _common.median(times[0])
    return {n: _common.median(times[n]) / plain for n in (1, 2, 4)}


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--dry-run", action="store_true", help="run on the CPU with small sizes (tests the script)")
    args = p.parse_args(argv)
    _common.setup(args)
    if not torch.cuda.is_available() and not args.dry_run:
        text = _common.section("4. GPU: syncs and the SEGA math's share", "SKIP: no CUDA device on this machine.")
        _common.finish(args, text)
        return 0
    device = "cpu" if args.dry_run else "cuda"
    _comfy.start()
    core = check_core(device, args.dry_run)
    sampler, per_step_free = check_sampler(device, args.dry_run)
    share = sega_share(device, args.dry_run)
    e2e, e2e_size, e2e_steps = end_to_end(device, args.dry_run)
    ref = reference_end_to_end(device, args.dry_run)
    pack_ratio = {int(r[0].split("=")[1]): float(r[4]) for r in e2e if r[0] != "plain CFG"}
    versus = [[n, f"{(2 + n) / 2:.3f}", f"{ref[n]:.3f}", f"{pack_ratio[n]:.3f}", f"{ref[n] / pack_ratio[n]:.2f}"]
              for n in (1, 2, 4)]
    body = "\n\n".join([
        _common.table(["sega_step case", "no sync (debug mode 'error')"], core),
        _common.table(["sampling run", "steps", "syncs from the pack", "syncs elsewhere (ComfyUI, torch)",
                       "where in the pack"], sampler),
        f"Pack syncs independent of the step count (none per step): **{_common.verdict(per_step_free)}**",
        _common.table(["model", "latent", "N", "steps", "GPU ms per step", "sega_step ms per step",
                       "SEGA math share"], share),
        f"End to end, {'full-size SD1.5 UNet, float16' if not args.dry_run else 'small UNet (dry run)'}, "
        f"{e2e_size} latent, {e2e_steps} steps, euler, cfg 7.5:",
        _common.table(["run", "model rows", "row ratio", "ms per run (median)", "time ratio", "time / row ratio",
                       "time <= 1.05 x rows"], e2e),
        "The reference pipeline (diffusers' UNet, same size, dtype, steps and settings) against itself "
        "without editing prompts, beside the pack's time ratio above:",
        _common.table(["N", "row ratio (both)", "reference time ratio", "pack time ratio",
                       "reference / pack"], versus),
    ])
    if args.dry_run:
        body = "DRY RUN on the CPU: the sync checks are not active, sizes are small.\n\n" + body
    _common.finish(args, _common.section("4. GPU: syncs and the SEGA math's share", body))
    failed = any(r[1] != "PASS" for r in core) or not per_step_free
    return 1 if failed and not args.dry_run else 0


if __name__ == "__main__":
    sys.exit(main())
