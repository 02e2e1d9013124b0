"""Tiny random-weight models built from ComfyUI's own classes: only the weights are fake.

  tiny_checkpoint()      an SD1.5-layout checkpoint file (fp16 safetensors, ~450 MB), built once
                         into CACHE_DIR/models/checkpoints and reused (run_sega.py --tiny, the host
                         tests, the benchmarks)
  tiny_mask_checkpoint() the same with the three-level UNet of TINY_MASK_UNET, whose cross-attention
                         sits at a quarter of the latent (what mask_from attention / intersect read);
                         built once as sega-tiny-sd15-mask.safetensors (the browser tests)
  unet_config(cls, ...)  a shrunken UNet config for a `comfy.supported_models` class
  init_weights(...)      deterministic weights from a seed (ComfyUI's ops skip initialisation)
  patcher(model)         a CPU ModelPatcher around a built model

Nothing here imports ComfyUI at module level; call harness.host.prepare_host() first.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from .host import CACHE_DIR

TINY_NAME = "sega-tiny-sd15.safetensors"
TINY_FORMAT = "1"  # bump when build_tiny_sd15 changes: cached files of another format are rebuilt
TINY_SEED = 20230131
CHECKPOINTS_DIR = CACHE_DIR / "models" / "checkpoints"

# ComfyUI detects SD15 from model_channels=320, context_dim=768, use_linear_in_transformer=False and
# one transformer block; everything else shrinks (one level, one res block, no middle block).
TINY_SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "transformer_depth_middle": -2, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
# The tiny UNet with three levels (two downsamplings), cross-attention only on the deepest, a quarter
# of the latent: the layers LEDITS++'s cross-attention mask reads (mask_from attention / intersect).
TINY_MASK_NAME = "sega-tiny-sd15-mask.safetensors"
TINY_MASK_UNET = dict(TINY_SD15_UNET, num_res_blocks=[1, 1, 1], channel_mult=[1, 1, 1], transformer_depth=[0, 0, 1],
                      transformer_depth_output=[0, 0, 0, 0, 1, 1])
# The full SD VAE: ComfyUI v0.8.0 does not infer a smaller decoder from the weights.
SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


# -- the checkpoint file ---------------------------------------------------------------------------

def _init_modules(module) -> None:
    """Deterministic weights for modules built with ComfyUI's ops, which skip initialisation."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for m in module.modules():
            for cls in type(m).__mro__:
                if cls.__module__.startswith("torch.nn.modules") and "reset_parameters" in cls.__dict__:
                    cls.reset_parameters(m)
                    break


def build_tiny_sd15(path: Path, seed: int = TINY_SEED, unet_config: dict | None = None) -> Path:
    """Write a random-weight checkpoint in the SD1.5 layout (fp16 safetensors, ~450 MB) to `path`, its
    UNet built with `unet_config` (default: TINY_SD15_UNET)."""
    import torch

    import comfy.supported_models
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = comfy.supported_models.SD15(dict(unet_config or TINY_SD15_UNET))
        unet = config.get_model({}, device="cpu").diffusion_model
        clip = config.clip_target().clip(device="cpu", dtype=torch.float32)
        vae = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
        for m in (unet, clip, vae):
            _init_modules(m)
    sd = config.process_unet_state_dict_for_saving(unet.state_dict())
    sd.update(config.process_clip_state_dict_for_saving(clip.state_dict()))
    sd.update(config.process_vae_state_dict_for_saving(vae.state_dict()))
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        comfy.utils.save_torch_file(sd, str(tmp), metadata={
            "sega_tiny_format": TINY_FORMAT, "sega_tiny_seed": str(seed),
            "description": "random weights in the SD1.5 layout, for smoke tests only"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _cached(path: Path, unet_config: dict) -> Path:
    """`path` if it holds a checkpoint of this format, else built there (about 10 s)."""
    from safetensors import safe_open

    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("sega_tiny_format") == TINY_FORMAT:
                    return path
        except Exception:  # truncated or foreign file: rebuild it
            pass
    return build_tiny_sd15(path, unet_config=unet_config)


def tiny_checkpoint(folder: Path = CHECKPOINTS_DIR) -> Path:
    """The tiny checkpoint in `folder`, built on first use (about 10 s) and reused after."""
    return _cached(folder / TINY_NAME, TINY_SD15_UNET)


def tiny_mask_checkpoint(folder: Path = CHECKPOINTS_DIR) -> Path:
    """The tiny checkpoint with TINY_MASK_UNET's three-level UNet in `folder`, built on first use."""
    return _cached(folder / TINY_MASK_NAME, TINY_MASK_UNET)


# -- in-memory models ------------------------------------------------------------------------------

def unet_config(cls, **overrides) -> dict:
    """`cls`'s UNet config (a comfy.supported_models class, its unet_extra_config included), shrunk to
    one level with one res block and one transformer block (float32, 4 channels), then `overrides`."""
    import torch

    cfg = dict(cls.unet_config)
    cfg.update(cls.unet_extra_config)
    cfg.update({"in_channels": 4, "out_channels": 4, "num_res_blocks": [1], "channel_mult": [1],
                "transformer_depth": [1], "transformer_depth_output": [1, 1], "use_spatial_transformer": True,
                "legacy": False, "image_size": 32, "use_checkpoint": False, "dtype": torch.float32})
    cfg.update(overrides)
    return cfg


def init_weights(model, seed: int, std: float, norms_at_one: bool = False, buffers: bool = False) -> None:
    """`model.diffusion_model`'s parameters drawn from N(0, std) with a generator seeded `seed`.

    norms_at_one: normalisation weights and scales set to 1 instead (not drawn). buffers: floating
    buffers drawn too (SD3's pos_embed is one, left as uninitialised memory by the model class)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            leaf = name.rsplit(".", 2)
            if norms_at_one and p.dim() == 1 and leaf[-1] in ("weight", "scale") \
                    and any("norm" in part or part.startswith("ln_") for part in leaf[:-1]):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        if buffers:
            for b in model.diffusion_model.buffers():
                if b.is_floating_point():
                    b.copy_(torch.randn(b.shape, generator=gen) * std)


def patcher(model):
    """A ModelPatcher that keeps `model` on the CPU."""
    import torch

    import comfy.model_patcher

    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
