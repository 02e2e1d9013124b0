"""SEGA's hooks inside a real ComfyUI sampler: batching, step counting, noise space, composition."""
from __future__ import annotations

import pytest
import torch

from sega_testlib import (Recorder, RowCounter, apply_sega, concept, cond, node_output, pack_module,
                          sample, tiny_sd15_model)

STEPS = 6


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_model()


@pytest.fixture(scope="module")
def prompts():
    return cond(1), cond(2), cond(3), cond(4)


def test_one_model_call_per_evaluation_carries_all_rows(model, prompts):
    pos, neg, c1, c2 = prompts
    counter = RowCounter()
    m = apply_sega(counter.attach(model), [concept(c1, warmup=2), concept(c2, warmup=1, cooldown=4)])
    sample(m, pos, neg, steps=STEPS)
    # one UNet call per step; positive, negative and both concepts until concept 2 cools down at step 4
    assert counter.rows == [4, 4, 4, 4, 3, 3]
    assert counter.cond_or_uncond[0] == [0, 1, 2, 3] or sorted(counter.cond_or_uncond[0]) == [0, 1, 2, 3]
    # the reference computes (2 + N) rows every step
    assert sum(counter.rows) < (2 + 2) * STEPS


def test_rows_before_warmup_skipped_without_momentum(model, prompts):
    pos, neg, c1, c2 = prompts
    counter = RowCounter()
    m = apply_sega(counter.attach(model), [concept(c1, warmup=2), concept(c2, warmup=3)], momentum_scale=0.0)
    sample(m, pos, neg, steps=STEPS)
    assert counter.rows == [2, 2, 3, 4, 4, 4]


def test_skipping_rows_gives_the_same_image(model, prompts, monkeypatch):
    pos, neg, c1, c2 = prompts
    concepts = [concept(c1, warmup=2, cooldown=4), concept(c2, warmup=3)]
    skipped = sample(apply_sega(model, concepts, momentum_scale=0.0), pos, neg, steps=STEPS)
    plan_cls = pack_module("sega_core.concepts").Plan
    # every concept row computed on every step before its cool-down, as the reference does
    monkeypatch.setattr(plan_cls, "rows", lambda self, step: [c for c in range(len(self)) if step < self.cooldown[c]])
    counter = RowCounter()
    full = sample(apply_sega(counter.attach(model), concepts, momentum_scale=0.0), pos, neg, steps=STEPS)
    assert counter.rows == [4, 4, 4, 4, 3, 3]
    # equal up to the UNet's float noise between batch sizes (2 to 4 rows), far below SEGA's effect
    torch.testing.assert_close(skipped, full, rtol=1e-4, atol=1e-4)
    plain = sample(model, pos, neg, steps=STEPS)
    assert (full - plain).abs().max() > 100 * (full - skipped).abs().max()


def test_settings_are_resolved_once_not_per_step(model, prompts, monkeypatch):
    """The concepts' settings become one Plan when the node runs; sampling never re-reads them."""
    pos, neg, c1, c2 = prompts
    concepts = pack_module("sega_core.concepts")
    patch = pack_module("nodes.patch")
    m = apply_sega(model, [concept(c1, warmup=1), concept(c2, warmup=0, cooldown=4, reverse=True)])
    resolved, plans = [], []
    monkeypatch.setattr(concepts.Plan, "build", classmethod(lambda cls, *a, **k: resolved.append("Plan.build")))
    monkeypatch.setattr(concepts.Concept, "validate", lambda self, *a, **k: resolved.append("Concept.validate"))
    real_step = patch.sega_step

    def spy(uncond, preds, rows, step, plan, *args, **kwargs):
        plans.append(plan)
        return real_step(uncond, preds, rows, step, plan, *args, **kwargs)

    monkeypatch.setattr(patch, "sega_step", spy)
    for _ in range(2):  # two runs of the same patched model
        sample(m, pos, neg, steps=STEPS)
    assert resolved == []
    assert len(plans) == 2 * STEPS
    assert all(p is plans[0] for p in plans)  # one Plan object, every step of every run
    assert plans[0].signed_scale == (5.0, -5.0) and plans[0].cooldown[1] == 4


def test_fraction_windows_are_resolved_once_per_run(model, prompts, monkeypatch):
    """Windows given as fractions of the schedule become steps once per run, when the run's step
    count is known (Plan.for_steps), never per step; the image equals the same window in steps."""
    pos, neg, c1, c2 = prompts
    concepts = pack_module("sega_core.concepts")
    patch = pack_module("nodes.patch")
    fractions = [concept(c1, warmup=0.25, cooldown=0.75, window_unit="fraction"), concept(c2, warmup=1)]
    m = apply_sega(model, fractions)
    resolved, plans = [], []
    real_for_steps, real_step = concepts.Plan.for_steps, patch.sega_step
    monkeypatch.setattr(concepts.Plan, "for_steps",
                        lambda self, steps: resolved.append(steps) or real_for_steps(self, steps))
    monkeypatch.setattr(patch, "sega_step", lambda *a, **k: plans.append(a[4]) or real_step(*a, **k))
    by_fraction = [sample(m, pos, neg, steps=STEPS), sample(m, pos, neg, steps=2 * STEPS)]
    assert resolved == [STEPS, 2 * STEPS]  # once per run
    assert len(plans) == 3 * STEPS
    assert all(p is plans[0] for p in plans[:STEPS]) and all(p is plans[STEPS] for p in plans[STEPS:])
    # acts at step i of N when 0.25 <= i / N < 0.75: steps 2-4 of 6, steps 3-8 of 12
    assert (plans[0].warmup, plans[0].cooldown) == ((2, 1), (5, float("inf")))
    assert (plans[STEPS].warmup, plans[STEPS].cooldown) == ((3, 1), (9, float("inf")))
    monkeypatch.undo()
    for steps, got, (warmup, cooldown) in [(STEPS, by_fraction[0], (2, 5)), (2 * STEPS, by_fraction[1], (3, 9))]:
        in_steps = apply_sega(model, [concept(c1, warmup=warmup, cooldown=cooldown), concept(c2, warmup=1)])
        assert torch.equal(got, sample(in_steps, pos, neg, steps=steps))


def test_edit_is_sega_core_in_noise_space(model, prompts):
    """Replays the recorded predictions through sega_core: same edit, with momentum across steps."""
    pos, neg, c1, c2 = prompts
    core = pack_module("sega_core")
    concepts = [concept(c1, warmup=1, threshold=0.8), concept(c2, warmup=2, reverse=True, scale=3.0, weight=0.5)]
    rec = Recorder()
    m = rec.attach(apply_sega(model, concepts, momentum_scale=0.3, momentum_beta=0.5))
    sample(m, pos, neg, steps=STEPS, cfg=6.0, batch=2)
    assert len(rec.calls) == STEPS
    plan = core.Plan.build([c.concept for c in concepts], 0.3, 0.5)
    momentum = None
    for step, call in enumerate(rec.calls):
        x, sigma = call["x"], call["sigma"].view(-1, 1, 1, 1)
        cond_d, uncond_d, *concept_d = call["out"]
        rows = plan.rows(step)
        assert len(concept_d) == len(rows)
        eps = lambda d: (x - d) / sigma  # noqa: E731
        preds = torch.stack([eps(d) for d in concept_d]) if rows else None
        edit, momentum, _ = core.sega_step(eps(uncond_d), preds, rows, step, plan, momentum)
        cfg_denoised = uncond_d + (cond_d - uncond_d) * 6.0
        expected = cfg_denoised if edit is None else cfg_denoised - sigma * edit
        torch.testing.assert_close(call["final"], expected, rtol=1e-5, atol=1e-5)
    assert edit is not None


@pytest.mark.parametrize("concepts", [
    pytest.param([], id="empty"),
    pytest.param([dict(scale=0.0), dict(scale=0.0, reverse=True)], id="scale0"),
    pytest.param([dict(weight=0.0)], id="weight0"),
])
@pytest.mark.parametrize("cfg", [7.5, 1.0])
def test_inert_sega_is_bit_identical(model, prompts, concepts, cfg):
    pos, neg, c1, _ = prompts
    plain = sample(model, pos, neg, steps=4, cfg=cfg)
    counter = RowCounter()
    out = sample(apply_sega(counter.attach(model), [concept(c1, **c) for c in concepts]), pos, neg, steps=4, cfg=cfg)
    assert torch.equal(plain, out)
    assert counter.rows == [1 if cfg == 1.0 else 2] * 4


def test_cfg1_still_computes_the_negative(model, prompts):
    pos, neg, c1, _ = prompts
    counter = RowCounter()
    out = sample(apply_sega(counter.attach(model), [concept(c1, warmup=0)]), pos, neg, steps=4, cfg=1.0)
    plain = sample(model, pos, neg, steps=4, cfg=1.0)
    assert counter.rows == [3] * 4
    assert torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-3


@pytest.mark.parametrize("sampler,calls_per_step", [("heun", 2), ("dpm_2", 2), ("dpmpp_2s_ancestral", 2),
                                                    ("dpmpp_sde", 2), ("euler_ancestral", 1), ("uni_pc", 1)])
def test_warmup_counts_sampler_steps_not_model_calls(model, prompts, sampler, calls_per_step):
    pos, neg, c1, _ = prompts
    counter = RowCounter()
    warmup = 3
    m = apply_sega(counter.attach(model), [concept(c1, warmup=warmup)], momentum_scale=0.0)
    sample(m, pos, neg, steps=STEPS, sampler=sampler)
    # concept rows start with the first call of step `warmup`
    first = counter.rows.index(3)
    assert counter.rows[:first] == [2] * first
    assert all(r == 3 for r in counter.rows[first:])
    assert first == warmup * calls_per_step


def test_momentum_advances_once_per_step_with_heun(model, prompts):
    """Every call of a step uses the momentum of the previous steps, formed from each step's first call."""
    pos, neg, c1, _ = prompts
    core = pack_module("sega_core")
    concepts = [concept(c1, warmup=2)]
    rec = Recorder()
    sample(rec.attach(apply_sega(model, concepts, momentum_scale=0.5)), pos, neg, steps=4, sampler="heun")
    plan = core.Plan.build([c.concept for c in concepts], 0.5, 0.4)
    # heun: steps 0-2 call the model twice, the last step once
    steps = [0, 0, 1, 1, 2, 2, 3]
    assert len(rec.calls) == len(steps)
    momentum, entering, current = None, None, -1
    for step, call in zip(steps, rec.calls):
        if step != current:
            entering, current, first = momentum, step, True
        x, sigma = call["x"], call["sigma"].view(-1, 1, 1, 1)
        cond_d, uncond_d, *concept_d = call["out"]
        eps = lambda d: (x - d) / sigma  # noqa: E731
        edit, new_m, _ = core.sega_step(eps(uncond_d), torch.stack([eps(d) for d in concept_d]), [0], step, plan,
                                     entering)
        if first:
            momentum, first = new_m, False
        expected = uncond_d + (cond_d - uncond_d) * 7.5
        expected = expected if edit is None else expected - sigma * edit
        torch.testing.assert_close(call["final"], expected, rtol=1e-5, atol=1e-5)


def _node(module, name):
    import importlib
    return getattr(importlib.import_module(module), name)


def _rescale_cfg(m):
    return node_output(_node("comfy_extras.nodes_model_advanced", "RescaleCFG")().patch(m, 0.7))


def _cfg_zero_star(m):
    return node_output(_node("comfy_extras.nodes_cfg", "CFGZeroStar").execute(m))


def _pag(m):
    return node_output(_node("comfy_extras.nodes_pag", "PerturbedAttentionGuidance").execute(m, 3.0))


@pytest.mark.parametrize("other", [_rescale_cfg, _cfg_zero_star, _pag], ids=["RescaleCFG", "CFGZeroStar", "PAG"])
@pytest.mark.parametrize("order", ["sega_first", "other_first"])
def test_composes_with_other_guidance(model, prompts, other, order):
    pos, neg, c1, _ = prompts
    concepts = [concept(c1, warmup=0)]
    plain = sample(model, pos, neg, steps=4)
    only_sega = sample(apply_sega(model, concepts), pos, neg, steps=4)
    only_other = sample(other(model), pos, neg, steps=4)
    counter = RowCounter()
    base = counter.attach(model)
    both_model = other(apply_sega(base, concepts)) if order == "sega_first" else apply_sega(other(base), concepts)
    both = sample(both_model, pos, neg, steps=4)
    assert torch.isfinite(both).all()
    # each keeps its effect: dropping either one changes the image
    for without in (only_sega, only_other, plain):
        assert (both - without).abs().max() > 1e-4
    # SEGA's rows ride in the main evaluation; another node's own calls stay as they were
    assert 3 in counter.rows
    if other is _pag:
        assert counter.rows.count(1) == 4


def test_two_samplers_sharing_a_patched_model_do_not_share_state(model, prompts):
    pos, neg, c1, _ = prompts
    m = apply_sega(model, [concept(c1, warmup=1)])
    a = sample(m, pos, neg, steps=STEPS, seed=1)
    sample(m, pos, neg, steps=3, seed=2)
    assert torch.equal(a, sample(m, pos, neg, steps=STEPS, seed=1))


# -- bad input ----------------------------------------------------------------------------

def test_concept_from_another_text_encoder_is_refused(model, prompts):
    pos, neg, _, _ = prompts
    errors = pack_module("nodes.errors")
    with pytest.raises(errors.SEGAError, match=r"SEGA Concept 'wide'.*1280 wide.*768.*CLIP"):
        sample(apply_sega(model, [concept(cond(5, width=1280), label="wide")]), pos, neg, steps=2)


def test_concept_batch_must_match_latent_batch(model, prompts):
    pos, neg, _, _ = prompts
    errors = pack_module("nodes.errors")
    with pytest.raises(errors.SEGAError, match=r"SEGA Concept #1.*3 prompts.*latent batch has 2"):
        sample(apply_sega(model, [concept(cond(5, batch=3))]), pos, neg, steps=2, batch=2)
    out = sample(apply_sega(model, [concept(cond(5, batch=2), warmup=0)]), pos, neg, steps=2, batch=2)
    assert torch.isfinite(out).all()


def test_nan_prediction_is_an_error_not_a_nan_image(model, prompts):
    pos, neg, c1, _ = prompts
    errors = pack_module("nodes.errors")
    latent = torch.zeros(1, 4, 8, 8)
    latent[0, 0, 0, 0] = float("nan")
    with pytest.raises(errors.SEGAError, match=r"SEGA KSampler: .*NaN or inf.*step 0"):
        sample(apply_sega(model, [concept(c1)], node="SEGA KSampler"), pos, neg, steps=3, latent=latent,
               denoise=0.5)


def test_bad_settings_name_the_node_and_input(model, prompts):
    _, _, c1, _ = prompts
    errors = pack_module("nodes.errors")
    with pytest.raises(errors.SEGAError, match=r"SEGA Guider: SEGA Concept 'x': threshold must be in \[0, 1\)"):
        apply_sega(model, [concept(c1, label="x", threshold=1.0)], node="SEGA Guider")
    with pytest.raises(errors.SEGAError, match=r"SEGA Apply: .*momentum_beta"):
        apply_sega(model, [concept(c1)], momentum_beta=1.5)


def test_concept_timestep_range_is_respected(model, prompts):
    """A concept limited by ConditioningSetTimestepRange acts only inside its range."""
    import node_helpers

    pos, neg, c1, _ = prompts
    late = node_helpers.conditioning_set_values(c1, {"start_percent": 0.5, "end_percent": 1.0})
    never = node_helpers.conditioning_set_values(c1, {"start_percent": 1.0, "end_percent": 1.0})
    plain = sample(model, pos, neg, steps=STEPS)
    counter = RowCounter()
    out = sample(apply_sega(counter.attach(model), [concept(never, warmup=0)], momentum_scale=0.0), pos, neg,
                 steps=STEPS)
    assert counter.rows == [2] * STEPS
    assert torch.equal(out, plain)
    counter = RowCounter()
    out = sample(apply_sega(counter.attach(model), [concept(late, warmup=0)], momentum_scale=0.0), pos, neg,
                 steps=STEPS)
    first = counter.rows.index(3)
    assert 0 < first < STEPS and counter.rows[:first] == [2] * first and set(counter.rows[first:]) == {3}
    assert not torch.equal(out, plain)


@pytest.mark.parametrize("limit", ["mask", "area"])
def test_concept_with_area_or_mask_edits_only_there(model, prompts, limit):
    """ConditioningSetMask / ConditioningSetArea on a concept: no edit where it has no prediction."""
    import node_helpers

    pos, neg, c1, _ = prompts
    if limit == "mask":
        mask = torch.zeros(1, 64, 64)
        mask[:, :, :32] = 1.0  # left half, in pixels; ComfyUI resizes it to the latent
        limited = node_helpers.conditioning_set_values(c1, {"mask": mask, "set_area_to_bounds": False,
                                                            "mask_strength": 1.0})
    else:
        # area in pixels / 8: left half of an 8x8 latent
        limited = node_helpers.conditioning_set_values(c1, {"area": (64 // 8, 32 // 8, 0, 0), "strength": 1.0,
                                                            "set_area_to_bounds": False})
    rec = Recorder()
    sample(rec.attach(apply_sega(model, [concept(limited, warmup=0, threshold=0.0)], momentum_scale=0.0)),
           pos, neg, steps=4, size=8)
    for call in rec.calls:
        cond_d, uncond_d = call["out"][0], call["out"][1]
        edit = call["final"] - (uncond_d + (cond_d - uncond_d) * 7.5)
        assert edit[..., 4:].abs().max() == 0, "edit outside the concept's " + limit
        assert edit[..., :2].abs().max() > 0


def test_sdxl_concept_rows_get_their_own_pooled_output():
    """Concepts go through process_conds like the prompt: SDXL's `y` of each row is its own pooled output."""
    from sega_testlib import sdxl_cond, tiny_sdxl_model

    model = tiny_sdxl_model()
    pos, neg, c1, c2 = sdxl_cond(1), sdxl_cond(2), sdxl_cond(3), sdxl_cond(4)
    counter = RowCounter()
    out = sample(apply_sega(counter.attach(model), [concept(c1, warmup=0), concept(c2, warmup=0)]), pos, neg,
                 steps=3)
    assert torch.isfinite(out).all()
    assert counter.rows == [4] * 3
    for y, order in zip(counter.y, counter.cond_or_uncond):
        for row, which in enumerate(order):
            expected = {0: pos, 1: neg, 2: c1, 3: c2}[which][0][1]["pooled_output"][0]
            torch.testing.assert_close(y[row, :1280], expected)


def test_composes_with_rescale_cfg_zero_star_and_pag_at_once(model, prompts):
    """SEGA, RescaleCFG (cfg slot), CFGZeroStar (post-cfg) and PAG (post-cfg + attention patch) on one model."""
    pos, neg, c1, _ = prompts
    patches = {"sega": lambda m: apply_sega(m, [concept(c1, warmup=0)]), "rescale": _rescale_cfg,
               "zero_star": _cfg_zero_star, "pag": _pag}

    def build(names, base):
        m = base
        for name in names:
            m = patches[name](m)
        return m

    counter = RowCounter()
    everything = sample(build(list(patches), counter.attach(model)), pos, neg, steps=4)
    assert torch.isfinite(everything).all()
    assert counter.rows == [3, 1] * 4  # SEGA's concept in the main call, PAG's own call
    for left_out in patches:
        others = sample(build([n for n in patches if n != left_out], model), pos, neg, steps=4)
        assert (everything - others).abs().max() > 1e-4, f"{left_out} had no effect next to the others"
