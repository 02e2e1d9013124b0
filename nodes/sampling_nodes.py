"""SEGA Apply, SEGA Guider and SEGA KSampler: three ways to sample with the same SEGA patch."""
from __future__ import annotations

import torch

import comfy.samplers
import nodes as comfy_nodes
from comfy_api.latest import io

from .concept_masks import preview_target
from .concept_nodes import Concepts, _chain
from .errors import SEGAError
from .patch import RunLog, apply_sega
from .schema import CATEGORY, schema


def _momentum_inputs():
    return [
        io.Float.Input(
            "momentum_scale", default=0.1, min=0.0, max=1.0, step=0.01, round=0.001,
            tooltip="How much of the edit's running average is added each step (s_m). 0 turns momentum off "
                    "(and lets SEGA skip concept rows before their warm-up); the paper uses 0.1 to 0.5."),
        io.Float.Input(
            "momentum_beta", default=0.4, min=0.0, max=0.999, step=0.01, round=0.001,
            tooltip="How slowly the momentum forgets earlier steps (beta_m). 0 keeps only the last step; "
                    "the paper uses 0.4 to 0.6."),
    ]


def _start_at_step_input():
    return io.Int.Input(
        "start_at_step", default=0, min=0, max=10000, optional=True,
        tooltip="For a run split across samplers (KSamplerAdvanced steps 10-20 after steps 0-10): the step of "
                "the full schedule at which this model's sampler starts, i.e. that sampler's start_at_step. "
                "Warm-up and cool-down then count steps of the full schedule. 0 (default): each run counts "
                "its own steps. The momentum starts afresh in each run.")


# the node's own id and the prompt (for the id the page knows it by): the mask preview is drawn on it
_HIDDEN = [io.Hidden.unique_id, io.Hidden.dynprompt]


def _concepts_input():
    return Concepts.Input(
        "concepts", optional=True,
        tooltip="From a SEGA Concept or SEGA Concept Stack. Left empty, sampling is exactly plain CFG.")


class SEGAApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SEGAApply",
            display_name="SEGA Apply",
            category=CATEGORY,
            description="Patches a MODEL so that any sampler node (KSampler, KSamplerAdvanced, SamplerCustom, "
                        "other packs') samples it with SEGA's concepts. Works with other model patches.",
            search_aliases=["semantic guidance model patch", "sega model"],
            inputs=[io.Model.Input("model", tooltip="The model to sample with SEGA."), _concepts_input(),
                    *_momentum_inputs(), _start_at_step_input()],
            outputs=[io.Model.Output(tooltip="The model with SEGA; use it in any sampler.")],
            hidden=_HIDDEN,
        )

    @classmethod
    def execute(cls, model, momentum_scale, momentum_beta, concepts=None, start_at_step=0) -> io.NodeOutput:
        return io.NodeOutput(apply_sega(model, _chain(concepts), momentum_scale, momentum_beta, "SEGA Apply",
                                        start_at_step=start_at_step, preview=preview_target(cls.hidden)))


class SEGAGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SEGAGuider",
            display_name="SEGA Guider",
            category=CATEGORY,
            description="A CFG guider with SEGA's concepts, for SamplerCustomAdvanced.",
            search_aliases=["semantic guidance guider", "sega cfg guider"],
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with."),
                io.Conditioning.Input("positive", tooltip="The prompt."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (the unconditional prediction "
                                                          "SEGA measures concepts against)."),
                _concepts_input(),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (the paper's 7.5). SEGA also acts "
                                       "at 1.0, e.g. for guidance-distilled models."),
                *_momentum_inputs(),
                _start_at_step_input(),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced.")],
            hidden=_HIDDEN,
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, momentum_scale, momentum_beta, concepts=None,
                start_at_step=0) -> io.NodeOutput:
        guider = comfy.samplers.CFGGuider(
            apply_sega(model, _chain(concepts), momentum_scale, momentum_beta, "SEGA Guider",
                       start_at_step=start_at_step, preview=preview_target(cls.hidden)))
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


class SEGAKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SEGAKSampler",
            display_name="SEGA KSampler",
            category=CATEGORY,
            description="KSampler with SEGA: adds or removes the concepts while keeping the composition. "
                        "While it samples, the node shows where each concept acts.",
            search_aliases=["semantic guidance sampler", "sega sampler", "sega ksampler"],
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed of the initial noise."),
                io.Int.Input("steps", default=50, min=1, max=10000,
                             tooltip="Sampler steps (the paper's 50). Warm-up and cool-down count these."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (the paper's 7.5)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="The sampling algorithm."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="The noise schedule."),
                io.Conditioning.Input("positive", tooltip="The prompt."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (the unconditional prediction "
                                                          "SEGA measures concepts against)."),
                _concepts_input(),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (Empty Latent Image for txt2img)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the latent is replaced: 1 for txt2img, below 1 for img2img."),
                *_momentum_inputs(),
            ],
            outputs=[
                io.Latent.Output(tooltip="The denoised latent."),
                io.Mask.Output(
                    "concept_masks", display_name="concept_masks",
                    tooltip="Where each concept acted: per concept, then per image (concept 1's images first), "
                            "the fraction of the concept's active steps in which its threshold kept each "
                            "position, at image size (1 = kept in every step, 0 = never). MaskToImage turns it "
                            "into images to save or composite."),
            ],
            hidden=_HIDDEN,
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, momentum_scale, momentum_beta, concepts=None) -> io.NodeOutput:
        specs = _chain(concepts)
        # A NaN in the input latent would give a NaN image even with no concept acting (the model
        # is then left unpatched): refuse it here, and check the result of a run SEGA did not take part in.
        if not bool(torch.isfinite(latent_image["samples"]).all()):
            raise SEGAError("SEGA KSampler: latent_image holds NaN or inf values; check the node that made it "
                            "(a loaded .latent file, a VAE Encode of a broken image).")
        # Always gathered (a few small tensor operations per step): ComfyUI caches a node's outputs by its
        # inputs, not by what is linked to them, so masks skipped while unlinked would stay empty when
        # the output is linked later.
        runs = RunLog()
        patched = apply_sega(model, specs, momentum_scale, momentum_beta, "SEGA KSampler",
                             preview=preview_target(cls.hidden), log_to=runs)
        out = comfy_nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                          latent_image, denoise=denoise)
        # a run SEGA took part in has checked its result already (and named the step and the cause)
        if not runs.sega_took_part and not bool(torch.isfinite(out[0]["samples"]).all()):
            raise SEGAError("SEGA KSampler: sampling gave NaN or inf. Check the model (fp16 overflow?) and "
                            "lower cfg or the concepts' edit_scale.")
        return io.NodeOutput(out[0], _concept_masks(model, specs, latent_image["samples"], runs))


def _concept_masks(model, specs: list, latent, runs: RunLog):
    """SEGA KSampler's concept_masks: (concepts x batch, H, W) at image size."""
    ratio = getattr(model.get_model_object("latent_format"), "spacial_downscale_ratio", 8)
    size = (latent.shape[-2] * ratio, latent.shape[-1] * ratio)
    batch = latent.shape[0]
    watch = next((w for w in runs.watches if w is not None), None)
    if watch is None:  # no concepts, or settings that never edit
        return torch.zeros(max(1, len(specs)) * batch, *size)
    return watch.result(batch, size)
