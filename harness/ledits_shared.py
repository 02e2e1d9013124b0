"""diffusers' LEDITS++ pipeline for Stable Diffusion on a real UNet (harness.shared_unet's), offline.

`LEditsPPPipelineStableDiffusion` runs its own `invert()` and `__call__()` with the given diffusers
UNet2DConditionModel; only the text side and the VAE are stand-ins:
  - a tokenizer that maps each known prompt to one id (every position holds it; its length is the
    prompt's words plus start and end), and a text encoder that returns the embedding (77, 768)
    chosen for that prompt, so the pack can be given exactly the same conditioning;
  - harness.ledits_reference's VAE, whose encode returns the chosen latent;
  - SD's scheduler config (an Euler scheduler with SD's betas, which the pipeline turns into
    SDE-DPM-Solver++(2M) as it does for SD 1.5's shipped scheduler).
`RowTally` counts the UNet's calls and batch rows (a forward pre-hook), for comparing model rows.
"""
from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace
from typing import Dict, Optional, Sequence, Tuple

import torch

from .ledits_reference import NEVER, SCALING_FACTOR, Edit, StubVAE  # noqa: F401  (Edit re-exported)


class EmbeddingTokenizer:
    """Each known prompt is one id; input_ids (n, 77) hold it at every position."""

    model_max_length = 77
    added_tokens_encoder: dict = {}

    def __init__(self, prompts: Sequence[str]):
        self.ids = {p: i for i, p in enumerate(prompts)}

    def tokenize(self, text):
        return text.split()

    def __call__(self, texts, padding=None, max_length=None, truncation=None, return_tensors=None,
                 return_length=False):
        texts = [texts] if isinstance(texts, str) else list(texts)
        unknown = [t for t in texts if t not in self.ids]
        if unknown:
            raise KeyError(f"EmbeddingTokenizer: no embedding for the prompts {unknown}")
        ids = torch.tensor([[self.ids[t]] * self.model_max_length for t in texts], dtype=torch.long)
        lengths = torch.tensor([min(len(t.split()) + 2, self.model_max_length) for t in texts])
        return SimpleNamespace(input_ids=ids, length=lengths)


class EmbeddingTextEncoder:
    """Returns the embedding table's row of each prompt's id: (n, 77, width)."""

    dtype = torch.float32
    config = SimpleNamespace()

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=None):
        return (self.table[input_ids[:, 0]].to(torch.float32),)


class RowTally:
    """The batch rows of every call of a torch module (a forward pre-hook); `remove()` detaches it."""

    def __init__(self, module):
        self.rows = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.rows.append(int(sample.shape[0]))

    def clear(self):
        self.rows.clear()

    def remove(self):
        self.handle.remove()


def sd_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon")


def ledits_pipeline(unet, embeddings: Dict[str, torch.Tensor]):
    """LEditsPPPipelineStableDiffusion on `unet` (diffusers UNet2DConditionModel); `embeddings` maps
    every prompt the runs use ("" for the uncond, the source prompt, the concepts) to its (77, width)
    embedding."""
    from diffusers import LEditsPPPipelineStableDiffusion

    prompts = list(embeddings)
    table = torch.stack([embeddings[p].reshape(embeddings[p].shape[-2:]) for p in prompts])
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = LEditsPPPipelineStableDiffusion(
            vae=StubVAE(), text_encoder=EmbeddingTextEncoder(table), tokenizer=EmbeddingTokenizer(prompts), unet=unet,
            scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def invert(pipe, x0: torch.Tensor, num_steps: int, skip: float, seed: int, source_prompt: str = "",
           source_guidance_scale: float = 3.5):
    """The pipeline's invert() of the latent x0 (diffusers' VP latent: what VAE encode times the
    scaling factor gives); the pipeline keeps the result (pipe.zs, pipe.init_latents)."""
    pipe.vae.latent = x0
    image = torch.zeros(x0.shape[0], 3, 8 * x0.shape[-2], 8 * x0.shape[-1]) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.invert(image=image, source_prompt=source_prompt, source_guidance_scale=source_guidance_scale,
                    num_inversion_steps=num_steps, skip=skip, generator=torch.Generator().manual_seed(seed))


def edit(pipe, concepts: Sequence[Tuple[str, Edit]], user_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The pipeline's __call__ on the last inversion (implicit masks only): the edited VP latent."""
    kw = {}
    if concepts:
        edits = [e for _, e in concepts]
        kw = dict(editing_prompt=[p for p, _ in concepts], reverse_editing_direction=[e.reverse for e in edits],
                  edit_guidance_scale=[e.scale for e in edits], edit_warmup_steps=[e.warmup for e in edits],
                  edit_cooldown_steps=[NEVER if e.cooldown is None else e.cooldown for e in edits],
                  edit_threshold=[e.threshold for e in edits])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(output_type="latent", user_mask=user_mask, use_cross_attn_mask=False, use_intersect_mask=False,
                   return_dict=False, **kw)
    return out[0]


def inversion_bytes(pipe) -> int:
    """Bytes the pipeline keeps for its last inversion: the storages behind pipe.zs and
    pipe.init_latents (a view of all N + 1 intermediate latents, which it keeps alive)."""
    seen, total = set(), 0
    for t in (pipe.zs, pipe.init_latents):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total
