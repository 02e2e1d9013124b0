"""The per-run plumbing that SEGA's patch and SEGA Replay Edit share.

A patch installs itself on a ModelPatcher under its wrapper key:
- OUTER_SAMPLE makes the run's state (a RunState, or a subclass) and puts it in the run's
  model_options under the patch's run key, then takes it out however the run ends;
- SAMPLER_SAMPLE gives the state's StepClock the run's schedule and the sampler's step callback;
- a post-cfg function turns the patch's edit (noise space) into ComfyUI's denoised space:
  denoised - sigma * edit.
Each hook acts only on a run whose state belongs to its own patch: a newer patch on a copy of
the model, or another patch pack's run, is left alone.
"""
from __future__ import annotations

from typing import Optional

import torch

import comfy.patcher_extension

from .steps import StepClock

WrappersMP = comfy.patcher_extension.WrappersMP


class RunState:
    """State of one sampling run of one patch: lives in that run's model_options and dies with it."""

    def __init__(self, patch: "RunScaffold", sigmas: torch.Tensor):
        self.patch = patch
        self.clock = StepClock(sigmas)


class RunScaffold:
    """Base of a model patch that keeps per-run state. Subclasses set KEY (the wrapper key: a newer
    patch with the same key replaces an older one), RUN_KEY (where the run state sits in
    model_options) and POST_CFG_MARK (the attribute that marks its post-cfg function), and define
    start_run and edit; finish_run and wrappers are optional."""

    KEY: str
    RUN_KEY: str
    POST_CFG_MARK: str
    DISABLE_CFG1: bool = False  # True when the edit needs the unconditional prediction at cfg 1

    # -- what a subclass defines -------------------------------------------------------------
    def start_run(self, guider, noise: torch.Tensor, sigmas: torch.Tensor) -> RunState:
        """The state of a new run (may refuse the run with a SEGAError)."""
        raise NotImplementedError

    def finish_run(self, run: RunState, out: torch.Tensor) -> None:
        """Called with the sampled latent after a run that ended normally."""

    def edit(self, run: RunState, args: dict, sigma: torch.Tensor) -> Optional[torch.Tensor]:
        """This evaluation's edit in noise space (None for none); `sigma` is shaped to broadcast on x."""
        raise NotImplementedError

    def wrappers(self) -> dict:
        return {WrappersMP.OUTER_SAMPLE: self.outer_sample, WrappersMP.SAMPLER_SAMPLE: self.sampler_sample}

    # -- installing on a model ---------------------------------------------------------------
    @classmethod
    def remove_from(cls, model) -> None:
        """Take any patch of this kind off a (cloned) ModelPatcher."""
        for kind in (WrappersMP.OUTER_SAMPLE, WrappersMP.SAMPLER_SAMPLE, WrappersMP.CALC_COND_BATCH):
            model.remove_wrappers_with_key(kind, cls.KEY)
        post = model.model_options.get("sampler_post_cfg_function")
        if post:
            model.model_options["sampler_post_cfg_function"] = [f for f in post if not hasattr(f, cls.POST_CFG_MARK)]

    def install(self, model) -> None:
        """Put this patch's hooks on a (cloned) ModelPatcher."""
        for kind, wrapper in self.wrappers().items():
            model.add_wrapper_with_key(kind, self.KEY, wrapper)

        def post_cfg(args):
            return self.post_cfg(args)

        setattr(post_cfg, self.POST_CFG_MARK, self)
        model.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=self.DISABLE_CFG1)

    def run_of(self, model_options: dict) -> Optional[RunState]:
        """This patch's run state in a run's model_options, or None (not sampling, or another patch's run)."""
        run = model_options.get(self.RUN_KEY)
        return run if run is not None and run.patch is self else None

    # -- the hooks ---------------------------------------------------------------------------
    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        noise, sigmas = args[0], args[3]
        run = self.start_run(guider, noise, sigmas)
        guider.model_options[self.RUN_KEY] = run
        try:
            out = executor(*args, **kwargs)
        finally:
            guider.model_options.pop(self.RUN_KEY, None)
        self.finish_run(run, out)
        return out

    def sampler_sample(self, executor, model_wrap, sigmas, extra_args, callback, *args, **kwargs):
        run = self.run_of(extra_args.get("model_options", {}))
        if run is not None:
            run.clock.set_schedule(sigmas, executor.class_obj)
            callback = run.clock.wrap_callback(callback)
        return executor(model_wrap, sigmas, extra_args, callback, *args, **kwargs)

    def post_cfg(self, args):
        denoised = args["denoised"]
        run = self.run_of(args["model_options"])
        if run is None:
            return denoised
        x = args["input"]
        sigma = args["sigma"].reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        edit = self.edit(run, args, sigma)
        if edit is None:
            return denoised
        return denoised - sigma * edit
