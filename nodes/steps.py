"""Which sampler step a model evaluation belongs to, counted on the run's own schedule."""
from __future__ import annotations

import torch

# ComfyUI's samplers report step i through the callback right after its first model call, then
# may call the model again for the same step (a corrector or a midpoint) before step i + 1.
# Those extra calls on step i, by sampler function, as a function of i and the run's schedule
# (read off comfy/k_diffusion/sampling.py; test_samplers.py checks every listed sampler against
# its callbacks). Other samplers are taken to make none.


def _second_call_unless_last(i: int, sigmas: list) -> int:
    # a midpoint or Heun correction, except on a step that ends at sigma 0 (an Euler step there)
    return 0 if sigmas[i + 1] == 0 else 1


def _heunpp2(i: int, sigmas: list) -> int:
    # Heun++ evaluates at sigma[i+1] and sigma[i+2]; Heun on the second-to-last step; Euler on the last
    end = sigmas[-1]
    return 0 if sigmas[i + 1] == end else 1 if sigmas[i + 2] == end else 2


def _seeds_3(i: int, sigmas: list) -> int:
    return 0 if sigmas[i + 1] == 0 else 2


def _sa_solver_pece(i: int, sigmas: list) -> int:
    # the corrector re-evaluates the model on every step but the first
    return 0 if i == 0 else 1


EXTRA_CALLS = {
    **{name: _second_call_unless_last for name in (
        "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpm_2_ancestral_RF",
        "sample_dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral_RF", "sample_dpmpp_2s_ancestral_cfg_pp",
        "sample_dpmpp_sde", "sample_dpmpp_sde_gpu", "sample_seeds_2", "sample_exp_heun_2_x0",
        "sample_exp_heun_2_x0_sde")},
    "sample_heunpp2": _heunpp2,
    "sample_seeds_3": _seeds_3,
    "sample_sa_solver_pece": _sa_solver_pece,
}
MAX_EXTRA_CALLS = 2
# DPM-Solver fast and adaptive choose their own noise levels and report their own (fewer) steps,
# after all the calls of a step: a call counts as the step of the run's schedule whose noise
# interval (sigma[i+1], sigma[i]] holds it.
BY_SIGMA = ("dpm_fast_function", "dpm_adaptive_function")
# calls past the expected ones without a step callback: the sampler reports no steps, read sigma instead
CALLS_WITHOUT_CALLBACK = 3


class StepClock:
    """Counts sampler steps of one run from the sampler's step callback, without reading sigma.

    `wrap_callback` goes around the callback the SAMPLER_SAMPLE wrapper passes on; `step_for`
    is called once per guider evaluation (the main cond batch, or the post-cfg function).
    """

    def __init__(self, sigmas: torch.Tensor, sampler=None):
        self.completed = 0  # step callbacks seen
        self.calls_since_callback = 0
        self.set_schedule(sigmas, sampler)

    def set_schedule(self, sigmas: torch.Tensor, sampler=None) -> None:
        self.sigmas = [float(s) for s in sigmas.detach().flatten().cpu()]
        name = getattr(getattr(sampler, "sampler_function", None), "__name__", "")
        self.extra_calls = EXTRA_CALLS.get(name)
        self.by_sigma = name in BY_SIGMA
        self.sigma_step = 0

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def wrap_callback(self, callback):
        def counted(step, *args, **kwargs):
            self.completed = step + 1
            self.calls_since_callback = 0
            if callback is not None:
                return callback(step, *args, **kwargs)
        return counted

    def step_for(self, timestep: torch.Tensor) -> int:
        """The sampler step (0-based) of this evaluation."""
        if self.by_sigma:
            return self._at_sigma(timestep)
        self.calls_since_callback += 1
        n = self.calls_since_callback
        if n > (MAX_EXTRA_CALLS if self.extra_calls else 0) + CALLS_WITHOUT_CALLBACK:
            # a sampler that reports no steps
            return max(self.completed, self._at_sigma(timestep))
        if self.completed == 0:
            return 0
        # after step i's report come its extra calls, then step i + 1
        i = self.completed - 1
        extra = self.extra_calls(i, self.sigmas) if self.extra_calls else 0
        return i if n <= extra else i + 1

    def _at_sigma(self, timestep: torch.Tensor) -> int:
        """The step whose noise interval (sigma[i+1], sigma[i]] holds this call's sigma; never goes back
        (an adaptive solver retrying a step at a higher noise level stays on its step)."""
        s = float(timestep.max()) * (1 - 1e-5)
        step = min(sum(1 for t in self.sigmas[1:-1] if t >= s), max(self.steps - 1, 0))
        self.sigma_step = max(self.sigma_step, step)
        return self.sigma_step
