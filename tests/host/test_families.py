"""SEGA on every model family: eps (SD 1.x, SDXL), v-prediction (SD 2.x 768-v), flow (SD3, Flux)
and a video model with 5-D latents (Wan 2.1), each a tiny random-weight model built from
ComfyUI's own supported_models class (families.py)."""
from __future__ import annotations

import pytest
import torch

from families import FAMILIES, one_thread  # noqa: F401  (fixture)
from noise_space import plan_of, replay, sample_recorded
from sega_testlib import RowCounter, apply_sega, concept

_MODELS = {}
pytestmark = pytest.mark.usefixtures("one_thread")


def model_of(name):
    if name not in _MODELS:
        _MODELS[name] = FAMILIES[name].build()
    return _MODELS[name]


def latent(family, batch=2):
    return torch.zeros(batch, *family.latent)


def plain_sample(model, family, positive, negative, steps=4, cfg=None, batch=2):
    import comfy.sample

    lat = latent(family, batch)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(lat, 0), steps, family.cfg if cfg is None else cfg,
                               "euler", "normal", positive, negative, lat, seed=0, disable_pbar=True)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_edit_is_computed_in_the_models_noise_space(name):
    """The edit ComfyUI applied equals sega_core on (x - D) / sigma of the recorded predictions,
    with momentum across steps: eps for eps and v models, the velocity for flow models."""
    family = FAMILIES[name]
    model = model_of(name)
    assert model.model.model_type.name == family.model_type
    pos, neg = family.cond(1), family.cond(2)
    concepts = [concept(family.cond(3), warmup=1, threshold=0.8),
                concept(family.cond(4), warmup=2, reverse=True, scale=3.0, weight=0.5)]
    m = apply_sega(model, concepts, momentum_scale=0.3, momentum_beta=0.5)
    out, calls, steps = sample_recorded(m, pos, neg, latent(family), steps=4, cfg=family.cfg)
    assert steps == [0, 1, 2, 3]
    edits = replay(calls, steps, plan_of(concepts, 0.3, 0.5), family.cfg)
    assert edits[0] is None and all(e is not None and e.abs().max() > 0 for e in edits[2:])
    assert torch.isfinite(out).all() and out.shape == latent(family).shape
    assert not torch.equal(out, plain_sample(model, family, pos, neg))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_noise_space_is_the_models_own_output(name):
    """(x - D) / sigma recovers the network's own output for eps and flow models (eps, velocity),
    and for v-prediction the eps the v implies (x = D + sigma * eps)."""
    family = FAMILIES[name]
    sampling = model_of(name).get_model_object("model_sampling")
    gen = torch.Generator().manual_seed(0)
    x, output = torch.randn(2, *family.latent, generator=gen), torch.randn(2, *family.latent, generator=gen)
    sigma = torch.tensor([0.3, 0.8])
    denoised = sampling.calculate_denoised(sigma, output, x)
    eps = (x - denoised) / sigma.view(-1, *([1] * (x.dim() - 1)))
    if family.model_type == "V_PREDICTION":
        torch.testing.assert_close(denoised + sigma.view(-1, 1, 1, 1) * eps, x)
        assert not torch.allclose(eps, output)
    else:
        torch.testing.assert_close(eps, output, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_edit_scale_zero_is_bit_identical(name):
    family = FAMILIES[name]
    model = model_of(name)
    pos, neg = family.cond(1), family.cond(2)
    plain = plain_sample(model, family, pos, neg)
    counter = RowCounter()
    off = apply_sega(counter.attach(model), [concept(family.cond(3), scale=0.0, warmup=0),
                                              concept(family.cond(4), scale=0.0, reverse=True)])
    assert torch.equal(plain_sample(off, family, pos, neg), plain)
    # the prompts of 2 samples (no negative at cfg 1): no concept rows computed
    assert set(counter.rows) == {(1 if family.cfg == 1.0 else 2) * 2}


def test_flux_dev_at_cfg_1_uses_the_negative_only_for_sega():
    """Guidance-distilled Flux runs at cfg 1: SEGA still evaluates the negative (as the base of the
    concept directions), each row keeps the distilled guidance of its own conditioning, and the
    edit changes the image."""
    import node_helpers

    family = FAMILIES["flux"]
    model = model_of("flux")
    pos = node_helpers.conditioning_set_values(family.cond(1), {"guidance": 2.5})
    neg, c1 = family.cond(2), family.cond(3)
    guidance = []

    def record_guidance(apply_model, args):
        guidance.append((list(args["cond_or_uncond"]), args["c"]["guidance"].tolist()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    m = model.clone()
    m.set_model_unet_function_wrapper(record_guidance)
    edited = plain_sample(apply_sega(m, [concept(c1, warmup=0)]), family, pos, neg, cfg=1.0, batch=1)
    plain = plain_sample(model, family, pos, neg, cfg=1.0, batch=1)
    assert torch.isfinite(edited).all() and (edited - plain).abs().max() > 1e-4
    for order, values in guidance:
        assert sorted(order) == [0, 1, 2]
        by_row = dict(zip(order, values))
        assert by_row[0] == pytest.approx(2.5) and by_row[1] == by_row[2] == pytest.approx(3.5)


def test_video_latent_thresholds_over_time_and_space():
    """Wan's 5-D latents: the edit is thresholded per sample and channel over (T, H, W) together."""
    family = FAMILIES["wan"]
    pos, neg = family.cond(1), family.cond(2)
    concepts = [concept(family.cond(3), warmup=0, threshold=0.75)]
    m = apply_sega(model_of("wan"), concepts, momentum_scale=0.0)
    _, calls, steps = sample_recorded(m, pos, neg, latent(family), steps=3, cfg=family.cfg)
    edits = replay(calls, steps, plan_of(concepts, 0.0), family.cfg)
    for edit in edits:
        kept = (edit != 0).flatten(2).float().mean(-1)  # per sample and channel, over T*H*W = 32
        assert torch.all((kept >= 0.25 - 1e-6) & (kept <= 0.25 + 1 / 32 + 1e-6))
