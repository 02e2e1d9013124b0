"""sega_core.attention: LEDITS++'s cross-attention mask M1 and how it meets the implicit mask M2.

The smoothing and the attention probabilities are compared with diffusers' own classes (its
LEDITS++ smoothing, its Attention module's get_attention_scores); the whole mask inside a
LEDITS++ run is compared with diffusers' pipeline in the host tests.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from sega_core import Concept, Plan, SEGAValueError, sega_step
from sega_core.attention import (attention_chunks, attention_mask, combine_masks, fused_chunks, fused_token_attention,
                                 intersects, projected_token_attention, smooth, smoothing_kernel, token_attention,
                                 token_positions)
from sega_core.ledits import implicit_mask, ledits_guidance


def test_kernel_equals_diffusers_ledits_smoothing():
    ledits = pytest.importorskip("diffusers.pipelines.ledits_pp.pipeline_leditspp_stable_diffusion")
    theirs = ledits.LeditsGaussianSmoothing("cpu")
    assert torch.allclose(smoothing_kernel(), theirs.weight, atol=3e-8, rtol=0)  # float32 rounding
    # corner, edge, centre as LEDITS.md gives them
    k = smoothing_kernel()[0, 0]
    assert (round(k[0, 0].item(), 3), round(k[0, 1].item(), 3), round(k[1, 1].item(), 3)) == (0.045, 0.122, 0.332)
    a = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(a.unsqueeze(1), (1, 1, 1, 1), mode="reflect")
    assert torch.allclose(smooth(a), theirs(padded).squeeze(1), atol=0, rtol=1e-6)


def test_token_positions():
    assert token_positions(77).tolist() == list(range(1, 76))  # diffusers: 1 : 1 + 75
    assert token_positions(77, words=3).tolist() == [1, 2, 3]
    assert token_positions(154).tolist() == list(range(1, 76)) + list(range(78, 153))
    assert token_positions(154, words=2).tolist() == [1, 2, 78, 79]
    assert token_positions(77, words=200).tolist() == list(range(1, 76))
    assert token_positions(256).tolist() == list(range(256))  # not CLIP (T5): every position
    assert token_positions(256, words=4).tolist() == [0, 1, 2, 3]
    with pytest.raises(SEGAValueError, match="words"):
        token_positions(77, words=0)


def test_token_attention_equals_diffusers_attention_probabilities():
    attention = pytest.importorskip("diffusers.models.attention_processor")
    torch.manual_seed(0)
    heads, dim_head = 4, 8
    attn = attention.Attention(query_dim=16, cross_attention_dim=12, heads=heads, dim_head=dim_head)
    x = torch.randn(3, 20, 16)
    ctx = torch.randn(3, 77, 12)
    q, k = attn.to_q(x), attn.to_k(ctx)
    probs = attn.get_attention_scores(attn.head_to_batch_dim(q), attn.head_to_batch_dim(k))  # (B*heads, Q, T)
    probs = probs.view(3, heads, 20, 77)
    for pos in (token_positions(77), token_positions(77, words=5)):
        want = probs[..., pos].sum(dim=(1, 3))
        got = token_attention(q, k, heads, pos)
        assert got.shape == (3, 20)
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
    # every position: the heads' probabilities sum to 1 each
    all_pos = token_attention(q, k, heads, torch.arange(77))
    assert torch.allclose(all_pos, torch.full((3, 20), float(heads)), atol=1e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 16), h=st.integers(2, 9), w=st.integers(2, 9), threshold=st.floats(0.0, 0.99),
       ties=st.booleans())
def test_attention_mask_is_quantile_of_smoothed_map(seed, h, w, threshold, ties):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, h, w, generator=g)
    if ties:
        a = (a * 3).round()
    m = attention_mask(a, threshold, (4 * h, 4 * w))
    assert m.dtype == torch.bool and m.shape == (2, 1, 4 * h, 4 * w)
    s = smooth(a)
    q = torch.quantile(s.flatten(1), threshold, dim=1)
    small = s >= q.view(-1, 1, 1)
    # nearest resize by 4: every map cell becomes a 4x4 block
    assert torch.equal(m[:, 0], small.repeat_interleave(4, 1).repeat_interleave(4, 2))
    # per sample: every cell above the quantile's lower order statistic is kept
    n = h * w
    assert (small.flatten(1).sum(1) >= n - 1 - math.floor(threshold * (n - 1))).all()


def test_attention_mask_finds_the_attended_region():
    a = torch.full((1, 16, 16), 0.01)
    a[0, 2:6, 9:14] = 0.5  # the concept's tokens are attended here
    m = attention_mask(a, 0.9, (64, 64))[0, 0]
    assert m[8:24, 36:56].float().mean() > 0.6
    assert not m[32:, :].any() and not m[:, :28].any()


def test_attention_mask_bad_input():
    with pytest.raises(SEGAValueError, match=r"\(B, h, w\)"):
        attention_mask(torch.rand(1, 1, 4, 4), 0.9, (16, 16))
    with pytest.raises(SEGAValueError, match="2x2"):
        attention_mask(torch.rand(1, 1, 4), 0.9, (4, 16))


def test_words_only_differs_from_diffusers_sum_over_all_positions():
    """diffusers sums 75 positions (words, end token and padding): per pixel, 1 minus the start
    token's and the last position's share. Here, as in CLIP, every pixel attends mostly to the start
    token; the concept's two word tokens draw a top-left square, the end token and padding the
    bottom half. Summing every position marks both; the word tokens alone mark only the word's square."""
    heads, d = 2, 4
    ctx = torch.zeros(1, 77, heads * d)
    q = torch.zeros(1, 64, heads * d)  # an 8x8 map
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    word_region = ((ys < 3) & (xs < 3)).flatten()
    pad_region = (ys >= 4).flatten()
    for h in range(heads):
        ctx[0, 0, h * d + 2] = 1.0  # the start token: every query has a share of it
        ctx[0, 1:3, h * d] = 1.0  # the word tokens
        ctx[0, 3:, h * d + 1] = 1.0  # end token and padding
        q[0, :, h * d + 2] = 12.0
        q[0, word_region, h * d] = 12.0
        q[0, pad_region, h * d + 1] = 12.0
    size = (32, 32)
    all_map = token_attention(q, ctx, heads, token_positions(77)).view(1, 8, 8) / heads
    words_map = token_attention(q, ctx, heads, token_positions(77, words=2)).view(1, 8, 8) / heads
    assert all_map.min() > 0.1 and all_map.max() < 1  # the start token takes a share everywhere
    m_all = attention_mask(all_map, 0.5, size)[0, 0]
    m_words = attention_mask(words_map, 0.8, size)[0, 0]
    pad = pad_region.view(8, 8).repeat_interleave(4, 0).repeat_interleave(4, 1)
    word = word_region.view(8, 8).repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert m_all[pad].float().mean() > 0.9  # all positions: the padding's region
    assert not m_words[pad].any() and m_words[word].float().mean() > 0.7  # words only: the word's region


def test_intersection_rule():
    assert intersects(800, always=False) and intersects(29, always=False)
    assert not intersects(801, always=False) and not intersects(841, always=False)
    assert intersects(999, always=True)
    m1 = torch.tensor([[True, True, False, False]])
    m2 = torch.tensor([[True, False, True, False]])
    assert torch.equal(combine_masks("implicit", m1, m2, True), m2)
    assert torch.equal(combine_masks("attention", m1, m2, True), m1)
    assert torch.equal(combine_masks("intersect", m1, m2, True), m1 & m2)
    assert torch.equal(combine_masks("intersect", m1, m2, False), m1)
    with pytest.raises(SEGAValueError, match="mask_from"):
        combine_masks("attn", m1, m2, True)
    with pytest.raises(SEGAValueError, match="attention mask"):
        combine_masks("attention", None, m2, True)


def test_concept_mask_from_is_validated():
    with pytest.raises(SEGAValueError, match="mask_from"):
        Plan.build([Concept(mask_from="cross")], names=["'glasses'"], where="SEGA Apply")
    plan = Plan.build([Concept(), Concept(mask_from="attention"), Concept(mask_from="intersect")])
    assert plan.mask_from == ("implicit", "attention", "intersect") and plan.attention == [1, 2]


def _case(seed=0, k=2, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    uncond = torch.randn(shape, generator=g)
    preds = torch.randn((k,) + shape, generator=g)
    m1 = torch.rand(shape[0], 1, *shape[2:], generator=g) > 0.6
    return uncond, preds, m1


@pytest.mark.parametrize("both", [True, False])
def test_ledits_guidance_with_attention_masks(both):
    uncond, preds, m1 = _case()
    concepts = [Concept(scale=4.0, warmup=0, mask_from="attention"),
                Concept(scale=3.0, warmup=0, threshold=0.7, mask_from="intersect", reverse=True)]
    plan = Plan.build(concepts)
    other = torch.flip(m1, dims=[-1])
    edit, _, kept = ledits_guidance(uncond, preds, [0, 1], 0, plan, attn_masks=[m1, other], intersect_both=both,
                                 return_kept=True)
    g0 = (preds[0] - uncond) * 4.0
    g1 = (preds[1] - uncond) * -3.0
    want1 = other & implicit_mask(g1, 0.7) if both else other
    assert torch.equal(kept[0], m1.expand_as(uncond)) and torch.equal(kept[1], want1.expand_as(uncond))
    assert torch.equal(edit, torch.where(m1, g0, 0.0) + torch.where(want1, g1, 0.0))
    # implicit concepts ignore any attention mask: the edit is the one of a plan without the setting
    plain = Plan.build([Concept(scale=4.0, warmup=0), Concept(scale=3.0, warmup=0, threshold=0.7, reverse=True)])
    assert torch.equal(ledits_guidance(uncond, preds, [0, 1], 0, plain).edit,
                       ledits_guidance(uncond, preds, [0, 1], 0, plain, attn_masks=[m1, other]).edit)
    with pytest.raises(SEGAValueError, match="attention mask"):
        ledits_guidance(uncond, preds, [0, 1], 0, plan).edit


@pytest.mark.parametrize("both", [True, False])
def test_sega_step_with_attention_masks(both):
    uncond, preds, m1 = _case(seed=3, k=3)
    base = dict(scale=5.0, warmup=0, threshold=0.8)
    modes = ["implicit", "attention", "intersect"]
    plan = Plan.build([Concept(**base, mask_from=m) for m in modes], momentum_scale=0.0)
    plain = Plan.build([Concept(**base)] * 3, momentum_scale=0.0)
    masks = [None, m1, ~m1]
    got = sega_step(uncond, preds, [0, 1, 2], 0, plan, None, attn_masks=masks, intersect_both=both, return_kept=True)
    ref = sega_step(uncond, preds, [0, 1, 2], 0, plain, None, return_kept=True)
    d = (preds - uncond) * 5.0
    thr = ref.kept  # SEGA's per-channel threshold, per concept
    want_kept = torch.stack([thr[0], m1.expand_as(uncond), (thr[2] & ~m1) if both else (~m1).expand_as(uncond)])
    assert torch.equal(got.kept, want_kept)
    assert torch.allclose(got.edit, (d * want_kept).sum(0), atol=1e-6)
    # all implicit: bit-identical to a plan without the setting
    same = sega_step(uncond, preds, [0, 1, 2], 0, Plan.build([Concept(**base, mask_from="implicit")] * 3,
                                                              momentum_scale=0.0), None, attn_masks=masks)
    assert torch.equal(same.edit, ref.edit)


def test_projected_token_attention_equals_diffusers_in_any_chunking():
    """The chunked sum of the layer's own projections equals diffusers' probabilities summed over the
    positions, whatever the chunks (from a latent so small that every chunk is one query of one head,
    to everything at once), with and without projection biases."""
    attention = pytest.importorskip("diffusers.models.attention_processor")
    torch.manual_seed(1)
    heads, dim_head = 4, 8
    for bias in (False, True):
        attn = attention.Attention(query_dim=16, cross_attention_dim=12, heads=heads, dim_head=dim_head, bias=bias)
        x, ctx = torch.randn(2, 20, 16), torch.randn(2, 77, 12)
        probs = attn.get_attention_scores(attn.head_to_batch_dim(attn.to_q(x)), attn.head_to_batch_dim(attn.to_k(ctx)))
        pos = token_positions(77)
        want = probs.view(2, heads, 20, 77)[..., pos].sum(dim=(1, 3))
        seen, fused_seen = set(), set()
        for latent in (1, 606, 2000, 6000, 10 ** 6, None):
            seen.add(attention_chunks(heads, dim_head, 20, 77, latent, 12))
            with torch.no_grad():
                got = projected_token_attention(x, ctx, attn.to_q.weight, attn.to_k.weight, heads, pos, latent,
                                                attn.to_q.bias, attn.to_k.bias)
            assert torch.allclose(got, want, atol=1e-5, rtol=0), (bias, latent)
            q, k = attn.to_q(x).detach(), attn.to_k(ctx).detach()
            for fused in (False, True):  # the chunked scores, the fused kernel with an indicator value
                assert torch.allclose(token_attention(q, k, heads, pos, latent, fused=fused), want, atol=1e-5, rtol=0)
            with torch.no_grad():
                got = projected_token_attention(x, ctx, attn.to_q.weight, attn.to_k.weight, heads, pos, latent,
                                                attn.to_q.bias, attn.to_k.bias, fused=True)
            assert torch.allclose(got, want, atol=1e-5, rtol=0), (bias, latent)
            fused_seen.add(fused_chunks(heads, 20, latent, 0, dim_head))
        assert len(seen) == 5  # the latents above chunk the work in different ways (10 ** 6: all at once)
        assert any(fold for _, _, fold in seen)  # no keys held (a latent below one head's keys) too
        assert fused_seen == {(1, 1), (heads, 9), (heads, 20)}  # one query of one head per call, .., all at once


@pytest.mark.parametrize("side", [64, 32])
def test_capture_memory_stays_below_one_latent_sd15(side):
    """SD 1.5 at 512 px (latent 4x64x64) and 256 px (4x32x32, where one head's keys alone are three
    latents: no keys are kept): the captured layers have 1280 channels, 8 heads of 160, CLIP's 77
    tokens of 768. Measured with torch.profiler: every allocation the capture of one concept row makes
    at one such layer (its projections, scores, sums) stays below one latent, at its peak and one by
    one; computed at once (no chunks), the same call holds 20 latents of queries alone."""
    from harness.memory import allocations

    g = torch.Generator().manual_seed(0)
    channels, heads = 1280, 8
    x = torch.randn(1, (side // 4) ** 2, channels, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    wq = torch.randn(channels, channels, generator=g) * channels ** -0.5
    wk = torch.randn(channels, 768, generator=g) * 768 ** -0.5
    pos = token_positions(77)
    latent = 4 * side * side
    latent_bytes = latent * 4  # float32
    chunked = allocations(lambda: projected_token_attention(x, ctx, wq, wk, heads, pos, latent))
    assert chunked.peak < latent_bytes and chunked.largest < latent_bytes, (chunked.peak / latent_bytes)
    whole = allocations(lambda: projected_token_attention(x, ctx, wq, wk, heads, pos, None))
    assert whole.peak > 20 * latent_bytes  # what the check above would catch
    assert torch.allclose(chunked.result, whole.result, atol=1e-5, rtol=0)
    q, k = x @ wq.t(), ctx @ wk.t()
    assert allocations(lambda: token_attention(q, k, heads, pos, latent)).peak < latent_bytes


def test_fused_way_at_sd3_1024_px_stays_below_one_latent():
    """The fused way (scaled_dot_product_attention with the text's indicator as its value, the math
    kernel excluded: it would raise rather than hold the probabilities) at the shapes of one SD3 joint
    call at 1024 px: 4096 image queries, 154 text + 4096 image keys, 24 heads of 64, a 16x128x128
    latent. Measured with torch.profiler: it peaks below one latent, where the probabilities at once
    are 1,594 latents; the sums equal the chunked scores' within 1e-5."""
    from harness.memory import allocations

    g = torch.Generator().manual_seed(0)
    heads, d, txt, n = 24, 64, 154, 4096
    q = torch.randn(1, txt + n, heads * d, generator=g)
    pos = torch.arange(txt)
    latent = 16 * 128 * 128
    used = allocations(lambda: fused_token_attention(q[:, txt:], q, heads, pos, latent))
    assert used.peak < latent * 4, used.peak / (latent * 4)
    assert heads * n * (txt + n) > 1500 * latent
    assert torch.allclose(used.result, token_attention(q[:, txt:], q, heads, pos, latent, fused=False), atol=1e-5,
                          rtol=0)


def test_the_cpu_fused_kernel_takes_the_strided_indicator_value_not_a_narrow_one():
    """Why the value is as wide as the queries: with the math kernel excluded, the CPU has no kernel for
    a one-column value (torch 2.13 / 2.14: it would fall back to the math kernel, which holds every
    probability), while the strided indicator of 8 T + d floats is taken by the flash kernel, which
    holds no (Q, T) probabilities: its peak stays below them (measured with torch.profiler)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from harness.memory import allocations
    from sega_core.attention import FUSED_KERNELS, _indicator

    g = torch.Generator().manual_seed(0)
    heads, nq, t_len, d = 8, 1024, 77, 64
    q, k = torch.randn(1, heads, nq, d, generator=g), torch.randn(1, heads, t_len, d, generator=g)
    pos = token_positions(t_len)
    v = _indicator(pos, t_len, d, torch.float32, "cpu").expand(1, heads, t_len, d)
    assert v.untyped_storage().nbytes() == (8 * (t_len - 1) + d) * 4  # not T x d
    with sdpa_kernel(FUSED_KERNELS):
        with pytest.raises(RuntimeError, match="kernel"):
            F.scaled_dot_product_attention(q, k, v[..., :1])
        used = allocations(lambda: F.scaled_dot_product_attention(q, k, v))
    probabilities = heads * nq * t_len * 4
    assert used.peak < probabilities
    want = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)[..., pos].sum(dim=-1)
    assert torch.allclose(used.result[..., 0], want, atol=1e-5, rtol=0)
