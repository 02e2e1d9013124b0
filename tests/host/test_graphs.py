"""SEGA in the graphs people build: img2img, split KSamplerAdvanced runs, batches, area and mask
conditioning, ControlNet, LoRA hooks, and core attention patches (PAG, SAG, NAG) on the same model.

The model is families.sd15 with a middle-block transformer (where PAG and SAG act); each run is
checked by replaying its recorded predictions through sega_core (noise_space.replay) or by
comparing with a graph that must give the same result.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import node_helpers

from families import FAMILIES, controlnet, one_thread, sd15  # noqa: F401  (one_thread: fixture)
from noise_space import plan_of, replay, sample_recorded
from sega_testlib import Recorder, RowCounter, apply_sega, concept, node_output, pack_module, sample

pytestmark = pytest.mark.usefixtures("one_thread")
FAM = FAMILIES["sd15"]
CFG = 5.0
POS, NEG, C1, C2 = FAM.cond(1), FAM.cond(2), FAM.cond(3), FAM.cond(4)


@pytest.fixture(scope="module")
def model():
    return sd15(middle=True)


def apply_from(model, concepts, start_at_step, momentum_scale=0.0):
    """SEGA Apply with start_at_step (a run that starts at that step of the full schedule)."""
    return pack_module("nodes.patch").apply_sega(model, concepts, momentum_scale, 0.4, "SEGA Apply",
                                                 start_at_step=start_at_step)


def image_latent(batch=1, seed=5):
    return torch.randn(batch, *FAM.latent, generator=torch.Generator().manual_seed(seed))


# -- img2img and split runs -----------------------------------------------------------------

def test_img2img_counts_the_steps_it_runs(model):
    """denoise 0.5: the run's own 6 steps (a 12-step schedule's second half) are steps 0-5."""
    concepts = [concept(C1, warmup=2, threshold=0.8)]
    m = apply_sega(model, concepts, momentum_scale=0.0)
    out, calls, steps = sample_recorded(m, POS, NEG, image_latent(), steps=6, cfg=CFG, denoise=0.5)
    assert steps == list(range(6)) and [c["rows"] for c in calls] == [2, 2, 3, 3, 3, 3]
    replay(calls, steps, plan_of(concepts, 0.0), CFG)
    m = apply_sega(model, concepts, momentum_scale=0.3)
    out, calls, steps = sample_recorded(m, POS, NEG, image_latent(), steps=6, cfg=CFG, denoise=0.5)
    replay(calls, steps, plan_of(concepts, 0.3), CFG)
    assert torch.isfinite(out).all()


def ksampler_advanced(model, latent, start, end, add_noise, leftover, sampler="euler", steps=6):
    import nodes

    out = nodes.KSamplerAdvanced().sample(model, "enable" if add_noise else "disable", 3, steps, CFG, sampler,
                                          "normal", POS, NEG, {"samples": latent}, start, end,
                                          "enable" if leftover else "disable")
    return node_output(out)["samples"]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_split_run_keeps_one_schedule(model, sampler):
    """KSamplerAdvanced steps 0-3 then 3-6 equals one 0-6 run when the second SEGA patch says
    start_at_step=3 (momentum off: it restarts at a split); without it the second run counts from 0."""
    concepts = [concept(C1, warmup=4, threshold=0.5, scale=8.0)]
    latent = torch.zeros(1, *FAM.latent)
    full = ksampler_advanced(apply_sega(model, concepts, momentum_scale=0.0), latent, 0, 10000, True, False, sampler)
    half = ksampler_advanced(apply_sega(model, concepts, momentum_scale=0.0), latent, 0, 3, True, True, sampler)
    counter = RowCounter()
    second = apply_from(counter.attach(model), concepts, 3)
    split = ksampler_advanced(second, half, 3, 10000, False, False, sampler)
    torch.testing.assert_close(split, full, rtol=1e-4, atol=1e-4)
    # steps 3, 4, 5 of the full schedule: the concept from step 4 (heun: two calls but on the last)
    assert counter.rows == ([2, 3, 3] if sampler == "euler" else [2, 2, 3, 3, 3])
    naive = ksampler_advanced(apply_sega(model, concepts, momentum_scale=0.0), half, 3, 10000, False, False, sampler)
    assert (naive - full).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_split_runs_replay_on_the_full_schedule(model, sampler):
    """Both halves, with momentum, replay through sega_core at the full schedule's steps; heun's
    first half ends above sigma 0, so its last step has its second evaluation too."""
    concepts = [concept(C1, warmup=1, cooldown=3), concept(C2, warmup=2, reverse=True)]
    plan = plan_of(concepts, 0.3)
    first = apply_sega(model, concepts, momentum_scale=0.3)
    half, calls, steps = sample_recorded(first, POS, NEG, torch.zeros(1, *FAM.latent), steps=6, cfg=CFG,
                                         sampler=sampler, last_step=3)
    assert steps[-1] == 2 and len(calls) == (3 if sampler == "euler" else 6)
    replay(calls, steps, plan, CFG)
    second = apply_from(model, concepts, 3, momentum_scale=0.3)
    _, calls, steps = sample_recorded(second, POS, NEG, half, steps=6, cfg=CFG, sampler=sampler, start_step=3,
                                      disable_noise=True)
    replay(calls, steps, plan, CFG, offset=3)


def test_start_at_step_on_the_nodes(comfy_nodes):
    import nodes

    for node_id in ("SEGAApply", "SEGAGuider"):
        spec = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        kind, options = spec["optional"]["start_at_step"][:2]
        assert kind == "INT" and options["default"] == 0 and options.get("tooltip")


# -- batches and conditioning ---------------------------------------------------------------

def test_batch_of_4_with_one_concept_prompt_per_image(model):
    concepts = [concept(FAM.cond(3, batch=4), warmup=1), concept(C2, warmup=0, reverse=True, threshold=0.7)]
    m = apply_sega(model, concepts, momentum_scale=0.2)
    out, calls, steps = sample_recorded(m, POS, NEG, torch.zeros(4, *FAM.latent), steps=4, cfg=CFG)
    edits = replay(calls, steps, plan_of(concepts, 0.2), CFG)
    assert out.shape[0] == 4 and torch.isfinite(out).all()
    assert all(not torch.equal(edits[-1][0], edits[-1][i]) for i in (1, 2, 3))


def limited(cond, how):
    if how == "area":  # the right half of an 8x8 latent: (height, width, y, x) in latent units
        return node_helpers.conditioning_set_values(cond, {"area": (8, 4, 0, 4), "strength": 1.0,
                                                          "set_area_to_bounds": False})
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0
    return node_helpers.conditioning_set_values(cond, {"mask": mask, "set_area_to_bounds": False,
                                                      "mask_strength": 1.0})


@pytest.mark.parametrize("how", ["area", "mask"])
def test_area_or_mask_on_the_positive(model, how):
    """A positive made of a whole-image prompt and an area or mask prompt; the concept still edits
    the whole image (its own prediction covers it)."""
    positive = POS + limited(FAM.cond(5), how)
    concepts = [concept(C1, warmup=0, threshold=0.5)]
    m = apply_sega(model, concepts, momentum_scale=0.1)
    out, calls, steps = sample_recorded(m, positive, NEG, torch.zeros(1, *FAM.latent), steps=4, cfg=CFG)
    edits = replay(calls, steps, plan_of(concepts, 0.1), CFG)
    assert torch.isfinite(out).all()
    assert edits[-1][..., :4].abs().max() > 0 and edits[-1][..., 4:].abs().max() > 0


@pytest.mark.parametrize("how", ["area", "mask"])
def test_concept_with_its_own_area_or_mask(model, how):
    """ConditioningSetArea / ConditioningSetMask on a concept: it edits only there (the right half)."""
    concepts = [concept(limited(C1, how), warmup=0, threshold=0.0)]
    m = apply_sega(model, concepts, momentum_scale=0.3)
    rec = Recorder()
    sample(rec.attach(m), POS, NEG, steps=4, cfg=CFG)
    for call in rec.calls:
        cond_d, uncond_d = call["out"][:2]
        edit = call["final"] - (uncond_d + (cond_d - uncond_d) * CFG)
        assert edit[..., :4].abs().max() == 0 and edit[..., 4:].abs().max() > 0


# -- ControlNet and LoRA hooks ----------------------------------------------------------------

def test_controlnet_on_the_prompts_reaches_the_concepts(model):
    """ControlNet Apply (Advanced) on positive and negative: the concept, measured against the
    negative, is evaluated under the same ControlNet, in the same model call."""
    import nodes

    cnet = controlnet(model)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    apply = nodes.ControlNetApplyAdvanced().apply_controlnet
    pos, neg = apply(POS, NEG, cnet, hint, 1.0, 0.0, 1.0)
    counter = RowCounter()
    edited = sample(apply_sega(counter.attach(model), [concept(C1, warmup=0)]), pos, neg, steps=4, cfg=CFG)
    assert counter.rows == [3] * 4  # one call per step: positive, negative and concept, all controlled
    own, _ = apply(C1, C1, cnet, hint, 1.0, 0.0, 1.0)  # the concept given the ControlNet by hand
    by_hand = sample(apply_sega(model, [concept(own, warmup=0)]), pos, neg, steps=4, cfg=CFG)
    torch.testing.assert_close(edited, by_hand, rtol=1e-4, atol=1e-4)
    without = sample(apply_sega(model, [concept(C1, warmup=0)]), POS, NEG, steps=4, cfg=CFG)
    assert (edited - without).abs().max() > 1e-3  # the ControlNet acts


def test_controlnet_on_the_positive_only_reaches_the_concepts(model):
    """Apply ControlNet (the single-conditioning node) on the positive only: ComfyUI hands its
    ControlNet to every other cond of the run (control_apply_to_uncond), the negative and the
    concepts alike, so the concept rows stay in the prompts' model call and the image is the one
    with the ControlNet on both prompts."""
    import nodes

    cnet = controlnet(model)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    pos = node_output(nodes.ControlNetApply().apply_controlnet(POS, cnet, hint, 1.0))
    counter = RowCounter()
    edited = sample(apply_sega(counter.attach(model), [concept(C1, warmup=0)]), pos, NEG, steps=4, cfg=CFG)
    assert counter.rows == [3] * 4  # positive, negative and concept in one call: one ControlNet for all
    both = nodes.ControlNetApplyAdvanced().apply_controlnet(POS, NEG, cnet, hint, 1.0, 0.0, 1.0)
    on_both = sample(apply_sega(model, [concept(C1, warmup=0)]), *both, steps=4, cfg=CFG)
    torch.testing.assert_close(edited, on_both, rtol=1e-4, atol=1e-4)
    without = sample(apply_sega(model, [concept(C1, warmup=0)]), POS, NEG, steps=4, cfg=CFG)
    assert (edited - without).abs().max() > 1e-3  # the ControlNet acts


def test_lora_hooks_on_the_prompts_reach_the_concepts(model):
    """A LoRA applied through hooks on the prompts' conditioning (Create Hook LoRA / Cond Set Props):
    the concept is evaluated with the same hooked weights. The hook here swaps in another model's
    weights, so the result must equal sampling that other model without hooks."""
    import comfy.hooks

    other = sd15(seed=7, middle=True)
    hooks = comfy.hooks.create_hook_model_as_lora(comfy.hooks.get_patch_weights_from_model(other), None, 1.0, 1.0)
    pos, neg = (comfy.hooks.set_hooks_for_conditioning(c, hooks) for c in (POS, NEG))
    concepts = [concept(C1, warmup=0)]
    hooked = sample(apply_sega(model, concepts), pos, neg, steps=3, cfg=CFG)
    direct = sample(apply_sega(other, concepts), POS, NEG, steps=3, cfg=CFG)
    torch.testing.assert_close(hooked, direct, rtol=1e-4, atol=1e-4)


def test_hooks_only_on_a_concept_are_ignored_with_a_warning(model, caplog):
    """ComfyUI registers hooks from the prompts before SEGA adds its concepts: hooks found only on a
    concept cannot act. SEGA says so in the log and samples the concept without them."""
    import comfy.hooks

    hooks = comfy.hooks.create_hook_model_as_lora(comfy.hooks.get_patch_weights_from_model(sd15(seed=7)), None,
                                                  1.0, 1.0)
    hooked = concept(comfy.hooks.set_hooks_for_conditioning(C1, hooks), warmup=0, label="hooked")
    with caplog.at_level("WARNING"):
        out = sample(apply_sega(model, [hooked]), POS, NEG, steps=3, cfg=CFG)
    assert any("SEGA Concept 'hooked': its hooks are not on the prompt" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, sample(apply_sega(model, [concept(C1, warmup=0)]), POS, NEG, steps=3, cfg=CFG))


# -- attention patches on the same model ------------------------------------------------------

def _node(module, name):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.skip(f"{module}.{name} is not in this ComfyUI")


def _pag(m):
    return node_output(_node("comfy_extras.nodes_pag", "PerturbedAttentionGuidance").execute(m, 3.0))


def _sag(m):
    return node_output(_node("comfy_extras.nodes_sag", "SelfAttentionGuidance").execute(m, 0.5, 2.0))


def _nag(m):
    return node_output(_node("comfy_extras.nodes_nag", "NAGuidance").execute(m, 5.0, 0.5, 1.5))


def first_final(m):
    rec = Recorder()
    out = sample(rec.attach(m), POS, NEG, steps=3, cfg=CFG)
    assert torch.isfinite(out).all()
    return rec.calls[0]["final"]


@pytest.mark.parametrize("patch", [_pag, _sag, _nag], ids=["PAG", "SAG", "NAG"])
@pytest.mark.parametrize("order", ["sega_first", "patch_first"])
def test_attention_patches_work_with_concept_rows_in_the_batch(model, patch, order):
    """With concept rows at indices 2 and 3 of the batch, each patch adds exactly what it adds
    without SEGA, and SEGA exactly its own edit (first step, where all runs see the same input)."""
    concepts = [concept(C1, warmup=0, threshold=0.5), concept(C2, warmup=0, reverse=True)]
    counter = RowCounter()
    base = counter.attach(model)
    both = patch(apply_sega(base, concepts)) if order == "sega_first" else apply_sega(patch(base), concepts)
    with_both = first_final(both)
    assert 4 in counter.rows and any(sorted(c) == [0, 1, 2, 3] for c in counter.cond_or_uncond)
    plain, only_patch, only_sega = first_final(model), first_final(patch(model)), first_final(
        apply_sega(model, concepts))
    assert (only_patch - plain).abs().max() > 1e-4, "the patch has no effect on this model"
    torch.testing.assert_close(with_both - only_patch, only_sega - plain, rtol=1e-4, atol=1e-4)
