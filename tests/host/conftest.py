"""Fixtures for tests that run inside ComfyUI; the helpers themselves live in comfy_host.py."""
from comfy_host import ckpt, comfy_nodes, tiny_sd15_checkpoint  # noqa: F401  (fixtures)
