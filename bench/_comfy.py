"""ComfyUI for the benchmarks: the host on sys.path, this pack imported, the tiny checkpoint loaded.

The pack is imported as a package (as ComfyUI imports a custom node) and driven through its
node classes (SEGA Concept, SEGA Apply) and ComfyUI's own sampler (comfy.sample.sample, what
KSampler runs), so the rows and times measured are those of a real workflow.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

from _common import ROOT

import run_sega

PACK_NAME = "comfyui_sega_bench"


def start():
    """Put ComfyUI first on sys.path (CPU mode without CUDA); returns its folder."""
    root = run_sega.find_comfyui()
    if root is None:
        raise SystemExit("ComfyUI not found: set COMFYUI_PATH to a ComfyUI source tree (or use $HOME/ComfyUI).")
    run_sega.use_comfyui(root)
    return root


def pack_module(name: str):
    """A module of this pack, imported as the package ComfyUI would load."""
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK_NAME}.{name}")


def _output(result):
    values = getattr(result, "result", None) or getattr(result, "args", None)
    return values[0] if values is not None else result[0]


def load_tiny():
    """(model, clip) of the tiny random-weight SD1.5 checkpoint (built once into the cache)."""
    import comfy.sd

    path = run_sega.tiny_checkpoint()
    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True)
    return model, clip


def encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def concepts(conds: list, settings: list) -> list:
    """SEGA Concept nodes chained: one per (conditioning, settings dict)."""
    node = pack_module("nodes.concept_nodes").SEGAConcept
    chain = None
    for cond, s in zip(conds, settings):
        chain = _output(node.execute(
            conditioning=cond, edit_scale=s.get("scale", 5.0), direction="remove" if s.get("reverse") else "add",
            threshold=s.get("threshold", 0.9), warmup=s.get("warmup", 10), cooldown=s.get("cooldown", 10000),
            weight=s.get("weight", 1.0), label=f"c{len(chain or [])}", concepts=chain))
    return chain


def sega(model, chain: list, momentum_scale: float = 0.1, momentum_beta: float = 0.4):
    """The model patched by a SEGA Apply node."""
    node = pack_module("nodes.sampling_nodes").SEGAApply
    return _output(node.execute(model=model, concepts=chain, momentum_scale=momentum_scale,
                                momentum_beta=momentum_beta))


def sample(model, positive, negative, steps: int, size: int, sampler: str = "euler", cfg: float = 7.5,
           seed: int = 0, scheduler: str = "normal"):
    """One KSampler run (comfy.sample.sample) on an empty latent of size x size."""
    import comfy.sample
    import torch

    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               denoise=1.0, seed=seed, disable_pbar=True)


class RowCounter:
    """Counts the rows of every model call, through ComfyUI's model function wrapper."""

    def __init__(self):
        self.rows = []

    def __call__(self, apply_model, args):
        self.rows.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    def __deepcopy__(self, memo):  # ComfyUI may deep-copy model_options when cloning a model
        return self

    def attach(self, model):
        m = model.clone()
        m.set_model_unet_function_wrapper(self)
        return m


def against_plain(models: dict, positive, negative, steps: int, size: int, repeats: int, sync=None) -> list:
    """SEGA runs against plain CFG (`models` maps names to models, "plain CFG" first): an untimed run
    of each counts its model rows, then timed runs of all are interleaved. Returns, per name,
    (name, rows, row ratio, median seconds, time ratio, time ratio <= 1.05 x row ratio).
    `sync`, if given, is called after each timed run (a GPU's queue must be drained before timing)."""
    import _common

    rows = {}
    for name, m in models.items():
        counter = RowCounter()
        sample(counter.attach(m), positive, negative, steps, size)
        rows[name] = sum(counter.rows)

    def run(m):
        sample(m, positive, negative, steps, size)
        if sync is not None:
            sync()

    times = _common.interleaved({name: (lambda m=m: run(m)) for name, m in models.items()}, repeats, warmup=1)
    plain_rows, plain_t = rows["plain CFG"], _common.median(times["plain CFG"])
    out = []
    for name in models:
        t = _common.median(times[name])
        row_ratio, time_ratio = rows[name] / plain_rows, t / plain_t
        out.append((name, rows[name], row_ratio, t, time_ratio, time_ratio <= 1.05 * row_ratio))
    return out
