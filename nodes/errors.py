"""Errors the SEGA nodes raise: each message names the node, the input and the fix."""

# ComfyUI's error dialog names an exception by its class's module and name, and a custom node pack's
# module is its install path ("<ComfyUI>/custom_nodes/comfyui-sega.nodes.errors"): the pack's errors
# carry a short, stable module name instead, so the dialog reads "comfyui_sega.SEGAError: ...".
ERROR_MODULE = "comfyui_sega"


class SEGAError(ValueError):
    """Raised for bad SEGA input or a failed SEGA run; ComfyUI shows the message on the node."""


SEGAError.__module__ = ERROR_MODULE
