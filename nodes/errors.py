"""Errors the SEGA nodes raise: each message names the node, the input and the fix."""


class SEGAError(ValueError):
    """Raised for bad SEGA input or a failed SEGA run; ComfyUI shows the message on the node."""
