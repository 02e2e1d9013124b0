"""Small API-format graphs with the tiny SD1.5 checkpoint, for tests of bad input and of state.

The graphs sample a small latent in few steps and save the latent itself (SaveLatent), so that
results compare bit for bit without a VAE decode. `run_latents` runs a prompt with no cache
(every node executes, the checkpoint is loaded afresh); `Queue` runs prompts one after another
through one executor with ComfyUI's default cache, as the server's queue does, so that the loaded
checkpoint (the same ModelPatcher) is shared by every prompt of the queue.
"""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from comfy_host import run_prompt

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
    inputs = {"conditioning": [f"{name}_text", 0], "edit_scale": 20.0, "direction": "add", "threshold": 0.5,
              "warmup": 0, "cooldown": 10000, "weight": 1.0, "label": text}
    inputs.update(settings)
    g[name] = {"class_type": "SEGAConcept", "inputs": inputs}
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
    """Prompts run one after another through one PromptExecutor with ComfyUI's default cache.

    `run` returns the saved latents and records which nodes executed (not taken from the cache).
    """

    def __init__(self):
        import execution
        import run_sega

        self.server = run_sega._Server()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                    cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        self.executed: list = []  # node ids that executed in the last run

    def run(self, prompt: dict) -> dict:
        import execution
        import run_sega

        prompt_id = uuid.uuid4().hex
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            raise run_sega.PromptValidationError(run_sega._validation_message(error, node_errors))
        self.server.events.clear()
        # with a client id, the executor reports each node it executes (cached ones are not reported)
        self.executor.execute(prompt, prompt_id, {"client_id": "sega-test"}, outputs)
        events = list(self.executor.status_messages) + list(self.server.events)
        self.executed = [d.get("node") for e, d in events if e == "executing" and d.get("node") is not None]
        for event, data in events:
            if event == "execution_error":
                raise run_sega.PromptExecutionError(
                    f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type')}: {data.get('exception_message')}")
            if event == "execution_interrupted":
                raise run_sega.PromptExecutionError(f"interrupted at node {data.get('node_id')}")
        if not self.executor.success:
            raise run_sega.PromptExecutionError(f"the prompt did not finish; events: {[e for e, _ in events]}")
        return latents(self.executor.history_result["outputs"])
