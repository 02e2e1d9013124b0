"""Without a ComfyUI the host tests are skipped, and the run ends with one line saying how many and why."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(r"^SKIPPED (\d+) host tests(?: and (\d+) host modules)?: no ComfyUI found \(set COMFYUI_PATH")


def test_without_a_host_the_host_tests_skip_with_one_line(tmp_path):
    for pack in (PACK_ROOT, Path(os.path.abspath(__file__)).parents[2]):
        if pack.parent.name == "custom_nodes" and (pack.parent.parent / "comfy").is_dir():
            pytest.skip("the pack sits in a ComfyUI's custom_nodes/, which is always found as the host")
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTHONPATH")}
    env["HOME"] = str(tmp_path)  # no $HOME/ComfyUI
    # test_nodes.py imports nothing of ComfyUI at module level; test_hooks.py does (a skipped module)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/host/test_nodes.py", "tests/host/test_hooks.py"],
                         cwd=PACK_ROOT, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    lines = [m for m in map(SUMMARY.match, text.splitlines()) if m]
    assert len(lines) == 1, text
    tests, modules = int(lines[0].group(1)), int(lines[0].group(2) or 0)
    assert tests >= 1 and modules == 1, text
    # every skipped test and module is counted, and nothing ran
    assert re.search(rf"\b{tests + modules} skipped\b", text) and " passed" not in text, text
