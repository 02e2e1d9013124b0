"""Attention masks on SD3 and Wan (nodes/attention_override.py): the cost of `attention` against `implicit`.

Two random-weight transformers built from ComfyUI's own classes, larger than the tests' tiny ones so
that attention is a real share of a step: an SD3 MMDiT (4 joint blocks, 256 wide, 4 heads, patch 2)
on a 32x32 latent (256 px: 256 image tokens) with 154 text tokens, and a Wan 2.1 text-to-video model
(4 blocks, 256 wide, 4 heads, patch (1, 2, 2)) on a 5-frame 32x32 latent (1280 image tokens) with
512 text tokens (20 prompt tokens, zero padding, as ComfyUI's UMT5 gives them). SEGA Apply with one
concept (warm-up 0: it acts at every step), euler, cfg 5, through comfy.sample.sample. Timed runs of
the modes are interleaved and their medians compared:
    extra time per step = median(attention) / median(implicit) - 1
The model rows are the same in both modes (3 per step: positive, negative, concept). The capture
takes every block here (4 of 4); the ratio on a full-size model depends on its shares of attention
and of the rest (README: counted for SD3 Medium and Wan 2.1 1.3B).
"""
from __future__ import annotations

import sys

import _common
import _comfy

WIDTH = 256


def build(family: str):
    import torch

    import comfy.supported_models

    from harness.tiny import init_weights, patcher

    if family == "sd3":
        cfg = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 4, "input_size": None,
               "adm_in_channels": 16, "pos_embed_max_size": 32, "num_patches": 1024, "pos_embed_scaling_factor": None,
               "context_embedder_config": {"target": "torch.nn.Linear",
                                           "params": {"in_features": 32, "out_features": WIDTH}},
               "x_block_self_attn_layers": [], "dtype": torch.float32}
        model = comfy.supported_models.SD3(cfg).get_model({})
    else:
        cfg = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16,
               "dim": WIDTH, "ffn_dim": 4 * WIDTH, "freq_dim": 64, "text_dim": 32, "out_dim": 16, "num_heads": 4,
               "num_layers": 4, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
               "dtype": torch.float32}
        model = comfy.supported_models.WAN21_T2V(cfg).get_model({})
    init_weights(model, 0, 0.05, norms_at_one=True, buffers=True)
    return patcher(model)


def text(family: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    if family == "sd3":
        return [[8.0 * torch.randn(1, 154, 32, generator=g), {"pooled_output": torch.randn(1, 16, generator=g)}]]
    e = 8.0 * torch.randn(1, 512, 32, generator=g)
    e[:, 20:] = 0.0
    return [[e, {}]]


LATENTS = {"sd3": (1, 16, 32, 32), "wan": (1, 16, 5, 32, 32)}


def run(model, family: str, steps: int):
    import torch

    import comfy.sample

    latent = torch.zeros(LATENTS[family])
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", text(family, 1), text(family, 2),
                               latent, denoise=1.0, seed=0, disable_pbar=True)


def capture_ms(model, family: str, repeats: int) -> float:
    """Milliseconds of the capture's own work per step, timed alone (steadier on a shared machine than
    the difference of two whole runs): the override's observation of every block's captured call with
    the shapes of a run (one concept row of three), then the mask from the map."""
    import time

    import torch

    am = _comfy.pack_module("nodes.attention_masks")
    ov = _comfy.pack_module("nodes.attention_override")
    from sega_core.attention import attention_mask

    dm = model.model.diffusion_model
    shape = LATENTS[family]
    g = torch.Generator().manual_seed(0)
    image = (shape[-2] // 2) * (shape[-1] // 2) * (shape[2] if len(shape) == 5 else 1)
    if family == "sd3":
        q = torch.randn(3, 154 + image, WIDTH, generator=g)
        calls = [(q, q)] * len(dm.joint_blocks)
    else:
        q = torch.randn(3, image, WIDTH, generator=g)
        k = torch.randn(3, 512, WIDTH, generator=g)
        k[:, 20:] = k[:, 20:21]  # the padding's one key
        calls = [(q, q), (q, k)] * len(dm.blocks)  # each block: its self-attention, then the cross-attention
    times = []
    for r in range(repeats + 3):
        capture = am.AttentionCapture(dm, model.model)
        start = time.perf_counter()
        capture.begin({2: 0}, shape[-2:])
        opts = {"cond_or_uncond": [0, 1, 2], am.ATTN_KEY: capture}
        if family == "wan":
            opts["grid_sizes"] = (shape[2], shape[-2] // 2, shape[-1] // 2)
        for i, (qq, kk) in enumerate(calls):
            opts["block_index"] = i // 2
            ov.observe(capture, (qq, kk, kk), {"heads": 4, "transformer_options": opts})
        maps = capture.end()
        attention_mask(maps[0], 0.9, shape[-2:])
        if r >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * _common.median(times)


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--steps", type=int, help="sampler steps (default 6, --quick 2)")
    p.add_argument("--repeats", type=int, help="interleaved timed runs per mode (default 5, --quick 1)")
    args = p.parse_args(argv)
    _common.setup(args)
    steps = args.steps or (2 if args.quick else 6)
    repeats = args.repeats or (1 if args.quick else 5)

    _comfy.start()
    node = _comfy.pack_module("nodes.concept_nodes").SEGAConcept
    rows = []
    for family in ("sd3", "wan"):
        model = build(family)
        models = {}
        for mode in ("implicit", "attention"):
            inputs = dict(_comfy.concept_inputs(text(family, 3), label="c", warmup=0), mask_from=mode)
            models[mode] = _comfy.sega(model, _comfy.node_output(node.execute(**inputs)), 0.1)
        times = _common.interleaved({m: (lambda m=m: run(models[m], family, steps)) for m in models}, repeats)
        base = _common.median(times["implicit"])
        alone = capture_ms(model, family, 3 if args.quick else 20)
        for mode in models:
            t = _common.median(times[mode])
            rows.append([family, mode, f"{t:.3f}", f"{1000 * t / steps:.1f}",
                         "-" if mode == "implicit" else f"{100 * (t / base - 1):+.1f}%"])
        rows.append([family, "capture work alone (every block + mask), per step", "-", f"{alone:.1f}",
                     f"{100 * alone / (1000 * base / steps):+.1f}%"])
        shape = LATENTS[family]
        grid = (shape[-2] // 2) * (shape[-1] // 2)
        latent = 1
        for n in shape[1:]:
            latent *= n
        rows.append([family, "kept per concept (one map)", "-", f"{grid} floats",
                     f"{grid / latent:.4f} of a latent"])
    body = _common.table(["family", "mask_from", "median s/run", "ms/step", "extra time per step vs implicit"], rows)
    notes = (f"{steps} steps, euler, cfg 5, one concept (warm-up 0), momentum 0.1; {repeats} interleaved timed "
             f"runs per mode after one warm-up round. On a shared machine whole runs swing by several percent "
             f"between rounds (either sign).")
    _common.finish(args, _common.section("Attention masks on SD3 and Wan: cost of mask_from attention", body, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
