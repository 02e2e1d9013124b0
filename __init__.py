"""comfyui-sega: Semantic Guidance (SEGA) for every model ComfyUI can sample."""
import logging

try:
    from comfy_api.latest import io as _io
except ImportError:  # ComfyUI from before the V3 node API
    _io = None

if hasattr(_io, "Autogrow"):
    from .nodes import comfy_entrypoint  # noqa: F401

    WEB_DIRECTORY = "./js"  # the frontend extension (served once: pyproject has no [tool.comfy] web)
else:
    # ComfyUI before v0.8.0 lacks the node API this pack is built on: register nothing, keep ComfyUI running.
    logging.getLogger(__name__).warning(
        "comfyui-sega needs ComfyUI v0.8.0 or newer: update ComfyUI to use the SEGA nodes (none were loaded).")
    NODE_CLASS_MAPPINGS = {}
