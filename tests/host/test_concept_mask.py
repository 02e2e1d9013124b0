"""SEGA Concept's optional MASK: the concept edits only inside it (resized to the latent, soft
values fade the edit), checked at the guidance level on every model evaluation."""
from __future__ import annotations

import pytest
import torch

from families import FAMILIES, one_thread  # noqa: F401  (fixture)
from noise_space import plan_of, replay, sample_recorded
from sega_testlib import concept_node, pack_module

pytestmark = pytest.mark.usefixtures("one_thread")
FAM = FAMILIES["sd15"]
CFG = 5.0
POS, NEG, C1, C2 = FAM.cond(1), FAM.cond(2), FAM.cond(3), FAM.cond(4)


@pytest.fixture(scope="module")
def model():
    return FAM.build()


def apply(model, concepts, momentum_scale=0.3):
    return pack_module("nodes.patch").apply_sega(model, concepts, momentum_scale, 0.4)


def edits_of(calls):
    return [c["final"] - (c["out"][1] + (c["out"][0] - c["out"][1]) * CFG) for c in calls]


def left_half_pixels(batch=None):
    """A MASK in pixels (64x64 for the 8x8 latent): the left half."""
    m = torch.zeros(64, 64) if batch is None else torch.zeros(batch, 64, 64)
    m[..., :32] = 1.0
    return m


@pytest.mark.parametrize("momentum_scale", [0.0, 0.3])
def test_edit_is_zero_outside_the_mask(model, momentum_scale):
    concepts = concept_node(C1, mask=left_half_pixels())
    out, calls, steps = sample_recorded(apply(model, concepts, momentum_scale), POS, NEG,
                                        torch.zeros(2, *FAM.latent), steps=4, cfg=CFG)
    for edit in edits_of(calls):
        assert edit[..., 4:].abs().max() == 0 and edit[..., :4].abs().max() > 0
    # and the edit inside is sega_core's with the mask resized to the latent
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    replay(calls, steps, plan_of(concepts, momentum_scale), CFG, masks=[mask])
    assert torch.isfinite(out).all()


def test_only_the_masked_concept_is_limited(model):
    concepts = concept_node(C2, concepts=concept_node(C1, mask=left_half_pixels()), direction="remove")
    _, calls, _ = sample_recorded(apply(model, concepts, 0.0), POS, NEG, torch.zeros(1, *FAM.latent), steps=3,
                                  cfg=CFG)
    assert all(e[..., 4:].abs().max() > 0 for e in edits_of(calls))  # concept 2 edits everywhere


def test_feathered_mask_fades_the_edit(model):
    """A soft mask (a horizontal ramp) weights the edit: replayed with the bilinearly resized mask."""
    ramp = torch.linspace(0, 1, 64).expand(64, 64).clone()
    concepts = concept_node(C1, mask=ramp, threshold=0.0)
    _, calls, steps = sample_recorded(apply(model, concepts, 0.3), POS, NEG, torch.zeros(1, *FAM.latent), steps=3,
                                      cfg=CFG)
    resized = torch.nn.functional.interpolate(ramp.view(1, 1, 64, 64), size=(8, 8), mode="bilinear")
    replay(calls, steps, plan_of(concepts, 0.3), CFG, masks=[resized])
    for edit in edits_of(calls):
        assert edit[..., 0].abs().max() < edit[..., 7].abs().max()


def test_one_mask_per_image_and_a_wrong_batch_is_refused(model):
    masks = left_half_pixels(batch=2)
    masks[1] = 0.0  # the second image: no edit at all
    _, calls, _ = sample_recorded(apply(model, concept_node(C1, mask=masks), 0.0), POS, NEG,
                                  torch.zeros(2, *FAM.latent), steps=2, cfg=CFG)
    for edit in edits_of(calls):
        assert edit[0, ..., :4].abs().max() > 0 and edit[1].abs().max() == 0
    errors = pack_module("nodes.errors")
    with pytest.raises(errors.SEGAError, match=r"SEGA Concept #1: its mask holds 3 masks but the latent batch has 2"):
        sample_recorded(apply(model, concept_node(C1, mask=left_half_pixels(batch=3))), POS, NEG,
                        torch.zeros(2, *FAM.latent), steps=2, cfg=CFG)


def test_mask_input_is_optional_with_a_tooltip(comfy_nodes):
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS["SEGAConcept"].INPUT_TYPES()
    kind, options = spec["optional"]["mask"][:2]
    assert kind == "MASK" and options.get("tooltip")
    assert "mask" not in spec["required"]
