"""One set of small random UNet weights that runs both in ComfyUI and in diffusers.

ComfyUI's loader detects a UNet by matching a few values against its table of known models, so a
diffusers-layout state dict of a very small UNet is refused; the weights are therefore made in
ComfyUI's own layout (the tiny SD1.5 UNet of harness.tiny: 320 channels, one level, one res block,
one transformer block, no middle block, 18.7 M parameters) and

  - loaded in ComfyUI through its own loader (`comfy.sd.load_diffusion_model_state_dict`, what the
    Load Diffusion Model node runs), which must detect them as SD15 with EPS prediction;
  - loaded in diffusers' `UNet2DConditionModel` with the keys mapped by ComfyUI's own
    `comfy.utils.unet_to_diffusers(unet_config)` (every key of both sides used exactly once).

`shared_unet()` returns both models (and the weights); tests/host/test_shared_unet.py shows that
they give the same eps. Use it wherever the pack's result inside ComfyUI is compared with a
diffusers pipeline on a real UNet (the LEDITS++ benchmark, attention-mask tests).

Nothing here imports ComfyUI at module level; call harness.host.prepare_host() first.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from .tiny import TINY_SD15_UNET, init_weights

SHARED_SEED = 20231116
# The weights' standard deviation (norm weights at 1): eps of about 0.1 (max about 0.3) on random
# inputs, so that concepts differ visibly and float32 rounding stays far below 1e-5.
SHARED_STD = 0.05


class SharedUNet(NamedTuple):
    comfy: object  # comfy.model_patcher.ModelPatcher, detected as SD15 / EPS
    diffusers: object  # diffusers.UNet2DConditionModel, eval mode, float32
    state_dict: dict  # the weights in ComfyUI's layout (no prefix)
    key_map: dict  # diffusers key -> ComfyUI key, as used


def comfy_state_dict(seed: int = SHARED_SEED, std: float = SHARED_STD, unet_config: Optional[dict] = None) -> dict:
    """The weights in ComfyUI's UNet layout: SD15's model built with `unet_config` (default: harness.tiny's
    TINY_SD15_UNET), every parameter drawn from N(0, std) with a generator seeded `seed`, norms at 1."""
    import torch

    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(unet_config or TINY_SD15_UNET))
    model = config.get_model({}, device="cpu")
    init_weights(model, seed, std, norms_at_one=True)
    return {k: v.detach().to(torch.float32).clone() for k, v in model.diffusion_model.state_dict().items()}


def diffusers_config(unet_config: dict) -> dict:
    """UNet2DConditionModel's arguments for a ComfyUI SD-style `unet_config` (as ComfyUI's detection
    gives it): one down and one up block per level, cross-attention where the level has transformer
    blocks, diffusers' SD conventions (flip_sin_to_cos, freq_shift 0, 32 groups, conv projections)."""
    c = unet_config
    levels = len(c["channel_mult"])
    res = list(c["num_res_blocks"])
    if len(set(res)) != 1:
        raise ValueError(f"diffusers_config: diffusers needs the same res blocks on every level, got {res}")
    if c.get("use_linear_in_transformer") or c.get("adm_in_channels"):
        raise ValueError("diffusers_config: only SD 1.x-style UNets (conv projections, no adm input)")
    if c.get("num_head_channels", -1) != -1:
        raise ValueError("diffusers_config: only a fixed head count (num_head_channels -1) maps to diffusers")
    depth = list(c["transformer_depth"])
    per_level = [depth[i * res[0]:(i + 1) * res[0]] for i in range(levels)]
    if any(len(set(d)) != 1 or d[0] > 1 for d in per_level):
        raise ValueError(f"diffusers_config: 0 or 1 transformer block per res block and level, got {depth}")
    attn = [d[0] == 1 for d in per_level]
    mid = c.get("transformer_depth_middle", -2)
    if mid not in (-2, 1):
        raise ValueError(f"diffusers_config: no middle block (-2) or one with one transformer block, got {mid}")
    return dict(
        sample_size=c.get("image_size", 32), in_channels=c["in_channels"], out_channels=c["out_channels"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        mid_block_type=None if mid == -2 else "UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(c["model_channels"] * m for m in c["channel_mult"]), layers_per_block=res[0],
        cross_attention_dim=c["context_dim"], attention_head_dim=c.get("num_heads", 8), norm_num_groups=32,
        flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False,
    )


def shared_unet(seed: int = SHARED_SEED, std: float = SHARED_STD, unet_config: Optional[dict] = None,
                device=None) -> SharedUNet:
    """The same random weights as a ComfyUI model (ModelPatcher, float32, loaded through ComfyUI's
    own loader and detected as SD15 / EPS) and a diffusers UNet2DConditionModel (float32, eval mode),
    both on `device` (default: the CPU)."""
    import torch

    import comfy.model_sampling
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    device = torch.device("cpu") if device is None else torch.device(device)
    sd = comfy_state_dict(seed, std, unet_config)
    patcher = comfy.sd.load_diffusion_model_state_dict(
        dict(sd), model_options={"dtype": torch.float32, "load_device": device})
    if patcher is None:
        raise RuntimeError("shared_unet: ComfyUI did not recognise the weights as a UNet it knows")
    config = patcher.model.model_config
    if type(config) is not comfy.supported_models.SD15:
        raise RuntimeError(f"shared_unet: ComfyUI detected {type(config).__name__}, not SD15")
    if not isinstance(patcher.get_model_object("model_sampling"), comfy.model_sampling.EPS) or \
            isinstance(patcher.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION):
        raise RuntimeError("shared_unet: ComfyUI does not predict eps with these weights")

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**diffusers_config(config.unet_config))
    wanted = set(unet.state_dict())
    key_map = {k: v for k, v in comfy.utils.unet_to_diffusers(config.unet_config).items() if k in wanted and v in sd}
    missing = sorted(wanted - set(key_map))
    unused = sorted(set(sd) - set(key_map.values()))
    if missing or unused or len(set(key_map.values())) != len(key_map):
        raise RuntimeError(f"shared_unet: the key map does not cover both layouts one to one "
                           f"(diffusers keys without a weight: {missing[:5]}, ComfyUI keys unused: {unused[:5]})")
    unet.load_state_dict({k: sd[v] for k, v in key_map.items()}, strict=True)
    unet.to(device).eval().requires_grad_(False)  # built in float32
    return SharedUNet(patcher, unet, sd, key_map)
