"""Properties of sega_step that hold for any shape and any valid settings (hypothesis).

  finite:       any 4-D or 5-D latent, batch 1-3, 0-8 concepts, every setting anywhere in its valid
                range (the nodes' ranges, negative scales and weights included): finite edits and
                momenta, of the latent's shape and dtype, over several steps.
  off:          every concept off (edit scale 0, or weight <= 0): no edit at all, the result is plain
                CFG bit for bit, also when the off concepts are computed anyway.
  direction:    reversing a concept and mirroring its prediction around the uncond (2u - p) changes
                nothing, bit for bit; nor does negating its scale and reversing it. Both are
                involutions, so applying one twice gives back the original run as well.
  order:        permuting the concepts (with their predictions, masks and inactive steps) changes the
                edits and the momentum only by float rounding.
  batch:        the samples of a batch do not interact: each one's edit is that of a batch of one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from sega_core import Concept, Plan, sega_step

HYPOTHESIS = dict(deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GUIDANCE_SCALE = 7.5


@dataclass
class Run:
    """One sampling run of sega_step: settings, per-step predictions and per-step inactive concepts."""

    concepts: List[Concept]
    momentum_scale: float
    momentum_beta: float
    u: torch.Tensor  # (T, B, C, ...)
    t: torch.Tensor  # (T, B, C, ...)
    e: torch.Tensor  # (T, N, B, C, ...)
    masks: Optional[list]  # None, or one entry per concept: None or a (1 or B, 1, ...) weight in [0, 1]
    inactive: List[List[int]]  # per step

    @property
    def steps(self) -> int:
        return self.u.shape[0]

    def replace(self, **changes) -> "Run":
        return dataclasses.replace(self, **changes)


def scales():
    return st.one_of(st.sampled_from([0.0, 1.0, 5.0, 100.0, -5.0]), st.floats(-100.0, 100.0))


def thresholds():
    return st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.999, 1 - 2**-24]), st.floats(0.0, 1.0, exclude_max=True))


def weights():
    return st.one_of(st.sampled_from([0.0, 1.0, 10.0, -1.0]), st.floats(-10.0, 10.0))


@st.composite
def runs(draw, max_concepts=8, dtypes=(torch.float32,), grid=None, scale=None, weight=None, masks=True):
    """A random Run. `grid`: predictions on a 1/64 grid (exact arithmetic, many ties in |edit|)."""
    steps = draw(st.integers(1, 6), label="steps")
    n = draw(st.integers(0, max_concepts), label="concepts")
    concept = st.builds(
        Concept, scale=scales() if scale is None else scale, threshold=thresholds(),
        warmup=st.integers(0, steps + 1), cooldown=st.one_of(st.none(), st.integers(0, steps + 1)),
        weight=weights() if weight is None else weight, reverse=st.booleans())
    concepts = draw(st.lists(concept, min_size=n, max_size=n), label="concept settings")
    batch = draw(st.integers(1, 3), label="batch")
    channels = draw(st.sampled_from([1, 2, 4, 16]), label="channels")
    rest = tuple(draw(st.lists(st.integers(1, 5), min_size=2, max_size=3), label="spatial"))  # 4-D or 5-D
    dtype = draw(st.sampled_from(dtypes), label="dtype")
    on_grid = draw(st.booleans(), label="grid") if grid is None else grid
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), label="seed"))
    shape = (steps, batch, channels) + rest
    if on_grid:
        u = torch.randint(-128, 129, shape, generator=g) / 64
        t = torch.randint(-128, 129, shape, generator=g) / 64
        e = torch.randint(-128, 129, (steps, n) + shape[1:], generator=g) / 64
    else:
        amplitude = draw(st.sampled_from([1.0, 1e-3, 30.0]), label="amplitude")
        u = torch.randn(shape, generator=g)
        t = u + 0.3 * torch.randn(shape, generator=g)
        e = u.unsqueeze(1) + amplitude * torch.randn((steps, n) + shape[1:], generator=g)
    mask_list = None
    if masks and n and draw(st.booleans(), label="masks"):
        mask_list = []
        for _ in range(n):
            kind = draw(st.sampled_from(["none", "shared", "per-sample"]))
            if kind == "none":
                mask_list.append(None)
            else:
                lead = 1 if kind == "shared" else batch
                mask_list.append(torch.rand((lead, 1) + rest, generator=g).to(dtype))
    inactive = [sorted(draw(st.sets(st.integers(0, n - 1), max_size=n), label=f"inactive {i}")) if n else []
                for i in range(steps)]
    return Run(concepts=concepts,
               momentum_scale=draw(st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(0.0, 1.0)),
                                   label="momentum_scale"),
               momentum_beta=draw(st.one_of(st.sampled_from([0.0, 0.4, 1.0]), st.floats(0.0, 1.0)),
                                  label="momentum_beta"),
               u=u.to(dtype), t=t.to(dtype), e=e.to(dtype), masks=mask_list, inactive=inactive)


def execute(run: Run, every_live: bool = False):
    """Per-step (edit, momentum) of sega_step. `every_live`: feed every concept that is not cooled
    down, not only plan.rows(step)."""
    plan = Plan.build(run.concepts, run.momentum_scale, run.momentum_beta)
    momentum, out = None, []
    for i in range(run.steps):
        rows = [c for c in range(len(plan)) if i < plan.cooldown[c]] if every_live else plan.rows(i)
        preds = run.e[i][rows] if rows else None
        edit, momentum, _ = sega_step(run.u[i], preds, rows, i, plan, momentum, inactive=run.inactive[i],
                                   masks=run.masks)
        out.append((edit, momentum))
    return out


def cfg(run: Run, i: int, edit: Optional[torch.Tensor]) -> torch.Tensor:
    """The guided noise prediction of step i: u + s_g (t - u) (+ edit)."""
    guided = run.u[i] + GUIDANCE_SCALE * (run.t[i] - run.u[i])
    return guided if edit is None else guided + edit


def assert_runs_equal(got, want, exact: bool, what: str):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        for name, x, y in (("edit", a[0], b[0]), ("momentum", a[1], b[1])):
            assert (x is None) == (y is None), f"{what}: step {i} {name}: {x is None} vs {y is None}"
            if x is None:
                continue
            if exact:
                assert torch.equal(x, y), f"{what}: step {i} {name} differs: {(x - y).abs().max()}"
            else:
                tol = 1e-5 * (1.0 + float(y.abs().max()))
                torch.testing.assert_close(x, y, rtol=1e-5, atol=tol, msg=f"{what}: step {i} {name}")


# --- finite --------------------------------------------------------------------------------------------

@settings(max_examples=100, **HYPOTHESIS)
@given(run=runs(dtypes=(torch.float32, torch.float64, torch.bfloat16)), every_live=st.booleans())
def test_finite_for_any_valid_settings(run, every_live):
    for i, (edit, momentum) in enumerate(execute(run, every_live)):
        for name, x in (("edit", edit), ("momentum", momentum)):
            if x is not None:
                assert x.shape == run.u[i].shape and x.dtype == run.u[i].dtype, (name, x.shape, x.dtype)
                assert torch.isfinite(x).all(), f"step {i}: non-finite {name}"
        assert torch.isfinite(cfg(run, i, edit)).all()


# --- off -----------------------------------------------------------------------------------------------

off_concept = st.one_of(
    st.builds(dict, scale=st.just(0.0), weight=weights()),
    st.builds(dict, scale=scales(), weight=st.one_of(st.just(0.0), st.floats(-10.0, 0.0))))


@settings(max_examples=80, **HYPOTHESIS)
@given(run=runs(), off=st.lists(off_concept, min_size=8, max_size=8), every_live=st.booleans())
def test_every_concept_off_is_plain_cfg(run, off, every_live):
    run = run.replace(concepts=[dataclasses.replace(c, **o) for c, o in zip(run.concepts, off)])
    assert Plan.build(run.concepts).inert
    for i, (edit, momentum) in enumerate(execute(run, every_live)):
        assert torch.equal(cfg(run, i, edit), cfg(run, i, None)), f"step {i}: not plain CFG"
        assert edit is None or not edit.any(), f"step {i}: a non-zero edit"
        assert momentum is None or not momentum.any(), f"step {i}: a non-zero momentum"


# --- direction -----------------------------------------------------------------------------------------

@settings(max_examples=80, **HYPOTHESIS)
@given(run=runs(dtypes=(torch.float32, torch.float64), grid=True), data=st.data())
def test_reverse_equals_mirrored_prediction(run, data):
    """Flip `reverse` of any subset of concepts and mirror their predictions to 2u - p: the edit a concept
    makes away from p is the one it makes towards 2u - p. On a 1/64 grid every step is exact."""
    n = len(run.concepts)
    flip = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="flip")
    e = run.e.clone()
    for k in range(n):
        if flip[k]:
            e[:, k] = 2 * run.u - run.e[:, k]
    mirrored = run.replace(
        concepts=[dataclasses.replace(c, reverse=not c.reverse) if f else c for c, f in zip(run.concepts, flip)],
        e=e)
    centre = 2 * run.u.unsqueeze(1)
    assert torch.equal(centre - (centre - run.e), run.e)  # the grid keeps the mirror exact: an involution
    assert_runs_equal(execute(mirrored), execute(run), exact=True, what="mirrored")


@settings(max_examples=60, **HYPOTHESIS)
@given(run=runs(dtypes=(torch.float32, torch.float64)), data=st.data())
def test_reverse_equals_negated_scale(run, data):
    n = len(run.concepts)
    flip = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="flip")
    negated = run.replace(concepts=[
        dataclasses.replace(c, scale=-c.scale, reverse=not c.reverse) if f else c
        for c, f in zip(run.concepts, flip)])
    assert_runs_equal(execute(negated), execute(run), exact=True, what="negated")


# --- order ---------------------------------------------------------------------------------------------

@settings(max_examples=80, **HYPOTHESIS)
@given(run=runs(dtypes=(torch.float32, torch.float64)), data=st.data(), every_live=st.booleans())
def test_concept_order_does_not_matter(run, data, every_live):
    n = len(run.concepts)
    perm = data.draw(st.permutations(range(n)), label="permutation")  # new position j holds concept perm[j]
    position = {c: j for j, c in enumerate(perm)}
    permuted = run.replace(
        concepts=[run.concepts[c] for c in perm],
        e=run.e[:, list(perm)] if n else run.e,
        masks=None if run.masks is None else [run.masks[c] for c in perm],
        inactive=[sorted(position[c] for c in step) for step in run.inactive])
    assert_runs_equal(execute(permuted, every_live), execute(run, every_live), exact=False, what="permuted")


# --- batch ---------------------------------------------------------------------------------------------

@settings(max_examples=60, **HYPOTHESIS)
@given(run=runs(dtypes=(torch.float32,)))
def test_samples_do_not_interact(run):
    whole = execute(run)
    for b in range(run.u.shape[1]):
        one = run.replace(
            u=run.u[:, b:b + 1], t=run.t[:, b:b + 1], e=run.e[:, :, b:b + 1],
            masks=None if run.masks is None else [m if m is None or m.shape[0] == 1 else m[b:b + 1]
                                                  for m in run.masks])
        sliced = [(None if x is None else x[b:b + 1], None if m is None else m[b:b + 1]) for x, m in whole]
        assert_runs_equal(execute(one), sliced, exact=False, what=f"sample {b}")
