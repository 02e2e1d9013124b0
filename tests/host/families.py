"""Tiny random-weight models of every family SEGA is tested with, built from ComfyUI's own classes.

Each family is ComfyUI's `supported_models` class with a shrunken config, so the real model
class, its model_sampling (eps, v-prediction, flow), its extra_conds (SDXL's pooled `y`, SD3's
pooled vector, Flux's guidance) and its latent shape (4-D images, 5-D video) are exercised;
only the weights are fake (harness.tiny builds them). Each model comes with conditioning of the
widths it expects.

Weights are set deterministically (ComfyUI's ops skip initialisation, which would leave
uninitialised memory): small normal values, norms at 1, so predictions are finite and differ
between prompts.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import pytest

import comfy_host

comfy_host.prepare_host()  # the CPU, before ComfyUI is imported
import torch

import comfy.model_base
import comfy.supported_models

from harness.tiny import init_weights, patcher, unet_config


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the module: these models are so small that a second thread only adds
    overhead, and on a shared 2-core machine thread contention made runs 10 to 50 times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build one family's tiny model and conditioning for it."""

    name: str
    build: Callable[[], object]  # -> ModelPatcher
    cond: Callable[[int], list]  # seed -> CONDITIONING
    latent: tuple  # latent shape of one sample (C, H, W) or (C, T, H, W)
    model_type: str  # the ModelType name ComfyUI gives it: EPS, V_PREDICTION, FLOW
    cfg: float = 5.0


def _built(model, seed: int, std: float):
    """`model` with weights from `seed` (norms at 1, buffers drawn too), in a CPU ModelPatcher."""
    init_weights(model, seed, std, norms_at_one=True, buffers=True)
    return patcher(model)


def _unet(cls, context_dim: int, **extra) -> dict:
    # the class applies its unet_extra_config last (SD2 and SDXL: 64 channels per head), so
    # model_channels is one head's worth there
    return unet_config(cls, **{"model_channels": 32, "transformer_depth_middle": -2, "num_classes": None,
                               "context_dim": context_dim, "num_heads": 2, "num_head_channels": -1,
                               "adm_in_channels": None, **extra})


def sd15(seed: int = 0, middle: bool = False):
    """SD 1.x: eps prediction. `middle`: a middle block with a transformer (where PAG and SAG act)."""
    extra = {"transformer_depth_middle": 1} if middle else {}
    model = comfy.supported_models.SD15(_unet(comfy.supported_models.SD15, 32, **extra)).get_model({})
    return _built(model, seed, 0.05)


def controlnet(model, seed: int = 0):
    """A ControlNet for `model` (an SD-style UNet), as ComfyUI builds one from a checkpoint's config,
    with random weights (its zero convolutions too, so it changes the prediction)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    cfg = dict(model.model.model_config.unet_config)
    cfg.pop("out_channels")
    cfg.update({"hint_channels": 3, "operations": comfy.ops.disable_weight_init, "dtype": torch.float32,
                "device": torch.device("cpu")})
    net = comfy.cldm.cldm.ControlNet(**cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"))


def sd2_v(seed: int = 0):
    """SD 2.x 768-v: v-prediction (what ComfyUI detects for the 768-v checkpoints)."""
    config = comfy.supported_models.SD20(_unet(comfy.supported_models.SD20, 32, model_channels=64,
                                               use_linear_in_transformer=True))
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION)
    return _built(model, seed, 0.05)


def sdxl(seed: int = 0):
    """SDXL: eps prediction with a pooled text vector and size conditioning in `y`."""
    cfg = _unet(comfy.supported_models.SDXL, 32, model_channels=64, num_classes="sequential",
                adm_in_channels=2816)
    model = comfy.supported_models.SDXL(cfg).get_model({})
    return _built(model, seed, 0.03)


def sd3(seed: int = 0):
    """SD3 / SD3.5: MMDiT, rectified flow (velocity prediction), 16 latent channels."""
    cfg = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "input_size": None,
           "adm_in_channels": 16, "pos_embed_max_size": 8, "num_patches": 64, "pos_embed_scaling_factor": None,
           "context_embedder_config": {"target": "torch.nn.Linear",
                                       "params": {"in_features": 32, "out_features": 64}},
           "x_block_self_attn_layers": [], "dtype": torch.float32}
    model = comfy.supported_models.SD3(cfg).get_model({})
    return _built(model, seed, 0.05)


def flux(seed: int = 0):
    """Flux dev-style: rectified flow with the distilled guidance as an input."""
    cfg = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
           "vec_in_dim": 16, "context_in_dim": 32, "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2,
           "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2,
           "qkv_bias": True, "txt_ids_dims": [], "dtype": torch.float32}
    model = comfy.supported_models.Flux(cfg).get_model({})
    return _built(model, seed, 0.05)


def wan(seed: int = 0):
    """Wan 2.1 text-to-video: rectified flow on 5-D latents (B, 16, T, H, W)."""
    cfg = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 16, "in_dim": 16,
           "dim": 32, "ffn_dim": 64, "freq_dim": 32, "text_dim": 32, "out_dim": 16, "num_heads": 2,
           "num_layers": 1, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
           "dtype": torch.float32}
    model = comfy.supported_models.WAN21_T2V(cfg).get_model({})
    return _built(model, seed, 0.05)


def _cond(width: int, tokens: int = 8, **pooled) -> Callable[[int], list]:
    def make(seed: int, batch: int = 1) -> list:
        gen = torch.Generator().manual_seed(seed)
        extra = {k: torch.randn(batch, n, generator=gen) for k, n in pooled.items()}
        return [[torch.randn(batch, tokens, width, generator=gen), extra]]
    return make


FAMILIES = {
    "sd15": Family("sd15", sd15, _cond(32), (4, 8, 8), "EPS"),
    "sd2_v": Family("sd2_v", sd2_v, _cond(32), (4, 8, 8), "V_PREDICTION"),
    "sdxl": Family("sdxl", sdxl, _cond(32, pooled_output=1280), (4, 8, 8), "EPS"),
    "sd3": Family("sd3", sd3, _cond(32, pooled_output=16), (16, 8, 8), "FLOW"),
    "flux": Family("flux", flux, _cond(32, pooled_output=16), (16, 8, 8), "FLUX", cfg=1.0),
    "wan": Family("wan", wan, _cond(32), (16, 2, 4, 4), "FLOW"),
}
