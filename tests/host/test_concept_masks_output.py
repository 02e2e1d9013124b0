"""Where each concept acted: the kept positions the hooks gather (SEGA KSampler's concept_masks
output), checked against sega_core's threshold on the recorded predictions; and the output in a
whole workflow, where it must not change the image."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from comfy_host import run_prompt, saved_images
from families import FAMILIES, one_thread  # noqa: F401  (fixture)
from harness.pack import concept_node
from noise_space import eps_of, plan_of, sample_recorded
from sega_testlib import concept, pack_module

pytestmark = pytest.mark.usefixtures("one_thread")
FAM = FAMILIES["sd15"]
CFG = 5.0
POS, NEG, C1, C2 = FAM.cond(1), FAM.cond(2), FAM.cond(3), FAM.cond(4)
STEPS = 5


@pytest.fixture(scope="module")
def model():
    return FAM.build()


def sample_with_masks(model, concepts, batch=2, momentum_scale=0.1):
    patch = pack_module("nodes.patch")
    runs = patch.RunLog()
    patched = patch.apply_sega(model, concepts, momentum_scale, 0.4, log_to=runs)
    out, calls, steps = sample_recorded(patched, POS, NEG, torch.zeros(batch, *FAM.latent), steps=STEPS, cfg=CFG)
    assert runs.sega_took_part and len(runs.watches) == 1 and runs.watches[0] is not None
    return runs.watches[0], calls, steps


def expected_fractions(calls, steps, plan, weights=None):
    """Per concept: mean over its active steps of the fraction of channels with |d| >= quantile."""
    sums, counts, seen = [0.0] * len(plan), [0] * len(plan), set()
    for step, call in zip(steps, calls):
        if step in seen:  # the first evaluation of each step
            continue
        seen.add(step)
        x, sigma = call["x"], call["sigma"]
        uncond = eps_of(x, sigma, call["out"][1])
        for k, c in enumerate(plan.rows(step)):
            if step < plan.warmup[c] or step >= plan.cooldown[c]:
                continue
            d = (eps_of(x, sigma, call["out"][2 + k]) - uncond) * plan.signed_scale[c]
            a = d.abs().flatten(2)
            kept = (a >= torch.quantile(a, plan.threshold[c], dim=-1, keepdim=True)).view(d.shape)
            frac = kept.float().mean(1)
            sums[c] = sums[c] + (frac if weights is None or weights[c] is None else frac * weights[c])
            counts[c] += 1
    return [s / n if n else None for s, n in zip(sums, counts)]


def test_kept_fractions_match_sega_core(model):
    concepts = [concept(C1, label="a", warmup=0, threshold=0.7),
                concept(C2, label="b", warmup=1, cooldown=3, threshold=0.0, reverse=True)]
    watch, calls, steps = sample_with_masks(model, concepts)
    latent = FAM.latent[-2:]
    masks = watch.result(2, latent)
    assert masks.shape == (4, *latent)  # concept-major: a's two images, then b's
    expected = expected_fractions(calls, steps, plan_of(concepts, 0.1))
    torch.testing.assert_close(masks[:2], expected[0], rtol=0, atol=1e-6)
    assert 0.1 < masks[:2].mean() < 0.6  # about 30% of each channel kept
    assert watch.counts == [STEPS, 2]  # b acts in steps 1 and 2 only
    assert torch.equal(masks[2:], torch.ones(2, *latent))  # threshold 0 keeps everything


def test_image_size_and_concept_mask(model):
    """At image size each latent position is a block; a SEGA Concept mask limits the positions."""
    left = torch.zeros(64, 64)
    left[:, :32] = 1.0
    spec = pack_module("nodes.concept_spec").ConceptSpec(
        conditioning=C1, concept=pack_module("sega_core").Concept(warmup=0, threshold=0.0), label="", mask=left)
    watch, _, _ = sample_with_masks(model, [spec], batch=1)
    small = watch.result(1, FAM.latent[-2:])
    big = watch.result(1, (64, 64))
    assert torch.equal(big, torch.nn.functional.interpolate(small.unsqueeze(1), size=(64, 64)).squeeze(1))
    assert torch.equal(small[0, :, :4], torch.ones(8, 4)) and small[0, :, 4:].abs().max() == 0


def test_nothing_is_gathered_or_sent_without_a_consumer(model):
    """In-process (no ComfyUI server) and with no RunLog, a run has no MaskWatch: the plain path."""
    masks = pack_module("nodes.concept_masks")
    assert masks.connected_server() is None
    target = masks.PreviewTarget("8", "8")
    assert masks.MaskWatch.for_run(["a"], target, tally=False) is None
    seen = []
    patched = pack_module("nodes.patch").apply_sega(model, [concept(C1, warmup=0)], 0.1, 0.4, preview=target)
    patch = next(f.sega_patch for f in patched.model_options["sampler_post_cfg_function"]
                 if hasattr(f, "sega_patch"))
    original = patch.post_cfg

    def spy(args):
        seen.append(args["model_options"]["sega_run"].watch)
        return original(args)

    patch.post_cfg = spy
    sample_recorded(patched, POS, NEG, torch.zeros(1, *FAM.latent), steps=2, cfg=CFG)
    assert seen and all(w is None for w in seen)


def test_preview_throttle_and_png(monkeypatch):
    """Which steps a preview is due on (the first, then at most every INTERVAL s, always the last),
    and the PNG it would carry: the mask's grey levels, shrunk to PREVIEW_SIDE at most."""
    import base64
    import io

    from PIL import Image

    masks = pack_module("nodes.concept_masks")
    watch = masks.MaskWatch(["a"], masks.PreviewTarget("8", "8"), tally=False)
    clock = [100.0]
    monkeypatch.setattr(masks.time, "monotonic", lambda: clock[0])
    due = []
    for step in range(6):
        if watch.wants(step, 6, first_call=True):
            due.append(step)
            watch.add(step, 6, [0], [True], torch.ones(1, 1, 4, 2, 2, dtype=torch.bool), [None])
        assert not watch.wants(step, 6, first_call=False)
        clock[0] += 0.1
    assert due == [0, 3, 5]
    ramp = torch.linspace(0, 1, 300).expand(200, 300)
    png = Image.open(io.BytesIO(base64.b64decode(masks._png(ramp))))
    assert png.mode == "L" and png.size == (128, 85)
    row = np.asarray(png)[40]
    assert row[0] < 3 and row[-1] > 252 and (np.diff(row.astype(int)) >= 0).all()


# -- the output in a whole workflow ---------------------------------------------------------------

def graph(ckpt: str) -> dict:
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a portrait photo", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "ctext": {"class_type": "CLIPTextEncode", "inputs": {"text": "glasses", "clip": ["ckpt", 1]}},
        "c1": concept_node(["ctext", 0], edit_scale=10.0, threshold=0.8, warmup=1, label="glasses"),
        "c2": concept_node(["ctext", 0], edit_scale=5.0, direction="remove", threshold=0.0, warmup=0, label="all",
                           concepts=["c1", 0]),
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "sampler": {"class_type": "SEGAKSampler", "inputs": {
            "model": ["ckpt", 0], "seed": 3, "steps": 4, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0,
            "momentum_scale": 0.1, "momentum_beta": 0.4, "concepts": ["c2", 0]}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "sega-masks"}},
    }
    g["asimage"] = {"class_type": "MaskToImage", "inputs": {"mask": ["sampler", 1]}}
    g["savemask"] = {"class_type": "SaveImage", "inputs": {"images": ["asimage", 0], "filename_prefix": "sega-masks"}}
    return g


def test_concept_masks_output_in_a_workflow(comfy_nodes, tiny_sd15_checkpoint):
    assert comfy_nodes.pack_imported, comfy_nodes.pack_error
    outputs = run_prompt(graph(tiny_sd15_checkpoint.name))
    masks = np.stack(saved_images(outputs, "savemask")).astype(np.int16)
    assert masks.shape == (2, 48, 64, 3)  # two concepts, one image, at image size
    glasses = masks[0, ..., 0]
    assert 0.05 < (glasses / 255).mean() < 0.4 and glasses.max() > 0  # about 20% kept, varying
    assert (masks[1] == 255).all()  # threshold 0: kept everywhere in every step
    # (gathering the masks leaves the image as it is: test_workflows.py's three ways give the same
    # image, SEGA KSampler gathering them and SEGA Apply + KSampler not)


def test_concept_masks_output_is_appended_after_latent(comfy_nodes):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["SEGAKSampler"]
    assert list(cls.RETURN_TYPES) == ["LATENT", "MASK"]
    assert cls.RETURN_NAMES[1] == "concept_masks"
