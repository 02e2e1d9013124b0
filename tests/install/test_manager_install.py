"""Install the pack exactly as ComfyUI-Manager does, into a fresh ComfyUI, and start it.

1. ComfyUI-Manager, in the version the host's manager_requirements.txt pins (what
   `pip install -r manager_requirements.txt` gives a user of that ComfyUI), goes into a venv
   layered on the host's venv (see install_env.py).
2. A bare clone of this repository's committed HEAD is served by a plain HTTP server on
   127.0.0.1 (git's dumb HTTP protocol).
3. A fresh ComfyUI: a copy of the host's source tree with empty custom_nodes/, user/, models/.
4. `cm-cli install http://127.0.0.1:PORT/comfyui-sega.git` (see cm_cli()), run from that copy
   with COMFYUI_PATH at it; no manager setting is changed (installing from a git URL is allowed
   at the default security_level). It must install no Python package.
5. ComfyUI starts from the copy with `--enable-manager`, as a manager user's does; /object_info
   must list every SEGA node, /api/workflow_templates every example workflow, /extensions the
   frontend extension.

Skipped with one line when PyPI cannot be reached or the host has no manager_requirements.txt.
"""
from __future__ import annotations

import ast
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from comfy_host import PACK_NAME, host_on_path
from comfy_server import fetch_json, free_port, stop_process
from install_env import clone, pypi_venv, requirement_lines

pytestmark = pytest.mark.host

# Top-level entries of a ComfyUI tree that are a user's data, or not needed to run it.
NOT_COPIED = {"custom_nodes", "models", "user", "input", "output", "temp", "tests", "tests-unit",
              ".git", ".github", ".ci"}
CM_CLI_TIMEOUT_S = 180
START_TIMEOUT_S = 180


def sega_node_ids(pack: Path) -> set[str]:
    """The node_id of every schema in the pack's nodes/ (what /object_info must list)."""
    ids = set()
    for path in (pack / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.keyword) and node.arg == "node_id" and isinstance(node.value, ast.Constant):
                ids.add(node.value.value)
    return ids


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def git_server(tmp_path):
    """The URL of a bare clone of HEAD, served over HTTP on 127.0.0.1; and HEAD's sha."""
    root = tmp_path / "git"
    sha = clone(root / f"{PACK_NAME}.git", bare=True)
    subprocess.run(["git", "update-server-info"], cwd=root / f"{PACK_NAME}.git", check=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{PACK_NAME}.git", sha
    server.shutdown()
    server.server_close()


def fresh_comfyui(host: Path, dest: Path) -> Path:
    def ignore(folder, names):
        skip = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
        if Path(folder) == host:
            skip |= NOT_COPIED & set(names)
        return skip

    shutil.copytree(host, dest, ignore=ignore, symlinks=True)
    (dest / "custom_nodes").mkdir()
    return dest


def _installed_packages(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    return {p["name"].lower(): p["version"] for p in json.loads(out)}


def cm_cli(python: Path) -> list[str]:
    """The command line of cm-cli, run from the ComfyUI folder.

    ComfyUI-Manager 4.2 has a top-level `cm_cli` package behind its `cm-cli` script. Before that
    (4.0.x, which ComfyUI v0.8.0 pins) the script imports ComfyUI's `comfy` package before it
    reads COMFYUI_PATH and fails, so those users run `python -m comfyui_manager.cm_cli` from the
    ComfyUI folder (which puts that folder on sys.path)."""
    code = "import importlib.util as u; print(u.find_spec('cm_cli') is not None)"
    probe = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    if probe.stdout.strip() == "True":
        return [str(python.parent / "cm-cli")]
    return [str(python), "-m", "comfyui_manager.cm_cli"]


def start_comfyui(python: Path, comfy: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--enable-manager",
           "--disable-auto-launch", "--database-url", "sqlite:///:memory:"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "COMFYUI_PATH")}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=comfy, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            log = log_path.read_text(errors="replace")
            raise AssertionError(f"ComfyUI exited with {proc.returncode}:\n{log[-4000:]}")
        try:
            fetch_json(url + "/api/system_stats")
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"ComfyUI did not answer in {START_TIMEOUT_S} s:\n"
                                     + log_path.read_text(errors="replace")[-4000:])
            time.sleep(0.5)


def test_cm_cli_install_from_git_url(git_server, tmp_path):
    host = host_on_path()
    manager_req = host / "manager_requirements.txt"
    if not manager_req.is_file():
        pytest.skip(f"{host} has no manager_requirements.txt (a ComfyUI without the pip-installed manager)")
    manager = requirement_lines(manager_req)
    version = "-".join(r.replace("==", "-") for r in manager)
    # one per host venv (this Python's) and manager version
    venv = pypi_venv(f"{Path(sys.prefix).name}-{version}", manager, layer_on=sys.executable)
    python = venv / "bin" / "python"
    url, sha = git_server
    comfy = fresh_comfyui(host, tmp_path / "ComfyUI")
    before = _installed_packages(python)

    env = dict(os.environ, COMFYUI_PATH=str(comfy), NO_COLOR="1", COLUMNS="200")
    env.pop("PYTHONPATH", None)
    t0 = time.monotonic()
    r = subprocess.run([*cm_cli(python), "install", url], cwd=comfy, env=env,
                       capture_output=True, text=True, timeout=CM_CLI_TIMEOUT_S)
    out = r.stdout + r.stderr
    print(f"cm-cli ({', '.join(manager)}) took {time.monotonic() - t0:.1f} s:\n{out}")
    assert r.returncode == 0 and "[INSTALLED]" in out and "ERROR" not in out, out
    installed = comfy / "custom_nodes" / PACK_NAME
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=installed, capture_output=True, text=True, check=True)
    assert head.stdout.strip() == sha
    # the manager read requirements.txt and installed nothing: ComfyUI's torch stays as it was
    assert "Install: pip packages" in out, out
    after = _installed_packages(python)
    changed = {name: (before.get(name), version) for name, version in after.items() if before.get(name) != version}
    assert not changed and after.keys() == before.keys(), f"installing the pack changed packages: {changed}"

    t0 = time.monotonic()
    proc, server = start_comfyui(python, comfy, tmp_path / "comfyui.log")
    try:
        object_info = fetch_json(server + "/object_info")
        templates = fetch_json(server + "/api/workflow_templates")
        extensions = fetch_json(server + "/extensions")
    finally:
        stop_process(proc)
    log = (tmp_path / "comfyui.log").read_text(errors="replace")
    print(f"ComfyUI started in {time.monotonic() - t0:.1f} s")
    assert "IMPORT FAILED" not in log, log[-4000:]

    ids = sega_node_ids(installed)
    assert len(ids) >= 7, ids
    missing = ids - set(object_info)
    assert not missing, (missing, log[-4000:])
    for node_id in ids:
        info = object_info[node_id]
        assert info["python_module"] == f"custom_nodes.{PACK_NAME}", info["python_module"]
        assert info["category"] == "sampling/sega" and info["display_name"].startswith("SEGA"), info
    examples = sorted(p.stem for p in (installed / "workflows").glob("*.json"))
    assert len(examples) >= 10 and sorted(templates.get(PACK_NAME, [])) == examples, templates
    assert [e for e in extensions if e.startswith(f"/extensions/{PACK_NAME}/") and e.endswith(".js")], extensions
