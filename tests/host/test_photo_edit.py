"""Photo edits (LEDITS++) inside ComfyUI: SEGA Invert Photo, SEGA Photo Edit, SEGA Photo Guider and
SEGA Inversion Sampler, run through ComfyUI's executor on the tiny SD1.5 checkpoint and called as nodes
on the tiny model of every family (families.py)."""
from __future__ import annotations

import pytest
import torch

from comfy_host import PromptValidationError, run_prompt
from families import FAMILIES, one_thread  # noqa: F401  (fixture)
from sega_graphs import Queue, latents, save
from harness.pack import ModelHook, concept_node as concept_node_api
from sega_testlib import RowCounter, concept_node, node_output, pack_module

import comfy.model_management
import comfy.samplers

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4
_MODELS = {}


def model_of(name):
    if name not in _MODELS:
        _MODELS[name] = FAMILIES[name].build()
    return _MODELS[name]


def photo(name, seed=0, batch=1):
    """A photo's latent for family `name` (as VAE Encode gives it, before process_latent_in)."""
    gen = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, *FAMILIES[name].latent, generator=gen)}


def mod():
    return pack_module("nodes.photo_edit")


def errors():
    return pack_module("nodes.errors")


def invert(name, latent=None, steps=STEPS, skip=0.15, seed=3, source=None, source_guidance=3.5, model=None):
    family = FAMILIES[name]
    return node_output(mod().SEGAInvertPhoto.execute(
        model=model or model_of(name), latent=photo(name) if latent is None else latent, uncond=family.cond(1),
        steps=steps, skip=skip, seed=seed, source=source, source_guidance=source_guidance))


def edit(name, inversion, concepts=None, combination="ledits", reconstruction="exact", model=None, **options):
    return node_output(mod().SEGAPhotoEdit.execute(model=model or model_of(name), inversion=inversion,
                                                   concepts=concepts, combination=combination,
                                                   reconstruction=reconstruction, **options))["samples"]


# -- reconstruction, every family ------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FAMILIES))
def test_reconstruction_is_exact(name):
    """No concept: the photo's latent comes back (float32, max abs error <= 1e-4); every concept at
    edit_scale 0 gives the same; "as diffusers" ends on the model's x0-prediction instead."""
    lat = photo(name)
    inv = invert(name, lat)
    assert inv.steps == STEPS and inv.zs.shape == (STEPS, *lat["samples"].shape)
    assert inv.family == type(model_of(name).model.model_config).__name__
    out = edit(name, inv)
    err = (out - lat["samples"]).abs().max().item()
    print(f"{name}: exact reconstruction max abs error {err:.2e}")
    assert err <= 1e-4
    off = concept_node(FAMILIES[name].cond(5), edit_scale=0.0)
    assert torch.equal(edit(name, inv, off), out)
    diffusers_like = edit(name, inv, reconstruction="as diffusers")
    err_d = (diffusers_like - lat["samples"]).abs().max().item()
    print(f"{name}: 'as diffusers' reconstruction max abs error {err_d:.2e}")
    assert err_d > err


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_edits_in_one_batched_call_per_step(name):
    """A concept changes the photo on every family (SDXL's pooled vectors, Flux's guidance, Wan's 5-D
    latents), with one model call of 2 rows per step (uncond + the concept)."""
    family = FAMILIES[name]
    counter = RowCounter()
    m = counter.attach(model_of(name))
    lat = photo(name)
    inv = invert(name, lat)
    counter.rows.clear()
    out = edit(name, inv, concept_node(family.cond(5), edit_scale=10.0), model=m)
    assert counter.rows == [2] * STEPS
    assert torch.isfinite(out).all() and (out - lat["samples"]).abs().max() > 1e-3


def test_inversion_memory_is_one_latent_per_step_plus_four():
    """The inversion object holds N noise maps, the start, the correction, the photo's latent and the
    first step's uncond prediction (float32, CPU) and the schedule: for SDXL at 1024x1024 and 50 steps
    that is 54 latents of 4x128x128, 14.2 MB (one more latent with a source prompt). The draws are not
    stored (the seed gives them again)."""
    inv = invert("sdxl")
    latent_bytes = inv.start.numel() * 4
    assert inv.nbytes() == (STEPS + 4) * latent_bytes + (STEPS + 1) * 4
    assert inv.photo.shape == inv.start.shape
    assert inv.zs.dtype == torch.float32 and inv.zs.device.type == "cpu"


def test_flow_families_use_the_flow_schedule_and_rule():
    """Flow models: ComfyUI's simple schedule over int(N (1 + skip)) steps, the last N + 1 (skip drops the
    noisiest part), with the Euler-ancestral RF rule; SDXL zeroes LEDITS++ SDXL's last 3 noise maps."""
    import comfy.samplers

    inv = invert("sd3", steps=10)
    assert inv.rule == "euler_ancestral_rf" and invert("sd15").rule == "dpmpp_2m_sde"
    full = comfy.samplers.calculate_sigmas(model_of("sd3").get_model_object("model_sampling"), "simple", 11)
    torch.testing.assert_close(inv.sigmas, full[1:].float())
    assert float(inv.sigmas[0]) < 1.0 and float(inv.sigmas[-1]) == 0.0
    assert invert("sdxl").zero_noise_steps == 3 and invert("sd15").zero_noise_steps == 0


def test_sigmas_are_ledits_timesteps_on_the_models_schedule():
    ledits = pack_module("sega_core.ledits")
    ms = model_of("sd15").get_model_object("model_sampling")
    sig = pack_module("nodes.photo_invert").inversion_sigmas(model_of("sd15"), 30, 0.15)
    ts = ledits.ledits_timesteps(30, 0.15)
    assert ts[0] == 841 and ts[-1] == 29 and len(sig) == 31 and float(sig[-1]) == 0.0
    torch.testing.assert_close(sig[:-1], ms.sigma(torch.tensor(ts, dtype=torch.float32)))


# -- the edit ---------------------------------------------------------------------------------------

def left_half_pixels():
    m = torch.zeros(64, 64)
    m[..., :32] = 1.0
    return m


class EditRecorder(ModelHook):
    """A post-cfg function: the edit the photo guider applied at each evaluation (uncond - final)."""

    def __init__(self):
        self.edits = []

    def __call__(self, args):
        self.edits.append(args["uncond_denoised"] - args["denoised"])
        return args["denoised"]

    def install(self, model) -> None:
        model.set_model_sampler_post_cfg_function(self)


@pytest.mark.parametrize("combination", ["ledits", "sega"])
def test_edit_acts_only_inside_the_mask(combination):
    inv = invert("sd15")
    rec = EditRecorder()
    concepts = concept_node(FAMILIES["sd15"].cond(5), mask=left_half_pixels(), edit_scale=10.0)
    out = edit("sd15", inv, concepts, combination, model=rec.attach(model_of("sd15")))
    assert len(rec.edits) == STEPS
    for e in rec.edits:
        assert e[..., 4:].abs().max() == 0 and e[..., :4].abs().max() > 0
    photo_latent = photo("sd15")["samples"]
    inside = (out - photo_latent)[..., :4].abs().max()
    outside = (out - photo_latent)[..., 4:].abs().max()
    print(f"{combination}: largest change inside the mask {inside:.3g}, outside {outside:.3g}")
    assert inside > 1e-2 and inside > 2 * outside


@pytest.mark.parametrize("combination", ["ledits", "sega"])
def test_keep_the_photo_outside_the_masks(combination):
    """outside_masks "keep the photo": outside the concept's mask the edit's latent is the photo's (1e-4),
    inside it changes; the default ("as LEDITS++") is the edit without the option, bit for bit, and
    changes the outside a little; a concept without a mask turns the option off."""
    name = "sd15"
    inv = invert(name)
    c = FAMILIES[name].cond
    concepts = concept_node(c(5), mask=left_half_pixels(), edit_scale=10.0)
    photo_latent = photo(name)["samples"]
    kept = edit(name, inv, concepts, combination, outside_masks="keep the photo")
    outside = (kept - photo_latent)[..., 4:].abs().max().item()
    inside = (kept - photo_latent)[..., :4].abs().max().item()
    default = edit(name, inv, concepts, combination)
    assert torch.equal(edit(name, inv, concepts, combination, outside_masks="as LEDITS++"), default)
    drift = (default - photo_latent)[..., 4:].abs().max().item()
    print(f"{combination}: keep the photo: outside {outside:.2e}, inside {inside:.3g}; as LEDITS++ outside {drift:.3g}")
    assert outside <= 1e-4 and inside > 1e-2 and drift > 1e-3
    unmasked = concept_node(c(6), concepts=concepts, edit_scale=3.0)
    assert torch.equal(edit(name, inv, unmasked, combination, outside_masks="keep the photo"),
                       edit(name, inv, unmasked, combination))


def test_keep_the_photo_with_the_inversion_sampler():
    """SEGA Inversion Sampler's outside_masks under SEGA Photo Guider gives SEGA Photo Edit's result; under
    another guider it is refused by name; a value outside the options is refused."""
    import comfy_extras.nodes_custom_sampler as custom

    name = "sd15"
    family = FAMILIES[name]
    lat = photo(name)
    inv = invert(name, lat)
    concepts = concept_node(family.cond(5), mask=left_half_pixels(), edit_scale=10.0)
    sampler, sigmas = mod().SEGAInversionSampler.execute(inversion=inv, reconstruction="exact",
                                                         outside_masks="keep the photo").args
    guider = node_output(mod().SEGAPhotoGuider.execute(model=model_of(name), inversion=inv, combination="ledits",
                                                       concepts=concepts))
    noise = node_output(custom.DisableNoise.execute())
    out = node_output(custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, lat))["samples"]
    assert torch.equal(out, edit(name, inv, concepts, outside_masks="keep the photo"))
    assert (out - lat["samples"])[..., 4:].abs().max() <= 1e-4
    plain = comfy.samplers.CFGGuider(model_of(name))
    plain.set_conds(family.cond(1), family.cond(1))
    plain.set_cfg(1.0)
    with pytest.raises(errors().SEGAError, match="SEGA Inversion Sampler: outside_masks 'keep the photo'.*CFGGuider"):
        custom.SamplerCustomAdvanced.execute(noise, plain, sampler, sigmas, lat)
    with pytest.raises(errors().SEGAError, match="SEGA Photo Edit: outside_masks must be one of"):
        edit(name, inv, concepts, outside_masks="keep")


@pytest.mark.parametrize("combination", ["ledits", "sega"])
def test_concept_masks_show_where_each_concept_acted(combination):
    """SEGA Photo Edit's concept_masks: per concept, the share of its active steps in which each position was
    kept; a masked concept only inside its mask, a concept that never acts (warm-up past the end) all zero."""
    inv = invert("sd15")
    c = FAMILIES["sd15"].cond
    concepts = concept_node(c(5), mask=left_half_pixels(), label="masked",
                            concepts=concept_node(c(4), warmup=100, label="late"))
    out = mod().SEGAPhotoEdit.execute(model=model_of("sd15"), inversion=inv, concepts=concepts,
                                      combination=combination, reconstruction="exact")
    masks = (getattr(out, "result", None) or out.args)[1]
    assert masks.shape == (2, 64, 64)
    assert masks[0].abs().sum() == 0  # "late" never acts
    assert masks[1][:, :32].max() > 0 and masks[1][:, 32:].max() == 0
    assert 0 <= masks.min() and masks.max() <= 1


def test_remove_and_add_go_opposite_ways():
    inv = invert("sd15")
    c = FAMILIES["sd15"].cond(5)
    add = edit("sd15", inv, concept_node(c, threshold=0.0))
    remove = edit("sd15", inv, concept_node(c, threshold=0.0, direction="remove"))
    base = photo("sd15")["samples"]
    assert not torch.equal(add, base) and not torch.equal(remove, base)
    assert ((add - base) * (remove - base)).sum() < 0


def test_rows_per_step():
    """1 row per inverted step (2 with a source prompt); per edit step the base (1; 2 for a source
    prompt's exact reconstruction) + the concepts acting, except on the first step, whose base rows are
    the inversion's own first predictions when the edit runs with the inversion's model."""
    name = "sd15"
    counter = RowCounter()
    m = counter.attach(model_of(name))
    inv = invert(name, model=m)
    assert counter.rows == [1] * STEPS
    counter.rows.clear()
    inv_src = invert(name, model=m, source=FAMILIES[name].cond(6))
    assert counter.rows == [2] * STEPS
    counter.rows.clear()
    concepts = concept_node(FAMILIES[name].cond(5), concepts=concept_node(FAMILIES[name].cond(4), warmup=2))
    edit(name, inv, concepts, model=m)
    assert counter.rows == [1, 2, 3, 3]
    counter.rows.clear()
    edit(name, inv_src, concepts, model=m)
    assert counter.rows == [1, 3, 4, 4]
    counter.rows.clear()
    edit(name, inv_src, concepts, model=m, reconstruction="as diffusers")  # diffusers' base: the uncond alone
    assert counter.rows == [1, 2, 3, 3]
    counter.rows.clear()
    edit(name, inv, None, model=m)  # no model call on the first step: nothing left to compute there
    assert counter.rows == [1] * (STEPS - 1)


def test_first_step_reuses_the_inversions_predictions_only_for_its_model():
    """The edit's first step takes its base rows from the inversion when the model is the inversion's:
    the result equals the edit that computes them (within float rounding: the uncond is computed in a
    batch of 1, not with the concept). Any other model (a patch added: here a post-CFG function)
    computes them itself."""
    name = "sd15"
    lat = photo(name)
    counter = RowCounter()
    m = counter.attach(model_of(name))
    concepts = concept_node(FAMILIES[name].cond(5), edit_scale=10.0)
    for source in (None, FAMILIES[name].cond(6)):
        inv = invert(name, lat, model=m, source=source)
        assert inv.first_step is not None and inv.first_step.uncond is not None
        assert (inv.first_step.source is not None) == (source is not None)
        counter.rows.clear()
        reused = edit(name, inv, concepts, model=m)
        base = 2 if source is not None else 1
        assert counter.rows[0] == 1 and counter.rows[1] == base + 1
        other = m.clone()
        other.set_model_sampler_post_cfg_function(lambda args: args["denoised"])
        counter.rows.clear()
        computed = edit(name, inv, concepts, model=other)
        assert counter.rows[0] == base + 1
        err = (reused - computed).abs().max().item()
        assert err <= 1e-4, err  # float rounding of another batch composition (outputs up to 3.4)
        assert (edit(name, inv, model=m) - lat["samples"]).abs().max() <= 1e-4  # still the photo


def test_source_prompt_guides_towards_it_and_still_reconstructs():
    """CFG towards the source prompt with the correct sign (not SD LEDITS++'s swapped roles), and the
    edit uses the same prediction, so the photo is still reconstructed exactly. "as diffusers" edits
    from the uncond alone, as diffusers' LEDITS++ does, and loses the photo as it does (its Quirk 10)."""
    name = "sd15"
    lat = photo(name)
    inv = invert(name, lat, source=FAMILIES[name].cond(6), source_guidance=3.5)
    assert inv.source is not None and inv.source_guidance == 3.5
    assert not torch.equal(inv.zs, invert(name, lat).zs)
    assert (edit(name, inv) - lat["samples"]).abs().max() <= 1e-4
    assert (edit(name, inv, reconstruction="as diffusers") - lat["samples"]).abs().max() > 0.1


def test_replay_sampler_equals_sega_core_replay():
    """The SAMPLER in ComfyUI computes sega_core.ledits.replay on the same predictions."""
    ledits = pack_module("sega_core.ledits")
    name = "sd15"
    inv = invert(name)
    record = []
    concepts = concept_node(FAMILIES[name].cond(5))
    guider = mod().photo_guider(model_of(name), inv, concepts, "ledits", "test")
    latent = torch.zeros(inv.latent_shape)
    out = guider.sample(torch.zeros_like(latent), latent, mod().replay_sampler(inv, "exact", record=record),
                        inv.sigmas.clone(), disable_pbar=True, seed=0)
    preds = iter([d for _, _, d in record])
    seen = []

    def denoise(x, sigma):
        seen.append(x.clone())
        return next(preds)

    x = ledits.replay(inv.start, inv.sigmas, inv.zs, denoise, rule=inv.rule, correction=inv.correction)
    for (x_in, _, _), x_core in zip(record, seen):
        torch.testing.assert_close(x_in, x_core, rtol=0, atol=1e-6)
    fmt = model_of(name).get_model_object("latent_format")
    torch.testing.assert_close(out, fmt.process_out(x), rtol=0, atol=1e-6)


class PredictionRecorder:
    """A post-cfg function: the input and the final prediction of every model evaluation."""

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args):
        self.calls.append((args["input"].clone(), args["denoised"].clone()))
        return args["denoised"]

    def attach(self, model):
        m = model.clone()
        m.set_model_sampler_post_cfg_function(self)
        return m


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3"])
def test_invert_node_equals_sega_core_invert(name):
    """SEGA Invert Photo computes sega_core.ledits.invert on the same predictions, with the draws of
    ledits.draw_noises from a CPU generator seeded with `seed` (diffusers' order), on the photo's latent
    in the model's sampler space."""
    ledits = pack_module("sega_core.ledits")
    rec = PredictionRecorder()
    lat = photo(name)
    inv = invert(name, lat, seed=11, model=rec.attach(model_of(name)))
    x0 = model_of(name).get_model_object("latent_format").process_in(lat["samples"])
    noises = ledits.draw_noises(x0.shape, STEPS, torch.Generator().manual_seed(11))
    preds = iter([d for _, d in rec.calls])
    inputs = []

    def denoise(x, sigma):
        inputs.append(x)
        return next(preds)

    core = ledits.invert(x0, inv.sigmas, noises, denoise, rule=inv.rule, zero_noise_steps=inv.zero_noise_steps)
    for (x_node, _), x_core in zip(rec.calls, inputs):
        torch.testing.assert_close(x_node, x_core, rtol=0, atol=1e-6)
    torch.testing.assert_close(inv.start, core.start, rtol=0, atol=0)
    torch.testing.assert_close(inv.zs, core.zs, rtol=0, atol=1e-5)
    if not inv.zero_noise_steps:
        torch.testing.assert_close(inv.correction, core.correction, rtol=0, atol=1e-6)


def test_inversion_sampler_with_sampler_custom_advanced_and_other_guiders():
    """SEGA Inversion Sampler's SAMPLER and SIGMAS replay the photo under a plain CFGGuider at cfg 1 on the
    uncond (the photo comes back) and compose with SEGA Guider (the concepts change it)."""
    import comfy_extras.nodes_custom_sampler as custom

    name = "sd15"
    family = FAMILIES[name]
    lat = photo(name)
    inv = invert(name, lat)
    sampler, sigmas = mod().SEGAInversionSampler.execute(inversion=inv, reconstruction="exact").args
    guider = comfy.samplers.CFGGuider(model_of(name))
    guider.set_conds(family.cond(1), family.cond(1))
    guider.set_cfg(1.0)
    noise = node_output(custom.DisableNoise.execute())
    out = node_output(custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, lat))["samples"]
    assert (out - lat["samples"]).abs().max() <= 1e-4
    sega_guider = node_output(pack_module("nodes.sampling_nodes").SEGAGuider.execute(
        model=model_of(name), positive=family.cond(1), negative=family.cond(1), cfg=1.0, momentum_scale=0.0,
        momentum_beta=0.4, concepts=concept_node(family.cond(5), edit_scale=10.0)))
    edited = node_output(custom.SamplerCustomAdvanced.execute(noise, sega_guider, sampler, sigmas, lat))["samples"]
    assert (edited - lat["samples"]).abs().max() > 1e-2
    photo_guider = node_output(mod().SEGAPhotoGuider.execute(model=model_of(name), inversion=inv,
                                                             combination="ledits", concepts=None))
    again = node_output(custom.SamplerCustomAdvanced.execute(noise, photo_guider, sampler, sigmas, lat))["samples"]
    assert torch.equal(again, edit(name, inv))


# -- bad input --------------------------------------------------------------------------------------

def test_inversion_of_another_family_is_refused():
    inv = invert("sd15")
    with pytest.raises(errors().SEGAError, match=r"SEGA Photo Edit: the inversion was made with a SD15 model but "
                                                 r"the model input is SDXL"):
        edit("sdxl", inv)


def test_another_latent_size_or_step_count_is_refused():
    import comfy_extras.nodes_custom_sampler as custom

    name = "sd15"
    family = FAMILIES[name]
    inv = invert(name)
    sampler, sigmas = mod().SEGAInversionSampler.execute(inversion=inv, reconstruction="exact").args
    guider = comfy.samplers.CFGGuider(model_of(name))
    guider.set_conds(family.cond(1), family.cond(1))
    noise = node_output(custom.DisableNoise.execute())
    other = {"samples": torch.zeros(1, 4, 16, 8)}
    with pytest.raises(errors().SEGAError, match=r"SEGA Inversion Sampler: the latent image is 1x4x16x8 but the "
                                                 r"inversion was made from a 1x4x8x8 latent"):
        custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, other)
    sigmas_10 = comfy.samplers.calculate_sigmas(model_of(name).get_model_object("model_sampling"), "normal", 10)
    with pytest.raises(errors().SEGAError, match=r"SEGA Inversion Sampler: the sigmas have 10 steps but the "
                                                 r"inversion has 4"):
        custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas_10, photo(name))


def test_bad_latents_and_skip_are_refused():
    name = "sd15"
    nan = photo(name)
    nan["samples"][0, 0, 0, 0] = float("nan")
    with pytest.raises(errors().SEGAError, match=r"SEGA Invert Photo: the latent holds NaN"):
        invert(name, nan)
    with pytest.raises(errors().SEGAError, match=r"SEGA Invert Photo: the latent is only 1x1"):
        invert(name, {"samples": torch.zeros(1, 4, 1, 1)})
    for skip in (1.0, -0.1):
        with pytest.raises(errors().SEGAError, match=r"SEGA Invert Photo: skip must be in \[0, 1\)"):
            invert(name, skip=skip)
        assert "skip must be in [0, 1)" in mod().SEGAInvertPhoto.validate_inputs(skip=skip)


def test_concept_for_another_model_is_refused():
    inv = invert("sd15")
    wide = [[torch.randn(1, 8, 768), {}]]
    with pytest.raises(errors().SEGAError, match=r"SEGA Photo Edit: SEGA Concept 'wide': its conditioning is 768 "
                                                 r"wide but the uncond is 32"):
        edit("sd15", inv, concept_node(wide, label="wide"))


def test_concept_with_an_area_is_refused():
    inv = invert("sd15")
    cond = FAMILIES["sd15"].cond(5)
    area = [[cond[0][0], {"area": (4, 4, 0, 0), "strength": 1.0}]]
    with pytest.raises(errors().SEGAError, match=r"SEGA Photo Edit: SEGA Concept #1: its conditioning has an area"):
        edit("sd15", inv, concept_node(area))


def test_interrupted_inversion_runs_fresh_and_equal():
    name = "sd15"
    reference = invert(name)

    class Interrupt:
        calls = 0

        def __deepcopy__(self, memo):
            return self

        def __call__(self, apply_model, args):
            self.calls += 1
            if self.calls == 2:
                comfy.model_management.interrupt_current_processing(True)
            return apply_model(args["input"], args["timestep"], **args["c"])

    m = model_of(name).clone()
    m.set_model_unet_function_wrapper(Interrupt())
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        invert(name, model=m)
    again = invert(name, model=m)
    assert torch.equal(again.zs, reference.zs) and torch.equal(again.start, reference.start)
    assert torch.equal(again.correction, reference.correction)


# -- through ComfyUI's executor, tiny SD1.5 checkpoint -----------------------------------------------

def photo_graph(ckpt: str, concept_scale: float | None = 8.0, steps: int = STEPS, skip: float = 0.15) -> dict:
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "empty": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "image": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                         "color": 0x3366AA}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["ckpt", 2]}},
        "invert": {"class_type": "SEGAInvertPhoto",
                   "inputs": {"model": ["ckpt", 0], "latent": ["encode", 0], "uncond": ["empty", 0], "steps": steps,
                              "skip": skip, "seed": 5}},
        "edit": {"class_type": "SEGAPhotoEdit",
                 "inputs": {"model": ["ckpt", 0], "inversion": ["invert", 0], "combination": "ledits",
                            "reconstruction": "exact"}},
    }
    if concept_scale is not None:
        g["ctext"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "glasses", "clip": ["ckpt", 1]}}
        g["mask"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
        g["left"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}}
        g["masked"] = {"class_type": "MaskComposite", "inputs": {"destination": ["mask", 0], "source": ["left", 0],
                                                                "x": 0, "y": 0, "operation": "add"}}
        g["concept"] = concept_node_api(["ctext", 0], edit_scale=concept_scale, threshold=0.5, warmup=0,
                                        label="glasses", mask=["masked", 0])
        g["edit"]["inputs"]["concepts"] = ["concept", 0]
    save(g, "photo", ["encode", 0])
    return save(g, "out", ["edit", 0])


def test_workflow_reconstructs_and_edits_the_photo(ckpt):
    rec = latents(run_prompt(photo_graph(ckpt, None)))
    err = (rec["out"] - rec["photo"]).abs().max().item()
    print(f"sd15 checkpoint through the executor: exact reconstruction max abs error {err:.2e}")
    assert err <= 1e-4
    first = latents(run_prompt(photo_graph(ckpt)))
    again = latents(run_prompt(photo_graph(ckpt)))
    assert torch.equal(first["out"], again["out"])  # bit-identical reruns
    diff = (first["out"] - first["photo"]).abs()
    assert diff[..., :4].max() > 1e-3 and diff[..., :4].max() > 2 * diff[..., 4:].max()


def test_inversion_is_served_from_the_cache_for_later_edits(ckpt):
    queue = Queue()
    first = queue.run(photo_graph(ckpt, 8.0))
    assert "invert" in queue.executed and "edit" in queue.executed
    second = queue.run(photo_graph(ckpt, 4.0))
    assert "invert" not in queue.executed and "edit" in queue.executed
    assert not torch.equal(first["out"], second["out"])
    third = queue.run(photo_graph(ckpt, None))
    assert "invert" not in queue.executed
    assert (third["out"] - third["photo"]).abs().max() <= 1e-4


def test_workflow_refuses_skip_outside_range(ckpt):
    g = photo_graph(ckpt, None, skip=1.0)
    del g["photo"]  # the only output is then the edit, which depends on the inversion
    with pytest.raises(PromptValidationError, match=r"SEGA Invert Photo: skip must be in \[0, 1\)"):
        run_prompt(g)


def test_sampler_custom_advanced_workflow(ckpt):
    """SEGA Photo Guider + SEGA Inversion Sampler in SamplerCustomAdvanced equal SEGA Photo Edit; a latent of
    another size is refused by the sampler, naming it and the input."""
    g = photo_graph(ckpt, 8.0)
    g["noise"] = {"class_type": "DisableNoise", "inputs": {}}
    g["guider"] = {"class_type": "SEGAPhotoGuider", "inputs": {"model": ["ckpt", 0], "inversion": ["invert", 0],
                                                               "combination": "ledits", "concepts": ["concept", 0]}}
    g["replay"] = {"class_type": "SEGAInversionSampler", "inputs": {"inversion": ["invert", 0],
                                                                     "reconstruction": "exact"}}
    g["custom"] = {"class_type": "SamplerCustomAdvanced",
                   "inputs": {"noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["replay", 0],
                              "sigmas": ["replay", 1], "latent_image": ["encode", 0]}}
    out = latents(run_prompt(save(g, "custom_out", ["custom", 0])))
    assert torch.equal(out["custom_out"], out["out"])
    g["other"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 64, "batch_size": 1}}
    g["custom"]["inputs"]["latent_image"] = ["other", 0]
    with pytest.raises(Exception, match=r"SEGA Inversion Sampler: the latent image is 1x4x8x4 but the inversion "
                                        r"was made from a 1x4x8x8 latent"):
        run_prompt(g)


def test_batch_of_two_photos_reconstructs_and_edits_each():
    lat = photo("sd15", batch=2)
    inv = invert("sd15", lat)
    assert (edit("sd15", inv) - lat["samples"]).abs().max() <= 1e-4
    edited = edit("sd15", inv, concept_node(FAMILIES["sd15"].cond(5)))
    assert all((edited[i] - lat["samples"][i]).abs().max() > 1e-3 for i in range(2))


def test_headless_photo_prompt_saves_photo_reconstruction_and_edit(ckpt):
    """photo_edit_prompt (for run_sega.py --image): one saved image, photo | reconstruction | edit."""
    import numpy as np
    from PIL import Image

    import folder_paths
    from comfy_host import saved_images

    name = "sega-test-photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(
        f"{folder_paths.get_input_directory()}/{name}")
    prompt = pack_module("nodes.photo_graph").photo_edit_prompt(ckpt, name, [{"text": "glasses", "edit_scale": 8.0}],
                                                                 steps=3)
    images = saved_images(run_prompt(prompt))
    assert len(images) == 1
    image = np.asarray(images[0])
    assert image.shape[:2] == (64, 3 * 96 + 2 * 8)
    recon, edited = image[:, 104:200].astype(int), image[:, 208:].astype(int)
    assert np.abs(recon - edited).max() > 0
