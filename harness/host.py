"""Finding ComfyUI and getting it ready to import, the same way for the runner, the tests and the
benchmarks.

The host is the first of (the order .ci/run and the README state):
  1. an explicit folder (run_sega.py's --comfyui);
  2. $COMFYUI_PATH (an error if it is set but not a ComfyUI source tree);
  3. $HOME/ComfyUI;
  4. the ComfyUI whose custom_nodes/ holds this pack (reached directly or through a link).
A ComfyUI source tree is a folder with comfy/ and nodes.py.

`prepare_host(root)` puts ComfyUI first on sys.path (before this repo, whose nodes/ would otherwise
shadow ComfyUI's nodes.py), binds ComfyUI's utils/ package as main.py does, and selects the CPU
when torch has no CUDA; it must run before comfy.model_management is first imported.
"""
from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
# The folder name the pack gets under custom_nodes/ (ComfyUI names the module after it).
PACK_NAME = "comfyui-sega"
# Where generated files go, never into the repository: the tiny checkpoint, test venvs.
CACHE_DIR = Path(os.environ.get("SEGA_TEST_CACHE") or Path.home() / ".cache" / "comfyui-sega")


class HostError(ValueError):
    """$COMFYUI_PATH or an explicit folder is not a ComfyUI source tree."""


def is_comfyui(path: Path) -> bool:
    return (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path | None:
    """The ComfyUI host (see the module's docstring for the order), resolved; None if there is none.

    Raises HostError when `explicit` or $COMFYUI_PATH names a folder that is not a ComfyUI tree."""
    for what, value in (("--comfyui", explicit), ("COMFYUI_PATH", os.environ.get("COMFYUI_PATH"))):
        if value:
            path = Path(value).expanduser()
            if not is_comfyui(path):
                raise HostError(f"{what}={value} is not a ComfyUI source tree (no comfy/ and nodes.py)")
            return path.resolve()
    candidates = [Path.home() / "ComfyUI"]
    # the pack inside ComfyUI/custom_nodes/<pack>, reached directly or through a link
    for pack in (Path(os.path.abspath(__file__)).parents[1], PACK_ROOT):
        if pack.parent.name == "custom_nodes":
            candidates.append(pack.parent.parent)
    for path in candidates:
        if is_comfyui(path):
            return path.resolve()
    return None


def host_version(host: Path) -> str:
    """The version in the tree's comfyui_version.py, or "unknown version"."""
    try:
        text = (host / "comfyui_version.py").read_text()
    except OSError:
        return "unknown version"
    m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    return m.group(1) if m else "unknown version"


def host_on_path() -> Path | None:
    """The first ComfyUI tree on sys.path, if any."""
    for entry in sys.path:
        p = Path(entry or ".")
        if is_comfyui(p):
            return p.resolve()
    return None


def prepare_host(root: Path | None = None) -> None:
    """Get ComfyUI's modules ready to import the way main.py has them (idempotent).

    Puts `root` first on sys.path when given. Binds `utils` to ComfyUI's utils/ package, as main.py
    does first thing: importing nodes.py puts comfy/ (which holds comfy/utils.py) in front of
    sys.path, after which `import server` would fail on v0.8.0. Selects the CPU in ComfyUI's
    arguments when torch has no CUDA.
    """
    if root is not None and str(root) not in sys.path[:1]:
        sys.path.insert(0, str(root))
    import torch

    if "utils" not in sys.modules:
        host = root if root is not None else host_on_path()
        if host is not None and (host / "utils" / "__init__.py").is_file():
            import utils  # noqa: F401  (ComfyUI's utils/ package)
    if torch.cuda.is_available():
        return
    import comfy.cli_args

    if not comfy.cli_args.args.cpu and "comfy.model_management" in sys.modules:
        raise RuntimeError(
            "comfy.model_management was imported before harness.host.prepare_host(): "
            "prepare the host before importing anything from ComfyUI"
        )
    comfy.cli_args.args.cpu = True


def start_prompt_server() -> None:
    """A PromptServer that is never started, as main.py makes one before loading nodes: some built-in
    extensions (v0.33.0's nodes_replacements) and packs use PromptServer.instance at load time."""
    import server

    if getattr(server.PromptServer, "instance", None) is None:
        server.PromptServer(asyncio.new_event_loop())


def init_nodes(load_pack: bool = True) -> None:
    """Load ComfyUI's built-in and custom nodes; load this pack too if it is not in custom_nodes/."""
    import nodes

    start_prompt_server()
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    if load_pack and "SEGAKSampler" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.load_custom_node(str(PACK_ROOT)))
    if load_pack and "SEGAKSampler" not in nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError("the SEGA nodes did not load: see the log above (ComfyUI v0.8.0 or newer is needed)")


def load_custom_node(path: Path) -> list[str]:
    """Load one more custom node folder (or .py file) after init; returns the node ids it added."""
    import nodes

    before = dict(nodes.NODE_CLASS_MAPPINGS)
    if not asyncio.run(nodes.load_custom_node(str(path))):
        raise RuntimeError(f"ComfyUI could not load {path} (see the log)")
    return sorted(k for k, v in nodes.NODE_CLASS_MAPPINGS.items() if before.get(k) is not v)
