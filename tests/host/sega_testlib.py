"""Small in-memory models and helpers for testing the SEGA hooks inside a real ComfyUI.

The model is ComfyUI's own SD1.5 class with a shrunken UNet and random weights: the real
guider, process_conds, calc_cond_batch and samplers run; only the weights are fake. The pack's
import, node outputs and RowCounter are harness.pack's (shared with the benchmarks).
"""
from __future__ import annotations

import comfy_host

comfy_host.prepare_host()  # the CPU, before ComfyUI is imported
import torch

import comfy.patcher_extension
import comfy.sample
import comfy.supported_models

from harness.host import PACK_ROOT  # noqa: F401  (re-exported)
from harness.pack import (ModelHook, RowCounter, concept_inputs, import_pack, node_output,  # noqa: F401  (re-exported)
                          pack_module)
from harness.tiny import init_weights, patcher, unet_config


def tiny_sd15_model(seed: int = 0):
    """A ModelPatcher around ComfyUI's SD15 model with a small UNet (random weights); its middle block
    has a transformer, so attention patches such as PAG's act on it."""
    cfg = unet_config(comfy.supported_models.SD15, transformer_depth_middle=1, num_classes=None, adm_in_channels=None)
    return _random_patcher(comfy.supported_models.SD15(cfg).get_model({}), seed, 0.05)


def tiny_sdxl_model(seed: int = 0):
    """A ModelPatcher around ComfyUI's SDXL model (pooled `y` conditioning) with a tiny UNet."""
    cfg = unet_config(comfy.supported_models.SDXL, transformer_depth_middle=-2, num_classes="sequential",
                      num_head_channels=64)
    return _random_patcher(comfy.supported_models.SDXL(cfg).get_model({}), seed, 0.02)


def _random_patcher(model, seed: int, std: float):
    """`model`'s UNet weights set to N(0, std) from `seed`, in a CPU ModelPatcher."""
    init_weights(model, seed, std)
    return patcher(model)


def sdxl_cond(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]]


def cond(seed: int, width: int = 768, batch: int = 1, **extra):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 77, width, generator=gen), dict(extra)]]


def concept(conditioning, label="", **settings):
    """A ConceptSpec as the SEGA Concept node makes it."""
    spec = pack_module("nodes.concept_spec")
    core = pack_module("sega_core")
    return spec.ConceptSpec(conditioning=conditioning, concept=core.Concept(**settings), label=label)


def concept_node(conditioning, mask=None, concepts=None, **settings):
    """A SEGA Concept node's output, as the node makes it (threshold 0.5 and warm-up 0 unless given)."""
    cls = pack_module("nodes.concept_nodes").SEGAConcept
    inputs = concept_inputs(conditioning, mask=mask, concepts=concepts, **{"threshold": 0.5, "warmup": 0, **settings})
    return node_output(cls.execute(**inputs))


def apply_sega(model, concepts, momentum_scale=0.1, momentum_beta=0.4, node="SEGA Apply"):
    return pack_module("nodes.patch").apply_sega(model, concepts, momentum_scale, momentum_beta, node)


def sample(model, positive, negative, steps=6, cfg=7.5, sampler="euler", scheduler="normal", batch=1,
           size=8, seed=0, denoise=1.0, latent=None):
    latent = torch.zeros(batch, 4, size, size) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               denoise=denoise, seed=seed, disable_pbar=True)


class Recorder(ModelHook):
    """Records, per main evaluation, the inputs SEGA sees and the denoised result after it.

    Its CALC_COND_BATCH wrapper sits inside SEGA's, so it sees the concept rows; its post-cfg
    function comes after SEGA's, so it sees SEGA's output.
    """

    def __init__(self):
        self.calls = []

    def install(self, model) -> None:
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test-recorder", self.calc)
        model.set_model_sampler_post_cfg_function(self.post_cfg)

    def calc(self, executor, model, conds, x_in, timestep, model_options):
        out = executor(model, conds, x_in, timestep, model_options)
        if len(conds) >= 2:
            self.calls.append({"x": x_in.clone(), "sigma": timestep.clone(), "out": [o.clone() for o in out],
                               "rows": len(conds)})
        return out

    def post_cfg(self, args):
        if self.calls and "final" not in self.calls[-1]:
            self.calls[-1]["final"] = args["denoised"].clone()
        return args["denoised"]
