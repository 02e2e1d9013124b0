"""SEGA with every sampler and scheduler ComfyUI lists: runs, stays finite, counts sampler steps
(not model calls) and advances the momentum once per step.

Each run is replayed through sega_core (noise_space.replay) with the true step of every model
evaluation, read off the sampler's own step callbacks (the callback of step i comes right after
its first evaluation; corrector and midpoint evaluations follow it). A wrong step, a concept row
too many or too few, or a momentum advanced per call instead of per step fails the replay.
"""
from __future__ import annotations

import math

import pytest
import torch

import comfy.samplers

from families import FAMILIES, one_thread  # noqa: F401  (fixture)
from noise_space import plan_of, replay, sample_recorded
from sega_testlib import apply_sega, concept

SAMPLERS = list(comfy.samplers.KSampler.SAMPLERS)
SCHEDULERS = list(comfy.samplers.KSampler.SCHEDULERS)
# DPM-Solver fast and adaptive pick their own noise levels and report their own steps: a model
# evaluation belongs to the scheduled step whose noise interval (sigma[i+1], sigma[i]] holds it
BY_SIGMA = {"dpm_fast", "dpm_adaptive"}
MULTI_CALL = ["heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
              "dpmpp_sde", "dpmpp_sde_gpu", "seeds_2", "seeds_3", "exp_heun_2_x0", "sa_solver_pece"]
STEPS = 5
_MODELS = {}
pytestmark = pytest.mark.usefixtures("one_thread")


def family_model(name):
    if name not in _MODELS:
        _MODELS[name] = FAMILIES[name].build()
    return FAMILIES[name], _MODELS[name]


def steps_by_sigma(model, sampler, scheduler, steps, calls):
    """The scheduled step of each recorded call of a sampler that picks its own noise levels, read
    off the recording: the step i whose interval of the run's schedule, from sigma[i] (included)
    down to sigma[i+1] (excluded, up to rounding), holds the sigma the call received; a call never
    goes back to an earlier step (an adaptive solver that retries at a higher noise level stays on
    its step)."""
    schedule = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler, scheduler=scheduler).sigmas
    schedule = schedule.tolist()

    def interval(sigma: float) -> int:
        for i in range(steps - 1):
            lower = schedule[i + 1]
            if sigma > lower and not math.isclose(sigma, lower, rel_tol=1e-5):
                return i
        return steps - 1

    out = []
    for call in calls:
        out.append(max([interval(float(call["sigma"].max()))] + out[-1:]))
    return out


def run_and_replay(family_name, sampler, scheduler, steps=STEPS, batch=1):
    family, model = family_model(family_name)
    # concept 0 from step 1 until step 3, concept 1 from step 2: every branch of the step, and the
    # rows of concept 0 drop out at step 3
    concepts = [concept(family.cond(3), warmup=1, cooldown=3, threshold=0.7),
                concept(family.cond(4), warmup=2, reverse=True, scale=3.0)]
    m = apply_sega(model, concepts, momentum_scale=0.5, momentum_beta=0.4)
    out, calls, call_steps = sample_recorded(m, family.cond(1), family.cond(2), torch.zeros(batch, *family.latent),
                                             steps=steps, cfg=family.cfg, sampler=sampler, scheduler=scheduler)
    assert torch.isfinite(out).all(), f"{sampler}/{scheduler} gave NaN or inf"
    if sampler in BY_SIGMA:
        call_steps = steps_by_sigma(model, sampler, scheduler, steps, calls)
    replay(calls, call_steps, plan_of(concepts, 0.5, 0.4), family.cfg, rtol=1e-4, atol=1e-4)
    return call_steps


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_eps_model(sampler):
    steps = run_and_replay("sd15", sampler, "normal")
    assert steps[-1] == STEPS - 1 or sampler in BY_SIGMA


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_flow_model(sampler):
    """Flow models take the samplers' _RF variants and sa_solver's shifted first sigma."""
    run_and_replay("sd3", sampler, "simple")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler(scheduler):
    run_and_replay("sd15", "euler", scheduler)
    run_and_replay("sd15", "heun", scheduler)


@pytest.mark.parametrize("sampler", ["euler"] + MULTI_CALL + ["uni_pc"])
def test_warmup_starts_at_step_k(sampler):
    """A warm-up of k steps: the concept's rows appear with the first model call of step k, for
    one-call and multi-call samplers alike (momentum off, so earlier steps need no concept rows)."""
    family, model = family_model("sd15")
    k = 2
    m = apply_sega(model, [concept(family.cond(3), warmup=k)], momentum_scale=0.0)
    _, calls, steps = sample_recorded(m, family.cond(1), family.cond(2), torch.zeros(1, *family.latent), steps=STEPS,
                                      cfg=family.cfg, sampler=sampler)
    assert [c["rows"] for c in calls] == [3 if s >= k else 2 for s in steps]
    assert sorted(set(steps)) == list(range(STEPS))


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpmpp_2s_ancestral", "dpmpp_sde", "uni_pc"])
def test_momentum_advances_once_per_step(sampler):
    """With momentum on, the replay (momentum taken from each step's first call) matches, and a
    momentum advanced on every call does not."""
    family, model = family_model("sd15")
    concepts = [concept(family.cond(3), warmup=1)]
    m = apply_sega(model, concepts, momentum_scale=0.5)
    _, calls, steps = sample_recorded(m, family.cond(1), family.cond(2), torch.zeros(1, *family.latent),
                                      steps=STEPS, cfg=family.cfg, sampler=sampler)
    plan = plan_of(concepts, 0.5)
    replay(calls, steps, plan, family.cfg)
    if len(calls) > len(set(steps)):
        per_call = list(range(len(calls)))  # every call its own step: the momentum advances per call
        with pytest.raises(AssertionError):
            replay(calls, [min(s, STEPS - 1) for s in per_call], plan, family.cfg)


@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential", "sgm_uniform", "simple", "beta"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_with_every_common_scheduler(sampler, scheduler):
    """The full grid, 3 steps each: finite, and every evaluation replays."""
    run_and_replay("sd15", sampler, scheduler, steps=3)
