"""Small in-memory models and helpers for testing the SEGA hooks inside a real ComfyUI.

The model is ComfyUI's own SD1.5 class with a shrunken UNet and random weights: the real
guider, process_conds, calc_cond_batch and samplers run; only the weights are fake.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import comfy_host

comfy_host.prepare_host()  # the CPU, before ComfyUI is imported
import torch

import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.supported_models

PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui_sega_under_test"


def import_pack():
    """This pack as a package (its folder name may not be a valid module name)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def pack_module(name: str):
    import_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")


def tiny_sd15_model(seed: int = 0):
    """A ModelPatcher around ComfyUI's SD15 model with a small UNet (random weights); its middle block
    has a transformer, so attention patches such as PAG's act on it."""
    cfg = dict(comfy.supported_models.SD15.unet_config)
    cfg.update(comfy.supported_models.SD15.unet_extra_config)
    cfg.update({"in_channels": 4, "out_channels": 4, "num_res_blocks": [1], "channel_mult": [1],
                "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": 1,
                "use_spatial_transformer": True, "legacy": False, "image_size": 32, "use_checkpoint": False,
                "num_classes": None, "dtype": torch.float32, "adm_in_channels": None})
    return _random_patcher(comfy.supported_models.SD15(cfg).get_model({}), seed, 0.05)


def tiny_sdxl_model(seed: int = 0):
    """A ModelPatcher around ComfyUI's SDXL model (pooled `y` conditioning) with a tiny UNet."""
    cfg = dict(comfy.supported_models.SDXL.unet_config)
    cfg.update({"in_channels": 4, "out_channels": 4, "num_res_blocks": [1], "channel_mult": [1],
                "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": -2,
                "use_spatial_transformer": True, "legacy": False, "image_size": 32, "use_checkpoint": False,
                "num_classes": "sequential", "dtype": torch.float32, "num_head_channels": 64})
    return _random_patcher(comfy.supported_models.SDXL(cfg).get_model({}), seed, 0.02)


def _random_patcher(model, seed: int, std: float):
    """`model`'s UNet weights set to N(0, std) from `seed`, in a CPU ModelPatcher."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


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


def apply_sega(model, concepts, momentum_scale=0.1, momentum_beta=0.4, node="SEGA Apply"):
    return pack_module("nodes.patch").apply_sega(model, concepts, momentum_scale, momentum_beta, node)


def sample(model, positive, negative, steps=6, cfg=7.5, sampler="euler", scheduler="normal", batch=1,
           size=8, seed=0, denoise=1.0, latent=None):
    latent = torch.zeros(batch, 4, size, size) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               denoise=denoise, seed=seed, disable_pbar=True)


class RowCounter:
    """Counts UNet calls and the rows of each, through ComfyUI's model function wrapper."""

    def __init__(self):
        self.rows = []
        self.cond_or_uncond = []
        self.y = []  # the pooled `y` conditioning of each call's rows, where the model has one

    def __call__(self, apply_model, args):
        self.rows.append(args["input"].shape[0])
        self.cond_or_uncond.append(list(args["cond_or_uncond"]))
        if "y" in args["c"]:
            self.y.append(args["c"]["y"].clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    def __deepcopy__(self, memo):
        # ComfyUI v0.8.0 deep-copies model_options when cloning a model: keep counting here
        return self

    def attach(self, model):
        m = model.clone()
        m.set_model_unet_function_wrapper(self)
        return m


def node_output(result):
    """The first output of a V1 or V3 node's function result."""
    if isinstance(result, tuple):
        return result[0]
    values = getattr(result, "result", None) or getattr(result, "args", None)
    return values[0]


class Recorder:
    """Records, per main evaluation, the inputs SEGA sees and the denoised result after it.

    Its CALC_COND_BATCH wrapper sits inside SEGA's, so it sees the concept rows; its post-cfg
    function comes after SEGA's, so it sees SEGA's output.
    """

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):
        # ComfyUI v0.8.0 deep-copies model_options (and the bound post_cfg in it) when cloning a model
        return self

    def attach(self, model):
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test-recorder", self.calc)
        m.set_model_sampler_post_cfg_function(self.post_cfg)
        return m

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
