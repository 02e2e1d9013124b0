"""Whole SEGA workflows through ComfyUI's executor with the tiny SD1.5 checkpoint: the three ways."""
from __future__ import annotations

import numpy as np
import pytest

from comfy_host import PromptValidationError, run_prompt, saved_images
from harness.pack import concept_node
from sega_graphs import sampler_inputs

STEPS = 6


def base_graph(ckpt: str, concepts: list[tuple[str, dict]], batch: int = 1) -> dict:
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a portrait photo of a man", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
    }
    refs = []
    for i, (text, settings) in enumerate(concepts):
        g[f"ctext{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}}
        g[f"concept{i}"] = concept_node([f"ctext{i}", 0], **{"warmup": 2, "label": text, **settings})
        refs.append([f"concept{i}", 0])
    if refs:
        g["stack"] = {"class_type": "SEGAConceptStack",
                      "inputs": {f"concepts.concepts{i}": ref for i, ref in enumerate(refs)}}
    return g


def finish(g: dict, latent_ref: list) -> dict:
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": latent_ref, "vae": ["ckpt", 2]}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "sega-test"}}
    return g


def ksampler_inputs(**extra) -> dict:
    return sampler_inputs(steps=STEPS, **extra)


def way_sega_ksampler(ckpt, concepts, batch=1):
    g = base_graph(ckpt, concepts, batch)
    extra = {"momentum_scale": 0.1, "momentum_beta": 0.4}
    if concepts:
        extra["concepts"] = ["stack", 0]
    g["sampler"] = {"class_type": "SEGAKSampler", "inputs": ksampler_inputs(**extra)}
    return finish(g, ["sampler", 0])


def way_apply_ksampler(ckpt, concepts, batch=1):
    g = base_graph(ckpt, concepts, batch)
    g["apply"] = {"class_type": "SEGAApply", "inputs": {"model": ["ckpt", 0], "concepts": ["stack", 0],
                                                          "momentum_scale": 0.1, "momentum_beta": 0.4}}
    g["sampler"] = {"class_type": "KSampler", "inputs": ksampler_inputs(model=["apply", 0])}
    return finish(g, ["sampler", 0])


def way_guider_custom_advanced(ckpt, concepts, batch=1):
    g = base_graph(ckpt, concepts, batch)
    g["guider"] = {"class_type": "SEGAGuider", "inputs": {
        "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "concepts": ["stack", 0],
        "cfg": 7.5, "momentum_scale": 0.1, "momentum_beta": 0.4}}
    g["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}}
    g["select"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["sigmas"] = {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": "normal",
                                                              "steps": STEPS, "denoise": 1.0}}
    g["sampler"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["select", 0], "sigmas": ["sigmas", 0],
        "latent_image": ["latent", 0]}}
    return finish(g, ["sampler", 0])


def plain_ksampler(ckpt, batch=1):
    g = base_graph(ckpt, [], batch)
    g["sampler"] = {"class_type": "KSampler", "inputs": ksampler_inputs()}
    return finish(g, ["sampler", 0])


def image(prompt) -> np.ndarray:
    images = saved_images(run_prompt(prompt), "save")
    assert len(images) >= 1
    return np.stack(images).astype(np.int16)


# strong settings: the random-weight model's predictions differ little between prompts
CONCEPTS = [("glasses", {"edit_scale": 20.0, "threshold": 0.5, "warmup": 0}),
            ("beard", {"direction": "remove", "warmup": 1, "edit_scale": 10.0, "threshold": 0.7})]


@pytest.fixture(scope="module")
def baseline(ckpt):
    return image(plain_ksampler(ckpt))


@pytest.mark.parametrize("way", [way_sega_ksampler, way_apply_ksampler, way_guider_custom_advanced],
                         ids=["SEGAKSampler", "SEGAApply+KSampler", "SEGAGuider+SamplerCustomAdvanced"])
def test_workflow_runs_and_edits(ckpt, baseline, way):
    edited = image(way(ckpt, CONCEPTS))
    assert edited.shape == baseline.shape == (1, 64, 64, 3)
    # SEGA changes the image, but keeps most of it (the threshold keeps 10% of each channel's edit)
    diff = np.abs(edited - baseline)
    assert diff.max() > 10
    assert edited.std() > 1  # not a flat (black / NaN) image


def test_three_ways_give_the_same_image(ckpt):
    ksampler = image(way_sega_ksampler(ckpt, CONCEPTS))
    assert np.array_equal(ksampler, image(way_apply_ksampler(ckpt, CONCEPTS)))
    assert np.abs(ksampler - image(way_guider_custom_advanced(ckpt, CONCEPTS))).max() <= 1


def test_no_concepts_is_plain_ksampler(ckpt, baseline):
    assert np.array_equal(image(way_sega_ksampler(ckpt, [])), baseline)


def test_batch_of_two(ckpt):
    edited = image(way_sega_ksampler(ckpt, CONCEPTS, batch=2))
    assert edited.shape == (2, 64, 64, 3)


def test_threshold_out_of_range_is_refused_before_running(ckpt):
    with pytest.raises(PromptValidationError, match=r"threshold"):
        run_prompt(way_sega_ksampler(ckpt, [("glasses", {"threshold": 1.0})]))
