"""sega_core on a CUDA device (skipped without one): the same numbers as the reference, and no
device-to-host sync inside a step, so a GPU never waits for the CPU between model calls.

The reference port (conftest.py, checked against diffusers' pipeline in test_sega_reference.py)
runs on the CPU; sega_core gets the same predictions on the GPU."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sega_core import Concept, Plan, sega_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda", 0)


def _run_on(device, case, u, t, e):
    ours, edits = [], []
    plan = Plan.build(case.concepts, case.momentum_scale, case.momentum_beta)
    m = None
    for i in range(case.steps):
        rows = plan.rows(i)
        preds = e[i][rows].to(device) if rows else None
        edit, m, _ = sega_step(u[i].to(device), preds, rows, i, plan, m)
        assert edit is None or edit.device.type == torch.device(device).type
        guidance = case.guidance_scale * (t[i] - u[i]).to(device)
        ours.append((u[i].to(device) + (guidance if edit is None else guidance + edit)).cpu())
        edits.append(None if edit is None else edit.cpu())
    return torch.stack(ours), edits


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), five_d=st.booleans())
def test_cuda_run_matches_reference(helpers, data, five_d):
    """Random settings (1-4 concepts, every per-concept parameter, momentum, batch > 1, 4-D and 5-D):
    sega_core on the GPU equals the reference port on the CPU within 1e-5."""
    case = helpers.draw_case(data, five_d=five_d)
    u, t, e = helpers.make_preds(case)
    ours, edits = _run_on(CUDA, case, u, t, e)
    helpers.assert_matches_reference(case, ours, edits, helpers.run_port(case, u, t, e))


@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (1, 16, 5, 30, 52)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_equals_cpu(shape, dtype):
    """Large latents, every dtype: the GPU's edit equals the CPU's (fp16/bf16 are thresholded in float32
    on both, so the kept entries are the same; values differ by at most one rounding)."""
    plan = Plan.build([Concept(warmup=0, threshold=0.9), Concept(warmup=1, threshold=0.5, scale=3.0, reverse=True),
                       Concept(warmup=0, cooldown=3, weight=0.5)], 0.1, 0.4)
    g = torch.Generator().manual_seed(0)
    u = torch.randn((4, *shape), generator=g).to(dtype)
    e = (u.unsqueeze(1).float() + 0.3 * torch.randn((4, 3, *shape), generator=g)).to(dtype)
    results = {}
    for device in ("cpu", CUDA):
        m, out = None, []
        for i in range(4):
            rows = plan.rows(i)
            edit, m, _ = sega_step(u[i].to(device), e[i][rows].to(device), rows, i, plan, m)
            out.append(edit.cpu())
        results[str(device)] = torch.stack(out)
    cpu, gpu = results["cpu"], results[str(CUDA)]
    assert gpu.dtype == dtype and torch.isfinite(gpu).all()
    assert torch.equal(cpu != 0, gpu != 0)  # the same entries kept
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(gpu, cpu, rtol=tol, atol=tol)


def test_no_host_sync_in_a_step():
    """After one warm-up call, sega_step on CUDA tensors never syncs with the host (warm-up, cool-down,
    per-concept thresholds, a mask, momentum): torch raises on any sync in debug mode 'error'."""
    plan = Plan.build([Concept(warmup=0, threshold=0.9), Concept(warmup=2, threshold=0.5, scale=3.0, reverse=True),
                       Concept(warmup=0, cooldown=4, weight=0.5)], 0.1, 0.4)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 4, 32, 32, generator=g).to(CUDA)
    e = (u.unsqueeze(0) + 0.3 * torch.randn(3, 2, 4, 32, 32, generator=g).to(CUDA))
    mask = torch.zeros(1, 1, 32, 32, device=CUDA)
    mask[..., :16] = 1.0
    masks = [mask, None, None]
    m = None
    for step in range(6):
        rows = plan.rows(step)
        args = (u, e[rows] if rows else None, rows, step, plan, m)
        sega_step(*args, masks=masks)  # warm-up: constants are copied once
        torch.cuda.set_sync_debug_mode("error")
        try:
            edit, m, _ = sega_step(*args, masks=masks)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(edit).all()
