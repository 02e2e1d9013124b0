"""SEGA Invert Photo + SEGA Photo Edit inside ComfyUI equal diffusers' LEditsPPPipelineStableDiffusion
when both run the same real UNet (harness.shared_unet), the same conditioning, photo latent, seed,
steps and skip: the inversion's start and noise maps, the edited latent, and the model rows."""
from __future__ import annotations

import comfy_host

comfy_host.prepare_host()
import pytest
import torch

import comfy.utils

from families import one_thread  # noqa: F401  (fixture)
from harness import ledits_shared as ref
from harness.pack import RowCounter, concept_inputs, node_output, pack_module
from harness.shared_unet import shared_unet

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, SKIP, SEED = 6, 0.15, 11
SOURCE = "a photo"
CONCEPTS = ["glasses", "a hat"]
TOL = 1e-4  # float32, after 6 steps of a real UNet on both sides


@pytest.fixture(scope="module")
def setup():
    shared = shared_unet()
    gen = torch.Generator().manual_seed(3)
    embeddings = {t: torch.randn(77, 768, generator=gen) for t in ["", SOURCE] + CONCEPTS}
    x0 = torch.randn(1, 4, 8, 12, generator=gen)  # diffusers' VP latent of a 64x96 photo
    pipe = ref.ledits_pipeline(shared.diffusers, embeddings)
    before = comfy.utils.PROGRESS_BAR_ENABLED
    comfy.utils.PROGRESS_BAR_ENABLED = False
    yield shared, embeddings, x0, pipe
    comfy.utils.PROGRESS_BAR_ENABLED = before


def conds(embeddings, text):
    return [[embeddings[text].unsqueeze(0), {}]]


def pack_edit(shared, embeddings, x0, source, settings):
    """(inversion, edited latent in diffusers' scale, inversion rows, edit rows) through the pack's nodes."""
    chain = None
    concept = pack_module("nodes.concept_nodes").SEGAConcept
    for text, s in zip(CONCEPTS, settings):
        inputs = concept_inputs(conds(embeddings, text), label=text, concepts=chain,
                                **dict({"threshold": 0.9, "warmup": 0}, **s))
        chain = node_output(concept.execute(**inputs))
    inv_rows, edit_rows = RowCounter(), RowCounter()
    inversion = node_output(pack_module("nodes.photo_invert").SEGAInvertPhoto.execute(
        model=inv_rows.attach(shared.comfy), latent={"samples": x0 / ref.SCALING_FACTOR},
        uncond=conds(embeddings, ""), steps=STEPS, skip=SKIP, seed=SEED,
        source=conds(embeddings, source) if source else None, source_guidance=3.5))
    out = node_output(pack_module("nodes.photo_edit").SEGAPhotoEdit.execute(
        model=edit_rows.attach(shared.comfy), inversion=inversion, concepts=chain, combination="ledits",
        reconstruction="as diffusers"))["samples"]
    return inversion, out * ref.SCALING_FACTOR, sum(inv_rows.rows), sum(edit_rows.rows)


def diffusers_edit(shared, pipe, x0, source, settings):
    tally = ref.RowTally(shared.diffusers)
    try:
        ref.invert(pipe, x0, STEPS, SKIP, SEED, source or "", 3.5)
        inv_rows = sum(tally.rows)
        tally.clear()
        edits = [(text, ref.Edit(scale=s.get("edit_scale", 5.0), threshold=0.9, warmup=s.get("warmup", 0),
                                 cooldown=s.get("cooldown"), reverse=s.get("direction") == "remove"))
                 for text, s in zip(CONCEPTS, settings)]
        out = ref.edit(pipe, edits)
        return out, inv_rows, sum(tally.rows)
    finally:
        tally.remove()


# name: (source prompt, SEGA Concept settings per concept, the pack's edit rows for STEPS steps)
CASES = {
    "reconstruction": (None, [], STEPS),
    "one concept": (None, [{}], 2 * STEPS),
    # the second concept acts in steps 1-3 only: the pack computes its row there, diffusers at every step
    "add and remove, a window": (None, [{"edit_scale": 7.0}, {"direction": "remove", "warmup": 1, "cooldown": 4}],
                                 2 * STEPS + 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pack_equals_diffusers_ledits_on_a_real_unet(setup, case):
    shared, embeddings, x0, pipe = setup
    source, settings, pack_rows = CASES[case]
    inversion, pack_out, p_inv, p_edit = pack_edit(shared, embeddings, x0, source, settings)
    ref_out, d_inv, d_edit = diffusers_edit(shared, pipe, x0, source, settings)
    # the inversion: the start (sampler space X = x sqrt(1 + sigma^2)) and every noise map
    start = inversion.start / (1 + inversion.sigmas[0] ** 2).sqrt()
    err_start = (start - pipe.init_latents).abs().max().item()
    err_zs = (inversion.zs - pipe.zs).abs().max().item()
    err = (pack_out - ref_out).abs().max().item()
    moved = (ref_out - x0).abs().max().item()
    print(f"{case}: start {err_start:.1e}, noise maps {err_zs:.1e} (max {pipe.zs.abs().max().item():.1f}), "
          f"edited latent {err:.1e} (it moved {moved:.2f} from the photo); rows pack {p_inv}+{p_edit}, "
          f"diffusers {d_inv}+{d_edit}")
    assert err_start <= TOL
    assert err_zs <= TOL
    assert err <= TOL
    assert p_inv == d_inv == STEPS
    assert d_edit == (1 + len(settings)) * STEPS  # diffusers computes every concept at every step
    assert p_edit == pack_rows
    if settings:
        # the concepts change the result far beyond the tolerance
        _, plain, _, _ = pack_edit(shared, embeddings, x0, None, [])
        assert (plain - pack_out).abs().max().item() > 100 * TOL

