"""sega_core.ledits on its own: exact reconstruction, the guidance's properties, bad input.

The model is a small deterministic function of (x, sigma) (not linear in x), so a wrong latent or a
wrong sigma fed to it shows in the result.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from sega_core import Concept, Plan, SEGAValueError
from sega_core.ledits import (
    Inversion, blend_outside, dpmpp_2m_sde_step, draw_noises, euler_ancestral_rf_step, implicit_mask, invert,
    keep_photo, ledits_guidance, ledits_rows, ledits_timesteps, noisy_latents, replay)

SHAPE = (1, 4, 8, 8)


def sd_sigmas(num_steps: int, skip: float):
    """SD's schedule (scaled-linear betas) at LEDITS++'s timesteps, then 0."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    return [math.sqrt((1 - ac[t]) / ac[t]) for t in ledits_timesteps(num_steps, skip)] + [0.0]


def karras(n: int, smin: float = 0.03, smax: float = 14.6, rho: float = 7.0):
    r = [(smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n)]
    return r + [0.0]


def flow_sigmas(n: int, shift: float = 1.0):
    """Flow schedules: linear from 1 (pure noise), time-shifted as SD3/Flux do."""
    t = [1 - i / n for i in range(n)]
    return [shift * s / (1 + (shift - 1) * s) for s in t] + [0.0]


def model(flow: bool = False, seed: int = 0):
    """denoise(x, sigma) from a fixed non-linear function of the model input (EPS: x / sqrt(1 + s^2))."""
    g = torch.Generator().manual_seed(seed)
    w = 0.5 * torch.randn(4, 4, generator=g)
    b = torch.randn(1, 4, 8, 8, generator=g)

    def denoise(x, sigma):  # ComfyUI's EPS / CONST conventions: denoised = x - sigma * output
        s = float(sigma)
        x_in = x if flow else x / math.sqrt(1 + s * s)
        out = torch.tanh(torch.einsum("ij,bjhw->bihw", w, x_in) + s * b[..., :x.shape[-2], :x.shape[-1]])
        return x - s * out

    return denoise


def x0_of(seed=0, shape=SHAPE, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + seed), dtype=dtype)


SCHEDULES = {
    "sd-30-skip-0.15": (sd_sigmas(30, 0.15), "dpmpp_2m_sde"),
    "sd-10-skip-0": (sd_sigmas(10, 0.0), "dpmpp_2m_sde"),
    "sd-50-skip-0.5": (sd_sigmas(50, 0.5), "dpmpp_2m_sde"),
    "sd-1-step": (sd_sigmas(1, 0.15), "dpmpp_2m_sde"),
    "karras-20": (karras(20), "dpmpp_2m_sde"),
    "flow-linear-20": (flow_sigmas(20), "euler_ancestral_rf"),
    "flow-shift-3-28": (flow_sigmas(28, 3.0), "euler_ancestral_rf"),
    "flow-from-0.8-12": (flow_sigmas(15)[3:], "euler_ancestral_rf"),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_exact_reconstruction(name):
    """Replay with the correction and no concept returns x0 (float32, <= 1e-4), both rules."""
    sigmas, rule = SCHEDULES[name]
    flow = rule == "euler_ancestral_rf"
    den = model(flow)
    x0 = x0_of()
    n = len(sigmas) - 1
    inv = invert(x0, sigmas, draw_noises(x0.shape, n, torch.Generator().manual_seed(1)), den, rule=rule)
    assert inv.zs.shape == (n, *x0.shape) and inv.zs[-1].abs().max() == 0  # the last step adds no noise
    out = replay(inv.start, sigmas, inv.zs, den, rule=rule, correction=inv.correction)
    assert (out - x0).abs().max().item() <= 1e-4
    if n > 1:  # without the correction: the last x0-prediction, not the photo
        assert (replay(inv.start, sigmas, inv.zs, den, rule=rule) - x0).abs().max() > 1e-3


@pytest.mark.parametrize("rule,sigmas", [("dpmpp_2m_sde", sd_sigmas(8, 0.15)),
                                         ("euler_ancestral_rf", flow_sigmas(8, 3.0))])
def test_inversion_writes_back_the_draws(rule, sigmas):
    """Edit-friendly: the latent the model sees at step k is the k-th draw (up to rounding), and the
    replay repeats the inversion's model inputs bit for bit."""
    flow = rule == "euler_ancestral_rf"
    x0 = x0_of(2)
    noises = draw_noises(x0.shape, 8, torch.Generator().manual_seed(3))
    draws = noisy_latents(x0, sigmas[:-1], noises, flow)
    seen_inv, seen_rep = [], []
    inv = invert(x0, sigmas, noises, model(flow), rule=rule, callback=lambda d: seen_inv.append(d["x"]))
    replay(inv.start, sigmas, inv.zs, model(flow), rule=rule, callback=lambda d: seen_rep.append(d["x"]))
    assert torch.equal(inv.start, draws[0])
    for k in range(8):
        assert (seen_inv[k] - draws[k]).abs().max() <= 1e-5 * max(1.0, sigmas[k])
        assert torch.equal(seen_inv[k], seen_rep[k])


def test_diffusers_style_reconstruction_ends_on_last_x0_prediction():
    sigmas = sd_sigmas(6, 0.15)
    den = model()
    x0 = x0_of(4)
    inv = invert(x0, sigmas, draw_noises(x0.shape, 6), den)
    last = []
    out = replay(inv.start, sigmas, inv.zs, den, callback=lambda d: last.append(d["denoised"]))
    assert torch.equal(out, last[-1])
    assert torch.equal(replay(inv.start, sigmas, inv.zs, den, correction=inv.correction), out + inv.correction)


def test_zero_noise_steps_zeroes_the_last_maps():
    sigmas = sd_sigmas(6, 0.15)
    x0 = x0_of()
    noises = draw_noises(x0.shape, 6, torch.Generator().manual_seed(0))
    full = invert(x0, sigmas, noises, model())
    part = invert(x0, sigmas, noises, model(), zero_noise_steps=3)
    assert torch.equal(part.zs[:3], full.zs[:3]) and not part.zs[3:].any()
    assert full.zs[3:5].abs().max() > 0.1
    assert torch.equal(part.start, full.start) and torch.equal(part.correction, full.correction)


def test_rerun_and_interrupted_inversion_are_fresh():
    """invert keeps no state: a run interrupted half-way and run again equals a fresh run bit for bit."""
    sigmas = sd_sigmas(6, 0.15)
    x0 = x0_of()
    noises = draw_noises(x0.shape, 6, torch.Generator().manual_seed(9))
    calls = []

    def flaky(x, s):
        calls.append(s)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return model()(x, s)

    with pytest.raises(KeyboardInterrupt):
        invert(x0, sigmas, noises, flaky)
    a = invert(x0, sigmas, noises, flaky)
    b = invert(x0, sigmas, noises, model())
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_batch_samples_are_independent():
    sigmas = sd_sigmas(5, 0.15)
    x0 = x0_of(shape=(2, 4, 8, 8))
    noises = draw_noises(x0.shape, 5, torch.Generator().manual_seed(0))
    both = invert(x0, sigmas, noises, model())
    one = invert(x0[1:], sigmas, noises[:, 1:], model())
    assert torch.equal(both.zs[:, 1:], one.zs) and torch.equal(both.correction[1:], one.correction)


def test_draw_noises_order():
    """diffusers draws the least noisy step first: noises[N-1] comes first from the generator."""
    g = torch.Generator().manual_seed(5)
    first, second = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    n = draw_noises(SHAPE, 2, torch.Generator().manual_seed(5))
    assert torch.equal(n[1], first) and torch.equal(n[0], second)


def test_step_rules_at_sigma_zero_and_first_order():
    x, d = torch.randn(SHAPE), torch.randn(SHAPE)
    mean, std, hist = dpmpp_2m_sde_step(x, d, 0.5, 0.0)
    assert mean is d and std == 0.0
    mean, std = euler_ancestral_rf_step(x, d, 0.5, 0.0)
    assert mean is d and std == 0.0
    # first step: (s'/s) e^{-h} x + (1 - e^{-2h}) d with h = log(s / s'); second adds the midpoint term
    s, s2 = 2.0, 1.0
    h = math.log(s / s2)
    mean, std, hist = dpmpp_2m_sde_step(x, d, s, s2)
    torch.testing.assert_close(mean, x * (s2 / s * math.exp(-h)) + d * (1 - math.exp(-2 * h)), rtol=0, atol=1e-6)
    assert std == pytest.approx(s2 * math.sqrt(1 - math.exp(-2 * h)))
    d2 = torch.randn(SHAPE)
    h2 = math.log(s2 / 0.5)
    mean2, _, _ = dpmpp_2m_sde_step(mean, d2, s2, 0.5, hist)
    first, _, _ = dpmpp_2m_sde_step(mean, d2, s2, 0.5)
    torch.testing.assert_close(mean2 - first, (d2 - d) * (0.5 * (1 - math.exp(-2 * h2)) * h2 / h), rtol=0,
                               atol=1e-6)


def test_rf_step_keeps_the_flow_marginal():
    """For a perfect denoiser (denoised = x0) the RF step maps x = (1 - s) x0 + s eps to
    mean + std z with mean A x + B x0: x0's coefficient is 1 - s' and the noise variance
    (A s)^2 + std^2 is s'^2, the flow marginal at s'."""
    ones, zeros = torch.ones(SHAPE), torch.zeros(SHAPE)
    for s, s2 in [(1.0, 0.9), (0.8, 0.5), (0.3, 0.05)]:
        a = euler_ancestral_rf_step(ones, zeros, s, s2)[0].mean().item()
        b = euler_ancestral_rf_step(zeros, ones, s, s2)[0].mean().item()
        std = euler_ancestral_rf_step(zeros, zeros, s, s2)[1]
        assert a * (1 - s) + b == pytest.approx(1 - s2, rel=1e-6)
        assert (a * s) ** 2 + std ** 2 == pytest.approx(s2 ** 2, rel=1e-6)


# ledits_guidance

def preds_for(n, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g)
    return u, u + 0.2 * torch.randn((n, *shape), generator=g)


def test_every_scale_zero_gives_no_edit():
    u, e = preds_for(3)
    plan = Plan.build([Concept(scale=0.0, warmup=0)] * 3, momentum_scale=0.0)
    assert ledits_rows(plan, 0) == []
    assert ledits_guidance(u, e, [0, 1, 2], 0, plan).edit is None  # rows given anyway: none acts
    edit, _, kept = ledits_guidance(u, e, [0, 1, 2], 0, plan, return_kept=True)
    assert edit is None and not kept.any()
    live = Plan.build([Concept(scale=5.0, warmup=0)], momentum_scale=0.0)
    assert not ledits_guidance(u, u.unsqueeze(0), [0], 0, live).edit.any()  # concept == uncond: zero edit


def test_reverse_mirrors():
    u, e = preds_for(2, seed=1)
    fwd = Plan.build([Concept(scale=4.0, threshold=0.8, warmup=0), Concept(scale=2.0, threshold=0.5, warmup=0)])
    rev = Plan.build([Concept(scale=4.0, threshold=0.8, warmup=0, reverse=True),
                      Concept(scale=2.0, threshold=0.5, warmup=0, reverse=True)])
    a = ledits_guidance(u, e, [0, 1], 0, fwd).edit
    assert a.abs().max() > 0 and torch.equal(ledits_guidance(u, e, [0, 1], 0, rev).edit, -a)


def test_plain_sum_no_weights():
    u, e = preds_for(2, seed=2)
    both = Plan.build([Concept(scale=3.0, warmup=0, weight=0.3), Concept(scale=5.0, threshold=0.7, warmup=0)])
    one = [Plan.build([Concept(scale=3.0, warmup=0)]), Plan.build([Concept(scale=5.0, threshold=0.7, warmup=0)])]
    parts = [ledits_guidance(u, e[k:k + 1], [0], 0, one[k]).edit for k in range(2)]
    torch.testing.assert_close(ledits_guidance(u, e, [0, 1], 0, both).edit, parts[0] + parts[1], rtol=0, atol=0)


def test_windows():
    plan = Plan.build([Concept(warmup=2, cooldown=4), Concept(warmup=0), Concept(scale=0.0, warmup=0)])
    assert [ledits_rows(plan, k) for k in range(5)] == [[1], [1], [0, 1], [0, 1], [1]]
    assert ledits_rows(plan, 2, inactive=[1]) == [0]


def test_user_mask_zero_outside():
    u, e = preds_for(1, seed=3)
    plan = Plan.build([Concept(scale=5.0, threshold=0.9, warmup=0)])
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1.0
    edit, _, kept = ledits_guidance(u, e, [0], 0, plan, user_masks=[mask], return_kept=True)
    outside = mask[0, 0] == 0
    assert not edit[..., outside].any()
    assert edit[..., ~outside].abs().sum() > 0
    # the mask acts before the quantile (as in diffusers): the 0.9-quantile of 64 positions, 48 of
    # them zero, keeps the top 7, all inside the mask
    assert int(kept[0, 0, 0].sum()) == 7 and not kept[0, 0, 0][outside].any()


@pytest.mark.parametrize("rule,sigmas", [("dpmpp_2m_sde", sd_sigmas(8, 0.15)),
                                         ("euler_ancestral_rf", flow_sigmas(8, 3.0))])
def test_keep_photo_holds_the_reconstruction_outside_the_mask(rule, sigmas):
    """keep_photo: outside the mask the replayed latent is the inversion's chain after every step (the
    model sees the draws there) and the photo at the end, while inside the edit goes on; a mask of
    ones changes nothing, a mask of zeros gives the reconstruction."""
    flow = rule == "euler_ancestral_rf"
    den = model(flow)
    x0 = x0_of(5)
    n = len(sigmas) - 1
    noises = draw_noises(x0.shape, n, torch.Generator().manual_seed(6))
    draws = noisy_latents(x0, sigmas[:-1], noises, flow)
    inv = invert(x0, sigmas, noises, den, rule=rule)
    push = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))

    def edited(x, sigma):  # an edit acting everywhere, as the model's view of the whole latent does
        return den(x, sigma) - float(sigma) * 0.5 * push

    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 1:5, 2:7] = 1.0
    outside = mask[0, 0] == 0
    seen = []
    out = replay(inv.start, sigmas, inv.zs, edited, rule=rule, correction=inv.correction,
                 callback=lambda d: seen.append(d["x"]), keep=keep_photo(mask, x0, sigmas, noises, flow))
    assert torch.equal(out[..., outside], x0[..., outside])
    assert (out - x0)[..., ~outside].abs().max() > 0.05
    for k in range(1, n):
        assert torch.equal(seen[k][..., outside], draws[k][..., outside])
    free = replay(inv.start, sigmas, inv.zs, edited, rule=rule, correction=inv.correction)
    assert (free - x0)[..., outside].abs().max() > 0.05  # without keep the edit reaches everywhere
    ones = replay(inv.start, sigmas, inv.zs, edited, rule=rule, correction=inv.correction,
                  keep=keep_photo(torch.ones(1, 1, 8, 8), x0, sigmas, noises, flow))
    assert torch.equal(ones, free)
    zeros = replay(inv.start, sigmas, inv.zs, edited, rule=rule, correction=inv.correction,
                   keep=keep_photo(torch.zeros(1, 1, 8, 8), x0, sigmas, noises, flow))
    assert torch.equal(zeros, x0)
    # another end point (the reconstruction without the correction ends on its last x0-prediction)
    end = x0 - inv.correction
    plain = replay(inv.start, sigmas, inv.zs, edited, rule=rule,
                   keep=keep_photo(torch.zeros(1, 1, 8, 8), x0, sigmas, noises, flow, end=end))
    assert torch.equal(plain, end)


def test_blend_outside_soft_mask():
    x, ref = torch.full((1, 2, 2, 2), 3.0), torch.full((1, 2, 2, 2), 1.0)
    m = torch.tensor([0.0, 0.25, 0.5, 1.0]).view(1, 1, 2, 2)
    out = blend_outside(x, ref, m)
    assert torch.allclose(out[0, 0], torch.tensor([[1.0, 1.5], [2.0, 3.0]]))
    assert torch.equal(out[0, 0], out[0, 1])


def test_implicit_mask_same_in_every_channel():
    u, e = preds_for(1, shape=(2, 4, 8, 8), seed=4)
    plan = Plan.build([Concept(scale=5.0, threshold=0.9, warmup=0)])
    edit, _, kept = ledits_guidance(u, e, [0], 0, plan, return_kept=True)
    assert all(torch.equal(kept[0, :, c], kept[0, :, 0]) for c in range(4))
    assert [int(kept[0, s, 0].sum()) for s in range(2)] == [7, 7]  # rank 0.9 * 63 = 56.7: the top 7 of 64
    assert torch.equal(edit != 0, kept[0])


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), c=st.sampled_from([1, 4, 16]), h=st.integers(1, 9), w=st.integers(1, 9),
       q=st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99]), st.floats(0.0, 0.999)),
       seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_implicit_mask_equals_torch_quantile(b, c, h, w, q, seed, ties):
    """The kept positions are those of torch.quantile (linear) over sum_c |g|, bit for bit."""
    g = torch.randn((b, c, h, w), generator=torch.Generator().manual_seed(seed))
    if ties:
        g = g.round()
    a = g.abs().sum(dim=1, keepdim=True)
    ref = a >= torch.quantile(a.flatten(1), q, dim=1).view(b, 1, 1, 1)
    assert torch.equal(implicit_mask(g, q), ref)


def test_video_latents():
    """5-D latents (B, C, T, H, W): the mask is taken over all positions of a sample."""
    u, e = preds_for(1, shape=(1, 16, 3, 4, 4), seed=5)
    plan = Plan.build([Concept(scale=5.0, threshold=0.75, warmup=0)])
    edit, _, kept = ledits_guidance(u, e, [0], 0, plan, return_kept=True)
    assert edit.shape == u.shape and int(kept[0, 0, 0].sum()) == 12


# bad input

def test_timesteps_and_skip():
    assert ledits_timesteps(30, 0.15)[:3] == [841, 813, 785] and ledits_timesteps(30, 0.15)[-1] == 29
    assert len(ledits_timesteps(100, 0.15)) == 100 and ledits_timesteps(100, 0.15)[0] == 100 * (1000 // 115) + 1
    for skip in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(SEGAValueError, match="SEGA Invert: skip must be in \\[0, 1\\)"):
            ledits_timesteps(10, skip, where="SEGA Invert")
    for n in (0, -1, 2.5):
        with pytest.raises(SEGAValueError, match="steps must be a whole number"):
            ledits_timesteps(n, 0.1)
    with pytest.raises(SEGAValueError, match="use fewer steps"):
        ledits_timesteps(999, 0.15)


def test_bad_inputs_named():
    x0 = x0_of()
    sig = sd_sigmas(4, 0.15)
    nz = draw_noises(x0.shape, 4)
    den = model()
    with pytest.raises(SEGAValueError, match="SEGA Invert: the latent to invert holds NaN"):
        invert(x0.clone().fill_(math.nan), sig, nz, den, where="SEGA Invert")
    with pytest.raises(SEGAValueError, match="end with 0"):
        invert(x0, sig[:-1], nz[:3], den)
    with pytest.raises(SEGAValueError, match="strictly decreasing"):
        invert(x0, [1.0, 2.0, 0.0], nz[:2], den)
    with pytest.raises(SEGAValueError, match="noises must have shape"):
        invert(x0, sig, nz[:3], den)
    with pytest.raises(SEGAValueError, match="at most 1"):
        invert(x0, [2.0, 1.0, 0.0], nz[:2], den, rule="euler_ancestral_rf")
    with pytest.raises(SEGAValueError, match="zero_noise_steps"):
        invert(x0, sig, nz, den, zero_noise_steps=5)
    inv = invert(x0, sig, nz, den)
    assert isinstance(inv, Inversion)
    with pytest.raises(SEGAValueError, match="SEGA Edit: the noise maps have shape"):
        replay(inv.start, sd_sigmas(5, 0.15), inv.zs, den, where="SEGA Edit")  # another step count
    with pytest.raises(SEGAValueError, match="the noise maps have shape"):
        replay(torch.zeros(1, 4, 8, 6), sig, inv.zs, den)  # another latent size
