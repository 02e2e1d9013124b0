"""sega_step's optional `kept` output: the entries each concept's threshold keeps (Eq. 5)."""
from __future__ import annotations

import pytest
import torch

from sega_core import Concept, Plan, sega_step

SHAPE = (2, 4, 6, 5)  # (B, C, H, W)


def preds(seed, n, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g)
    return u, u.unsqueeze(0) + 0.3 * torch.randn((n, *shape), generator=g)


def expected_kept(u, e, plan, rows):
    """|d| >= torch.quantile(|d|, q) per sample and channel, over the remaining axes."""
    out = []
    for k, c in enumerate(rows):
        d = (e[k] - u) * plan.signed_scale[c]
        a = d.abs().float().flatten(2)
        t = torch.quantile(a, plan.threshold[c], dim=-1, keepdim=True)
        out.append((a >= t).view(d.shape))
    return torch.stack(out)


@pytest.mark.parametrize("thresholds", [(0.9, 0.9), (0.5, 0.95), (0.0, 0.7)])
def test_kept_is_the_threshold_mask_and_changes_nothing_else(thresholds):
    concepts = [Concept(warmup=0, threshold=q, reverse=i == 1) for i, q in enumerate(thresholds)]
    plan = Plan.build(concepts, momentum_scale=0.2)
    u, e = preds(1, len(concepts))
    m0 = 0.1 * torch.randn(SHAPE)
    edit, momentum, _ = sega_step(u, e, [0, 1], 3, plan, m0)
    edit2, momentum2, kept = sega_step(u, e, [0, 1], 3, plan, m0, return_kept=True)
    assert torch.equal(edit, edit2) and torch.equal(momentum, momentum2)
    assert kept.dtype == torch.bool and kept.shape == (2, *SHAPE)
    assert torch.equal(kept, expected_kept(u, e, plan, [0, 1]))
    for k, q in enumerate(thresholds):
        fraction = kept[k].float().mean().item()
        if q == 0.0:
            assert fraction == 1.0  # threshold 0 keeps everything
        else:
            assert abs(fraction - (1 - q)) < 0.15, (q, fraction)


def test_kept_ignores_user_masks_and_follows_rows():
    plan = Plan.build([Concept(warmup=0, threshold=0.6), Concept(warmup=0, threshold=0.6)], momentum_scale=0.0)
    u, e = preds(2, 1)
    mask = torch.zeros(1, 1, *SHAPE[2:])
    _, _, kept = sega_step(u, e, [1], 0, plan, None, masks=[None, mask], return_kept=True)
    assert kept.shape == (1, *SHAPE)
    assert torch.equal(kept, expected_kept(u, e, plan, [1]))


def test_no_rows_gives_no_kept():
    plan = Plan.build([Concept(warmup=5)], momentum_scale=0.0)
    u, _ = preds(3, 1)
    edit, momentum, kept = sega_step(u, None, [], 0, plan, None, return_kept=True)
    assert edit is None and momentum is None and kept is None


def test_video_latent():
    shape = (1, 3, 2, 4, 4)  # (B, C, T, H, W)
    plan = Plan.build([Concept(warmup=0, threshold=0.75)], momentum_scale=0.0)
    u, e = preds(4, 1, shape)
    _, _, kept = sega_step(u, e, [0], 0, plan, None, return_kept=True)
    assert torch.equal(kept, expected_kept(u, e, plan, [0]))


def test_large_latent_selection_path():
    """Rows of 4096+ entries in 64K+ blocks take the CPU's histogram selection."""
    shape = (1, 16, 64, 64)
    plan = Plan.build([Concept(warmup=0, threshold=0.9), Concept(warmup=0, threshold=0.5)], momentum_scale=0.0)
    u, e = preds(5, 2, shape)
    _, _, kept = sega_step(u, e, [0, 1], 0, plan, None, return_kept=True)
    assert torch.equal(kept, expected_kept(u, e, plan, [0, 1]))
