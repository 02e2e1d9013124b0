"""Cross-attention masks (SEGA Concept's mask_from): the cost of `attention` and `intersect` against `implicit`.

A tiny random-weight SD1.5 UNet with three levels and cross-attention on the deepest one (a
quarter of the latent: the layers LEDITS++ takes its maps from, 3 of them) samples with SEGA Apply
and one concept (warm-up 0, so the concept acts at every step), euler, cfg 7.5, through ComfyUI's
sampler (comfy.sample.sample, what KSampler runs). Timed runs of the three modes are interleaved
and their medians compared:
    extra time per step = median(mode) / median(implicit) - 1        target <= 5%
The model rows are the same in all three modes (3 per step: positive, negative, concept).

Memory, from the shapes the capture actually sees (one layer of the run): what it keeps per
concept between the model call and the edit (one map of the attention map's resolution) and what
one captured layer allocates while it runs (the concept row's q and k projections and its
probabilities), each against one latent (C x H x W float32) of the same run.
"""
from __future__ import annotations

import sys

import _common
import _comfy

UNET = {"num_res_blocks": [1, 1, 1], "channel_mult": [1, 1, 1], "transformer_depth": [0, 0, 1],
        "transformer_depth_output": [0, 0, 0, 0, 1, 1]}


def build_model():
    import comfy.supported_models

    from harness.tiny import init_weights, patcher, unet_config

    cfg = unet_config(comfy.supported_models.SD15, **UNET, transformer_depth_middle=-2, num_classes=None,
                      adm_in_channels=None)
    model = comfy.supported_models.SD15(cfg).get_model({})
    init_weights(model, 2, 0.05, norms_at_one=True)
    return patcher(model)


def clip_like(seed: int):
    """A CLIP-shaped embedding: a large start-of-text vector shared by all prompts, then random tokens."""
    import torch

    e = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed))
    e[0, 0] = 4.0 * torch.randn(768, generator=torch.Generator().manual_seed(0))
    return [[e, {}]]


def capture_cost(model, size: int, repeats: int) -> float:
    """Milliseconds of the capture's own work per step, timed alone (steadier on a shared machine
    than the difference of two whole runs): the attn2_patch at each captured layer with the shapes
    of a run (one concept row of three), then the mask from the map."""
    import time

    import torch

    am = _comfy.pack_module("nodes.attention_masks")
    from sega_core.attention import attention_mask

    dm = model.model.diffusion_model
    layers = [(kind, i) for kind, blocks in (("input", dm.input_blocks), ("output", dm.output_blocks))
              for i, b in enumerate(blocks) if any(hasattr(x, "transformer_blocks") for x in b)]
    capture = am.AttentionCapture(dm, model.model)
    width = next(b.transformer_blocks[0].attn2.to_q.in_features for b in dm.output_blocks for b in b
                 if hasattr(b, "transformer_blocks"))
    q_len = (size // 4) ** 2
    n = torch.randn(3, q_len, width)
    ctx = torch.randn(3, 77, 768)
    opts = [{"block": layer, "block_index": 0, "cond_or_uncond": [0, 1, 2], "original_shape": [3, 4, size, size],
             "n_heads": 8, am.ATTN_KEY: capture} for layer in layers]
    times = []
    for r in range(repeats + 5):
        start = time.perf_counter()
        capture.begin({2: 0})
        for o in opts:
            am.attention_patch(n, ctx, ctx, o)
        maps = capture.end()
        attention_mask(maps[0], 0.9, (size, size))
        if r >= 5:
            times.append(time.perf_counter() - start)
    return 1000 * _common.median(times)


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--size", type=int, help="latent side (default 32 = 256 px, --quick 16)")
    p.add_argument("--steps", type=int, help="sampler steps (default 10, --quick 4)")
    p.add_argument("--repeats", type=int, help="interleaved timed runs per mode (default 5, --quick 1)")
    args = p.parse_args(argv)
    _common.setup(args)
    size = args.size or (16 if args.quick else 32)
    steps = args.steps or (4 if args.quick else 10)
    repeats = args.repeats or (1 if args.quick else 5)

    _comfy.start()
    model = build_model()
    pos, neg, concept = clip_like(1), clip_like(2), clip_like(3)
    modes = ["implicit", "attention", "intersect"]
    models = {}
    node = _comfy.pack_module("nodes.concept_nodes").SEGAConcept
    for mode in modes:
        inputs = dict(_comfy.concept_inputs(concept, label="glasses", warmup=0), mask_from=mode)
        models[mode] = _comfy.sega(model, _comfy.node_output(node.execute(**inputs)), 0.1)

    # rows (untimed), and the shapes one captured layer sees
    rows = {}
    for mode in modes:
        counter = _comfy.RowCounter()
        _comfy.sample(counter.attach(models[mode]), pos, neg, steps, size)
        rows[mode] = sum(counter.rows)
    dm = model.model.diffusion_model
    attn = next(b.transformer_blocks[0].attn2 for b in dm.output_blocks for b in b if hasattr(b, "transformer_blocks"))
    heads, inner, q_len = attn.heads, attn.to_q.out_features, (size // 4) ** 2

    capture_ms = capture_cost(model, size, repeats=20 if args.quick else 100)
    times = _common.interleaved({m: (lambda m=m: _comfy.sample(models[m], pos, neg, steps, size)) for m in modes},
                                repeats, warmup=1)
    base = _common.median(times["implicit"])
    table_rows = []
    for mode in modes:
        t = _common.median(times[mode])
        extra = t / base - 1
        table_rows.append([mode, rows[mode], f"{t:.3f}", f"{1000 * t / steps:.1f}",
                           "-" if mode == "implicit" else f"{100 * extra:+.1f}%",
                           "-" if mode == "implicit" else _common.verdict(extra <= 0.05)])
    table_rows.append(["capture work alone (3 layers + mask), per step", "-", "-", f"{capture_ms:.2f}",
                       f"{100 * capture_ms / (1000 * base / steps):+.1f}%",
                       _common.verdict(capture_ms / (1000 * base / steps) <= 0.05)])
    latent = 4 * size * size * 4
    kept = q_len * 4
    transient = (q_len * inner + 77 * inner + heads * q_len * 77) * 4
    mem_rows = [
        ["kept per concept (one map, float32)", f"{q_len} floats = {kept:,} B", f"{latent:,} B",
         f"{kept / latent:.3f}", _common.verdict(kept < latent)],
        ["working memory of one captured layer (q, k, probabilities)", f"{transient:,} B", f"{latent:,} B",
         f"{transient / latent:.2f}", "-"],
    ]
    body = "\n\n".join([
        _common.table(["mask_from", "model rows", "median s/run", "ms/step", "extra time per step vs implicit",
                       "target <= +5%"], table_rows),
        _common.table(["memory", "capture", "one latent", "ratio", "kept < 1 latent"], mem_rows),
    ])
    notes = (f"Latent {size}x{size} ({8 * size} px), {steps} steps, euler, cfg 7.5, one concept (warm-up 0), "
             f"momentum 0.1; {repeats} interleaved timed runs per mode after one warm-up round; the UNet has "
             f"320 channels on three levels, {heads} heads, cross-attention only at {size // 4}x{size // 4} "
             f"(3 layers, all captured): the captured layers are a larger share of this model than of SD 1.5, "
             f"where the 16x16 layers are 5 of 16 cross-attention layers. The working memory is freed when the "
             f"layer returns; the model's own attention at that layer allocates the same q and k for every row. "
             f"On a shared machine whole runs swing by several percent between rounds (either sign); the row "
             f"'capture work alone' times the capture's own work per step, the steadier figure.")
    _common.finish(args, _common.section("Cross-attention masks: cost of mask_from attention / intersect", body,
                                         notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
