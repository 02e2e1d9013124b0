"""Schema helpers shared by the SEGA nodes."""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

CATEGORY = "sampling/sega"
_FIELDS = {f.name for f in dataclasses.fields(io.Schema)}


def schema(**kwargs) -> io.Schema:
    """io.Schema, leaving out fields this ComfyUI does not know yet (search_aliases before v0.9)."""
    return io.Schema(**{k: v for k, v in kwargs.items() if k in _FIELDS})
