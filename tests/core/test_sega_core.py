"""sega_core without diffusers: skipped rows, deliberate differences from the reference, isolation.

The oracle here is `helpers.reference_step` (tests/core/conftest.py), a transcription of the
reference's step that test_sega_reference.py checks against the real diffusers pipeline.
"""
from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import sega_core
from sega_core import Concept, Plan, quantile_threshold, sega_step, threshold_edit

SEGA_CORE_DIR = Path(sega_core.__file__).resolve().parent
PACK_ROOT = SEGA_CORE_DIR.parent
HYPOTHESIS = dict(deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# --- Skipped rows: plan.rows(step) gives what computing every concept gives ------------------------

@settings(max_examples=150, **HYPOTHESIS)
@given(data=st.data())
def test_rows_match_computing_every_concept(helpers, data):
    """sega_step fed only plan.rows(step) == the reference's step, which computes every concept."""
    case = helpers.draw_case(data)
    u, t, e = helpers.make_preds(case)
    ours, edits = helpers.run_ours(case, u, t, e)
    helpers.assert_matches_reference(case, ours, edits, helpers.run_port(case, u, t, e))


@settings(max_examples=60, **HYPOTHESIS)
@given(data=st.data())
def test_rows_match_all_live_concepts(helpers, data):
    """sega_step fed every concept that is not cooled down (scale 0, weight 0 and, with momentum
    off, not yet warmed-up ones included) gives the same edits as fed only plan.rows(step)."""
    case = helpers.draw_case(data)
    u, t, e = helpers.make_preds(case)
    skipped, skipped_edits = helpers.run_ours(case, u, t, e)
    live, live_edits = helpers.run_ours(
        case, u, t, e, rows_of=lambda plan, i: [c for c in range(len(plan)) if i < plan.cooldown[c]])
    for i, (a, b) in enumerate(zip(skipped_edits, live_edits)):
        a = torch.zeros_like(u[i]) if a is None else a
        b = torch.zeros_like(u[i]) if b is None else b
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {i}")
    torch.testing.assert_close(skipped, live, rtol=0, atol=1e-5)


def test_rows_superset_with_cooled_down_concept(helpers):
    """A cooled-down concept passed in anyway makes no edit (regression: it used to be applied)."""
    case = helpers.Case(concepts=[Concept(warmup=0, cooldown=1), Concept(warmup=0)], steps=3, momentum_scale=0.0)
    u, t, e = helpers.make_preds(case)
    _, skipped = helpers.run_ours(case, u, t, e)
    _, every = helpers.run_ours(case, u, t, e, rows_of=lambda plan, i: list(range(len(plan))))
    for a, b in zip(skipped, every):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("step", [2, 4])
def test_inactive_concept_is_treated_as_cooled_down(step):
    """`inactive` (a concept outside its conditioning's timestep range) equals a cool-down at this step."""
    gen = torch.Generator().manual_seed(step)
    u = torch.randn(2, 4, 8, 8, generator=gen)
    e = torch.randn(2, 2, 4, 8, 8, generator=gen)
    m = torch.randn(2, 4, 8, 8, generator=gen)
    concepts = [Concept(warmup=1), Concept(warmup=3, weight=2.0)]
    plan = Plan.build(concepts, 0.2, 0.5)
    cooled = Plan.build([concepts[0], Concept(warmup=3, weight=2.0, cooldown=step)], 0.2, 0.5)
    got = sega_step(u, e, [0, 1], step, plan, m, inactive=[1])
    want = sega_step(u, e[:1], [0], step, cooled, m)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- Deliberate difference: the reference's NaN ------------------------------------------------------

@pytest.mark.parametrize("concepts,steps_nan", [
    # only concept 0 is warmed up (steps 0-2) and its weight is 0
    ([Concept(warmup=0, weight=0.0), Concept(warmup=3)], [0, 1, 2]),
    # a negative weight counts as 0
    ([Concept(warmup=0, weight=-1.0), Concept(warmup=3), Concept(warmup=4, reverse=True)], [0, 1, 2]),
    # the only warmed-up concept has already cooled down (steps 1-2): weight 0 as well
    ([Concept(warmup=0, cooldown=1), Concept(warmup=3)], [1, 2]),
], ids=["weight-0", "negative-weight", "cooled-down"])
def test_reference_nan_ours_no_edit(helpers, concepts, steps_nan):
    """Reference: only some concepts warmed up, all of them weighted 0 -> 0/0 -> NaN image.
    sega_core: no edit at those steps (CFG alone), finite, and the same as the reference elsewhere."""
    case = helpers.Case(concepts=concepts, steps=6, momentum_scale=0.1)
    assert helpers.nan_steps(case) == steps_nan
    u, t, e = helpers.make_preds(case)
    port = helpers.run_port(case, u, t, e)
    ours, edits = helpers.run_ours(case, u, t, e)
    for i in steps_nan:
        assert torch.isnan(port[i]).all(), "the reference's normalisation divides 0 by 0 here"
        assert edits[i] is None or not edits[i].any()
        torch.testing.assert_close(ours[i], u[i] + case.guidance_scale * (t[i] - u[i]), rtol=0, atol=0)
    assert torch.isfinite(ours).all()
    helpers.assert_matches_reference(case, ours, edits, port)


def test_reference_normalisation_divides_zero_by_zero():
    """The reference's lines for the partly warmed-up branch, on weights that are all 0."""
    concept_weights_tmp = torch.zeros(1, 2)  # one warmed-up concept, batch 2, weight 0
    concept_weights_tmp = torch.where(concept_weights_tmp < 0, torch.zeros_like(concept_weights_tmp),
                                      concept_weights_tmp)
    concept_weights_tmp = concept_weights_tmp / concept_weights_tmp.sum(dim=0)
    edit = torch.einsum("cb,cbijk->bijk", concept_weights_tmp, torch.randn(1, 2, 4, 3, 3))
    assert torch.isnan(edit).all()


# --- Deliberate difference: any number of axes after (B, C) -----------------------------------------

@pytest.mark.parametrize("q", [0.0, 0.3, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 6), (1, 16, 3, 4, 4), (3, 2, 1, 7, 1)])
def test_threshold_5d_per_sample_and_channel(q, shape):
    """(B, C, T, H, W): the quantile is taken per sample and channel over T*H*W."""
    g = torch.Generator().manual_seed(sum(shape))
    d = torch.randn((2,) + shape, generator=g)  # a stack of 2 concepts
    out = threshold_edit(d, q)
    flat = d.abs().flatten(3)
    t = torch.quantile(flat, q, dim=-1, keepdim=True)
    keep = (flat >= t).view_as(d)
    assert torch.equal(out, torch.where(keep, d, torch.zeros_like(d)))
    # per sample and channel: not per sample, not over the batch
    b, c = shape[:2]
    for k, s, ch in [(0, 0, 0), (1, b - 1, c - 1)]:
        tq = torch.quantile(d[k, s, ch].abs().flatten(), q)
        assert torch.equal(out[k, s, ch], torch.where(d[k, s, ch].abs() >= tq, d[k, s, ch], 0.0))


@settings(max_examples=40, **HYPOTHESIS)
@given(data=st.data())
def test_5d_run_matches_reference_step_flattened(helpers, data):
    """Whole 5-D runs agree with the reference's step with its threshold taken over T*H*W."""
    case = helpers.draw_case(data, five_d=True)
    u, t, e = helpers.make_preds(case)
    assert u[0].dim() == 5  # (B, C, T, H, W) per step
    ours, edits = helpers.run_ours(case, u, t, e)
    helpers.assert_matches_reference(case, ours, edits, helpers.run_port(case, u, t, e))


# --- Deliberate difference: more than 2**24 elements per sample and channel ------------------------

def test_more_than_2_pow_24_elements_per_channel():
    """One channel of 2**24 + 8 elements: torch.quantile has refused more than 2**24 (and sorts)."""
    n = 2**24 + 8
    a = 1_000_003  # coprime with n: k -> a*k mod n is a permutation of 0..n-1
    assert math.gcd(a, n) == 1
    perm = (torch.arange(n, dtype=torch.int64) * a) % n
    assert bool((torch.bincount(perm, minlength=n) == 1).all())  # a permutation: sorted, it is 0, 1, ..., n-1
    values = perm.to(torch.float32)  # float32 rounding is monotonic: sorted values = float32(0..n-1)
    del perm
    signs = torch.ones(n)
    signs[1::3] = -1
    concept = (values * signs).view(1, 1, 1, n)  # (K, B, C, n); uncond is 0, scale 1
    del signs
    q = 0.9
    plan = Plan.build([Concept(scale=1.0, threshold=q, warmup=0)], momentum_scale=0.0)
    edit = sega_step(torch.zeros(1, 1, n), concept, plan.rows(0), 0, plan, None).edit

    # Sort-based quantile: the sorted |edit| is float32(arange(n)) by construction.
    sorted_abs = torch.arange(n, dtype=torch.float32)
    rank = float(torch.tensor(q, dtype=torch.float32)) * (n - 1)  # torch.quantile's rank
    lo, hi = math.floor(rank), math.ceil(rank)
    assert lo != hi
    expected_t = torch.lerp(sorted_abs[lo], sorted_abs[hi], torch.tensor(rank - lo, dtype=torch.float32))
    # Near 1.5e7 float32 steps by 1: the interpolated quantile rounds onto sorted_abs[lo] itself,
    # so the element at rank lo is kept too (|d| >= quantile), as torch.quantile decides.
    assert expected_t == sorted_abs[lo]
    assert torch.equal(quantile_threshold(values.view(1, n), q), expected_t.view(1))
    try:
        assert torch.equal(torch.quantile(values, q), expected_t)
    except RuntimeError as err:  # older torch: "quantile() input tensor is too large"
        assert "too large" in str(err)
    kept = n - int(torch.searchsorted(sorted_abs, expected_t))
    assert kept == int((edit != 0).sum())
    assert torch.equal(edit.view(n), torch.where(values >= expected_t, concept.view(n), 0.0))


# --- Deliberate difference: fp16 / bf16 thresholded in float32 --------------------------------------

@pytest.mark.parametrize("dtype,next_after_one", [(torch.float16, 1 + 2**-10), (torch.bfloat16, 1 + 2**-7)])
def test_half_precision_thresholded_in_float32(helpers, dtype, next_after_one):
    """|edit| 0.1 ... 0.9, 1, 1 + ulp: the 0.905 quantile lies just above 1. In float32 only 1 + ulp is
    kept; the reference rounds the quantile back to fp16/bf16 (= 1.0) and keeps 1.0 as well."""
    values = torch.tensor([0.1 * k for k in range(1, 10)] + [1.0, next_after_one]).to(dtype)
    assert float(values[-1]) == next_after_one  # exactly representable
    n, q = values.numel(), 0.905
    edit_in = values.view(1, 1, 1, n, 1)  # (K, B, C, H, W) with uncond 0 and scale 1
    concepts = [Concept(scale=1.0, threshold=q, warmup=0)]
    plan = Plan.build(concepts, momentum_scale=0.0)
    edit = sega_step(torch.zeros(1, 1, n, 1, dtype=dtype), edit_in, plan.rows(0), 0, plan, None).edit
    assert edit.dtype == dtype
    t32 = torch.quantile(values.float(), q)
    assert 1.0 < t32 < next_after_one and float(t32.to(dtype)) == 1.0
    kept = edit.view(n) != 0
    assert kept.tolist() == (values.float() >= t32).tolist() == [False] * (n - 1) + [True]
    # The reference's rule keeps one more element.
    port, _ = helpers.reference_step(torch.zeros(1, 1, n, 1, dtype=dtype), torch.zeros(1, 1, n, 1, dtype=dtype),
                                     edit_in, 0, concepts, 1.5, 0.0, 0.4, None)
    assert (port.view(n) != 0).tolist() == [False] * (n - 2) + [True, True]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.95, 0.99])
def test_half_precision_mask_equals_float32_mask(dtype, q):
    g = torch.Generator().manual_seed(7)
    d = (torch.randn(3, 2, 4, 8, 8, generator=g) * 3).to(dtype)  # (K, B, C, H, W)
    out = threshold_edit(d, q)
    assert out.dtype == dtype
    flat = d.abs().flatten(3).float()
    keep = (flat >= torch.quantile(flat, q, dim=-1, keepdim=True)).view_as(d)
    assert torch.equal(out, torch.where(keep, d, torch.zeros((), dtype=dtype)))


# --- Isolation from ComfyUI ---------------------------------------------------------------------------

BLOCKER = r"""
import importlib, importlib.abc, pkgutil, sys
HOST = ("comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "execution", "nodes")
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in HOST or top.startswith("comfy"):
            raise ImportError("blocked for this test: " + name)
        return None
sys.meta_path.insert(0, Blocker())
sys.modules["comfy"] = None
import sega_core
for info in pkgutil.walk_packages(sega_core.__path__, "sega_core."):
    importlib.import_module(info.name)
from sega_core import Concept, Plan, sega_step
import torch
plan = Plan.build([Concept(warmup=0)])
edit, m, _ = sega_step(torch.zeros(1, 4, 2, 2), torch.randn(1, 1, 4, 2, 2), plan.rows(0), 0, plan, None)
assert edit is not None and m is not None
try:
    import comfy
except ImportError:
    pass
else:
    raise SystemExit("comfy was importable")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HOST or m.startswith("comfy"))
assert loaded == ["comfy"] and sys.modules["comfy"] is None, loaded
print("sega_core ok")
"""


def test_import_without_comfy():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(PACK_ROOT)
    proc = subprocess.run([sys.executable, "-c", BLOCKER], cwd=str(PACK_ROOT), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sega_core ok" in proc.stdout


def test_sega_core_never_mentions_comfy():
    """No module of sega_core imports or names `comfy` (prose such as "ComfyUI" in docs is fine)."""
    files = sorted(SEGA_CORE_DIR.rglob("*.py"))
    assert files
    for path in files:
        text = path.read_text()
        assert not re.search(r"(?<![A-Za-z0-9_])comfy", text), f"{path.name} mentions comfy"
        for node in ast.walk(ast.parse(text)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.lower().startswith(("comfy", "folder_paths", "execution", "nodes")), \
                    f"{path.name} imports {name}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_per_concept_scales_are_not_rounded(dtype):
    """Different scales per concept in float16/bfloat16: each concept's difference is scaled by the
    exact scale (one rounding, as a single shared scale gets), not by the scale rounded to the dtype
    first (5.3 is 5.3125 in bfloat16)."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 4, 8, 8, generator=g).to(dtype)
    e = (u.float().unsqueeze(0) + torch.randn(2, 1, 4, 8, 8, generator=g)).to(dtype)
    plan = Plan.build([Concept(scale=5.3, threshold=0.0, warmup=0), Concept(scale=2.0, threshold=0.0, warmup=0)],
                      momentum_scale=0.0)
    edit = sega_step(u, e, plan.rows(0), 0, plan, None).edit
    d = e - u.unsqueeze(0)
    scaled = torch.stack([d[0] * 5.3, d[1] * 2.0])  # a Python float: one rounding
    assert not torch.equal(scaled[0], d[0] * torch.tensor(5.3, dtype=dtype))  # the rounded scale differs
    assert torch.equal(edit, torch.tensordot(torch.ones(2, dtype=dtype), scaled, dims=1))  # weights 1, 1
