"""ComfyUI for the benchmarks: the host on sys.path, this pack imported, the tiny checkpoint loaded.

The pack is imported as a package (as ComfyUI imports a custom node) and driven through its
node classes (SEGA Concept, SEGA Apply) and ComfyUI's own sampler (comfy.sample.sample, what
KSampler runs), so the rows and times measured are those of a real workflow. Finding ComfyUI,
the pack's import, the tiny checkpoint and RowCounter are harness/'s (shared with the tests).
"""
from __future__ import annotations

from _common import ROOT  # noqa: F401  (puts the repo on sys.path)

from harness.host import find_comfyui, prepare_host
from harness.pack import RowCounter, concept_inputs, node_output, pack_module  # noqa: F401  (re-exported)
from harness.tiny import tiny_checkpoint


def start():
    """Put ComfyUI first on sys.path (CPU mode without CUDA); returns its folder."""
    root = find_comfyui()
    if root is None:
        raise SystemExit("ComfyUI not found: set COMFYUI_PATH to a ComfyUI source tree (or use $HOME/ComfyUI).")
    prepare_host(root)
    return root


def load_tiny():
    """(model, clip) of the tiny random-weight SD1.5 checkpoint (built once into the cache)."""
    import comfy.sd

    path = tiny_checkpoint()
    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True)
    return model, clip


def encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def concepts(conds: list, settings: list) -> list:
    """SEGA Concept nodes chained: one per (conditioning, dict of the node's inputs over its defaults)."""
    node = pack_module("nodes.concept_nodes").SEGAConcept
    chain = None
    for cond, s in zip(conds, settings):
        chain = node_output(node.execute(**concept_inputs(cond, label=f"c{len(chain or [])}", concepts=chain, **s)))
    return chain


def sega(model, chain: list, momentum_scale: float = 0.1, momentum_beta: float = 0.4):
    """The model patched by a SEGA Apply node."""
    node = pack_module("nodes.sampling_nodes").SEGAApply
    return node_output(node.execute(model=model, concepts=chain, momentum_scale=momentum_scale,
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
