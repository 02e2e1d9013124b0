"""The ComfyUI host tests/conftest.py found (it is first on sys.path)."""
from __future__ import annotations

import sys
from pathlib import Path


def host_dir() -> Path:
    for entry in sys.path:
        p = Path(entry)
        if (p / "comfy").is_dir() and (p / "nodes.py").is_file() and (p / "main.py").is_file():
            return p
    raise RuntimeError("no ComfyUI host on sys.path")
