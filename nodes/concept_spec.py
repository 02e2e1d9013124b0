"""The SEGA_CONCEPTS value that flows between SEGA nodes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..sega_core import Concept

SEGA_CONCEPTS = "SEGA_CONCEPTS"


@dataclass(frozen=True)
class ConceptSpec:
    """One concept as a SEGA Concept node made it: its conditioning, its settings, a label and
    an optional user mask (where the concept may edit)."""

    conditioning: list  # ComfyUI CONDITIONING: [[cross_attn tensor, {extra: ...}], ...]
    concept: Concept
    label: str
    mask: Optional[torch.Tensor] = None  # ComfyUI MASK, (H, W) or (N, H, W), values in [0, 1]

    def describe(self, index: int) -> str:
        name = f"'{self.label}'" if self.label else f"#{index + 1}"
        return f"SEGA Concept {name}"
