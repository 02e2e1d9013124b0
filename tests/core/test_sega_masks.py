"""Per-concept user masks in sega_step: a concept's thresholded edit is weighted by its mask."""
from __future__ import annotations

import pytest
import torch

from sega_core import Concept, Plan, sega_step

SHAPE = (2, 4, 6, 6)  # (B, C, H, W)


def preds(seed, n, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g)
    return u, u.unsqueeze(0) + 0.3 * torch.randn((n, *shape), generator=g)


def left_half(shape=SHAPE):
    m = torch.zeros(1, 1, *shape[2:])
    m[..., : shape[-1] // 2] = 1.0
    return m


def run(plan, masks, steps=4, seed=0, shape=SHAPE):
    """Edits of a few steps with momentum, every concept computed."""
    momentum, edits = None, []
    for step in range(steps):
        u, e = preds(seed + step, len(plan), shape)
        rows = list(range(len(plan)))
        edit, momentum, _ = sega_step(u, e, rows, step, plan, momentum, masks=masks)
        edits.append(edit)
    return edits


def test_mask_multiplies_the_thresholded_edit():
    plan = Plan.build([Concept(warmup=0, threshold=0.8)], momentum_scale=0.0)
    u, e = preds(0, 1)
    full = sega_step(u, e, [0], 0, plan, None).edit
    mask = left_half()
    masked = sega_step(u, e, [0], 0, plan, None, masks=[mask]).edit
    torch.testing.assert_close(masked, full * mask)
    assert masked[..., :3].abs().max() > 0


@pytest.mark.parametrize("momentum_scale", [0.0, 0.5])
def test_edit_is_zero_outside_the_mask_on_every_step(momentum_scale):
    """Also with momentum: the momentum is formed from masked edits, so it never leaks outside."""
    plan = Plan.build([Concept(warmup=1, threshold=0.5), Concept(warmup=2, reverse=True, scale=3.0)],
                      momentum_scale=momentum_scale)
    mask = left_half()
    for edit in run(plan, [mask, mask]):
        if edit is not None:
            assert torch.equal(edit[..., 3:], torch.zeros_like(edit[..., 3:]))
    assert any(e is not None and e[..., :3].abs().max() > 0 for e in run(plan, [mask, mask]))


def test_only_the_masked_concept_is_limited():
    plan = Plan.build([Concept(warmup=0, threshold=0.5), Concept(warmup=0, threshold=0.5)], momentum_scale=0.0)
    mask = left_half()
    both = run(plan, [mask, None], steps=1)[0]
    second_only = run(plan, [torch.zeros_like(mask), None], steps=1)[0]
    torch.testing.assert_close(both[..., 3:], second_only[..., 3:])
    assert not torch.allclose(both[..., :3], second_only[..., :3])


def test_feathered_mask_scales_the_edit():
    plan = Plan.build([Concept(warmup=0, threshold=0.0)], momentum_scale=0.0)
    u, e = preds(1, 1)
    full = sega_step(u, e, [0], 0, plan, None).edit
    ramp = torch.linspace(0, 1, SHAPE[-1]).view(1, 1, 1, -1)
    soft = sega_step(u, e, [0], 0, plan, None, masks=[ramp]).edit
    torch.testing.assert_close(soft, full * ramp)


def test_no_masks_is_bit_identical_to_none():
    plan = Plan.build([Concept(warmup=1), Concept(warmup=0, weight=0.5)], momentum_scale=0.2)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(run(plan, None), run(plan, [None, None])))


def test_per_sample_mask_and_video_latent():
    shape = (2, 3, 2, 4, 4)  # (B, C, T, H, W): one mask per sample, the same over time
    plan = Plan.build([Concept(warmup=0, threshold=0.5)], momentum_scale=0.0)
    mask = torch.zeros(2, 1, 1, 4, 4)
    mask[0, ..., :2] = 1.0  # sample 0: left half; sample 1: nothing
    edit = run(plan, [mask], steps=1, shape=shape)[0]
    assert edit[0, ..., :2].abs().max() > 0 and edit[0, ..., 2:].abs().max() == 0
    assert edit[1].abs().max() == 0
