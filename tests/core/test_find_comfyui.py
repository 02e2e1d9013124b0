"""harness.host.find_comfyui: the one order in which run_sega.py, the tests, the benchmarks and
.ci/run look for ComfyUI ($COMFYUI_PATH, then $HOME/ComfyUI, then the ComfyUI above custom_nodes/)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from harness.host import PACK_ROOT, HostError, find_comfyui


def _tree(path: Path) -> Path:
    (path / "comfy").mkdir(parents=True)
    (path / "nodes.py").write_text("")
    return path


@pytest.fixture
def no_pack_host():
    for pack in (PACK_ROOT, Path(os.path.abspath(__file__)).parents[2]):
        if pack.parent.name == "custom_nodes" and (pack.parent.parent / "comfy").is_dir():
            pytest.skip("the pack sits in a ComfyUI's custom_nodes/, which is found after $HOME/ComfyUI")


def test_comfyui_path_comes_first(tmp_path, monkeypatch):
    env = _tree(tmp_path / "env")
    monkeypatch.setenv("HOME", str(tmp_path))
    _tree(tmp_path / "ComfyUI")
    monkeypatch.setenv("COMFYUI_PATH", str(env))
    assert find_comfyui() == env.resolve()
    explicit = _tree(tmp_path / "explicit")
    assert find_comfyui(explicit) == explicit.resolve()  # run_sega.py's --comfyui


def test_then_home_comfyui(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    home = _tree(tmp_path / "ComfyUI")
    assert find_comfyui() == home.resolve()


def test_none_without_a_tree(tmp_path, monkeypatch, no_pack_host):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ComfyUI").mkdir()  # not a source tree: no comfy/, no nodes.py
    assert find_comfyui() is None


@pytest.mark.parametrize("variable", ["COMFYUI_PATH", "explicit"])
def test_a_named_folder_that_is_not_comfyui_is_an_error(tmp_path, monkeypatch, variable):
    monkeypatch.setenv("HOME", str(tmp_path))
    _tree(tmp_path / "ComfyUI")
    if variable == "COMFYUI_PATH":
        monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nothing"))
        with pytest.raises(HostError, match=r"COMFYUI_PATH=.*nothing is not a ComfyUI source tree"):
            find_comfyui()
    else:
        monkeypatch.delenv("COMFYUI_PATH", raising=False)
        with pytest.raises(HostError, match=r"--comfyui=.*nothing is not a ComfyUI source tree"):
            find_comfyui(tmp_path / "nothing")


def test_ci_run_states_the_same_order():
    """.ci/run picks its main host in the same order (it is bash, so it is read here, not run)."""
    script = (PACK_ROOT / ".ci" / "run").read_text()
    block = script[script.index('main_host=""'):script.index("# Other hosts")]
    tests = re.findall(r'^(?:if|elif) (.*); then$', block, re.MULTILINE)
    assert len(tests) == 3, block
    assert "COMFYUI_PATH" in tests[0] and '"$HOME/ComfyUI"' in tests[1] and "custom_nodes" in tests[2], tests
