"""SEGA Concept's mask_from: LEDITS++'s cross-attention masks inside a real ComfyUI.

- equal to diffusers' LEDITS++ pipeline (use_cross_attn_mask, use_intersect_mask) on one set of
  UNet weights run by both (harness.shared_unet, with a level at a quarter of the latent: the
  layers LEDITS++ takes its maps from): the concepts' masks and the edited latents;
- `implicit` leaves every image bit for bit as it was (no attention patch is even installed);
- the mask lands where the concept's tokens are attended (a constructed case);
- it composes with PAG and another pack's attn2 patch: every patch keeps acting.
"""
from __future__ import annotations

import comfy_host

comfy_host.prepare_host()
import pytest
import torch

from families import one_thread  # noqa: F401  (fixture)
from harness.pack import concept_chain, node_output, pack_module
from harness.tiny import TINY_MASK_UNET
from sega_testlib import sample

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5  # float32
# the tiny SD1.5 UNet with three levels; cross-attention only on the deepest, a quarter of the latent
# (the browser tests' sega-tiny-sd15-mask checkpoint has the same layout)
MASK_UNET = TINY_MASK_UNET
SIZE = 32  # latent side: 8x8 attention maps
STEPS, SKIP, SEED = 6, 0.15, 3


def clip_like(gen, n: int = 77, width: int = 768, start=None):
    """An embedding shaped like CLIP's: a large start-of-text vector shared by every prompt (it
    draws most of the attention), then the prompt's own tokens."""
    e = torch.randn(n, width, generator=gen)
    e[0] = start
    return e


@pytest.fixture(scope="module")
def shared():
    from harness.shared_unet import shared_unet

    return shared_unet(unet_config=MASK_UNET)


@pytest.fixture(scope="module")
def embeddings():
    gen = torch.Generator().manual_seed(11)
    start = 4.0 * torch.randn(768, generator=gen)
    return {t: clip_like(gen, start=start) for t in ("", "glasses", "a hat")}


def concepts_of(conds: dict, settings: list):
    return concept_chain(conds, settings, warmup=0)


def pack_edit(model, conds, x0, settings, combination="ledits"):
    """SEGA Invert Photo + SEGA Photo Edit (LEDITS++ combination, diffusers' reconstruction): the
    edited latent (diffusers' scaling) and the PhotoGuider (its MaskWatch holds the masks used)."""
    from harness import ledits_shared as ref

    inv = node_output(pack_module("nodes.photo_invert").SEGAInvertPhoto.execute(
        model=model, latent={"samples": x0 / ref.SCALING_FACTOR}, uncond=conds[""], steps=STEPS, skip=SKIP,
        seed=SEED, source=None, source_guidance=3.5))
    guiders = []
    out = pack_module("nodes.photo_edit").photo_edit(model, inv, concepts_of(conds, settings), combination,
                                                     "as diffusers", guider_out=guiders)
    return out["samples"] * ref.SCALING_FACTOR, guiders[0]


class ClipTokenizer:
    """Like CLIPTokenizer with padding="max_length": every prompt reports length 77, so diffusers sums
    the 75 positions after the start token (LEDITS.md, M1)."""

    def __init__(self, inner):
        self.inner = inner
        self.model_max_length = inner.model_max_length
        self.added_tokens_encoder = {}

    def tokenize(self, text):
        return self.inner.tokenize(text)

    def __call__(self, texts, **kwargs):
        out = self.inner(texts, **kwargs)
        out.length = torch.full_like(out.length, 77)
        return out


def diffusers_edit(shared, embeddings, x0, settings, cross: bool, intersect: bool):
    import warnings

    from harness import ledits_shared as ref

    pipe = ref.ledits_pipeline(shared.diffusers, embeddings)
    pipe.tokenizer = ClipTokenizer(pipe.tokenizer)
    ref.invert(pipe, x0, STEPS, SKIP, SEED)
    kw = dict(editing_prompt=[t for t, _ in settings],
              reverse_editing_direction=[s.get("direction") == "remove" for _, s in settings],
              edit_guidance_scale=[s.get("edit_scale", 5.0) for _, s in settings],
              edit_warmup_steps=[0] * len(settings), edit_cooldown_steps=[ref.NEVER] * len(settings),
              edit_threshold=[s.get("threshold", 0.9) for _, s in settings])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(output_type="latent", use_cross_attn_mask=cross, use_intersect_mask=intersect,
                   return_dict=False, **kw)
    return out[0], pipe.activation_mask, [int(t) for t in pipe.inversion_steps]


@pytest.mark.parametrize("mode", ["attention", "intersect"])
def test_equal_to_diffusers_ledits(shared, embeddings, mode):
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, 4, SIZE, SIZE, generator=gen)
    conds = {t: [[e.unsqueeze(0), {}]] for t, e in embeddings.items()}
    settings = [("glasses", {"mask_from": mode, "threshold": 0.8}),
                ("a hat", {"mask_from": mode, "threshold": 0.9, "direction": "remove", "edit_scale": 3.0})]
    ours, guider = pack_edit(shared.comfy, conds, x0, settings)
    theirs, activation, timesteps = diffusers_edit(shared, embeddings, x0, settings, cross=True,
                                                   intersect=mode == "intersect")
    if mode == "intersect":
        assert any(t > 800 for t in timesteps) and any(t <= 800 for t in timesteps)  # both rules run
    # the masks each concept used, averaged over its steps (every step: warm-up 0, no cool-down)
    for c in range(len(settings)):
        want = activation[:, c, :, 0].float().mean(0)  # (B, H, W)
        got = guider.watch.sums[c] / guider.watch.counts[c]
        assert guider.watch.counts[c] == STEPS
        assert torch.allclose(got.float(), want, atol=1e-6), f"concept {c}: masks differ"
        assert 0.0 < float(want.mean()) < 0.5  # a real mask, not everything
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"edited latents differ by {diff:.2e}"
    # and it is not the implicit edit
    plain, _ = pack_edit(shared.comfy, conds, x0, [(t, {k: v for k, v in s.items() if k != "mask_from"})
                                                   for t, s in settings])
    assert (plain - ours).abs().max() > 1e-3


# -- inside ComfyUI's sampler: implicit unchanged, the capture leaves the model alone, composition --

@pytest.fixture(scope="module")
def pag_model():
    return build_pag_model()


def build_pag_model():
    """The three-level tiny SD1.5 with a middle-block transformer too (where PAG acts)."""
    import comfy.supported_models

    from harness.tiny import init_weights, patcher, unet_config

    cfg = unet_config(comfy.supported_models.SD15, **{k: MASK_UNET[k] for k in (
        "num_res_blocks", "channel_mult", "transformer_depth", "transformer_depth_output")},
        transformer_depth_middle=1, num_classes=None, adm_in_channels=None)
    model = comfy.supported_models.SD15(cfg).get_model({})
    init_weights(model, 2, 0.05, norms_at_one=True)
    return patcher(model)


def start_like():
    gen = torch.Generator().manual_seed(11)
    return 4.0 * torch.randn(768, generator=gen)


def text(seed: int):
    return [[clip_like(torch.Generator().manual_seed(seed), start=start_like()).unsqueeze(0), {}]]


POS, NEG, C1, C2 = (text(s) for s in (21, 22, 23, 24))


def apply(model, settings):
    concepts = concepts_of({"c1": C1, "c2": C2}, settings)
    return pack_module("nodes.patch").apply_sega(model, concepts, 0.0, 0.4)


def attn2_patches(model):
    return model.model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", [])


def test_implicit_is_bit_identical_and_installs_nothing(pag_model):
    """mask_from implicit (or absent, as in saved workflows) samples exactly as before: no attention
    patch is installed and the image is the same bit for bit."""
    absent = apply(pag_model, [("c1", {"threshold": 0.7}), ("c2", {"direction": "remove"})])
    implicit = apply(pag_model, [("c1", {"threshold": 0.7, "mask_from": "implicit"}),
                                 ("c2", {"direction": "remove", "mask_from": "implicit"})])
    assert attn2_patches(absent) == [] and attn2_patches(implicit) == []
    a = sample(absent, POS, NEG, steps=4, size=16)
    assert torch.equal(a, sample(implicit, POS, NEG, steps=4, size=16))
    plain = sample(pag_model, POS, NEG, steps=4, size=16)
    assert (a - plain).abs().max() > 1e-3  # SEGA edits
    attention = apply(pag_model, [("c1", {"threshold": 0.7, "mask_from": "attention"})])
    assert len(attn2_patches(attention)) == 1


def first_predictions(model, settings):
    """The first evaluation's predictions of every row (positive, negative, concepts), recorded by a
    CALC_COND_BATCH wrapper inside SEGA's."""
    from sega_testlib import Recorder

    rec = Recorder()
    sample(rec.attach(apply(model, settings)), POS, NEG, steps=2, size=16)
    return rec.calls[0]["out"]


def test_the_capture_leaves_the_predictions_bit_for_bit(pag_model):
    """At the first step every run sees the same latent: with the attention capture at work the model's
    predictions of all rows are exactly those of the implicit run."""
    implicit = first_predictions(pag_model, [("c1", {}), ("c2", {})])
    captured = first_predictions(pag_model, [("c1", {"mask_from": "attention"}), ("c2", {"mask_from": "intersect"})])
    assert len(implicit) == len(captured) == 4
    for a, b in zip(implicit, captured):
        assert torch.equal(a, b)


def test_concept_masks_output_shows_the_attention_mask(pag_model):
    """SEGA KSampler's concept_masks: with mask_from attention, what the concept's attention map keeps
    (the same in every channel, about 1 - threshold of the positions), not SEGA's per-channel threshold."""
    patch = pack_module("nodes.patch")
    masks = {}
    for mode in ("implicit", "attention"):
        log = patch.RunLog()
        concepts = concepts_of({"c1": C1}, [("c1", {"threshold": 0.75, "mask_from": mode})])
        m = patch.apply_sega(pag_model, concepts, 0.0, 0.4, log_to=log)
        sample(m, POS, NEG, steps=3, size=16)
        watch = log.watches[0]
        masks[mode] = watch.sums[0] / watch.counts[0]
    att = masks["attention"]
    # binary per step and the same in every channel: each position kept in 0, 1, 2 or 3 of 3 steps
    assert torch.allclose(att * 3, (att * 3).round(), atol=1e-5)
    assert 0.15 <= float(att.mean()) <= 0.35
    assert not torch.equal(att, masks["implicit"])


def test_the_mask_lands_where_the_concept_tokens_are_attended(shared):
    """A constructed case at one real cross-attention layer of the model: the concept row's pixels in
    the top-left quarter have hidden states whose query matches the keys of the concept's word tokens
    (solved through the layer's own to_k), the uncond and positive rows attend to the bottom-right.
    The capture takes only the concept row, and its mask is the top-left quarter."""
    am = pack_module("nodes.attention_masks")
    from sega_core.attention import attention_mask

    dm = shared.comfy.model.diffusion_model
    capture = am.AttentionCapture(dm)
    opts = {"block": ("input", 5), "block_index": 0, "cond_or_uncond": [0, 1, 2], "original_shape": [3, 4, 32, 32],
            am.ATTN_KEY: capture}
    attn = capture.layer(opts)
    assert attn is not None, "no cross-attention in input block 5"
    opts["n_heads"] = attn.heads
    gen = torch.Generator().manual_seed(0)
    width = attn.to_q.in_features

    def token_for(hidden, logit):
        """A context token whose key meets the query of `hidden` with this dot product (spread over the
        heads, each head's share positive), solved through the layer's own to_k."""
        q = attn.to_q(hidden)
        key = logit * q / q.norm() ** 2
        return torch.linalg.lstsq(attn.to_k.weight.detach(), key.unsqueeze(1)).solution.squeeze(1)

    with torch.no_grad():
        u, v = torch.randn(width, generator=gen), torch.randn(width, generator=gen)
        ctx = torch.zeros(3, 77, attn.to_k.in_features)
        ctx[:, 0] = token_for(u, 1500.0)  # the start token: every pixel attends to it (as in CLIP)
        ctx[:, 1:3] = token_for(v, 4000.0)  # the concept's two word tokens
        n = u + 0.1 * torch.randn(3, 64, width, generator=gen)
    grid = torch.zeros(8, 8, dtype=torch.bool)
    grid[:4, :4] = True
    n[2, grid.flatten()] += v  # the concept row: top-left attends to the word tokens
    n[:2, (~grid).flatten().nonzero()[-16:].squeeze(1)] += v  # uncond and positive: elsewhere
    capture.begin({2: 0})
    out = am.attention_patch(n, ctx, ctx, opts)
    assert out[0] is n and out[1] is ctx and out[2] is ctx  # inputs handed on unchanged
    maps = capture.end()
    assert list(maps) == [0] and maps[0].shape == (1, 8, 8)
    assert maps[0][0][grid].min() > 0.5 > maps[0][0][~grid].max()  # most attention on the words there
    mask = attention_mask(maps[0], 0.75, (32, 32))[0, 0]
    want = grid.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(mask, want)
    # a layer of another resolution, the middle block, or no waiting capture: nothing is taken
    capture.begin({2: 0})
    am.attention_patch(n[:, :16], ctx, ctx, opts)
    am.attention_patch(n, ctx, ctx, dict(opts, block=("middle", 0)))
    assert capture.end() == {}
    am.attention_patch(n, ctx, ctx, opts)  # not waiting: ignored
    assert capture.end() == {}


def throwaway_attn2(calls: list):
    """Another pack's attn2 patch: scales the cross-attention context and counts its calls in `calls`
    (a function, so that ComfyUI versions that deep-copy model options while cloning keep calling
    this one)."""

    def patch(n, context, value, extra_options):
        calls.append(1)
        return n, context * 1.5, value * 1.5

    return patch


def test_works_with_pag_and_another_attn2_patch(pag_model):
    """SEGA with attention masks, PAG and a throwaway attn2 patch on one model: PAG still changes the
    image, the throwaway patch is still called and changes it, and SEGA still captures its maps
    and edits."""
    import importlib

    pag = importlib.import_module("comfy_extras.nodes_pag").PerturbedAttentionGuidance
    settings = [("c1", {"mask_from": "intersect", "threshold": 0.8})]

    def run(sega=True, with_pag=True, throwaway=None):
        m = pag_model.clone()
        if throwaway is not None:
            m.set_model_attn2_patch(throwaway)
        if with_pag:
            m = node_output(pag.execute(m, 3.0))
        if sega:
            m = apply(m, settings)
        log = pack_module("nodes.patch").RunLog()
        if sega:  # the same patch again, with a RunLog to read the masks used
            m = pack_module("nodes.patch").apply_sega(m, concepts_of({"c1": C1}, settings), 0.0, 0.4, log_to=log)
        return sample(m, POS, NEG, steps=3, size=16), log

    calls = []
    everything, log = run(throwaway=throwaway_attn2(calls))
    assert calls
    watch = log.watches[0]
    assert watch.counts[0] == 3 and 0 < float((watch.sums[0] / 3).mean()) < 0.5  # SEGA's masks were made
    assert (everything - run(throwaway=throwaway_attn2([]), with_pag=False)[0]).abs().max() > 1e-3  # PAG acts
    assert (everything - run(throwaway=None)[0]).abs().max() > 1e-3  # the throwaway patch acts
    assert (everything - run(sega=False, throwaway=throwaway_attn2([]))[0]).abs().max() > 1e-3  # SEGA acts


def test_a_model_without_the_layers_is_a_clear_error():
    """A UNet with no cross-attention at a quarter of the latent (here: one level, at full size) has no
    map to give: a SEGAError names the concept and mask_from, instead of a silent implicit mask."""
    from sega_testlib import tiny_sd15_model

    model = tiny_sd15_model()
    errors = pack_module("nodes.errors")
    m = apply(model, [("c1", {"mask_from": "attention"})])
    with pytest.raises(errors.SEGAError, match=r"SEGA Concept 'c1'.*mask_from 'attention'.*quarter"):
        sample(m, POS, NEG, steps=2, size=16)


def test_intersect_rule_follows_the_family(shared):
    """diffusers' LEDITS++ on SD intersects only at timesteps t <= 800 (the attention mask alone above);
    its SDXL pipeline intersects at every step."""
    from sega_testlib import tiny_sdxl_model

    am = pack_module("nodes.attention_masks")
    sd = shared.comfy
    ms = sd.get_model_object("model_sampling")
    capture = am.AttentionCapture(sd.model.diffusion_model, sd.model)
    sigma = {t: float(ms.sigma(torch.tensor(float(t)))) for t in (799, 800, 801, 900)}
    assert [am.intersect_now(capture, sd, sigma[t]) for t in (799, 800, 801, 900)] == [True, True, False, False]
    xl = tiny_sdxl_model()
    xl_capture = am.AttentionCapture(xl.model.diffusion_model, xl.model)
    assert xl_capture.always_intersect and am.intersect_now(xl_capture, xl, sigma[900])


def test_photo_edit_with_sega_combination(shared, embeddings):
    """SEGA Photo Edit's SEGA combination with mask_from attention: each step's mask is the attention
    mask, the same in every channel (binary per step), and the edit differs from the implicit one."""
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, 4, 16, 16, generator=gen)
    conds = {t: [[e.unsqueeze(0), {}]] for t, e in embeddings.items()}
    settings = [("glasses", {"mask_from": "attention", "threshold": 0.75})]
    ours, guider = pack_edit(shared.comfy, conds, x0, settings, "sega")
    mean = guider.watch.sums[0] / guider.watch.counts[0]
    n = guider.watch.counts[0]
    assert n == STEPS and torch.allclose(mean * n, (mean * n).round(), atol=1e-5)
    assert 0.15 <= float(mean.mean()) <= 0.4
    plain, _ = pack_edit(shared.comfy, conds, x0, [("glasses", {"threshold": 0.75})], "sega")
    assert torch.isfinite(ours).all() and (plain - ours).abs().max() > 1e-3


def test_a_concept_with_an_area_is_a_clear_error(pag_model):
    """A concept conditioning with an area (ConditioningSetArea) is evaluated on a crop of the latent,
    whose attention map is not the latent's: the capture leaves it out and the run stops with a
    SEGAError naming the concept, instead of a mask at the wrong place."""
    errors = pack_module("nodes.errors")
    area = [[C1[0][0], {"area": (8, 16, 0, 0), "strength": 1.0, "set_area_to_bounds": False}]]
    concepts = concepts_of({"c1": area}, [("c1", {"mask_from": "intersect"})])
    m = pack_module("nodes.patch").apply_sega(pag_model, concepts, 0.0, 0.4)
    with pytest.raises(errors.SEGAError, match=r"SEGA Concept 'c1'.*area"):
        sample(m, POS, NEG, steps=2, size=16)


SCALE_START, SCALE_TOKENS = 60.0, 8.0  # large enough for tiny random weights to attend unevenly
THREE_LEVELS = {"num_res_blocks": [1, 1, 1], "channel_mult": [1, 1, 1], "transformer_depth": [0, 0, 2],
                "transformer_depth_output": [0, 0, 0, 0, 2, 2]}


@pytest.mark.parametrize("family", ["sdxl", "sd2_v"])
def test_sdxl_and_sd2_sample_with_attention_masks(family):
    """SDXL (pooled y, several transformer blocks per layer) and SD 2.x (v-prediction, linear
    projections) sample with mask_from attention and intersect: every step's mask is the same in every
    channel for attention, and both differ from implicit."""
    import comfy.model_base
    import comfy.supported_models

    from families import FAMILIES, _built, _unet

    if family == "sdxl":
        cfg = _unet(comfy.supported_models.SDXL, 32, model_channels=64, num_classes="sequential",
                    adm_in_channels=2816, **THREE_LEVELS)
        model = _built(comfy.supported_models.SDXL(cfg).get_model({}), 0, 0.03)
    else:
        config = comfy.supported_models.SD20(_unet(comfy.supported_models.SD20, 32, model_channels=64,
                                                   use_linear_in_transformer=True, **THREE_LEVELS))
        model = _built(comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION), 0, 0.05)
    fam = FAMILIES[family]
    start = torch.randn(32, generator=torch.Generator().manual_seed(0))

    def text(seed):  # CLIP-shaped (a large start token shared by all prompts), 32 wide, SDXL's pooled output kept
        c = fam.cond(seed)
        e = clip_like(torch.Generator().manual_seed(seed), width=32, start=SCALE_START * start) * SCALE_TOKENS
        e[0] = SCALE_START * start
        return [[e.unsqueeze(0), dict(c[0][1])]]

    pos, neg, c1 = text(1), text(2), text(3)
    patch = pack_module("nodes.patch")
    masks, images = {}, {}
    for mode in ("implicit", "attention", "intersect"):
        log = patch.RunLog()
        m = patch.apply_sega(model, concepts_of({"c1": c1}, [("c1", {"mask_from": mode, "threshold": 0.75})]),
                             0.0, 0.4, log_to=log)
        images[mode] = sample(m, pos, neg, steps=3, size=16, cfg=fam.cfg)
        masks[mode] = log.watches[0].sums[0] / log.watches[0].counts[0]
        assert torch.isfinite(images[mode]).all()
    att = masks["attention"]
    assert torch.allclose(att * 3, (att * 3).round(), atol=1e-5) and 0.15 <= float(att.mean()) <= 0.35
    for mode in ("attention", "intersect"):
        assert (images[mode] - images["implicit"]).abs().max() > 1e-4
    assert float(masks["intersect"].mean()) < float(att.mean())  # the threshold's entries inside the map


# -- Flux: the image tokens' attention to the text tokens in the double blocks' joint attention ----

def flux_blocks_call_attn1_patch() -> bool:
    import inspect

    import comfy.ldm.flux.layers

    return "attn1_patch" in inspect.getsource(comfy.ldm.flux.layers.DoubleStreamBlock.forward)


needs_flux_hook = pytest.mark.skipif(not flux_blocks_call_attn1_patch(),
                                     reason="this ComfyUI's Flux blocks have no attn1_patch hook (v0.8.0)")


def test_flux_without_the_hook_is_a_clear_error():
    """On a ComfyUI whose Flux blocks call no attn1_patch, mask_from attention stops with a SEGAError
    naming the concept (on a newer one the mask is made: the tests below)."""
    from families import FAMILIES

    if flux_blocks_call_attn1_patch():
        pytest.skip("this ComfyUI's Flux blocks call attn1_patch")
    fam = FAMILIES["flux"]
    m = pack_module("nodes.patch").apply_sega(fam.build(), concepts_of({"c1": fam.cond(3)}, [
        ("c1", {"mask_from": "attention"})]), 0.0, 0.4)
    with pytest.raises(pack_module("nodes.errors").SEGAError, match=r"SEGA Concept 'c1'.*attn1_patch"):
        sample(m, fam.cond(1), fam.cond(2), steps=2, size=8, cfg=fam.cfg, latent=torch.zeros(1, *fam.latent))


@needs_flux_hook
def test_flux_samples_with_attention_masks():
    """Flux (joint attention; no reference to compare with): mask_from attention gives a finite image
    and a mask of the latent's size, the same in every channel, keeping about 1 - threshold; intersect
    keeps less; both change the image."""
    from families import FAMILIES

    fam = FAMILIES["flux"]
    model = fam.build()
    am = pack_module("nodes.attention_masks")
    assert am.model_kind(model.model.diffusion_model) == "flux"
    pos, neg, c1 = fam.cond(1), fam.cond(2), fam.cond(3)
    c1 = [[c1[0][0] * 8.0, dict(c1[0][1])]]  # tiny random weights: a larger text gives uneven attention
    patch = pack_module("nodes.patch")
    masks, images = {}, {}
    for mode in ("implicit", "attention", "intersect"):
        log = patch.RunLog()
        m = patch.apply_sega(model, concepts_of({"c1": c1}, [("c1", {"mask_from": mode, "threshold": 0.75})]),
                             0.0, 0.4, log_to=log)
        if mode != "implicit":
            assert am.joint_attention_patch in m.model_options["transformer_options"]["patches"]["attn1_patch"]
        images[mode] = sample(m, pos, neg, steps=3, size=8, cfg=fam.cfg, latent=torch.zeros(1, *fam.latent))
        masks[mode] = log.watches[0].sums[0] / log.watches[0].counts[0]
        assert torch.isfinite(images[mode]).all()
    att = masks["attention"]
    assert att.shape[-2:] == fam.latent[-2:]
    assert torch.allclose(att * 3, (att * 3).round(), atol=1e-5) and 0.15 <= float(att.mean()) <= 0.4
    assert float(masks["intersect"].mean()) < float(att.mean())
    for mode in ("attention", "intersect"):
        assert (images[mode] - images["implicit"]).abs().max() > 1e-4


@needs_flux_hook
def test_flux_mask_lands_where_the_text_is_attended():
    """A constructed joint-attention case (no RoPE): the concept row's image tokens in the top-left
    quarter have queries matching the text tokens' keys, the rest match the image tokens' keys; the
    other rows the opposite. The capture takes only the concept row, and its mask is that quarter."""
    am = pack_module("nodes.attention_masks")
    from sega_core.attention import attention_mask

    from families import FAMILIES

    model = FAMILIES["flux"].build()
    capture = am.AttentionCapture(model.model.diffusion_model, model.model)
    heads, d, txt, side = 2, 8, 5, 4  # a 8x8 latent: 4x4 image tokens (patch 2)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    a, b = a / a.norm(), b - (b @ a) * a / 1.0
    b = b / b.norm()
    k = torch.zeros(2, heads, txt + side * side, d)
    k[:, :, :txt] = 8.0 * a  # text keys
    k[:, :, txt:] = 8.0 * b  # image keys
    grid = torch.zeros(side, side, dtype=torch.bool)
    grid[:2, :2] = True
    q = torch.zeros(2, heads, txt + side * side, d)
    q[1, :, txt:][:, grid.flatten()] = 8.0 * a  # concept row (index 1): the quarter looks at the text
    q[1, :, txt:][:, ~grid.flatten()] = 8.0 * b
    q[0, :, txt:][:, grid.flatten()] = 8.0 * b  # the other row: the opposite
    q[0, :, txt:][:, ~grid.flatten()] = 8.0 * a
    opts = {"block_type": "double", "cond_or_uncond": [0, 2], "img_slice": [txt, txt + side * side],
            am.ATTN_KEY: capture}
    capture.begin({2: 0}, (8, 8))
    assert am.joint_attention_patch(q, k, k, pe=None, extra_options=opts) == {}
    am.joint_attention_patch(q, k, k, pe=None, extra_options=dict(opts, block_type="single"))  # not taken
    maps = capture.end()
    assert capture.layers_seen == 1 and maps[0].shape == (1, side, side)
    assert maps[0][0][grid].min() > 0.9 > 0.1 > maps[0][0][~grid].max()
    mask = attention_mask(maps[0], 0.75, (8, 8))[0, 0]
    assert torch.equal(mask, grid.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_models_without_maps_are_refused_before_sampling():
    """A model family with no map here (AuraFlow: neither a UNet nor Flux, SD3 or Wan): SEGA Apply
    refuses mask_from attention with a SEGAError naming the concept, and no patch is installed."""
    import comfy.supported_models

    from harness.tiny import patcher

    cfg = {"cond_seq_dim": 32, "dim": 32, "n_layers": 2, "n_double_layers": 1, "n_heads": 2, "global_conddim": 32,
           "max_seq": 64, "dtype": torch.float32}
    model = patcher(comfy.supported_models.AuraFlow(cfg).get_model({}))
    concepts = concepts_of({"c1": text(3)}, [("c1", {"mask_from": "intersect"})])
    with pytest.raises(pack_module("nodes.errors").SEGAError,
                       match=r"SEGA Apply: SEGA Concept 'c1': mask_from 'intersect'.*SD3, Flux and Wan"):
        pack_module("nodes.patch").apply_sega(model, concepts, 0.0, 0.4)
    assert attn2_patches(model) == []
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})


def test_each_image_of_a_batch_gets_its_own_mask(pag_model):
    """A batch of two latents: each image's mask comes from its own attention map (diffusers' store
    mixes the heads of all images, LEDITS.md quirk 8): the two masks differ, and each equals the mask
    of that image sampled alone."""
    import comfy.sample

    patch = pack_module("nodes.patch")
    concepts = concepts_of({"c1": C1}, [("c1", {"mask_from": "attention", "threshold": 0.75})])

    def masks(latent):
        log = patch.RunLog()
        m = patch.apply_sega(pag_model, concepts, 0.0, 0.4, log_to=log)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4))  # image 0 alike in both
        comfy.sample.sample(m, noise, 2, 5.0, "euler", "normal", POS, NEG, latent, disable_pbar=True, seed=0)
        return log.watches[0].sums[0] / log.watches[0].counts[0]

    both = masks(torch.zeros(2, 4, 16, 16))
    assert both.shape == (2, 16, 16) and not torch.equal(both[0], both[1])
    assert torch.equal(masks(torch.zeros(1, 4, 16, 16))[0], both[0])
