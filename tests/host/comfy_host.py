"""Helpers for tests that run inside a real ComfyUI (the host found by tests/conftest.py).

Import this module before anything from ComfyUI: `prepare_host()` runs on import and puts
ComfyUI on the CPU when torch has no CUDA, which must happen before `comfy.model_management`
is first imported. Nothing here imports ComfyUI at module level, so collecting host tests
without a host is harmless (they are skipped by tests/conftest.py).

Fixtures (re-exported by tests/host/conftest.py):
  tiny_sd15_checkpoint  a random-weight SD1.5-layout checkpoint, built once and cached outside
                        the repo, at ${SEGA_TEST_CACHE:-$HOME/.cache/comfyui-sega}/models/checkpoints/
  comfy_nodes           ComfyUI's nodes initialised once per session, with this pack loaded as a
                        custom node and the output folder in a temp dir
  ckpt                  the tiny checkpoint's name, for CheckpointLoaderSimple (both of the above)

Functions:
  run_prompt(prompt)    validate and execute an API-format prompt in-process; returns the outputs,
                        raises PromptValidationError / PromptExecutionError with ComfyUI's message
  saved_images(outputs) the images that SaveImage / PreviewImage wrote, as numpy arrays
  load_pack(path)       load one more custom node folder after init (e.g. a throwaway test pack)
  init_comfy(work_dir, packs): what the comfy_nodes fixture uses
Finding the host, preparing it, the checkpoint builder and the prompt runner are harness/'s
(shared with run_sega.py and the benchmarks); this module adds the pytest side.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import pytest

# re-exported for the tests: CACHE_DIR, PACK_NAME, PACK_ROOT, host_on_path, the prompt errors
from harness.host import (CACHE_DIR, PACK_NAME, PACK_ROOT, host_on_path, load_custom_node,  # noqa: F401
                          prepare_host, start_prompt_server)
from harness.prompts import PromptExecutionError, PromptValidationError, execute_prompt  # noqa: F401
from harness.tiny import CHECKPOINTS_DIR, TINY_MASK_NAME, TINY_NAME, tiny_checkpoint, tiny_mask_checkpoint


# --------------------------------------------------------------------------------------------
# The tiny SD1.5 checkpoint
# --------------------------------------------------------------------------------------------

def check_sd15(path: Path, full: bool = True) -> None:
    """Load `path` the way CheckpointLoaderSimple does; require SD15 with EPS prediction."""
    import comfy.model_base
    import comfy.sd

    out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=full, output_clip=full)
    model = out[0]
    family = type(model.model.model_config).__name__
    if family != "SD15" or model.model.model_type != comfy.model_base.ModelType.EPS:
        raise AssertionError(f"{path} detected as {family} / {model.model.model_type}, not SD15 / EPS")
    if full and (out[1] is None or out[2] is None):
        raise AssertionError(f"{path}: CLIP or VAE did not load")


@dataclasses.dataclass(frozen=True)
class TinyCheckpoint:
    path: Path
    name: str  # what CheckpointLoaderSimple's ckpt_name takes


def tiny_sd15_checkpoint_path() -> Path:
    """Build (once) and return the tiny checkpoint (harness.tiny's builder); check that it loads as SD15."""
    return _checked(TINY_NAME, tiny_checkpoint)


def tiny_mask_checkpoint_path() -> Path:
    """Build (once) and return the tiny checkpoint whose UNet has cross-attention at a quarter of the
    latent (harness.tiny's TINY_MASK_UNET); check that it loads as SD15 / EPS."""
    return _checked(TINY_MASK_NAME, tiny_mask_checkpoint)


def _checked(name: str, build) -> Path:
    """`build(CHECKPOINTS_DIR)`'s checkpoint `name`, loaded to check it is SD15 / EPS (with its CLIP and
    VAE when it was just built); a file that fails is removed, so the next run builds it again."""
    prepare_host()
    fresh = not (CHECKPOINTS_DIR / name).is_file()
    path = build(CHECKPOINTS_DIR)
    try:
        check_sd15(path, full=fresh)
    except Exception:
        path.unlink(missing_ok=True)
        raise
    return path


@pytest.fixture(scope="session")
def tiny_sd15_checkpoint() -> TinyCheckpoint:
    path = tiny_sd15_checkpoint_path()
    return TinyCheckpoint(path=path, name=path.name)


# --------------------------------------------------------------------------------------------
# ComfyUI initialised in-process
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ComfyNodes:
    """What the session's ComfyUI looks like once its nodes are loaded."""
    work_dir: Path
    output_dir: Path
    pack_dir: Path  # the link under custom_nodes/
    pack_imported: bool
    pack_nodes: list[str]  # node ids registered from this pack
    pack_log: list[str]  # WARNING and above logged while loading custom nodes

    @property
    def pack_error(self) -> str | None:
        if self.pack_imported:
            return None
        return "\n".join(self.pack_log) or f"{self.pack_dir} did not import"


_STATE: ComfyNodes | None = None


class _RecordWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def init_comfy(work_dir: Path, packs: dict[str, Path] | None = None) -> ComfyNodes:
    """Load ComfyUI's nodes once, in-process, with `packs` ({folder name: source dir}) as the
    only custom nodes (the host's own custom_nodes/ is left out, so installed packs cannot
    change the results). Inputs, outputs and temp files go under `work_dir`."""
    global _STATE
    if _STATE is not None:
        return _STATE
    prepare_host()
    import folder_paths
    import nodes

    packs = {PACK_NAME: PACK_ROOT} if packs is None else packs
    custom_nodes = work_dir / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    for name, src in packs.items():
        (custom_nodes / name).symlink_to(Path(src).resolve(), target_is_directory=True)
    for sub in ("output", "input", "temp", "user"):
        (work_dir / sub).mkdir(exist_ok=True)
    folder_paths.set_output_directory(str(work_dir / "output"))
    folder_paths.set_input_directory(str(work_dir / "input"))
    folder_paths.set_temp_directory(str(work_dir / "temp"))
    folder_paths.set_user_directory(str(work_dir / "user"))
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes)], set())
    CHECKPOINTS_DIR.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("checkpoints", str(CHECKPOINTS_DIR))

    start_prompt_server()  # as main.py does before loading nodes

    recorder = _RecordWarnings()
    logging.getLogger().addHandler(recorder)
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        logging.getLogger().removeHandler(recorder)

    pack_dir = custom_nodes / PACK_NAME
    module = f"custom_nodes.{PACK_NAME}"
    _STATE = ComfyNodes(
        work_dir=work_dir,
        output_dir=work_dir / "output",
        pack_dir=pack_dir,
        pack_imported=PACK_NAME in nodes.LOADED_MODULE_DIRS,
        pack_nodes=sorted(k for k, v in nodes.NODE_CLASS_MAPPINGS.items()
                          if getattr(v, "RELATIVE_PYTHON_MODULE", None) == module),
        pack_log=recorder.lines,
    )
    return _STATE


@pytest.fixture(scope="session")
def comfy_nodes(tmp_path_factory) -> ComfyNodes:
    return init_comfy(tmp_path_factory.mktemp("comfyui"))


@pytest.fixture(scope="session")
def ckpt(comfy_nodes, tiny_sd15_checkpoint) -> str:
    """The tiny checkpoint's name for CheckpointLoaderSimple, with ComfyUI and this pack loaded."""
    assert comfy_nodes.pack_imported, comfy_nodes.pack_error
    return tiny_sd15_checkpoint.name


def load_pack(path: Path) -> list[str]:
    """Load one more custom node folder (or .py file) after init; returns the node ids it added."""
    return load_custom_node(path)


# --------------------------------------------------------------------------------------------
# Running prompts
# --------------------------------------------------------------------------------------------

def run_prompt(prompt: dict) -> dict:
    """Validate and execute an API-format prompt with ComfyUI's own executor (no cache).

    Returns the UI outputs by node id (e.g. {"9": {"images": [{"filename": ...}]}}); raises
    PromptValidationError or PromptExecutionError with ComfyUI's message when it fails.
    Needs the `comfy_nodes` fixture (or init_comfy) first. The runner is harness.prompts'.
    """
    if _STATE is None:
        raise RuntimeError("ComfyUI is not initialised: use the comfy_nodes fixture")
    return execute_prompt(prompt)


def saved_images(outputs: dict, node_id: str | None = None) -> list:
    """The images the output nodes wrote (SaveImage, PreviewImage), as HxWxC uint8 numpy arrays,
    in node-id then batch order; only `node_id`'s when given."""
    import numpy as np
    from PIL import Image

    import folder_paths

    roots = {"output": folder_paths.get_output_directory(), "temp": folder_paths.get_temp_directory(),
             "input": folder_paths.get_input_directory()}
    images = []
    for nid in sorted(outputs, key=lambda k: (len(k), k)):
        if node_id is not None and nid != node_id:
            continue
        for item in outputs[nid].get("images", []):
            path = Path(roots[item.get("type", "output")], item.get("subfolder", ""), item["filename"])
            with Image.open(path) as im:
                images.append(np.asarray(im).copy())
    return images


if host_on_path() is not None:
    prepare_host()
