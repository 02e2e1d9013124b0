"""Small API-format graphs with the tiny SD1.5 checkpoint, for tests of bad input and of state.

The graphs sample a small latent in few steps and save the latent itself (SaveLatent), so that
results compare bit for bit without a VAE decode. `run_latents` runs a prompt with no cache
(every node executes, the checkpoint is loaded afresh); `Queue` runs prompts one after another
through one executor with ComfyUI's default cache, as the server's queue does, so that the loaded
checkpoint (the same ModelPatcher) is shared by every prompt of the queue.
"""
from __future__ import annotations

from pathlib import Path

from comfy_host import run_prompt
from harness.pack import concept_node

SIZE = 32  # pixels: a 4x4 latent
STEPS = 3


def graph(ckpt: str, batch: int = 1) -> dict:
    """The loader, prompt, negative and an empty latent; add concepts and samplers to it."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a portrait photo of a man", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": batch}},
    }


def add_concept(g: dict, name: str, text: str, **settings) -> list:
    """A CLIP Text Encode and a SEGA Concept (strong settings: the random model's prompts differ little)."""
    g[f"{name}_text"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}}
    g[name] = concept_node([f"{name}_text", 0], **{"edit_scale": 20.0, "threshold": 0.5, "warmup": 0, "label": text,
                                                   **settings})
    return [name, 0]


def add_stack(g: dict, name: str, refs: list) -> list:
    g[name] = {"class_type": "SEGAConceptStack", "inputs": {f"concepts.concepts{i}": r for i, r in enumerate(refs)}}
    return [name, 0]


def sampler_inputs(**extra) -> dict:
    inputs = {"model": ["ckpt", 0], "seed": 7, "steps": STEPS, "cfg": 7.5, "sampler_name": "euler",
              "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0],
              "latent_image": ["latent", 0], "denoise": 1.0}
    inputs.update(extra)
    return inputs


def add_sega_ksampler(g: dict, name: str, concepts: list | None, **extra) -> list:
    extra = {"momentum_scale": 0.1, "momentum_beta": 0.4, **extra}
    if concepts is not None:
        extra["concepts"] = concepts
    g[name] = {"class_type": "SEGAKSampler", "inputs": sampler_inputs(**extra)}
    return [name, 0]


def add_ksampler(g: dict, name: str, **extra) -> list:
    g[name] = {"class_type": "KSampler", "inputs": sampler_inputs(**extra)}
    return [name, 0]


def save(g: dict, name: str, samples: list) -> dict:
    """SaveLatent of `samples` as output node `name`; returns g."""
    g[name] = {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": f"sega-test/{name}"}}
    return g


def latents(outputs: dict) -> dict:
    """The latents the SaveLatent nodes wrote, by output node id."""
    import safetensors.torch

    import folder_paths

    out = {}
    for nid, ui in outputs.items():
        for item in ui.get("latents", []):
            path = Path(folder_paths.get_output_directory(), item.get("subfolder", ""), item["filename"])
            out[nid] = safetensors.torch.load_file(str(path))["latent_tensor"]
    return out


def run_latents(prompt: dict) -> dict:
    """Run with no cache (every node executes); the saved latents by output node id."""
    return latents(run_prompt(prompt))


class Queue:
    """Prompts run one after another through one PromptExecutor with ComfyUI's default cache
    (harness.prompts.PromptRunner). `run` returns the saved latents and records which nodes
    executed (not taken from the cache) in `executed`."""

    def __init__(self):
        from harness.prompts import PromptRunner

        self.runner = PromptRunner(cache=True, client_id="sega-test")

    @property
    def executed(self) -> list:
        return self.runner.executed

    def run(self, prompt: dict) -> dict:
        return latents(self.runner.run(prompt))
