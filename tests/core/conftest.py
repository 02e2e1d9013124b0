"""Shared helpers for the sega_core tests (pure torch; nothing here may import ComfyUI).

`helpers` (a session fixture) gives the tests:
  reference_step  harness.reference's line-for-line torch port of one denoising step of diffusers'
                  SemanticStableDiffusionPipeline (shared with the benchmarks).
                  test_sega_reference.py checks it against the real pipeline, so the tests that
                  run without diffusers rest on a checked oracle.
  run_ours        the pack's per-step noise predictions: u + (s_g (t - u) + edit).
  run_port        the same, from `reference_step`.
  make_preds      random per-step predictions (uncond, text, concepts).
  draw_case       a random SEGA configuration drawn with hypothesis' `data` strategy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import List, Optional, Sequence

import pytest
import torch

from harness.reference import reference_step
from sega_core import Concept, Plan, sega_step


@dataclass
class Case:
    """One SEGA run: settings, sizes and the prompts' batch layout."""

    concepts: List[Concept]
    steps: int = 6
    guidance_scale: float = 7.5
    momentum_scale: float = 0.1
    momentum_beta: float = 0.4
    prompts: int = 1  # distinct prompts
    images_per_prompt: int = 1
    shape: Sequence[int] = (4, 3, 3)  # (C, H, W) of one sample
    seed: int = 0
    scalars: bool = False  # pass the shared settings to the reference as scalars, not lists
    extra: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.prompts * self.images_per_prompt


def make_preds(case: Case, dtype=torch.float32, shape: Optional[Sequence[int]] = None):
    """Per-step predictions u, t: (T, B, *shape); e: (T, N, B, *shape).

    Text and concept predictions are the uncond plus a smaller offset, as real
    noise predictions are; random values make ties in |edit| (which could flip a
    threshold decision between two exact implementations) practically impossible.
    """
    g = torch.Generator().manual_seed(case.seed)
    shape = tuple(case.shape if shape is None else shape)
    T, B, N = case.steps, case.batch, len(case.concepts)
    u = torch.randn((T, B) + shape, generator=g)
    t = u + 0.3 * torch.randn((T, B) + shape, generator=g)
    e = u.unsqueeze(1) + 0.3 * torch.randn((T, N, B) + shape, generator=g)
    return u.to(dtype), t.to(dtype), e.to(dtype)


def run_port(case: Case, u, t, e):
    """(T, B, ...) noise predictions of `reference_step` over a whole run."""
    m, out = None, []
    for i in range(case.steps):
        eps, m = reference_step(u[i], t[i], e[i], i, case.concepts, case.guidance_scale, case.momentum_scale,
                                case.momentum_beta, m)
        out.append(eps)
    return torch.stack(out)


def run_ours(case: Case, u, t, e, rows_of=None):
    """(T, B, ...) noise predictions and per-step edits (None = no edit) of sega_core.

    rows_of(plan, step) picks the concepts fed to sega_step (default: plan.rows(step));
    only those concepts' predictions are passed, stacked in that order.
    """
    plan = Plan.build(case.concepts, case.momentum_scale, case.momentum_beta)
    m, out, edits = None, [], []
    for i in range(case.steps):
        rows = plan.rows(i) if rows_of is None else rows_of(plan, i)
        preds = e[i][rows] if rows else None
        edit, m, _ = sega_step(u[i], preds, rows, i, plan, m)
        guidance = case.guidance_scale * (t[i] - u[i])
        out.append(u[i] + (guidance if edit is None else guidance + edit))
        edits.append(edit)
    return torch.stack(out), edits


def nan_steps(case: Case) -> List[int]:
    """Steps where the reference divides 0 by 0: only some concepts warmed up, none of them weighted."""
    plan = Plan.build(case.concepts, case.momentum_scale, case.momentum_beta)
    n = len(plan)
    steps = []
    for i in range(case.steps):
        warmed = plan.warmed(i)
        if 0 < sum(warmed) < n and sum(plan.weight[c] for c in range(n)
                                        if warmed[c] and i < plan.cooldown[c]) == 0:
            steps.append(i)
    return steps


def draw_case(data, max_concepts: int = 4, max_steps: int = 8, batch: bool = True, five_d: bool = False) -> Case:
    """A random configuration covering every per-concept setting (hypothesis `st.data()`)."""
    from hypothesis import strategies as st

    d = data.draw
    steps = d(st.integers(2, max_steps), label="steps")
    n = d(st.integers(1, max_concepts), label="concepts")
    scale = st.one_of(st.sampled_from([0.0, 1.0, 5.0, 7.5, 10.0]), st.floats(0.1, 10.0))
    threshold = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99]), st.floats(0.0, 0.99))
    # No weights of tiny magnitude: below float32's range the reference rounds them to 0 (and divides
    # 0 by 0) while sega_core keeps them in double; no one sets a weight of 1e-50 on purpose.
    weight = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 2.0, -1.0]), st.floats(0.01, 2.0), st.floats(-1.0, -0.01))
    concept = st.builds(
        Concept, scale=scale, threshold=threshold, warmup=st.integers(0, steps),
        cooldown=st.one_of(st.none(), st.integers(0, steps + 1)), weight=weight, reverse=st.booleans())
    scalars = d(st.booleans(), label="scalars")
    if scalars:  # one setting shared by all concepts: the reference gets scalars
        one = d(concept, label="concept")
        concepts = [one] * n
    else:
        concepts = [d(concept, label=f"concept{k}") for k in range(n)]
    if five_d:
        shape = (d(st.sampled_from([1, 4])), d(st.integers(1, 3)), d(st.integers(1, 3)), d(st.integers(1, 4)))
    else:
        shape = (d(st.sampled_from([1, 4, 16])), d(st.integers(1, 4)), d(st.integers(1, 4)))
    return Case(
        concepts=concepts, steps=steps,
        guidance_scale=d(st.sampled_from([1.5, 7.5]), label="guidance_scale"),
        momentum_scale=d(st.sampled_from([0.0, 0.1, 0.5]), label="momentum_scale"),
        momentum_beta=d(st.sampled_from([0.4, 0.8]), label="momentum_beta"),
        prompts=d(st.integers(1, 2), label="prompts") if batch else 1,
        images_per_prompt=d(st.integers(1, 2), label="images_per_prompt") if batch else 1,
        shape=shape, seed=d(st.integers(0, 2**31 - 1), label="seed"), scalars=scalars)


def assert_matches_reference(case: Case, ours, edits, ref, atol: float = 1e-5):
    """ours == ref at every step, except the reference's NaN steps, where ours must be plain CFG."""
    bad = nan_steps(case)
    for i in range(case.steps):
        if i in bad:
            assert torch.isnan(ref[i]).all(), f"step {i}: the reference should be NaN here"
            assert edits[i] is None or not edits[i].any(), f"step {i}: expected no edit"
            assert torch.isfinite(ours[i]).all()
            continue
        assert torch.isfinite(ref[i]).all(), f"step {i}: unexpected NaN in the reference"
        err = (ours[i] - ref[i]).abs().max().item()
        assert err <= atol, f"step {i}: max abs diff {err:.3g} > {atol}"


@pytest.fixture(scope="session")
def helpers():
    return SimpleNamespace(
        Case=Case, make_preds=make_preds, reference_step=reference_step, run_port=run_port, run_ours=run_ours,
        nan_steps=nan_steps, draw_case=draw_case, assert_matches_reference=assert_matches_reference)
