"""The attention capture's memory at a real ComfyUI cross-attention layer (mask_from attention /
intersect): what one attn2_patch call allocates while it computes a concept row's map, measured
with torch.profiler (harness.memory), stays below one latent of the run, and the map equals the
same sum computed at once from the layer's own to_q / to_k.
"""
from __future__ import annotations

import comfy_host

comfy_host.prepare_host()
import pytest
import torch

from families import one_thread  # noqa: F401  (fixture)
from harness.memory import allocations
from harness.pack import pack_module
from harness.tiny import TINY_MASK_UNET

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    import comfy.supported_models

    from harness.tiny import init_weights, patcher, unet_config

    cfg = unet_config(comfy.supported_models.SD15, **{k: TINY_MASK_UNET[k] for k in (
        "num_res_blocks", "channel_mult", "transformer_depth", "transformer_depth_output")},
        transformer_depth_middle=-2, num_classes=None, adm_in_channels=None)
    m = comfy.supported_models.SD15(cfg).get_model({})
    init_weights(m, 2, 0.05, norms_at_one=True)
    return patcher(m)


@pytest.mark.parametrize("size", [32, 64])
def test_one_captured_layer_stays_below_one_latent(model, size):
    from sega_core.attention import token_attention, token_positions

    am = pack_module("nodes.attention_masks")
    dm = model.model.diffusion_model
    i, block = next((i, b) for i, blocks in enumerate(dm.output_blocks) for b in blocks
                    if hasattr(b, "transformer_blocks"))
    attn = block.transformer_blocks[0].attn2
    gen = torch.Generator().manual_seed(size)
    n = torch.randn(3, (size // 4) ** 2, attn.to_q.in_features, generator=gen)  # positive, negative, concept
    ctx = torch.randn(3, 77, attn.to_k.in_features, generator=gen)
    capture = am.AttentionCapture(dm, model.model)
    opts = {"block": ("output", i), "block_index": 0, "cond_or_uncond": [0, 1, 2],
            "original_shape": [3, 4, size, size], "n_heads": attn.heads, am.ATTN_KEY: capture}
    capture.begin({2: 0})
    got = allocations(lambda: am.attention_patch(n, ctx, ctx, opts))
    latent_bytes = 4 * size * size * 4
    assert got.peak < latent_bytes and got.largest < latent_bytes, got.peak / latent_bytes
    maps = capture.end()
    with torch.no_grad():
        want = token_attention(attn.to_q(n[2:]), attn.to_k(ctx[2:]), attn.heads, token_positions(77))
        whole = allocations(lambda: token_attention(attn.to_q(n[2:]), attn.to_k(ctx[2:]), attn.heads,
                                                    token_positions(77)))
    assert whole.peak > 5 * latent_bytes  # computed at once: what the check above would catch
    assert torch.allclose(maps[0].flatten(1) * attn.heads, want, atol=1e-5, rtol=0)


def test_the_capture_projects_with_the_weights_the_layer_uses():
    """ComfyUI's Linear layers cast their weights as they run (manual cast: fp16 weights, float32
    input) and apply weight patches on the fly (weight_function, as low-VRAM mode applies a LoRA):
    the weights the capture projects with give what the layer's own call gives."""
    import comfy.ops

    am = pack_module("nodes.attention_masks")
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    plain = comfy.ops.disable_weight_init.Linear(16, 8, bias=False)
    plain.weight = torch.nn.Parameter(torch.randn(8, 16), requires_grad=False)
    w, b = am._weights(plain, x)
    assert w is plain.weight and b is None  # no copy
    cast = comfy.ops.manual_cast.Linear(16, 8, bias=True, dtype=torch.float16)
    cast.weight = torch.nn.Parameter(torch.randn(8, 16).half(), requires_grad=False)
    cast.bias = torch.nn.Parameter(torch.randn(8).half(), requires_grad=False)
    cast.weight_function = [lambda weight: weight * 2]
    w, b = am._weights(cast, x)
    assert w.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(torch.nn.functional.linear(x, w, b), cast(x))
        assert torch.allclose(cast(x), torch.nn.functional.linear(x, 2 * cast.weight.float(), cast.bias.float()))
