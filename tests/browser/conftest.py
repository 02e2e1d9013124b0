"""Fixtures of the real-browser tests: one ComfyUI server and one Chromium per test module.

Module scope on purpose: playwright's sync API keeps an event loop running in the main thread
while it is open, and the in-process host tests that run after these need asyncio.run().

Every test in tests/browser/ is marked `host` (it needs the ComfyUI host that tests/conftest.py
finds). Without python playwright or the system's Chromium the module skips with one line.
Screenshots go to $SEGA_TEST_ARTIFACTS (default: <system temp>/comfyui-sega-browser), never
into the repository.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

BROWSER_DIR = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if BROWSER_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.host)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = Path(os.environ.get("SEGA_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "comfyui-sega-browser")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory):
    import comfy_host
    from comfy_browser import Server, prepare_base_dir
    from comfy_server import host_dir

    ckpt = comfy_host.tiny_sd15_checkpoint_path()
    # the tiny model whose UNet has cross-attention at a quarter of the latent (mask_from attention)
    mask_ckpt = comfy_host.tiny_mask_checkpoint_path()
    base = tmp_path_factory.mktemp("comfyui-base")
    prepare_base_dir(base, ckpt)
    (base / "models" / "checkpoints" / mask_ckpt.name).symlink_to(mask_ckpt)
    server = Server(host_dir(), base)
    server.ckpt_name = ckpt.name
    server.mask_ckpt_name = mask_ckpt.name
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    from comfy_browser import launch_browser
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_browser(p)
        yield b
        b.close()
