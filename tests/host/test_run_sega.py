"""The README's first command: run_sega.py runs a SEGA workflow through ComfyUI without the browser."""
from __future__ import annotations

import subprocess
import sys

from comfy_host import PACK_ROOT, host_on_path


def _run(*args, tmp_path):
    # the same cache as the tests' tiny checkpoint ($SEGA_TEST_CACHE or $HOME/.cache/comfyui-sega)
    return subprocess.run([sys.executable, str(PACK_ROOT / "run_sega.py"), "--comfyui", str(host_on_path()),
                           "--output-dir", str(tmp_path), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)


def test_without_a_checkpoint_it_says_what_to_do(tmp_path):
    res = _run(tmp_path=tmp_path)
    assert res.returncode == 2
    assert "--checkpoint" in res.stderr and "--tiny" in res.stderr


def test_tiny_smoke_run_writes_both_images_side_by_side(tmp_path, tiny_sd15_checkpoint):
    from PIL import Image

    res = _run("--tiny", "--steps", "3", "--size", "64", tmp_path=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    images = sorted(tmp_path.glob("sega_run_*.png"))
    assert len(images) == 1 and str(images[0]) in res.stdout
    with Image.open(images[0]) as im:
        assert im.size == (64 * 2 + 8, 64)  # without SEGA | 8 px gap | with SEGA
    assert "3/3" in res.stderr  # the sampler's progress bar
