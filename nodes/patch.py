"""SEGA on a ComfyUI MODEL, through hooks that compose with other nodes.

No single-slot hook is taken (no sampler_cfg_function, no sampler_calc_cond_batch_function):
- an OUTER_SAMPLE wrapper adds the concept conditionings to the guider, so ComfyUI's
  process_conds treats them like positive and negative (areas, masks, timestep ranges,
  SDXL's pooled output, ControlNet), and creates the run's state;
- a SAMPLER_SAMPLE wrapper learns the run's sigma schedule and counts finished sampler
  steps through the step callback, so multi-call samplers advance one step at a time;
- a CALC_COND_BATCH wrapper appends the concepts a step needs to the main
  [positive, negative] evaluation: one batched model call, as the reference does;
- a post-cfg function adds SEGA's edit, computed by sega_core in noise space.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers

from ..sega_core import Plan, SEGAValueError, sega_step
from .concept_spec import ConceptSpec
from .edit_files import EditRecord, save_path
from .errors import SEGAError
from .steps import StepClock

log = logging.getLogger(__name__)

KEY = "sega"  # wrapper key, shared by every SEGA patch: a newer patch replaces an older one
RUN_KEY = "sega_run"  # where the per-run state sits in the sampling run's model_options
RECORD_KEY = "sega_record"  # set by SEGA Save Edit: a RecordSpec in the model's options


@dataclass(frozen=True)
class RecordSpec:
    """Save the edit of every run of this model, under this prefix in ComfyUI's output folder."""

    prefix: str
_WRAPPERS = (
    comfy.patcher_extension.WrappersMP.OUTER_SAMPLE,
    comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE,
    comfy.patcher_extension.WrappersMP.CALC_COND_BATCH,
)
def remove_sega(model) -> None:
    """Take any SEGA patch off a (cloned) ModelPatcher."""
    for kind in _WRAPPERS:
        model.remove_wrappers_with_key(kind, KEY)
    post = model.model_options.get("sampler_post_cfg_function")
    if post:
        model.model_options["sampler_post_cfg_function"] = [f for f in post if not hasattr(f, "sega_patch")]


def apply_sega(model, specs: Sequence[ConceptSpec], momentum_scale: float, momentum_beta: float,
               node: str = "SEGA Apply"):
    """A clone of `model` that samples with SEGA. Inert settings return an unpatched clone."""
    try:
        for i, spec in enumerate(specs):
            spec.concept.validate(spec.describe(i))
        plan = Plan.build([s.concept for s in specs], momentum_scale, momentum_beta)
    except SEGAValueError as e:
        raise SEGAError(f"{node}: {e}") from None
    m = model.clone()
    remove_sega(m)
    if plan.inert:
        # nothing can change the image: leave the model exactly as it was (bit-identical output)
        return m
    patch = _Patch(list(specs), plan, node)
    m.add_wrapper_with_key(_WRAPPERS[0], KEY, patch.outer_sample)
    m.add_wrapper_with_key(_WRAPPERS[1], KEY, patch.sampler_sample)
    m.add_wrapper_with_key(_WRAPPERS[2], KEY, patch.calc_cond_batch)

    def post_cfg(args):
        return patch.post_cfg(args)

    post_cfg.sega_patch = patch
    # the concepts are measured against the unconditional prediction, so it must be computed at cfg 1
    m.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=True)
    return m


class _Patch:
    """The settings of one SEGA patch; holds no per-run state."""

    def __init__(self, specs: list, plan: Plan, node: str):
        self.specs = specs
        self.plan = plan
        self.node = node

    # -- OUTER_SAMPLE: concepts into the guider, a fresh run state --------------------------
    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        noise, sigmas = args[0], args[3]
        keys = self._add_concepts(guider, noise.shape[0])
        run = _Run(self, guider, keys, sigmas)
        record = guider.model_options.get(RECORD_KEY)
        if record is not None:
            run.recording = EditRecord(terms={}, sigmas=run.sigmas, shape=list(noise.shape), settings=self.settings())
        guider.model_options[RUN_KEY] = run
        try:
            out = executor(*args, **kwargs)
        finally:
            guider.model_options.pop(RUN_KEY, None)
        run.check_finite(out)
        if record is not None:
            path = run.recording.save(save_path(record.prefix))
            log.info("SEGA Save Edit: saved the edit of %d steps to %s", len(run.recording.terms), path)
        return out

    def settings(self) -> dict:
        """The SEGA settings of this patch, as saved with a recorded edit."""
        return {"concepts": [dict(label=s.label, **dataclasses.asdict(s.concept)) for s in self.specs],
                "momentum_scale": self.plan.momentum_scale, "momentum_beta": self.plan.momentum_beta}

    def _add_concepts(self, guider, batch: int) -> list:
        positive = guider.conds.get("positive") or []
        p_attn = next((c["cross_attn"] for c in positive if c.get("cross_attn") is not None), None)
        keys = []
        for i, spec in enumerate(self.specs):
            where = spec.describe(i)
            cond = spec.conditioning
            if not isinstance(cond, list) or not cond:
                raise SEGAError(f"{where}: its conditioning input is empty; wire a CLIP Text Encode into it.")
            for entry in cond:
                attn = entry[0]
                if p_attn is not None and attn is not None and attn.shape[-1] != p_attn.shape[-1]:
                    raise SEGAError(
                        f"{where}: its conditioning is {attn.shape[-1]} wide but the positive prompt's is "
                        f"{p_attn.shape[-1]}: it was encoded for another model. Encode the concept with the "
                        f"CLIP of the model you sample with.")
                if attn is not None and attn.shape[0] not in (1, batch):
                    raise SEGAError(
                        f"{where}: its conditioning holds {attn.shape[0]} prompts but the latent batch has "
                        f"{batch} images; use one prompt (it applies to every image) or one per image.")
            key = f"sega_concept_{i}"
            guider.conds[key] = comfy.sampler_helpers.convert_cond(cond)
            keys.append(key)
        return keys

    # -- SAMPLER_SAMPLE: the schedule, and a step counter on the sampler's callback ------
    def sampler_sample(self, executor, model_wrap, sigmas, extra_args, callback, *args, **kwargs):
        run = extra_args.get("model_options", {}).get(RUN_KEY)
        if run is not None and run.patch is self:
            run.clock.set_schedule(sigmas, executor.class_obj)
            callback = run.clock.wrap_callback(callback)
        return executor(model_wrap, sigmas, extra_args, callback, *args, **kwargs)

    # -- CALC_COND_BATCH: concept rows in the main evaluation ------------------------------
    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        run = model_options.get(RUN_KEY)
        if (run is None or run.patch is not self or len(conds) != 2 or conds[1] is None
                or conds[0] is not run.guider.conds.get("positive")):
            # another node's own evaluation (PAG's, say): leave it alone
            return executor(model, conds, x_in, timestep, model_options)
        step = run.clock.step_for(timestep)
        inactive = run.out_of_range(step)
        rows = [c for c in self.plan.rows(step) if c not in inactive]
        extra = [run.guider.conds[run.keys[c]] for c in rows]
        out = executor(model, list(conds) + extra, x_in, timestep, model_options)
        covered = [run.coverage(c, x_in, timestep) for c in rows]
        run.pending = (step, rows, inactive, out[2:], covered)
        return out[:2]

    # -- post-cfg: the edit, in noise space -------------------------------------------------
    def post_cfg(self, args):
        denoised = args["denoised"]
        run = args["model_options"].get(RUN_KEY)
        if run is None or run.patch is not self or run.pending is None:
            return denoised
        step, rows, inactive, outs, covered = run.pending
        run.pending = None
        x = args["input"]
        sigma = args["sigma"].reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        uncond_denoised = args["uncond_denoised"]
        # where a concept's area or mask leaves the latent uncovered, ComfyUI returns zeros:
        # there the concept makes no edit (its prediction is taken to be the unconditional one)
        outs = [o if m is None else torch.where(m, o, uncond_denoised) for o, m in zip(outs, covered)]
        # eps = (x - D) / sigma for eps and v models; the velocity for flow models
        uncond = (x - uncond_denoised) / sigma
        preds = (x.unsqueeze(0) - torch.stack(outs)) / sigma if rows else None
        edit, momentum = sega_step(uncond, preds, rows, step, self.plan, run.momentum_at(step), inactive)
        run.after_step(momentum, uncond, preds, edit)
        if run.recording is not None and edit is not None and step not in run.recording.terms:
            run.recording.terms[step] = edit.detach().clone()
        if edit is None:
            return denoised
        return denoised - sigma * edit


class _Run:
    """State of one sampling run: lives in that run's model_options and dies with it."""

    def __init__(self, patch: _Patch, guider, keys: list, sigmas: torch.Tensor):
        self.patch = patch
        self.guider = guider
        self.keys = keys
        self.clock = StepClock(sigmas)
        self.pending = None  # (step, rows, inactive, concept outputs, coverage) for post-cfg
        self.step = None  # the step whose momentum is being formed
        self.momentum = None  # momentum entering self.step
        self.next_momentum = None
        self.first_call = False
        self.bad = []  # (step, what) device flags, read once after sampling
        self.recording = None  # EditRecord when the model went through SEGA Save Edit

    @property
    def sigmas(self) -> list:
        return self.clock.sigmas

    def coverage(self, c: int, x_in: torch.Tensor, timestep: torch.Tensor) -> Optional[torch.Tensor]:
        """Where concept c's conditioning gives a prediction: None for everywhere, else a bool map.

        Only concepts with an area or a mask (ConditioningSetArea, ConditioningSetMask) get a map;
        it is built with ComfyUI's own get_area_and_mult, as calc_cond_batch places them.
        """
        entries = self.guider.conds.get(self.keys[c]) or []
        if not any("area" in e or "mask" in e for e in entries):
            return None
        cover = torch.zeros_like(x_in)
        for e in entries:
            p = comfy.samplers.get_area_and_mult(e, x_in, timestep)
            if p is None:
                continue
            if p.area is None and "mask" not in e:
                return None
            target = cover
            if p.area is not None:
                dims = len(p.area) // 2
                for i in range(dims):
                    target = target.narrow(i + 2, p.area[i + dims], p.area[i])
            target += p.mult
        return cover > 0

    def out_of_range(self, step: int) -> list:
        """Concepts whose conditioning is outside its timestep range (ConditioningSetTimestepRange)
        at this step's scheduled sigma: ComfyUI gives such a cond no prediction, so no edit."""
        sigma = self.sigmas[min(step, len(self.sigmas) - 1)]
        out = []
        for c, key in enumerate(self.keys):
            entries = self.guider.conds.get(key) or []
            if not any(_in_range(e, sigma) for e in entries):
                out.append(c)
        return out

    def momentum_at(self, step: int) -> Optional[torch.Tensor]:
        """Momentum entering `step`; advances once per step, whatever the calls per step."""
        if step != self.step:
            if self.step is not None:
                self.momentum = self.next_momentum
            self.step = step
            self.first_call = True
        return self.momentum

    def after_step(self, momentum, uncond, preds, edit) -> None:
        if self.first_call:
            self.next_momentum = momentum
            self.first_call = False
        self.bad.append((self.step, "the model's unconditional prediction", ~torch.isfinite(uncond).all()))
        if preds is not None:
            self.bad.append((self.step, "the model's concept predictions", ~torch.isfinite(preds).all()))
        if edit is not None:
            self.bad.append((self.step, "SEGA's edit", ~torch.isfinite(edit).all()))

    def check_finite(self, out: torch.Tensor) -> None:
        if bool(torch.isfinite(out).all()):
            return
        first = next(((s, what) for s, what, flag in self.bad if bool(flag)), None)
        cause = (f"{first[1]} first became NaN or inf at step {first[0]}" if first
                 else "the sampler produced NaN or inf")
        raise SEGAError(
            f"{self.patch.node}: sampling with SEGA gave NaN or inf ({cause}). Check the input latent and "
            f"the model (fp16 overflow?), or lower the concepts' edit_scale.")


def _in_range(entry: dict, sigma: float) -> bool:
    """The timestep test of comfy.samplers.get_area_and_mult, on the host."""
    start, end = entry.get("timestep_start"), entry.get("timestep_end")
    return not ((start is not None and sigma > start) or (end is not None and sigma < end))
