"""SEGA Concept's attention_tokens: which tokens of the concept's text the attention mask sums.

'all' (the default) is diffusers' sum over CLIP's 75 positions after the start token; 'words' sums
only the concept's own word tokens, which SEGA Concept (text) counts with the CLIP's tokenizer.
Through ComfyUI's executor on the tiny SD 1.5 checkpoint with cross-attention at a quarter of the
latent: a workflow saved without the input samples bit for bit as with 'all', and 'words' changes
the mask (SEGA KSampler's concept_masks output). SEGA Concept, fed a CONDITIONING, refuses 'words'
by name. (The direction of the difference, on a constructed attention map, is
tests/core/test_attention_core.py::test_words_only_differs_from_diffusers_sum_over_all_positions.)
"""
from __future__ import annotations

import numpy as np
import pytest

from comfy_host import run_prompt, saved_images, tiny_mask_checkpoint_path
from families import one_thread  # noqa: F401  (fixture)
from harness.pack import concept_inputs, pack_module

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mask_ckpt(comfy_nodes) -> str:
    assert comfy_nodes.pack_imported, comfy_nodes.pack_error
    return tiny_mask_checkpoint_path().name


def graph(ckpt: str, text: str, tokens) -> dict:
    concept = {"clip": ["ckpt", 1], "text": text, "edit_scale": 8.0, "direction": "add", "threshold": 0.8,
               "warmup": 0, "cooldown": 10000, "weight": 1.0, "label": "", "mask_from": "attention"}
    if tokens is not None:
        concept["attention_tokens"] = tokens
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a portrait photo", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "c1": {"class_type": "SEGAConceptText", "inputs": concept},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "sampler": {"class_type": "SEGAKSampler", "inputs": {
            "model": ["ckpt", 0], "seed": 5, "steps": 3, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0,
            "momentum_scale": 0.1, "momentum_beta": 0.4, "concepts": ["c1", 0]}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "sega-tokens"}},
        "asimage": {"class_type": "MaskToImage", "inputs": {"mask": ["sampler", 1]}},
        "savemask": {"class_type": "SaveImage", "inputs": {"images": ["asimage", 0], "filename_prefix": "sega-tokens"}},
    }


def run(ckpt: str, tokens, text: str = "a pair of round glasses"):
    outputs = run_prompt(graph(ckpt, text, tokens))
    return saved_images(outputs, "save")[0], saved_images(outputs, "savemask")[0][..., 0]


def test_words_changes_the_mask_and_the_default_is_unchanged(mask_ckpt):
    image, mask = run(mask_ckpt, None)  # a workflow saved before the input existed
    image_all, mask_all = run(mask_ckpt, "all")
    image_words, mask_words = run(mask_ckpt, "words")
    assert np.array_equal(image, image_all) and np.array_equal(mask, mask_all)
    assert 0 < (mask_all > 0).mean() < 1 and 0 < (mask_words > 0).mean() < 1
    changed = (mask_words != mask_all).mean()
    assert changed > 0.05, changed  # another mask, not a few rounding flips
    assert not np.array_equal(image_words, image_all)  # and the edit follows it


def test_word_tokens_counts_the_tokenizer_words(mask_ckpt):
    import comfy.sd

    from comfy_host import tiny_mask_checkpoint_path as path

    prompt_nodes = pack_module("nodes.prompt_nodes")
    clip = comfy.sd.load_checkpoint_guess_config(str(path()), output_vae=False, output_clipvision=False)[1]
    assert prompt_nodes.word_tokens(clip, "glasses") == 1
    assert prompt_nodes.word_tokens(clip, "a pair of round glasses") == 5
    assert prompt_nodes.word_tokens(clip, "(red hat:1.3)") == 2  # weighting adds no token
    assert prompt_nodes.word_tokens(clip, "word " * 100) == 75  # a long text: its first chunk's 75
    node = pack_module("nodes.prompt_nodes").SEGAConceptText
    spec = node.execute(clip=clip, text="a red hat", edit_scale=5.0, direction="add", threshold=0.9, warmup=0,
                        cooldown=10000, weight=1.0, mask_from="attention", attention_tokens="words")
    assert spec.result[0][-1].concept.mask_words == 3
    spec = node.execute(clip=clip, text="a red hat", edit_scale=5.0, direction="add", threshold=0.9, warmup=0,
                        cooldown=10000, weight=1.0, mask_from="attention")
    assert spec.result[0][-1].concept.mask_words is None


def test_sega_concept_refuses_words_by_name(comfy_nodes):
    from sega_testlib import cond

    node = pack_module("nodes.concept_nodes").SEGAConcept
    errors = pack_module("nodes.errors")
    with pytest.raises(errors.SEGAError, match=r"SEGA Concept: attention_tokens 'words'.*SEGA Concept \(text\)"):
        node.execute(**concept_inputs(cond(1)), mask_from="attention", attention_tokens="words")
    with pytest.raises(errors.SEGAError, match="SEGA Concept: attention_tokens must be one of all, words"):
        node.execute(**concept_inputs(cond(1)), attention_tokens="nouns")
