"""Tools from PyPI for the tests that install the pack the way users do.

Each tool gets its own venv under ${SEGA_TEST_CACHE:-$HOME/.cache/comfyui-sega}/, built on first
use and reused while its requirements stay the same. When PyPI cannot be reached the calling test
is skipped with one line that says so.

A "layered" venv sees every package of another venv (a .pth file names that venv's
site-packages) and installs its own on top. ComfyUI-Manager goes into one layered on the ComfyUI
host's venv: ComfyUI, the manager and whatever the manager installs share one interpreter, as in
a user's ComfyUI, and the host's venv itself is never changed.
"""
from __future__ import annotations

import fcntl
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.host import CACHE_DIR, PACK_ROOT  # noqa: F401  (PACK_ROOT: re-exported)

# The Registry's packer and validator; bump on purpose, after reading its changes.
COMFY_CLI = "comfy-cli==1.23.0"
PIP_TIMEOUT_S = 600
# What pip prints when it cannot reach the index (pip retries once, then gives up).
NETWORK_ERROR = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution"
    r"|Name or service not known|Network is unreachable|ConnectTimeout|Read timed out"
    r"|No matching distribution found|Could not find a version that satisfies", re.IGNORECASE)


# venvs that could not be built in this test run, and why: skipped at once from then on
_unreachable: dict[str, str] = {}


def _site_packages(python: str) -> list[str]:
    code = "import sysconfig, json; p = sysconfig.get_paths(); print(json.dumps(sorted({p['purelib'], p['platlib']})))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def pypi_venv(name: str, requirements: list[str], layer_on: str | None = None) -> Path:
    """The venv CACHE_DIR/name holding `requirements` from PyPI, layered on the environment of the
    Python `layer_on` if given."""
    venv = CACHE_DIR / name
    python = venv / "bin" / "python"
    if name in _unreachable:
        pytest.skip(_unreachable[name])
    want = json.dumps({"requirements": requirements, "layer_on": str(layer_on or "")})
    stamp = venv / ".sega-stamp"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building the same venv
        if python.exists() and stamp.is_file() and stamp.read_text() == want:
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        base = layer_on or sys.executable
        subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True)
        if layer_on:
            (Path(_site_packages(str(python))[0]) / "_layer_on.pth").write_text(
                "\n".join(_site_packages(base)) + "\n")
        cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--retries", "1",
               "--timeout", "30", *requirements]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
            out, ok = r.stdout + r.stderr, r.returncode == 0
        except subprocess.TimeoutExpired as e:
            out, ok = f"pip install did not finish in {PIP_TIMEOUT_S} s: {e.stderr or ''}", False
        if not ok:
            shutil.rmtree(venv, ignore_errors=True)
            if NETWORK_ERROR.search(out) or "did not finish" in out:
                last = [line for line in out.splitlines() if line.strip()][-1:]
                _unreachable[name] = (f"PyPI unreachable: could not install {' '.join(requirements)} "
                                      f"({last[0].strip() if last else 'no output'})")
                pytest.skip(_unreachable[name])
            raise AssertionError(f"pip install {' '.join(requirements)} failed:\n{out[-4000:]}")
        stamp.write_text(want)
    return venv


def requirement_lines(path: Path) -> list[str]:
    """The requirements of a requirements file: no blank lines, no comments."""
    lines = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def clone(dest: Path, bare: bool = False) -> str:
    """A clone of this repository's committed HEAD at `dest` (what CI and users get); its sha."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    probe = subprocess.run(["git", "-C", str(PACK_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{PACK_ROOT} is not a git checkout: nothing to install from")
    # --no-local: through git's transport, as from a server; only the checked-out branch
    cmd = ["git", "clone", "-q", "--no-local", "--single-branch", *(["--bare"] if bare else []),
           str(PACK_ROOT), str(dest)]
    subprocess.run(cmd, check=True, capture_output=True)
    return probe.stdout.strip()
