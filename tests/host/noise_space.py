"""Replays a recorded sampling run through sega_core, to check what the hooks computed.

`sample_recorded` samples with a Recorder (sega_testlib) on the model and notes, at each step
callback, how many main evaluations had run: that gives the true sampler step of every model
evaluation (the callback of step i comes right after its first evaluation). `replay` then
recomputes every evaluation's result from its recorded predictions with sega_core in noise
space, eps = (x - D) / sigma per sample (the velocity for flow models), with the momentum
advancing once per step, and compares it with what ComfyUI got.
"""
from __future__ import annotations

import comfy_host

comfy_host.prepare_host()
import torch

import comfy.sample

from sega_testlib import Recorder, pack_module


def sample_recorded(model, positive, negative, latent, steps=4, cfg=5.0, sampler="euler", scheduler="normal",
                    seed=0, denoise=1.0, start_step=None, last_step=None, force_full_denoise=False,
                    disable_noise=False):
    """Samples `model` (a Recorder is attached); returns (samples, recorded calls, true step per call)."""
    rec = Recorder()
    marks = []  # evaluations seen when step i's callback came
    noise = torch.zeros_like(latent) if disable_noise else comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample(rec.attach(model), noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                              denoise=denoise, start_step=start_step, last_step=last_step,
                              force_full_denoise=force_full_denoise, disable_noise=disable_noise, seed=seed,
                              callback=lambda i, *args: marks.append(len(rec.calls)), disable_pbar=True)
    return out, rec.calls, steps_from_callbacks(marks, len(rec.calls))


def steps_from_callbacks(marks: list, calls: int) -> list:
    """The step of each evaluation: the first evaluation of step i is the last one before its callback."""
    firsts = [m - 1 for m in marks]
    return [max((i for i, f in enumerate(firsts) if f <= j), default=0) for j in range(calls)]


def eps_of(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma.reshape(-1, *([1] * (x.dim() - 1)))


def replay(calls, steps, plan, cfg, masks=None, offset=0, rtol=1e-5, atol=1e-5):
    """Checks every recorded evaluation against sega_core; returns the edits (None where none).

    The concept rows of an evaluation are those `plan.rows(step)` names; the momentum entering a
    step is the one left by the first evaluation of the previous step.
    """
    core = pack_module("sega_core")
    edits = []
    momentum = entering = None
    current = first = None
    for step, call in zip(steps, calls):
        step += offset
        if step != current:
            entering, current, first = momentum, step, True
        x, sigma = call["x"], call["sigma"]
        cond_d, uncond_d, *concept_d = call["out"]
        rows = plan.rows(step)
        assert len(concept_d) == len(rows), f"step {step}: {len(concept_d)} concept rows, expected {rows}"
        preds = torch.stack([eps_of(x, sigma, d) for d in concept_d]) if rows else None
        kwargs = {} if masks is None else {"masks": [None if m is None else m.to(x) for m in masks]}
        edit, new_momentum, _ = core.sega_step(eps_of(x, sigma, uncond_d), preds, rows, step, plan, entering, **kwargs)
        if first:
            momentum, first = new_momentum, False
        expected = uncond_d + (cond_d - uncond_d) * cfg
        if edit is not None:
            expected = expected - sigma.reshape(-1, *([1] * (x.dim() - 1))) * edit
        torch.testing.assert_close(call["final"], expected, rtol=rtol, atol=atol)
        edits.append(edit)
    return edits


def plan_of(concepts, momentum_scale=0.1, momentum_beta=0.4):
    core = pack_module("sega_core")
    return core.Plan.build([c.concept for c in concepts], momentum_scale, momentum_beta)
