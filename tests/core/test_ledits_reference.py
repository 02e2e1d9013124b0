"""sega_core.ledits against the reference: diffusers' LEditsPPPipelineStableDiffusion and
LEditsPPPipelineStableDiffusionXL, run offline with stand-in parts (harness/ledits_reference.py).

Both sides get the same predictions (per step, per row, plus a smooth function of the latent the
model is given) and the same random draws (one generator seed). Compared, within 1e-5 (float32):
the x_t that starts the edit (init_latents), every noise map zs[k], and the latent after every edit
step. sega_core works in ComfyUI's sampler space (X = x0 + sigma * eps); diffusers' VP latent is
X / sqrt(1 + sigma^2), so each of our latents is converted before the comparison.

Deliberate differences from diffusers have their own tests at the end of this file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from harness import ledits_reference as R  # noqa: E402
from sega_core import Concept, Plan, SEGAValueError  # noqa: E402
from sega_core.ledits import (  # noqa: E402
    draw_noises, invert, ledits_guidance, ledits_rows, ledits_timesteps, replay)

ATOL = 1e-5
E = R.Edit


@dataclass
class Case:
    family: str = "sd"
    steps: int = 4
    skip: float = 0.15
    shape: tuple = (1, 4, 8, 8)  # (B, C, h, w) latent
    edits: List[R.Edit] = field(default_factory=list)
    user_mask: Optional[str] = None  # None, "binary" or "soft"
    source: bool = False  # SDXL: a source prompt with guidance scale `source_scale`
    source_scale: float = 3.5
    zero_noise_steps: int = 0  # SDXL's num_zero_noise_steps
    seed: int = 0
    v_prediction: bool = False  # SD 2.x-style v-prediction model

    @property
    def pipe(self) -> str:
        return self.family + ("-v" if self.v_prediction else "")


def make_inputs(case: Case):
    """x0, the prediction table (concepts and source near the uncond, as real predictions are) and
    the user mask."""
    g = torch.Generator().manual_seed(1000 + case.seed)
    n, (b, c, h, w) = case.steps, case.shape
    u = torch.randn((n, 1, b, c, h, w), generator=g)
    others = u + 0.15 * torch.randn((n, 1 + len(case.edits), b, c, h, w), generator=g)
    table = torch.cat([u, others], dim=1)
    x0 = torch.randn((b, c, h, w), generator=g)
    mask = None
    if case.user_mask == "binary":
        mask = (torch.rand((1, 1, h, w), generator=g) > 0.4).float()
    elif case.user_mask == "soft":
        mask = torch.rand((1, 1, h, w), generator=g)
    return x0, table, mask


def vp(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Sampler space -> diffusers' VP latent."""
    return x / math.sqrt(1.0 + sigma * sigma)


def source_cfg(scale: float):
    """SDXL's source guidance: eps_u + s (eps_src - eps_u), on [uncond, source]."""
    return lambda eps, k: eps[0] + scale * (eps[1] - eps[0])


def run_reference(pipe, case: Case, preds, x0, mask):
    kw = {}
    if case.family == "sdxl":
        kw["num_zero_noise_steps"] = case.zero_noise_steps
    source = "source" if case.source else ""
    init, zs, sigmas = R.invert(pipe, preds, x0, case.steps, case.skip, case.seed, source_prompt=source,
                                source_guidance_scale=case.source_scale, **kw)
    latents = R.edit(pipe, preds, case.edits, user_mask=mask)
    return init, zs, sigmas, latents


def plan_of(edits) -> Plan:
    return Plan.build([Concept(scale=e.scale, threshold=e.threshold, warmup=e.warmup, cooldown=e.cooldown,
                               reverse=e.reverse) for e in edits], momentum_scale=0.0)


def run_ours(case: Case, preds, x0, mask, sigmas, inversion_combine=None, inversion_tags=(R.UNCOND,)):
    """sega_core's inversion and edit on the same predictions: (start, zs, latents after each step)."""
    noises = draw_noises(x0.shape, case.steps, torch.Generator().manual_seed(case.seed))
    if inversion_combine is None and case.source and case.source_scale > 1.0:
        inversion_combine, inversion_tags = source_cfg(case.source_scale), (R.UNCOND, R.SOURCE)
    inv = invert(x0, sigmas, noises, preds.denoise(sigmas, inversion_tags, inversion_combine, record="ours-invert"),
                 zero_noise_steps=case.zero_noise_steps)
    plan = plan_of(case.edits)
    masks = None if mask is None else [mask] * len(plan)

    def tags(k):
        return [R.UNCOND] + [2 + c for c in ledits_rows(plan, k)]

    def combine(eps, k):
        rows = ledits_rows(plan, k)
        edit = ledits_guidance(eps[0], torch.stack(eps[1:]) if rows else None, rows, k, plan, masks).edit
        return eps[0] if edit is None else eps[0] + edit

    seen = []
    out = replay(inv.start, sigmas, inv.zs, preds.denoise(sigmas, tags, combine, record="ours-edit"),
                 callback=lambda d: seen.append(d["x"]))
    return inv, seen[1:] + [out]


def check(pipes, case: Case):
    pipe = pipes[case.pipe]
    x0, table, mask = make_inputs(case)
    ts = ledits_timesteps(case.steps, case.skip)
    preds = R.Predictions(table, ts, v_prediction=case.v_prediction)
    init, zs, sigmas, ref = run_reference(pipe, case, preds, x0, mask)
    assert R.timesteps(pipe, case.steps, case.skip) == ts
    inv, ours = run_ours(case, preds, x0, mask, sigmas)
    err = (vp(inv.start, sigmas[0]) - init).abs().max().item()
    assert err <= ATOL, f"init_latents: max abs diff {err:.3g}"
    assert zs.shape == inv.zs.shape
    for k in range(case.steps):
        err = (inv.zs[k] - zs[k]).abs().max().item()
        assert err <= ATOL, f"zs[{k}]: max abs diff {err:.3g}"
    if case.zero_noise_steps:
        assert not inv.zs[case.steps - case.zero_noise_steps:].any()
        assert inv.zs[case.steps - case.zero_noise_steps - 1].abs().max() > 0.1
    assert len(ref) == case.steps
    for k in range(case.steps):
        err = (vp(ours[k], sigmas[k + 1]) - ref[k]).abs().max().item()
        assert err <= ATOL, f"latent after edit step {k}: max abs diff {err:.3g}"
    # model rows per edit step: never more than diffusers', fewer where a concept's window allows
    theirs = [len(tags) * case.shape[0] for phase, k, tags in preds.calls if phase == "edit"]
    mine = [len(tags) * case.shape[0] for phase, k, tags in preds.calls if phase == "ours-edit"]
    assert len(theirs) == len(mine) == case.steps
    assert all(a <= b for a, b in zip(mine, theirs))
    return preds, inv, ours, ref, sigmas


@pytest.fixture(scope="module")
def pipes():
    return {"sd": R.build("sd"), "sdxl": R.build("sdxl"), "sd-v": R.build("sd", prediction_type="v_prediction"),
            "sdxl-v": R.build("sdxl", prediction_type="v_prediction")}


CASES = {
    "sd-reconstruction": Case(),
    "sd-1-concept-defaults": Case(edits=[E()]),
    "sd-1-step": Case(steps=1, edits=[E()]),
    "sd-1-concept-reverse-skip-0": Case(steps=6, skip=0.0, edits=[E(scale=3.0, threshold=0.5, warmup=1,
                                                                     reverse=True)]),
    "sd-2-concepts-both-directions": Case(steps=5, skip=0.5, edits=[
        E(scale=4.0, threshold=0.9, warmup=1, cooldown=4), E(scale=6.0, threshold=0.8, reverse=True)]),
    "sd-3-concepts-windows-thresholds": Case(steps=6, skip=0.3, seed=3, edits=[
        E(scale=2.0, threshold=0.0, warmup=0, cooldown=2), E(scale=5.0, threshold=0.95, warmup=2, reverse=True),
        E(scale=7.0, threshold=0.9, warmup=1, cooldown=5)]),
    "sd-cooldown-0-and-scale-0": Case(steps=4, edits=[E(cooldown=0), E(scale=0.0), E(warmup=2)]),
    "sd-user-mask-binary": Case(steps=5, user_mask="binary", edits=[E(), E(scale=3.0, reverse=True, warmup=1)]),
    "sd-user-mask-soft": Case(steps=4, user_mask="soft", edits=[E(threshold=0.7)]),
    "sd-batch-2": Case(shape=(2, 4, 8, 8), steps=4, edits=[E(), E(scale=4.0, threshold=0.6, reverse=True)]),
    "sd-non-square": Case(shape=(1, 4, 8, 12), steps=5, skip=0.2, edits=[E(warmup=1)]),
    "sd-10-steps": Case(steps=10, skip=0.15, edits=[E(warmup=2, cooldown=8), E(scale=3.0, reverse=True)]),
    "sdxl-reconstruction": Case(family="sdxl", steps=5),
    "sdxl-defaults-zeroed-noise": Case(family="sdxl", steps=6, zero_noise_steps=3, edits=[E()]),
    "sdxl-source-prompt": Case(family="sdxl", steps=6, source=True, zero_noise_steps=3, edits=[
        E(scale=5.0, warmup=1), E(scale=3.0, threshold=0.7, reverse=True, cooldown=5)]),
    "sdxl-source-scale-1-no-guidance": Case(family="sdxl", steps=4, source=True, source_scale=1.0, edits=[E()]),
    "sdxl-3-concepts-user-mask": Case(family="sdxl", steps=5, skip=0.3, user_mask="binary", seed=7, edits=[
        E(threshold=0.5), E(scale=8.0, threshold=0.95, warmup=1, reverse=True), E(scale=2.0, warmup=3)]),
    "sd-v-prediction-reconstruction": Case(steps=5, v_prediction=True),
    "sd-v-prediction-2-concepts-user-mask": Case(steps=6, v_prediction=True, user_mask="soft", edits=[
        E(warmup=1), E(scale=4.0, threshold=0.7, reverse=True, cooldown=5)]),
    "sdxl-v-prediction-source-prompt": Case(family="sdxl", steps=5, v_prediction=True, source=True,
                                            zero_noise_steps=2, edits=[E(threshold=0.8)]),
    "sdxl-non-square-skip-0": Case(family="sdxl", shape=(1, 4, 12, 8), steps=4, skip=0.0,
                                   zero_noise_steps=1, edits=[E(warmup=1)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers(pipes, name):
    check(pipes, CASES[name])


def test_rows_fewer_where_windows_allow(pipes):
    """A concept outside its window costs diffusers a row every step; sega_core skips it."""
    case = Case(steps=5, edits=[E(warmup=2), E(cooldown=1)])
    preds = check(pipes, case)[0]
    theirs = sum(len(t) for p, k, t in preds.calls if p == "edit")
    mine = sum(len(t) for p, k, t in preds.calls if p == "ours-edit")
    assert theirs == 5 * 3
    assert mine == 5 + 3 + 1  # uncond every step, concept 0 at steps 2-4, concept 1 at step 0


def test_reconstruction_ends_on_x0_prediction(pipes):
    """Without concepts both end on the model's x0-prediction at the last step (not x0 itself)."""
    case = Case(steps=4)
    preds, inv, ours, ref, sigmas = check(pipes, case)
    x0 = make_inputs(case)[0]
    assert (ref[-1] - x0).abs().max() > 1e-2  # diffusers' reconstruction is not the photo's latent
    assert (ours[-1] + inv.correction - x0).abs().max() <= 1e-5  # the correction closes the gap


# Deliberate differences from diffusers (LEDITS.md, "Quirks"): what diffusers does, and what the pack
# does instead.

def test_sd_source_guidance_swapped_in_diffusers(pipes):
    """Quirk 1: SD's invert() swaps uncond and source: eps = eps_src + s (eps_u - eps_src), guiding
    away from the source prompt. SDXL guides towards it, eps_u + s (eps_src - eps_u); the pack uses
    SDXL's (correct) form for every family."""
    case = Case(steps=4, source=True)
    x0, table, _ = make_inputs(case)
    ts = ledits_timesteps(case.steps, case.skip)
    preds = R.Predictions(table, ts)
    _, zs_sd, sigmas = R.invert(pipes["sd"], preds, x0, case.steps, case.skip, case.seed, source_prompt="source",
                                source_guidance_scale=3.5)
    _, zs_xl, _ = R.invert(pipes["sdxl"], preds, x0, case.steps, case.skip, case.seed, source_prompt="source",
                           source_guidance_scale=3.5, num_zero_noise_steps=0)
    swapped = lambda eps, k: eps[1] + 3.5 * (eps[0] - eps[1])  # noqa: E731
    inv_swapped, _ = run_ours(case, preds, x0, None, sigmas, swapped, (R.UNCOND, R.SOURCE))
    inv_pack, _ = run_ours(case, preds, x0, None, sigmas)  # source_cfg: the pack's form
    assert (inv_swapped.zs - zs_sd).abs().max() <= ATOL  # we reproduce SD's quirk when asked to
    assert (inv_pack.zs - zs_xl).abs().max() <= ATOL  # the pack's form is SDXL's
    assert (inv_pack.zs - zs_sd).abs().max() > 1e-2  # and not SD's


def test_source_prompt_reconstruction(pipes):
    """Quirk 10: with a source prompt diffusers' edit base is the uncond prediction while the noise
    maps came from the guided one, so even without concepts the photo is lost. Replaying with the
    inversion's own (guided) prediction and the correction gives the photo's latent back."""
    case = Case(family="sdxl", steps=5, source=True)
    x0, table, _ = make_inputs(case)
    preds = R.Predictions(table, ledits_timesteps(case.steps, case.skip))
    _, _, sigmas, ref = run_reference(pipes["sdxl"], case, preds, x0, None)
    inv, ours = run_ours(case, preds, x0, None, sigmas)
    assert (ours[-1] - ref[-1]).abs().max() <= ATOL  # uncond base: diffusers' result
    assert (ref[-1] - x0).abs().max() > 0.1  # which is not the photo
    guided = preds.denoise(sigmas, (R.UNCOND, R.SOURCE), source_cfg(case.source_scale))
    back = replay(inv.start, sigmas, inv.zs, guided, correction=inv.correction)
    assert (back - x0).abs().max() <= 1e-4


def test_sd_ddim_inversion_crashes_in_diffusers():
    """Quirk 3: SD's invert() with DDIMScheduler indexes alphas_cumprod with a float tensor
    (IndexError). The pack inverts with SDE-DPM-Solver++(2M), the scheduler diffusers itself turns
    SD 1.5's and SDXL's schedulers into, and refuses any other rule by name."""
    from diffusers import DDIMScheduler

    pipe = R.build("sd", DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=False, steps_offset=1))
    case = Case(steps=3)
    x0, table, _ = make_inputs(case)
    preds = R.Predictions(table, [int(t) for t in R.timesteps(pipe, 3, 0.15)])
    with pytest.raises(IndexError):
        R.invert(pipe, preds, x0, 3, 0.15, 0)
    with pytest.raises(SEGAValueError, match="rule must be one of dpmpp_2m_sde, euler_ancestral_rf"):
        invert(x0, [2.0, 1.0, 0.0], torch.zeros(2, *x0.shape), lambda x, s: x, rule="ddim")


def test_guidance_rescale_crashes_in_diffusers(pipes):
    """Quirk 4: guidance_rescale > 0 with concepts raises AttributeError in diffusers (and is skipped
    without concepts). The pack has no guidance_rescale: its edit is diffusers' at the default 0."""
    case = Case(steps=3, edits=[E()])
    x0, table, _ = make_inputs(case)
    preds = R.Predictions(table, ledits_timesteps(case.steps, case.skip))
    _, _, sigmas = R.invert(pipes["sd"], preds, x0, case.steps, case.skip, case.seed)
    with pytest.raises(AttributeError, match="mean"):
        R.edit(pipes["sd"], preds, case.edits, guidance_rescale=0.7)
    plain = R.edit(pipes["sd"], preds, [])
    assert torch.equal(R.edit(pipes["sd"], preds, [], guidance_rescale=0.7), plain)
    check(pipes, case)  # guidance_rescale=0: equal to sega_core


def test_sdxl_size_swapped_in_diffusers(pipes):
    """Quirk: SDXL's invert() and __call__() pass (W, H) in pixels where SDXL's size conditioning
    expects (H, W). The pack's nodes take the size conditioning from ComfyUI's own SDXL
    conditioning (not from sega_core), so the latents here do not depend on it; this records what
    diffusers passes for a 64 x 96 px (h x w) photo."""
    pipe = pipes["sdxl"]
    pipe.unet.time_ids.clear()
    check(pipes, Case(family="sdxl", shape=(1, 4, 8, 12), steps=3, edits=[E()]))
    ids = {tuple(t[0].tolist()) for t in pipe.unet.time_ids}
    assert ids == {(96.0, 64.0, 0.0, 0.0, 96.0, 64.0)}  # (W, H, top, left, W, H): swapped


def test_sdxl_batch_2(pipes):
    """Quirk 8: SDXL does not repeat the concept embeddings per image, so a batch of two photos with
    two concepts gives the UNet 4 embedding rows for 6 latent rows (a real UNet fails on it). The pack
    edits every photo of a batch on its own: its inversion equals diffusers' at batch 2, and each
    photo's edit equals that photo edited alone."""
    case = Case(family="sdxl", shape=(2, 4, 8, 8), steps=4, edits=[E(), E(scale=3.0, reverse=True, warmup=1)])
    x0, table, _ = make_inputs(case)
    preds = R.Predictions(table, ledits_timesteps(case.steps, case.skip))
    init, zs, sigmas = R.invert(pipes["sdxl"], preds, x0, case.steps, case.skip, case.seed, num_zero_noise_steps=0)
    with pytest.raises(AssertionError, match="embeddings for 4 rows, latents for 6 rows"):
        R.edit(pipes["sdxl"], preds, case.edits)
    inv, ours = run_ours(case, preds, x0, None, sigmas)
    assert (vp(inv.start, sigmas[0]) - init).abs().max() <= ATOL
    assert (inv.zs - zs).abs().max() <= ATOL
    plan = plan_of(case.edits)
    for s in range(2):
        alone = R.Predictions(table[:, :, s:s + 1], preds.timesteps)

        def combine(eps, k):
            rows = ledits_rows(plan, k)
            return eps[0] + ledits_guidance(eps[0], torch.stack(eps[1:]), rows, k, plan).edit

        out = replay(inv.start[s:s + 1], sigmas, inv.zs[:, s:s + 1],
                     alone.denoise(sigmas, lambda k: [R.UNCOND] + [2 + c for c in ledits_rows(plan, k)], combine))
        assert torch.equal(out, ours[-1][s:s + 1])


def test_16_channel_latents_crash_in_diffusers(pipes):
    """Quirk 12: diffusers' implicit mask repeats over 4 channels (hard-coded), so a 16-channel
    latent (SD3, Flux) with a concept fails. sega_core's mask is one spatial mask for every channel
    of any count; without a concept both still agree."""
    case = Case(shape=(1, 16, 8, 8), steps=3, edits=[E()])
    x0, table, _ = make_inputs(case)
    preds = R.Predictions(table, ledits_timesteps(case.steps, case.skip))
    init, zs, sigmas = R.invert(pipes["sd"], preds, x0, case.steps, case.skip, case.seed)
    with pytest.raises(RuntimeError, match="size of tensor a \\(4\\) must match the size of tensor b \\(16\\)"):
        R.edit(pipes["sd"], preds, case.edits)
    inv, ours = run_ours(case, preds, x0, None, sigmas)
    assert (inv.zs - zs).abs().max() <= ATOL
    plan = plan_of(case.edits)
    u, e = table[0, 0], table[0, 2:3]
    edit, _, kept = ledits_guidance(u, e, [0], 0, plan, return_kept=True)
    assert all(torch.equal(kept[0, :, c], kept[0, :, 0]) for c in range(16))
    assert int(kept[0, 0, 0].sum()) == 7 and torch.isfinite(ours[-1]).all()


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_timesteps_match_diffusers(pipes, family):
    """diffusers' own spacing, its defaults (SD 30 steps, SDXL 50, skip 0.15) and Quirk 11 included:
    int(100 * 1.15) is 114, so 100 steps at skip 0.15 space over 114 (not 115)."""
    for n, skip in [(30, 0.15), (50, 0.15), (100, 0.15), (1, 0.0), (7, 0.99), (200, 0.5), (12, 0.3333)]:
        assert ledits_timesteps(n, skip) == R.timesteps(pipes[family], n, skip), (n, skip)
    assert ledits_timesteps(100, 0.15)[0] == 8 * 100 + 1  # 1000 // (114 + 1) = 8


def test_sd_source_scale_1_crashes_in_diffusers(pipes):
    """Quirk 2: SD's invert() raises AttributeError for source_guidance_scale <= 1, even without a
    source prompt. The pack inverts with the plain uncond prediction there, as SDXL does."""
    case = Case(steps=3)
    x0, table, _ = make_inputs(case)
    preds = R.Predictions(table, ledits_timesteps(case.steps, case.skip))
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'dtype'"):
        R.invert(pipes["sd"], preds, x0, case.steps, case.skip, case.seed, source_guidance_scale=1.0)
    _, zs_xl, sigmas = R.invert(pipes["sdxl"], preds, x0, case.steps, case.skip, case.seed, source_prompt="source",
                                source_guidance_scale=1.0, num_zero_noise_steps=0)
    inv, _ = run_ours(Case(steps=3, source=True, source_scale=1.0), preds, x0, None, sigmas)
    assert (inv.zs - zs_xl).abs().max() <= ATOL
