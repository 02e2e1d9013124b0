"""The pack as the Comfy Registry gets it: pyproject.toml's Registry fields, requirements.txt, and
the zip that `comfy node pack` makes (comfy-cli from PyPI, in its own venv; no ComfyUI needed).

`comfy node pack` zips the git-tracked files minus .comfyignore; it runs here on a clone of the
committed HEAD, as on a fresh checkout in CI. The zip must hold exactly what a user needs: the
code, the frontend, the example workflows, the docs the README shows, the part of harness/
run_sega.py runs on, and nothing of tests/, bench/ or CI.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import tomllib
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from install_env import COMFY_CLI, PACK_ROOT, clone, pypi_venv, requirement_lines

# What a user's copy of the pack holds: these files, and every tracked file below these folders.
USER_FILES = {"__init__.py", "run_sega.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE",
              # what run_sega.py imports of harness/ (the rest of harness/ is for developing the pack)
              "harness/__init__.py", "harness/host.py", "harness/pack.py", "harness/prompts.py", "harness/tiny.py",
              "harness/workflow.py"}
USER_FOLDERS = ("nodes/", "sega_core/", "js/", "workflows/", "docs/")
# The pack's minimum ComfyUI, as __init__.py tells users and .ci/run tests it.
MIN_COMFYUI = "0.8.0"
TORCH_PACKAGES = re.compile(r"^(torch|torchvision|torchaudio|torchsde)\b", re.IGNORECASE)


def _pyproject() -> dict:
    return tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())


def test_registry_fields():
    data = _pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    # Registry rules for the node id: letters, digits, - _ . ; no run of specials; starts with a
    # letter; under 100 characters; "ComfyUI" left out of it.
    assert re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", project["name"]), project["name"]
    assert len(project["name"]) < 100 and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    assert (PACK_ROOT / project["license"]["file"]).is_file()
    assert project["description"].strip()
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"].strip() and comfy["DisplayName"].strip()
    assert comfy["requires-comfyui"] == f">={MIN_COMFYUI}"
    assert f"v{MIN_COMFYUI}" in (PACK_ROOT / "__init__.py").read_text()
    assert re.search(rf"^min_comfyui={re.escape(MIN_COMFYUI)}$", (PACK_ROOT / ".ci" / "run").read_text(), re.MULTILINE)


def test_requirements_agree_and_never_list_torch():
    """ComfyUI-Manager installs requirements.txt, the Registry reads `dependencies`: the same list,
    and never torch (a custom node must not replace the torch build of a user's ComfyUI)."""
    listed = requirement_lines(PACK_ROOT / "requirements.txt")
    assert listed == list(_pyproject()["project"]["dependencies"])
    for line in (PACK_ROOT / "requirements.txt").read_text().splitlines():
        code = line.split("#", 1)[0]
        # pip and ComfyUI-Manager read a comment after a requirement differently
        assert "#" not in line or not code.strip(), f"a comment after a requirement: {line!r}"
        assert not TORCH_PACKAGES.match(code.strip()), line


def _comfy(args: list[str], cwd: Path, home: Path) -> tuple[int, str]:
    venv = pypi_venv("venv-comfy-cli", [COMFY_CLI])
    # no telemetry, no prompt; its settings go to a temporary home
    env = dict(os.environ, HOME=str(home), DO_NOT_TRACK="1", NO_COLOR="1", COLUMNS="200")
    r = subprocess.run([str(venv / "bin" / "comfy"), "--skip-prompt", "--no-json", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=180)
    return r.returncode, r.stdout + r.stderr


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("pack") / "comfyui-sega"
    clone(dest)
    return dest


def test_comfy_node_validate(checkout, tmp_path):
    rc, out = _comfy(["node", "validate"], checkout, tmp_path)
    print(out)
    assert rc == 0, out
    assert "All validation checks passed" in out, out
    # the validator only warns (exit 0) on bad fields and on eval/exec: a warning is a failure here
    assert not re.search(r"warning|error", out, re.IGNORECASE), out


def _tracked(checkout: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=checkout, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _module_files(module: str) -> set[str]:
    path = module.replace(".", "/")
    return {f"{path}.py", f"{path}/__init__.py"}


def test_comfy_node_pack_holds_what_a_user_needs(checkout, tmp_path):
    rc, out = _comfy(["node", "pack"], checkout, tmp_path)
    print(out)
    assert rc == 0 and "Created zip file" in out, out
    with zipfile.ZipFile(checkout / "node.zip") as z:
        names = [i.filename for i in z.infolist() if not i.is_dir()]
        sources = {n: z.read(n).decode() for n in names if n.endswith(".py")}
    print("\n".join(sorted(names)))
    expected = {f for f in _tracked(checkout) if f in USER_FILES or f.startswith(USER_FOLDERS)}
    assert USER_FILES <= expected, USER_FILES - expected
    assert sorted(names) == sorted(expected), (
        f"missing: {sorted(expected - set(names))}; not for users: {sorted(set(names) - expected)}")
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]

    # Nothing in the zip imports what was left out (tests/, bench/): every import of the pack's own
    # modules resolves to a file in the zip.
    top_level = {PurePosixPath(f).parts[0].removesuffix(".py") for f in _tracked(checkout)}
    for name, source in sources.items():
        package = PurePosixPath(name).parent.parts
        for node in ast.walk(ast.parse(source, name)):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                candidates = _module_files(target) if node.module else {"/".join([*base, "__init__.py"])}
                if node.module is None:  # from . import x: x is a module or a name in __init__
                    candidates |= {f for a in node.names for f in _module_files(".".join([*base, a.name]))}
                assert candidates & set(names), f"{name}:{node.lineno} imports {target} (not in the zip)"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for mod in mods:
                    top = mod.split(".")[0]
                    if top in top_level:
                        assert _module_files(mod) & set(names), f"{name}:{node.lineno} imports {mod} (not in the zip)"
