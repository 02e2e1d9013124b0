"""The SEGA_CONCEPTS value that flows between SEGA nodes."""
from __future__ import annotations

from dataclasses import dataclass

from ..sega_core import Concept

SEGA_CONCEPTS = "SEGA_CONCEPTS"


@dataclass(frozen=True)
class ConceptSpec:
    """One concept as a SEGA Concept node made it: its conditioning, its settings and a label."""

    conditioning: list  # ComfyUI CONDITIONING: [[cross_attn tensor, {extra: ...}], ...]
    concept: Concept
    label: str

    def describe(self, index: int) -> str:
        name = f"'{self.label}'" if self.label else f"#{index + 1}"
        return f"SEGA Concept {name}"
