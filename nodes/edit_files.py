"""SEGA edit files: the per-step edit of a run, saved as safetensors, and safe paths for them.

Only ComfyUI's output and input folders are read or written; names with '..', absolute
paths and links that lead outside those folders are refused.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import folder_paths

from .errors import SEGAError

FORMAT = "comfyui-sega.edit/1"
SUFFIX = ".safetensors"
# looked up at call time: ComfyUI (and --output-directory) may change the folders after import
ROOTS = {"output": lambda: folder_paths.get_output_directory(), "input": lambda: folder_paths.get_input_directory()}


def _inside(path: str, root: str) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, base]) == base


def _check_relative(name: str, node: str, what: str) -> Path:
    p = Path(name)
    if not name or "\x00" in name or p.is_absolute() or ".." in p.parts or name.startswith("~"):
        raise SEGAError(f"{node}: {what} {name!r} must be a plain name inside ComfyUI's folders "
                        f"(no '..', no absolute path).")
    return p


def list_edit_files() -> list:
    """Edit files in ComfyUI's output and input folders, as 'name [output]' / 'name [input]'."""
    out = []
    for tag, root_fn in ROOTS.items():
        root = root_fn()
        for dirpath, _, files in os.walk(root, followlinks=False):
            for f in files:
                if f.endswith(SUFFIX):
                    rel = os.path.relpath(os.path.join(dirpath, f), root)
                    out.append(f"{rel.replace(os.sep, '/')} [{tag}]")
    return sorted(out)


def resolve_edit_file(name: str, node: str = "SEGA Replay Edit") -> Path:
    """The file behind a 'name [output]' / 'name [input]' entry, checked to stay in that folder."""
    tag = "input"
    for t in ROOTS:
        if name.endswith(f" [{t}]"):
            name, tag = name[: -len(f" [{t}]")], t
            break
    _check_relative(name, node, "edit_file")
    root = ROOTS[tag]()
    path = os.path.join(root, name)
    if not _inside(path, root):
        raise SEGAError(f"{node}: edit_file {name!r} leads outside ComfyUI's {tag} folder; refused.")
    if not name.endswith(SUFFIX) or not os.path.isfile(path):
        raise SEGAError(f"{node}: edit_file {name!r} is not a SEGA edit file in ComfyUI's {tag} folder.")
    return Path(path)


def save_path(prefix: str, node: str = "SEGA Save Edit") -> Path:
    """A new file name in ComfyUI's output folder for `prefix` (subfolders allowed), numbered like images."""
    _check_relative(prefix, node, "filename_prefix")
    root = folder_paths.get_output_directory()
    folder = os.path.join(root, os.path.dirname(prefix))
    if not _inside(folder, root):
        raise SEGAError(f"{node}: filename_prefix {prefix!r} leads outside ComfyUI's output folder; refused.")
    os.makedirs(folder, exist_ok=True)
    if not _inside(folder, root):  # a link created in between
        raise SEGAError(f"{node}: filename_prefix {prefix!r} leads outside ComfyUI's output folder; refused.")
    base = os.path.basename(prefix) or "sega_edit"
    taken = {f for f in os.listdir(folder)}
    n = 1
    while f"{base}_{n:05}_{SUFFIX}" in taken:
        n += 1
    return Path(folder) / f"{base}_{n:05}_{SUFFIX}"


@dataclass
class EditRecord:
    """The edit SEGA added at each step of one run (noise space, float32), with what made it."""

    terms: dict  # step -> tensor (B, C, ...)
    sigmas: list
    shape: list  # the latent's shape
    settings: dict

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        tensors = {f"edit.{step:05d}": t.detach().to("cpu", torch.float32).contiguous()
                   for step, t in sorted(self.terms.items())}
        meta = {"format": FORMAT, "steps": str(len(self.sigmas) - 1), "sigmas": json.dumps(self.sigmas),
                "latent_shape": json.dumps(self.shape), "sega": json.dumps(self.settings)}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path, node: str = "SEGA Replay Edit") -> "EditRecord":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise SEGAError(f"{node}: {path.name} is not a SEGA edit file (saved by SEGA Save Edit).")
                terms = {int(k.split(".")[1]): f.get_tensor(k) for k in f.keys() if k.startswith("edit.")}
                return cls(terms=terms, sigmas=json.loads(meta["sigmas"]), shape=json.loads(meta["latent_shape"]),
                           settings=json.loads(meta.get("sega", "{}")))
        except SEGAError:
            raise
        except Exception as e:
            raise SEGAError(f"{node}: {path.name} could not be read as a SEGA edit file ({e}).") from None

    def term(self, step: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        t = self.terms.get(step)
        if t is None:
            return None
        t = t.to(like.device, like.dtype)
        return t.expand_as(like) if t.shape[0] == 1 else t
