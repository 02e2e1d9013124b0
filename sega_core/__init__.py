"""Semantic Guidance (SEGA, Brack et al. 2023, arXiv:2301.12247) in pure torch.

Nothing here imports ComfyUI: a host converts its own conventions (denoised
predictions, sigma schedules, conditioning formats) at its boundary and calls
these functions with noise-space predictions.
"""
from .concepts import Concept, Plan, SEGAValueError, concept_acts
from .guidance import StepResult, sega_step, threshold_edit, quantile_threshold
from .attention import (attention_chunks, attention_mask, combine_masks, intersects, projected_token_attention,
                        smooth, smoothing_kernel, token_attention, token_positions)
from .ledits import (Inversion, draw_noises, dpmpp_2m_sde_step, euler_ancestral_rf_step, implicit_mask, invert,
                     ledits_guidance, ledits_rows, ledits_timesteps, noisy_latents, replay)

__all__ = ["Concept", "Plan", "SEGAValueError", "StepResult", "concept_acts", "sega_step", "threshold_edit",
           "quantile_threshold",
           # LEDITS++ photo editing (sega_core.ledits)
           "Inversion", "draw_noises", "dpmpp_2m_sde_step", "euler_ancestral_rf_step", "implicit_mask", "invert",
           "ledits_guidance", "ledits_rows", "ledits_timesteps", "noisy_latents", "replay",
           # LEDITS++'s cross-attention masks (sega_core.attention)
           "attention_chunks", "attention_mask", "combine_masks", "intersects", "projected_token_attention", "smooth",
           "smoothing_kernel", "token_attention", "token_positions"]
