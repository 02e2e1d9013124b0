"""sega_core makes every tensor on its inputs' device (what running on several GPUs needs).

Checked on the CPU by switching torch's default device to 'meta': a tensor created without an
explicit device would land there and the step would fail or return a 'meta' result."""
from __future__ import annotations

import torch

from sega_core import Concept, Plan, sega_step


def test_sega_core_follows_its_inputs_device():
    plan = Plan.build([Concept(warmup=0, threshold=0.8),
                       Concept(warmup=1, threshold=0.61, scale=3.7, reverse=True, weight=0.45)], 0.3, 0.4)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 4, 6, 6, generator=g)
    e = u + 0.3 * torch.randn(2, 2, 4, 6, 6, generator=g)
    mask = torch.ones(1, 1, 6, 6)
    mask[..., :3] = 0.0
    # on 'meta' first: sega_core caches the constants it builds
    got, momentum = None, None
    with torch.device("meta"):
        for step in range(3):
            got, momentum, _ = sega_step(u, e, [0, 1], step, plan, momentum, masks=[mask, None])
    assert got.device == u.device and momentum.device == u.device
    expected, momentum = None, None
    for step in range(3):
        expected, momentum, _ = sega_step(u, e, [0, 1], step, plan, momentum, masks=[mask, None])
    torch.testing.assert_close(got, expected)
