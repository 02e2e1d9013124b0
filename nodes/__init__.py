"""ComfyUI glue of comfyui-sega: the nodes and the hooks that run sega_core inside ComfyUI's sampler."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .concept_nodes import SEGAConcept, SEGAConceptStack
from .photo_edit import NODES as PHOTO_EDIT_NODES
from .prompt_nodes import SEGAConceptText, SEGAPrompt
from .replay_nodes import SEGAReplayEdit, SEGASaveEdit
from .sampling_nodes import SEGAApply, SEGAGuider, SEGAKSampler


class SEGAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SEGAConcept, SEGAConceptText, SEGAPrompt, SEGAConceptStack, SEGAApply, SEGAGuider, SEGAKSampler,
                SEGASaveEdit, SEGAReplayEdit, *PHOTO_EDIT_NODES]


async def comfy_entrypoint() -> SEGAExtension:
    return SEGAExtension()
