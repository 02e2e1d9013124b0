"""SEGA Concept's mask_from on SD3 and Wan, whose maps come through ComfyUI's optimized_attention_override.

No reference exists for these families, so the tests show:
- the mask is finite, has the latent's size (a video's mask is the same on every frame), keeps about
  1 - threshold of the positions, and attention / intersect change the image;
- a constructed case where the answer is known: the concept row's image tokens in one quarter attend
  to the concept's text, the mask is that quarter (Wan: averaged over the frames);
- mask_from implicit installs nothing and leaves the image bit for bit; with the capture at work the
  model's predictions of every row are bit for bit those of the implicit run;
- an override already on the model (another pack's) is chained: it is still called and still acts,
  also when it is set after SEGA's; SEGA's override returns the attention result unchanged;
- SEGA KSampler, SEGA Guider and the photo-edit nodes work with it.
"""
from __future__ import annotations

import comfy_host

comfy_host.prepare_host()
import pytest
import torch

import comfy.samplers

from families import FAMILIES, one_thread  # noqa: F401  (fixture)
from harness.pack import concept_chain, node_output, pack_module
from sega_testlib import sample

pytestmark = pytest.mark.usefixtures("one_thread")
OVERRIDE = "optimized_attention_override"
LATENTS = {"sd3": (1, 16, 16, 16), "wan": (1, 16, 2, 16, 16)}  # maps: 8x8 (Wan: 2 frames of 8x8)
WORDS, TOKENS = 5, 16  # Wan's prompts: 5 tokens, zero padding to 16 (ComfyUI's UMT5 zeroes its padding)
_MODELS = {}


def model_of(family: str):
    if family not in _MODELS:
        _MODELS[family] = FAMILIES[family].build()
    return _MODELS[family]


def text(family: str, seed: int, batch: int = 1):
    """A conditioning for the family's tiny model, scaled up so that tiny random weights attend
    unevenly; Wan's is padded with zeros after its prompt tokens, as ComfyUI's UMT5 encoder gives it."""
    if family == "wan":
        e = 8.0 * torch.randn(batch, TOKENS, 32, generator=torch.Generator().manual_seed(seed))
        e[:, WORDS:] = 0.0
        return [[e, {}]]
    c = FAMILIES[family].cond(seed, batch)
    return [[c[0][0] * 8.0, dict(c[0][1])]]


def concepts_of(conds: dict, settings: list):
    return concept_chain(conds, settings, warmup=0)


def apply(family: str, settings: list, model=None, log=None):
    concepts = concepts_of({"c1": text(family, 3), "c2": text(family, 4)}, settings)
    return pack_module("nodes.patch").apply_sega(model or model_of(family), concepts, 0.0, 0.4, log_to=log)


def run(family: str, model, steps: int = 3, batch: int = 1):
    fam = FAMILIES[family]
    latent = torch.zeros(batch, *LATENTS[family][1:])
    return sample(model, text(family, 1, batch), text(family, 2, batch), steps=steps, cfg=fam.cfg, latent=latent)


def override_of(model):
    return model.model_options.get("transformer_options", {}).get(OVERRIDE)


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_samples_with_attention_masks(family):
    """mask_from attention: a finite image, a mask of the latent's size, the same in every channel (and
    frame), binary per step, keeping about 1 - threshold; intersect keeps less; both change the image."""
    am = pack_module("nodes.attention_override")
    patch = pack_module("nodes.patch")
    masks, images = {}, {}
    for mode in ("implicit", "attention", "intersect"):
        log = patch.RunLog()
        m = apply(family, [("c1", {"mask_from": mode, "threshold": 0.75})], log=log)
        assert isinstance(override_of(m), am.ObservingOverride) == (mode != "implicit")
        images[mode] = run(family, m)
        masks[mode] = log.watches[0].sums[0] / log.watches[0].counts[0]
        assert torch.isfinite(images[mode]).all()
    att = masks["attention"]
    assert att.shape == (1, *LATENTS[family][-2:]) and torch.isfinite(att).all()
    assert torch.allclose(att * 3, (att * 3).round(), atol=1e-5) and 0.2 <= float(att.mean()) <= 0.3
    assert float(masks["intersect"].mean()) < float(att.mean())
    for mode in ("attention", "intersect"):
        assert (images[mode] - images["implicit"]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_the_mask_used_is_the_maps_mask_on_every_frame(family):
    """The mask a step multiplies the edit with is M1 of the captured map, (B, 1, H, W), and (B, 1, 1,
    H, W) for a video: the same on every frame and channel."""
    am = pack_module("nodes.attention_masks")
    patch = pack_module("nodes.patch")
    seen = []
    real = am.masks_for

    def spy(maps, needed, plan, x, where):
        out = real(maps, needed, plan, x, where)
        seen.append((maps[needed[0]].clone(), out[needed[0]], x.shape))
        return out

    m = apply(family, [("c1", {"mask_from": "attention", "threshold": 0.75})])
    patch.attention_masks.masks_for = spy
    try:
        run(family, m, steps=2)
    finally:
        patch.attention_masks.masks_for = real
    assert len(seen) == 2
    for attn, mask, shape in seen:
        assert attn.shape == (1, 8, 8) and torch.isfinite(attn).all() and float(attn.std()) > 0
        want = pack_module("sega_core.attention").attention_mask(attn, 0.75, shape[-2:])
        assert mask.shape == ((1, 1, 1, 16, 16) if len(shape) == 5 else (1, 1, 16, 16))
        assert torch.equal(mask.reshape(want.shape), want)


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_implicit_is_bit_identical_and_installs_nothing(family):
    """mask_from implicit (or absent, as saved workflows have it): no override is installed and the image
    is the same bit for bit."""
    absent = apply(family, [("c1", {"threshold": 0.7}), ("c2", {"direction": "remove"})])
    implicit = apply(family, [("c1", {"threshold": 0.7, "mask_from": "implicit"}),
                              ("c2", {"direction": "remove", "mask_from": "implicit"})])
    assert override_of(absent) is None and override_of(implicit) is None
    a = run(family, absent)
    assert torch.equal(a, run(family, implicit))
    assert (a - run(family, model_of(family))).abs().max() > 1e-3  # SEGA edits


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_the_capture_leaves_the_predictions_bit_for_bit(family):
    """At the first step every run sees the same latent: with the capture at work the model's predictions
    of every row (positive, negative, two concepts) are exactly those of the implicit run."""
    from sega_testlib import Recorder

    def first(settings):
        rec = Recorder()
        run(family, rec.attach(apply(family, settings)), steps=2)
        return rec.calls[0]["out"]

    implicit = first([("c1", {}), ("c2", {})])
    captured = first([("c1", {"mask_from": "attention"}), ("c2", {"mask_from": "intersect"})])
    assert len(implicit) == len(captured) == 4
    for a, b in zip(implicit, captured):
        assert torch.equal(a, b)


def _directions(d: int):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    a = a / a.norm()
    b = b - (b @ a) * a
    return a, b / b.norm()


def attention_result(q, k, v, heads, **kwargs):
    """The function an override is given: plain attention (the test's stand-in for ComfyUI's kernel)."""
    b, n, inner = q.shape
    d = inner // heads
    qh, kh, vh = (t.view(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1)
    return (p @ vh).transpose(1, 2).reshape(b, n, inner)


def test_sd3_mask_lands_where_the_text_is_attended():
    """A constructed joint-attention call [text, image] (heads 2, a 8x8 latent: 4x4 image tokens): the
    concept row's image tokens in the top-left quarter query the text keys, the rest the image keys;
    the other row the opposite. The override captures only the concept row, its mask is that quarter,
    and the call's result is the function's, unchanged. An image-only call (SD3.5's second attention)
    is left out."""
    am = pack_module("nodes.attention_masks")
    ov = pack_module("nodes.attention_override")
    from sega_core.attention import attention_mask

    model = model_of("sd3")
    capture = am.AttentionCapture(model.model.diffusion_model, model.model)
    heads, d, txt, side = 2, 8, 5, 4
    a, b = _directions(d)
    n = side * side
    grid = torch.zeros(side, side, dtype=torch.bool)
    grid[:2, :2] = True
    k = torch.zeros(2, txt + n, heads, d)
    k[:, :txt], k[:, txt:] = 8.0 * a, 8.0 * b
    q = torch.zeros(2, txt + n, heads, d)
    q[1, txt:][grid.flatten()], q[1, txt:][~grid.flatten()] = 8.0 * a, 8.0 * b  # concept row (cond index 2)
    q[0, txt:][grid.flatten()], q[0, txt:][~grid.flatten()] = 8.0 * b, 8.0 * a
    q, k = q.flatten(2), k.flatten(2)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(1))
    opts = {"cond_or_uncond": [0, 2], am.ATTN_KEY: capture}
    override = ov.ObservingOverride()
    capture.begin({2: 0}, (8, 8))
    out = override(attention_result, q, k, v, heads=heads, transformer_options=opts)
    assert torch.equal(out, attention_result(q, k, v, heads))
    override(attention_result, q[:, txt:], k[:, txt:], v[:, txt:], heads=heads, transformer_options=opts)
    maps = capture.end()
    assert capture.layers_seen == 1 and maps[0].shape == (1, side, side)
    assert maps[0][0][grid].min() > 0.9 > 0.1 > maps[0][0][~grid].max()
    mask = attention_mask(maps[0], 0.75, (8, 8))[0, 0]
    assert torch.equal(mask, grid.repeat_interleave(2, 0).repeat_interleave(2, 1))


def wan_i2v():
    """A tiny Wan 2.1 image-to-video model (its blocks' cross-attention also attends to CLIP image tokens)."""
    import comfy.supported_models

    cfg = {"image_model": "wan2.1", "model_type": "i2v", "patch_size": (1, 2, 2), "text_len": 16, "in_dim": 36,
           "dim": 32, "ffn_dim": 64, "freq_dim": 32, "text_dim": 32, "out_dim": 16, "num_heads": 2,
           "num_layers": 1, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
           "dtype": torch.float32}
    from harness.tiny import patcher

    return patcher(comfy.supported_models.WAN21_I2V(cfg).get_model({}))


@pytest.mark.parametrize("grid,kind", [(True, "t2v"), (False, "t2v"), (True, "i2v")])
def test_wan_mask_lands_where_the_prompt_is_attended(grid, kind):
    """A constructed Wan block (heads 2, 2 frames of a 8x8 latent: 2x4x4 image tokens, 6 text positions:
    3 prompt tokens, 3 zero-padding ones with one key): first the block's self-attention (left out),
    then its cross-attention. The concept row's tokens of the top-left quarter query the prompt's keys on
    both frames, those of the top-right quarter on frame 0 only; every other token the padding's. The
    map is 1, 1/2 and 0 there (the mean over frames), the other row is not taken, and the mask is the
    top-left quarter; each call returns the function's result unchanged. Without grid_sizes in the
    transformer_options (ComfyUI v0.8.0 sets none) the frames come from the token count. On an
    image-to-video block the call between the two, to the CLIP image tokens, is left out too."""
    am = pack_module("nodes.attention_masks")
    ov = pack_module("nodes.attention_override")
    from sega_core.attention import attention_mask

    model = model_of("wan") if kind == "t2v" else wan_i2v()
    dm = model.model.diffusion_model
    capture = am.AttentionCapture(dm, model.model)
    heads, d, frames, side, words, pad = 2, 8, 2, 4, 3, 3
    a, b = _directions(d)
    n = frames * side * side
    keys = torch.zeros(2, words + pad, heads, d)
    keys[:, :words] = 8.0 * a + 0.5 * torch.randn(words, 1, d, generator=torch.Generator().manual_seed(2))
    keys[:, words:] = 8.0 * b  # the padding: one key
    tl = torch.zeros(side, side, dtype=torch.bool)
    tl[:2, :2] = True
    tr = torch.zeros(side, side, dtype=torch.bool)
    tr[:2, 2:] = True
    looks = torch.stack([tl | tr, tl]).flatten()  # (frames * side * side,): the tokens that query the prompt
    q = torch.zeros(2, n, heads, d)
    q[1][looks], q[1][~looks] = 30.0 * a, 30.0 * b
    q[0][looks], q[0][~looks] = 30.0 * b, 30.0 * a
    q, keys = q.flatten(2), keys.flatten(2)
    v = torch.randn(keys.shape, generator=torch.Generator().manual_seed(1))
    opts = {"cond_or_uncond": [0, 2], "block_index": 0, am.ATTN_KEY: capture}
    if grid:
        opts["grid_sizes"] = (frames, side, side)
    override = ov.ObservingOverride()
    capture.begin({2: 0}, (8, 8))
    assert torch.equal(override(attention_result, q, q, q, heads=heads, transformer_options=opts),
                       attention_result(q, q, q, heads))  # the self-attention
    if kind == "i2v":  # the image tokens' attention to the CLIP image embedding (here: the prompt's keys)
        override(attention_result, q, keys, v, heads=heads, transformer_options=opts, low_precision_attention=False)
    assert capture.layers_seen == 0
    assert torch.equal(override(attention_result, q, keys, v, heads=heads, transformer_options=opts),
                       attention_result(q, keys, v, heads))  # the cross-attention
    maps = capture.end()
    assert capture.layers_seen == 1 and maps[0].shape == (1, side, side)
    m = maps[0][0]
    assert m[tl].min() > 0.95 and (m[tr] - 0.5).abs().max() < 0.05 and m[~(tl | tr)].max() < 0.05
    mask = attention_mask(maps[0], 0.75, (8, 8))[0, 0]
    assert torch.equal(mask, tl.repeat_interleave(2, 0).repeat_interleave(2, 1))


def throwaway_override(calls: list):
    """Another pack's optimized_attention_override: counts its calls in `calls` and scales the attention
    result by 1.5 (a function, so that model clones share it)."""

    def override(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs) * 1.5

    return override


@pytest.mark.parametrize("family", ["sd3", "wan"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_another_override_keeps_acting(family, when):
    """Another pack's override set on the model before SEGA (chained at apply) or after it (chained when
    the run starts): it is still called and still changes the image, SEGA still makes its masks, and
    SEGA still edits."""
    patch = pack_module("nodes.patch")
    settings = [("c1", {"mask_from": "attention", "threshold": 0.75})]

    def sampled(sega=True, throwaway=None):
        m = model_of(family).clone()
        if throwaway is not None and when == "before":
            m.model_options.setdefault("transformer_options", {})[OVERRIDE] = throwaway
        log = patch.RunLog()
        if sega:
            m = apply(family, settings, model=m, log=log)
        if throwaway is not None and when == "after":
            m = m.clone()
            m.model_options.setdefault("transformer_options", {})[OVERRIDE] = throwaway
        return run(family, m), log

    calls = []
    everything, log = sampled(throwaway=throwaway_override(calls))
    assert calls
    watch = log.watches[0]
    assert watch.counts[0] == 3 and 0.2 <= float((watch.sums[0] / 3).mean()) <= 0.3  # SEGA's masks were made
    assert (everything - sampled()[0]).abs().max() > 1e-3  # the other override acts
    assert (everything - sampled(sega=False, throwaway=throwaway_override([]))[0]).abs().max() > 1e-3  # SEGA acts


def test_the_override_chains_and_leaves_results_unchanged():
    """SEGA's override calls the earlier one exactly as ComfyUI would (same function, same arguments) and
    returns its result unchanged; installing twice chains once; a container path is kept."""
    ov = pack_module("nodes.attention_override")
    seen = []

    def earlier(func, *args, **kwargs):
        seen.append((func, args, kwargs))
        return ("result", func(*args, **kwargs))

    earlier.container_function = lambda *args, **kwargs: "containers"
    options = {"transformer_options": {OVERRIDE: earlier}}
    ov.chained(options)
    ov.chained(options)
    override = options["transformer_options"][OVERRIDE]
    assert isinstance(override, ov.ObservingOverride) and override.previous is earlier
    assert override.container_function is earlier.container_function
    q = torch.randn(1, 4, 8)
    out = override(attention_result, q, q, q, heads=2, transformer_options={"cond_or_uncond": [0]})
    assert out[0] == "result" and torch.equal(out[1], attention_result(q, q, q, 2))
    assert seen[0][0] is attention_result and seen[0][1][0] is q and seen[0][2]["heads"] == 2
    assert not hasattr(ov.ObservingOverride(), "container_function")


def test_sega_ksampler_and_guider_nodes():
    """SEGA KSampler on Wan (its concept_masks output has the latent's size) and SEGA Guider on SD3 run
    with mask_from attention, and the masks change their images against implicit."""
    nodes = pack_module("nodes.sampling_nodes")
    images = {}
    for mode in ("implicit", "attention"):
        concepts = concepts_of({"c1": text("wan", 3)}, [("c1", {"mask_from": mode, "threshold": 0.75})])
        out = nodes.SEGAKSampler.execute(model_of("wan"), 0, 3, 5.0, "euler", "normal", text("wan", 1),
                                         text("wan", 2), {"samples": torch.zeros(LATENTS["wan"])}, 1.0, 0.0, 0.4,
                                         concepts=concepts)
        latent, masks = out.result[0], out.result[1]
        assert masks.shape[-2:] == (128, 128) and torch.isfinite(masks).all()
        images[("wan", mode)] = latent["samples"]
        concepts = concepts_of({"c1": text("sd3", 3)}, [("c1", {"mask_from": mode, "threshold": 0.75})])
        guider = nodes.SEGAGuider.execute(model_of("sd3"), text("sd3", 1), text("sd3", 2), 5.0, 0.0, 0.4,
                                          concepts=concepts).result[0]
        sigmas = comfy.samplers.calculate_sigmas(model_of("sd3").get_model_object("model_sampling"), "simple", 3)
        noise = torch.randn(LATENTS["sd3"], generator=torch.Generator().manual_seed(0))
        images[("sd3", mode)] = guider.sample(noise, torch.zeros(LATENTS["sd3"]),
                                              comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                                              disable_pbar=True)
    for family in ("wan", "sd3"):
        assert torch.isfinite(images[(family, "attention")]).all()
        assert (images[(family, "attention")] - images[(family, "implicit")]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_photo_edit_with_attention_masks(family):
    """SEGA Invert Photo + SEGA Photo Edit (the photo guider's capture): each step's mask is the
    attention mask (binary per step, about 1 - threshold kept), and the edit differs from implicit."""
    photo = pack_module("nodes.photo_edit")
    invert = pack_module("nodes.photo_invert").SEGAInvertPhoto
    x0 = torch.randn(LATENTS[family], generator=torch.Generator().manual_seed(5))
    inv = node_output(invert.execute(model=model_of(family), latent={"samples": x0}, uncond=text(family, 1),
                                     steps=4, skip=0.15, seed=3, source=None, source_guidance=3.5))
    out = {}
    for mode in ("implicit", "attention"):
        guiders = []
        concepts = concepts_of({"c1": text(family, 3)}, [("c1", {"mask_from": mode, "threshold": 0.75})])
        out[mode] = photo.photo_edit(model_of(family), inv, concepts, "ledits", "exact", guider_out=guiders)["samples"]
        watch = guiders[0].watch
    mean, n = watch.sums[0] / watch.counts[0], watch.counts[0]
    assert n == 4 and torch.allclose(mean * n, (mean * n).round(), atol=1e-5) and 0.2 <= float(mean.mean()) <= 0.3
    assert torch.isfinite(out["attention"]).all() and (out["attention"] - out["implicit"]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_one_captured_call_stays_below_one_latent(family):
    """Full-size shapes through the capture of the tiny models (it reads the call's q and k, and the
    model's patch and output channels): one SD3 joint call at 1024 px (a 16x128x128 latent: 4096 image
    tokens after 154 text tokens, 24 heads of 64) and one Wan cross-attention call at 480p (a
    16x5x60x104 latent: 5x30x52 image tokens, 512 text tokens of which 20 are the prompt's, 12 heads
    of 128), for one concept row. Its CPU allocations during the call (harness.memory) peak below one
    float32 latent, where the probabilities at once take 1,594 (SD3) and 96 (Wan) latents; the map is
    the softmax summed over the text positions, computed head by head (within 1e-5)."""
    from harness.memory import allocations

    am = pack_module("nodes.attention_masks")
    ov = pack_module("nodes.attention_override")
    model = model_of(family)
    gen = torch.Generator().manual_seed(0)
    capture = am.AttentionCapture(model.model.diffusion_model, model.model)
    opts = {"cond_or_uncond": [2], am.ATTN_KEY: capture}
    if family == "sd3":
        heads, d, side, frames, txt = 24, 64, 128, 1, 154
        n = (side // 2) ** 2
        q = torch.randn(1, txt + n, heads * d, generator=gen)
        k = torch.randn(1, txt + n, heads * d, generator=gen)
        capture.begin({2: 0}, (side, side))
        capture.positions(txt, q.device, clip=False)  # made once per run: not the call's
        latent_bytes = 16 * side * side * 4
        queries, text = q[:, txt:], torch.arange(txt)
    else:
        heads, d, frames, (h, w), words = 12, 128, 5, (60, 104), 20
        n = frames * (h // 2) * (w // 2)
        q = torch.randn(1, n, heads * d, generator=gen)
        k = torch.randn(1, 512, heads * d, generator=gen)
        k[:, words:] = k[:, -1:]  # the prompt's padding: one key
        opts.update(block_index=0, grid_sizes=(frames, h // 2, w // 2))
        capture.begin({2: 0}, (h, w))
        ov.observe(capture, (q, q, q), {"heads": heads, "transformer_options": opts})  # the self-attention
        latent_bytes = 16 * frames * h * w * 4
        queries, text = q, torch.arange(words)
        ov._prompt_positions(capture, 0, 0, k[0])  # found once per run: not the call's
    used = allocations(lambda: ov.observe(capture, (q, k, k), {"heads": heads, "transformer_options": opts}))
    assert capture.layers_seen == 1
    print(f"{family}: peak {used.peak:,} B = {used.peak / latent_bytes:.2f} latent")
    assert used.peak < latent_bytes, used.peak / latent_bytes
    assert heads * n * k.shape[1] * 4 > 90 * latent_bytes  # the probabilities at once
    got = capture.end()[0].flatten() * heads * frames
    want = torch.zeros(n)
    qh, kh = queries[0].view(n, heads, d), k[0].view(-1, heads, d)
    for i in range(heads):
        want += torch.softmax(qh[:, i] @ kh[:, i].t() / d ** 0.5, dim=-1)[:, text].sum(dim=-1)
    want = want.view(frames, -1).sum(dim=0)
    assert torch.allclose(got, want, atol=1e-5 * frames, rtol=0)


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_each_image_of_a_batch_gets_its_own_mask(family):
    """A batch of two latents (different noise, the same prompts): each image's mask comes from its own
    map; the two differ, and the first equals the mask of that image sampled alone."""
    import comfy.sample

    patch = pack_module("nodes.patch")
    concepts = concepts_of({"c1": text(family, 3)}, [("c1", {"mask_from": "attention", "threshold": 0.75})])

    def masks(batch):
        log = patch.RunLog()
        m = patch.apply_sega(model_of(family), concepts, 0.0, 0.4, log_to=log)
        latent = torch.zeros(batch, *LATENTS[family][1:])
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4))  # image 0 alike in both
        comfy.sample.sample(m, noise, 2, 5.0, "euler", "normal", text(family, 1), text(family, 2), latent,
                            disable_pbar=True, seed=0)  # one prompt for every image
        return log.watches[0].sums[0] / log.watches[0].counts[0]

    both = masks(2)
    assert both.shape == (2, 16, 16) and not torch.equal(both[0], both[1])
    assert torch.equal(masks(1)[0], both[0])
