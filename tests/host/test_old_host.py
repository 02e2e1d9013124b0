"""On a ComfyUI too old for the pack (v0.3.64: no io.Autogrow) the pack must say "update ComfyUI"
once, register nothing, and let ComfyUI start normally.

The old tree is $SEGA_OLD_COMFYUI, else $HOME/ComfyUI-v0.3.64; its Python is
$SEGA_OLD_COMFYUI_PYTHON, else $HOME/.cache/comfyui-sega/venv-v0.3.64/bin/python.
ComfyUI runs as a real server in a subprocess, with a temp base directory whose custom_nodes/
holds a link to this pack.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from comfy_host import PACK_NAME, PACK_ROOT
from comfy_server import fetch_json, free_port, stop_process

OLD_HOST = Path(os.environ.get("SEGA_OLD_COMFYUI") or Path.home() / "ComfyUI-v0.3.64")
OLD_PYTHON = Path(os.environ.get("SEGA_OLD_COMFYUI_PYTHON")
                  or Path.home() / ".cache" / "comfyui-sega" / "venv-v0.3.64" / "bin" / "python")
START_TIMEOUT_S = 180
UPDATE_LINE = re.compile(r"update comfyui", re.IGNORECASE)


def run_old_comfyui(host: Path, python: Path, pack_dir: Path, work: Path) -> tuple[dict, list[str]]:
    """Start `host` with `pack_dir` as its only custom node; return (/object_info, log lines)."""
    base = work / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "user").mkdir()
    (base / "custom_nodes" / PACK_NAME).symlink_to(pack_dir.resolve(), target_is_directory=True)
    port = free_port()
    log_path = work / "comfyui.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
           "--disable-auto-launch", "--disable-api-nodes"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=host, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"ComfyUI exited with {proc.returncode} while starting:\n"
                                         + log_path.read_text(errors="replace")[-4000:])
                try:
                    fetch_json(f"http://127.0.0.1:{port}/system_stats")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"ComfyUI did not answer in {START_TIMEOUT_S} s:\n"
                                             + log_path.read_text(errors="replace")[-4000:])
                    time.sleep(0.5)
            object_info = fetch_json(f"http://127.0.0.1:{port}/object_info")
        finally:
            stop_process(proc)
    return object_info, log_path.read_text(errors="replace").splitlines()


@pytest.fixture(scope="module")
def old_comfyui(tmp_path_factory):
    if not (OLD_HOST / "comfy").is_dir() or not (OLD_HOST / "main.py").is_file():
        pytest.skip(f"no old ComfyUI tree at {OLD_HOST} (set SEGA_OLD_COMFYUI to a v0.3.64 tree)")
    if not OLD_PYTHON.is_file():
        pytest.skip(f"no Python for the old ComfyUI at {OLD_PYTHON} (set SEGA_OLD_COMFYUI_PYTHON)")
    assert (PACK_ROOT / "__init__.py").is_file(), f"the pack has no __init__.py ({PACK_ROOT})"
    return run_old_comfyui(OLD_HOST, OLD_PYTHON, PACK_ROOT, tmp_path_factory.mktemp("old-comfyui"))


def test_old_comfyui_starts_with_the_pack(old_comfyui):
    object_info, log = old_comfyui
    assert "KSampler" in object_info, "ComfyUI's own nodes are missing"
    link = f"custom_nodes{os.sep}{PACK_NAME}"
    crashes = [line for line in log if link in line
               and re.search(r"Cannot import|Error while calling comfy_entrypoint", line)]
    assert not crashes, "the pack failed to import:\n" + "\n".join(crashes)


def test_old_comfyui_asks_once_for_an_update(old_comfyui):
    _, log = old_comfyui
    asks = [line for line in log if PACK_NAME in line.lower() and UPDATE_LINE.search(line)]
    assert len(asks) == 1, f"want exactly one 'update ComfyUI' line naming {PACK_NAME}, got {asks}"


def test_old_comfyui_registers_no_sega_node(old_comfyui):
    object_info, _ = old_comfyui
    ours = sorted(k for k, v in object_info.items()
                  if v.get("python_module") == f"custom_nodes.{PACK_NAME}" or k.upper().startswith("SEGA"))
    assert not ours, f"nodes registered on a ComfyUI without io.Autogrow: {ours}"
