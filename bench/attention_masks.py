"""Cross-attention masks (SEGA Concept's mask_from): the cost of `attention` and `intersect` against `implicit`.

A tiny random-weight SD1.5 UNet with three levels and cross-attention on the deepest one (a
quarter of the latent: the layers LEDITS++ takes its maps from, 3 of them) samples with SEGA Apply
and one concept (warm-up 0, so the concept acts at every step), euler, cfg 7.5, through ComfyUI's
sampler (comfy.sample.sample, what KSampler runs). Timed runs of the three modes are interleaved
and their medians compared:
    extra time per step = median(mode) / median(implicit) - 1        target <= 5%
The model rows are the same in all three modes (3 per step: positive, negative, concept).

Memory, against one latent (C x H x W float32) of the same run: what the capture keeps per concept
between the model call and the edit (one map of the attention map's resolution), and what one
captured layer allocates while it runs, measured (torch.profiler's CPU allocation records,
harness.memory): the peak of the capture's live allocations during the attn2_patch call with the
run's shapes (one concept row of three), and the same for one layer of SD 1.5 at 512 px (1280
channels, 8 heads, CLIP's 77 tokens; the pure function with random weights).
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


def layer_peak(model, size: int, chunked: bool = True):
    """harness.memory.allocations of one attn2_patch call at a captured layer of `model`, with the shapes
    of a run (three rows, the third a concept's), capturing that row; `chunked` False: the same sum
    computed at once (the layer's q and k, then every probability), for comparison."""
    import torch

    from harness.memory import allocations
    from sega_core.attention import token_attention, token_positions

    am = _comfy.pack_module("nodes.attention_masks")
    dm = model.model.diffusion_model
    block = next((("output", i), b) for i, blocks in enumerate(dm.output_blocks) for b in blocks
                 if hasattr(b, "transformer_blocks"))
    attn = block[1].transformer_blocks[0].attn2
    capture = am.AttentionCapture(dm, model.model)
    n = torch.randn(3, (size // 4) ** 2, attn.to_q.in_features)
    ctx = torch.randn(3, 77, attn.to_k.in_features)
    opts = {"block": block[0], "block_index": 0, "cond_or_uncond": [0, 1, 2], "original_shape": [3, 4, size, size],
            "n_heads": attn.heads, am.ATTN_KEY: capture}
    capture.begin({2: 0})
    if chunked:
        return allocations(lambda: am.attention_patch(n, ctx, ctx, opts))
    with torch.no_grad():
        return allocations(lambda: token_attention(attn.to_q(n[2:]), attn.to_k(ctx[2:]), attn.heads,
                                                   token_positions(77)))


def sd15_peak():
    """harness.memory.allocations of the capture's sum for one concept row at one 16x16 layer of SD 1.5
    at 512 px (1280 channels, 8 heads of 160, CLIP's 77 tokens of 768), with the chunks the capture
    uses for a 4x64x64 latent."""
    import torch

    from harness.memory import allocations
    from sega_core.attention import projected_token_attention, token_positions

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 256, 1280, generator=g), torch.randn(1, 77, 768, generator=g)
    wq, wk = torch.randn(1280, 1280, generator=g) * 0.03, torch.randn(1280, 768, generator=g) * 0.03
    pos = token_positions(77)
    return allocations(lambda: projected_token_attention(x, ctx, wq, wk, 8, pos, 4 * 64 * 64))


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
    whole = layer_peak(model, size, chunked=False)
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
    layer = layer_peak(model, size)
    sd15 = sd15_peak()
    mem_rows = [
        ["kept per concept (one map, float32)", f"{q_len} floats = {kept:,} B", f"{latent:,} B",
         f"{kept / latent:.3f}", _common.verdict(kept < latent)],
        [f"peak while one captured layer runs (this model, {size}x{size} latent; largest allocation "
         f"{layer.largest:,} B)", f"{layer.peak:,} B", f"{latent:,} B", f"{layer.peak / latent:.2f}",
         _common.verdict(layer.peak < latent)],
        [f"peak while one captured layer runs (SD 1.5, 64x64 latent; largest allocation {sd15.largest:,} B)",
         f"{sd15.peak:,} B", f"{4 * 64 * 64 * 4:,} B", f"{sd15.peak / (4 * 64 * 64 * 4):.2f}",
         _common.verdict(sd15.peak < 4 * 64 * 64 * 4)],
    ]
    body = "\n\n".join([
        _common.table(["mask_from", "model rows", "median s/run", "ms/step", "extra time per step vs implicit",
                       "target <= +5%"], table_rows),
        _common.table(["memory", "capture", "one latent", "ratio", "below 1 latent"], mem_rows),
    ])
    notes = (f"Latent {size}x{size} ({8 * size} px), {steps} steps, euler, cfg 7.5, one concept (warm-up 0), "
             f"momentum 0.1; {repeats} interleaved timed runs per mode after one warm-up round; the UNet has "
             f"320 channels on three levels, {heads} heads, cross-attention only at {size // 4}x{size // 4} "
             f"(3 layers, all captured): the captured layers are a larger share of this model than of SD 1.5, "
             f"where the 16x16 layers are 5 of 16 cross-attention layers. The capture projects the concept "
             f"row's queries and keys from the layer's weights in chunks of heads and query positions sized "
             f"from the latent (sega_core.attention.attention_chunks): a group of heads' keys (one head at "
             f"least: 77 x d floats) and one chunk's queries and scores at a time, all freed when the layer "
             f"returns; computed at once, the same layer would hold {whole.peak / latent:.0f} latents "
             f"({whole.peak:,} B) here. "
             f"On a shared machine whole runs swing by several percent between rounds (either sign); the row "
             f"'capture work alone' times the capture's own work per step, the steadier figure.")
    _common.finish(args, _common.section("6. Cross-attention masks: cost of mask_from attention / intersect", body,
                                         notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
