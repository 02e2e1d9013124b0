"""The reference's step math, two ways, fed chosen noise predictions (no weights, no downloads).

pipeline(): diffusers' SemanticStableDiffusionPipeline itself, with stand-ins for the tokenizer,
  text encoder and UNet (the UNet returns a fixed tensor of 2 + N chunks: uncond, prompt, concepts)
  and a real DDIMScheduler, as tests/core/test_sega_reference.py drives it. Running it with and
  without editing prompts and subtracting gives the per-step cost of the reference's SEGA block,
  including its per-step CPU copies of the estimates, its `.to("cpu")` moves and the extra
  concept copies of the latents it feeds the UNet.
port(): the torch transcription of one reference step in tests/core/conftest.py
  (`reference_step`), which tests/core checks against the pipeline. It is the math alone,
  generalised to any number of axes after (B, C), so it also runs on video latents.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from types import SimpleNamespace

import torch

from _common import ROOT


def port():
    """tests/core/conftest.py's reference_step (imported by path; it needs pytest installed)."""
    spec = importlib.util.spec_from_file_location("sega_reference_port", ROOT / "tests" / "core" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module.reference_step


class _Tokenizer:
    model_max_length = 2

    def __call__(self, texts, padding=None, max_length=None, return_tensors=None, truncation=None):
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = [[0 if t == "" else 1 if t == "prompt" else 100 + int(t[7:])] * 2 for t in texts]
        return SimpleNamespace(input_ids=torch.tensor(ids))


class _TextEncoder:
    def __call__(self, input_ids):
        return (input_ids.to(torch.float32).unsqueeze(-1),)


class _UNet(torch.nn.Module):
    """Returns the same predictions at every step: uncond, prompt, then the concepts, B rows each.

    A Module with a `device`, so that the pipeline runs on the device of the predictions."""

    def __init__(self, device):
        super().__init__()
        self.config = SimpleNamespace(in_channels=4, sample_size=1)
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.out = None

    def __call__(self, sample, timestep, encoder_hidden_states=None):
        assert sample.shape[0] == self.out.shape[0], (sample.shape, self.out.shape)
        return SimpleNamespace(sample=self.out)


class Pipeline:
    """The reference pipeline on fixed predictions; `run(edit)` runs `steps` steps with or without SEGA."""

    def __init__(self, u: torch.Tensor, t: torch.Tensor, e: torch.Tensor, steps: int):
        from diffusers import DDIMScheduler
        from diffusers.pipelines.deprecated.semantic_stable_diffusion.pipeline_semantic_stable_diffusion import (
            SemanticStableDiffusionPipeline,
        )

        logging.getLogger("diffusers").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.pipe = SemanticStableDiffusionPipeline(
                vae=None, text_encoder=_TextEncoder(), tokenizer=_Tokenizer(), unet=_UNet(u.device),
                scheduler=DDIMScheduler(num_train_timesteps=1000), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.b, self.c, self.h, self.w = u.shape
        self.n = e.shape[0]
        self.with_edit = torch.cat([u, t] + list(e))
        self.without = torch.cat([u, t])
        self.steps = steps
        self.latents = torch.zeros_like(u)

    def run(self, edit: bool) -> None:
        unet = self.pipe.unet
        unet.config.in_channels = self.c
        unet.out = self.with_edit if edit else self.without
        kw = {}
        if edit:
            kw = dict(editing_prompt=[f"concept{k}" for k in range(self.n)], edit_guidance_scale=5.0,
                      edit_warmup_steps=0, edit_threshold=0.9, edit_momentum_scale=0.1, edit_mom_beta=0.4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.pipe(prompt=["prompt"] * self.b, height=8 * self.h, width=8 * self.w, num_inference_steps=self.steps,
                      guidance_scale=7.5, latents=self.latents, output_type="latent", **kw)


def threshold_lines(noise_guidance_edit_tmp: torch.Tensor, edit_threshold_c: float = 0.9) -> torch.Tensor:
    """The reference's thresholding lines, verbatim, to show what they do with a given latent shape."""
    tmp = torch.quantile(torch.abs(noise_guidance_edit_tmp).flatten(start_dim=2), edit_threshold_c, dim=2,
                         keepdim=False)
    return torch.where(torch.abs(noise_guidance_edit_tmp) >= tmp[:, :, None, None], noise_guidance_edit_tmp,
                       torch.zeros_like(noise_guidance_edit_tmp))
