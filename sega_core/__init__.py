"""Semantic Guidance (SEGA, Brack et al. 2023, arXiv:2301.12247) in pure torch.

Nothing here imports ComfyUI: a host converts its own conventions (denoised
predictions, sigma schedules, conditioning formats) at its boundary and calls
these functions with noise-space predictions.
"""
from .concepts import Concept, Plan, SEGAValueError, concept_acts
from .guidance import StepResult, sega_step, threshold_edit, quantile_threshold

__all__ = ["Concept", "Plan", "SEGAValueError", "StepResult", "concept_acts", "sega_step", "threshold_edit",
           "quantile_threshold"]
