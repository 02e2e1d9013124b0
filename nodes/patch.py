"""SEGA on a ComfyUI MODEL, through hooks that compose with other nodes.

No single-slot hook is taken (no sampler_cfg_function, no sampler_calc_cond_batch_function):
- an OUTER_SAMPLE wrapper adds the concept conditionings to the guider, so ComfyUI's
  process_conds treats them like positive and negative (areas, masks, timestep ranges,
  SDXL's pooled output, ControlNet), and creates the run's state;
- a SAMPLER_SAMPLE wrapper learns the run's sigma schedule and counts finished sampler
  steps through the step callback, so multi-call samplers advance one step at a time;
- a CALC_COND_BATCH wrapper appends the concepts a step needs to the main
  [positive, negative] evaluation: one batched model call, as the reference does;
- a post-cfg function adds SEGA's edit, computed by sega_core in noise space (and, when a
  preview or SEGA KSampler's concept_masks asks, notes where each concept's threshold kept).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch

import comfy.sampler_helpers
import comfy.samplers

from ..sega_core import Plan, SEGAValueError, sega_step
from . import attention_masks
from .concept_masks import MaskWatch, PreviewTarget
from .concept_spec import ConceptSpec
from .edit_files import EditRecord, save_path
from .errors import SEGAError
from .run_scaffold import RunScaffold, RunState, WrappersMP

log = logging.getLogger(__name__)

KEY = "sega"  # wrapper key, shared by every SEGA patch: a newer patch replaces an older one
RUN_KEY = "sega_run"  # where the per-run state sits in the sampling run's model_options
RECORD_KEY = "sega_record"  # set by SEGA Save Edit: a RecordSpec in the model's options


@dataclass(frozen=True)
class RecordSpec:
    """Save the edit of every run of this model, under this prefix in ComfyUI's output folder."""

    prefix: str


@dataclass
class RunLog:
    """What the sampling runs of a patched model leave for the node that sampled with it: each
    run's MaskWatch (the concepts' kept positions over that run), in order."""

    watches: list = field(default_factory=list)

    @property
    def sega_took_part(self) -> bool:
        """Whether SEGA ran in any sampling run (settings that can never edit leave no patch)."""
        return bool(self.watches)


class PendingStep(NamedTuple):
    """One step's concept evaluation, handed from calc_cond_batch to the post-cfg function."""

    step: int  # the step of the full schedule
    rows: list  # the concepts evaluated (plan.rows(step), less the inactive ones)
    inactive: list  # concepts outside their conditioning's timestep range at this step
    outputs: list  # the denoised predictions of `rows`
    covered: list  # per row: None (everywhere), or a bool map of where its area or mask gives a prediction
    attn: Optional[dict] = None  # concept -> its cross-attention map, for mask_from attention / intersect


def remove_sega(model) -> None:
    """Take any SEGA patch off a (cloned) ModelPatcher."""
    _Patch.remove_from(model)


def apply_sega(model, specs: Sequence[ConceptSpec], momentum_scale: float, momentum_beta: float,
               node: str = "SEGA Apply", start_at_step: int = 0, preview: Optional[PreviewTarget] = None,
               log_to: Optional[RunLog] = None):
    """A clone of `model` that samples with SEGA. Inert settings return an unpatched clone.

    The settings are validated here, once (Plan.build), with a message naming `node`, the concept
    and the setting. preview: the SEGA node on which the page draws each concept's kept positions
    while sampling (sent only when the client that queued the prompt is connected). log_to: a
    RunLog to which each sampling run adds its MaskWatch.

    start_at_step: the step of the full schedule at which this model's sampling runs start, for a
    run split across samplers (KSamplerAdvanced's start_at_step): warm-up and cool-down then count
    steps of the full schedule. A sampling run cannot see its place in a longer schedule, so the
    workflow says it.
    """
    try:
        plan = Plan.build([s.concept for s in specs], momentum_scale, momentum_beta,
                          names=[s.describe(i) for i, s in enumerate(specs)], where=node)
    except SEGAValueError as e:
        raise SEGAError(str(e)) from None
    m = model.clone()
    remove_sega(m)
    if plan.inert:
        # nothing can change the image: leave the model exactly as it was (bit-identical output)
        return m
    if start_at_step < 0:
        raise SEGAError(f"{node}: start_at_step must be >= 0, got {start_at_step}.")
    _Patch(list(specs), plan, node, int(start_at_step), preview, log_to).install(m)
    if plan.attention:
        attention_masks.check_model(m, plan, lambda c: f"{node}: {specs[c].describe(c)}")
        attention_masks.install(m)
    return m


class _Patch(RunScaffold):
    """The settings of one SEGA patch; holds no per-run state."""

    KEY = KEY
    RUN_KEY = RUN_KEY
    POST_CFG_MARK = "sega_patch"
    # the concepts are measured against the unconditional prediction, so it must be computed at cfg 1
    DISABLE_CFG1 = True

    def __init__(self, specs: list, plan: Plan, node: str, start_at_step: int = 0,
                 preview: Optional[PreviewTarget] = None, log_to: Optional[RunLog] = None):
        self.specs = specs
        self.plan = plan
        self.node = node
        self.start_at_step = start_at_step  # the full schedule's step at which each run starts
        self.preview = preview  # the node the page draws the kept positions on
        self.log_to = log_to  # the caller's RunLog

    def wrappers(self) -> dict:
        return {**super().wrappers(), WrappersMP.CALC_COND_BATCH: self.calc_cond_batch}

    # -- OUTER_SAMPLE: concepts into the guider, a fresh run state --------------------------
    def start_run(self, guider, noise: torch.Tensor, sigmas: torch.Tensor) -> "_Run":
        keys = self._add_concepts(guider, noise.shape[0])
        run = _Run(self, guider, keys, sigmas)
        run.record = guider.model_options.get(RECORD_KEY)
        if run.record is not None:
            run.recording = EditRecord(terms={}, sigmas=run.sigmas, shape=list(noise.shape), settings=self.settings())
        labels = [s.label or f"#{i + 1}" for i, s in enumerate(self.specs)]
        run.watch = MaskWatch.for_run(labels, self.preview, self.log_to is not None)
        if self.plan.attention:
            run.capture = attention_masks.start_capture(guider.model_options, guider.model_patcher,
                                                         self.plan.mask_words)
        return run

    def finish_run(self, run: "_Run", out: torch.Tensor) -> None:
        run.check_finite(out)
        if self.log_to is not None:
            self.log_to.watches.append(run.watch)
        if run.record is not None:
            path = run.recording.save(save_path(run.record.prefix))
            log.info("SEGA Save Edit: saved the edit of %d steps to %s", len(run.recording.terms), path)

    def settings(self) -> dict:
        """The SEGA settings of this patch, as saved with a recorded edit."""
        return {"concepts": [dict(label=s.label, **dataclasses.asdict(s.concept)) for s in self.specs],
                "momentum_scale": self.plan.momentum_scale, "momentum_beta": self.plan.momentum_beta}

    def _add_concepts(self, guider, batch: int) -> list:
        positive = guider.conds.get("positive") or []
        p_attn = next((c["cross_attn"] for c in positive if c.get("cross_attn") is not None), None)
        # A concept is measured against the negative's prediction, so it is evaluated under the same
        # model changes: a concept conditioning without its own ControlNet or hooks (LoRA hooks) gets
        # the negative's. (A ControlNet applied to the positive only reaches the other conds through
        # process_conds, as ComfyUI does for the negative.)
        negative = guider.conds.get("negative") or []
        inherit = {k: next((c[k] for c in negative if c.get(k) is not None), None) for k in ("control", "hooks")}
        inherit = {k: v for k, v in inherit.items() if v is not None}
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
            mask = spec.mask
            if mask is not None and mask.dim() == 3 and mask.shape[0] not in (1, batch):
                raise SEGAError(
                    f"{where}: its mask holds {mask.shape[0]} masks but the latent batch has {batch} images; "
                    f"use one mask (it applies to every image) or one per image.")
            key = f"sega_concept_{i}"
            entries = comfy.sampler_helpers.convert_cond(cond)
            entries = [dict(inherit, **{k: v for k, v in e.items() if v is not None or k not in inherit})
                       for e in entries]
            # hooks only act once registered on the model, which ComfyUI did for the prompts' hooks
            # before this wrapper runs: keep the registered ones (the prompts'), as ComfyUI does
            comfy.samplers.filter_registered_hooks_on_conds({key: entries}, guider.model_options)
            if any(e.get("hooks") is None for e in entries) and any(c[1].get("hooks") is not None for c in cond):
                log.warning("%s: its hooks are not on the prompt, so they do not act on the concept; "
                            "put the same hooks on the prompt (or encode the concept with the same hooked CLIP).",
                            where)
            guider.conds[key] = entries
            keys.append(key)
        return keys

    # -- CALC_COND_BATCH: concept rows in the main evaluation ------------------------------
    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        run = self.run_of(model_options)
        if (run is None or len(conds) != 2 or conds[1] is None
                or conds[0] is not run.guider.conds.get("positive")):
            # another node's own evaluation (PAG's, say): leave it alone
            return executor(model, conds, x_in, timestep, model_options)
        local = run.clock.step_for(timestep)
        step = local + self.start_at_step  # the step of the full schedule
        inactive = run.out_of_range(local)
        run.check_areas(x_in)
        rows = [c for c in run.plan.rows(step) if c not in inactive]
        extra = [run.guider.conds[run.keys[c]] for c in rows]
        # concept k of `rows` is cond index 2 + k in this evaluation
        attn = {2 + k: c for k, c in enumerate(rows) if c in self.plan.attention} if run.capture else None
        if attn:
            run.capture.begin(attn, x_in.shape[-2:])
        out = executor(model, list(conds) + extra, x_in, timestep, model_options)
        maps = run.capture.end() if attn else None
        covered = [run.coverage(c, x_in, timestep) for c in rows]
        run.pending = PendingStep(step, rows, inactive, out[2:], covered, maps)
        return out[:2]

    # -- post-cfg: the edit, in noise space -------------------------------------------------
    def edit(self, run: "_Run", args: dict, sigma: torch.Tensor) -> Optional[torch.Tensor]:
        if run.pending is None:
            return None
        step, rows, inactive, outs, covered, maps = run.pending
        run.pending = None
        x = args["input"]
        uncond_denoised = args["uncond_denoised"]
        # where a concept's area or mask leaves the latent uncovered, ComfyUI returns zeros:
        # there the concept makes no edit (its prediction is taken to be the unconditional one)
        outs = [o if m is None else torch.where(m, o, uncond_denoised) for o, m in zip(outs, covered)]
        # eps = (x - D) / sigma for eps and v models; the velocity for flow models
        uncond = (x - uncond_denoised) / sigma
        preds = (x.unsqueeze(0) - torch.stack(outs)) / sigma if rows else None
        entering = run.momentum_at(step)
        user_masks = run.masks_for(x)
        local = step - self.start_at_step  # recorded edits are indexed by the run's own schedule
        watch = run.watch
        wants_kept = watch is not None and watch.wants(local, run.clock.steps, run.first_call)
        attn_masks, both = None, True
        if maps is not None:
            attn_masks = attention_masks.masks_for(maps, [c for c in rows if c in self.plan.attention], self.plan, x,
                                                   lambda c: self.specs[c].describe(c))
            both = attention_masks.intersect_now(run.capture, run.guider.model_patcher,
                                                 run.sigmas[min(local, len(run.sigmas) - 1)])
        # the one place where the concepts' predictions become the edit
        result = sega_step(uncond, preds, rows, step, run.plan, entering, inactive, user_masks,
                           return_kept=wants_kept, attn_masks=attn_masks, intersect_both=both)
        if wants_kept:
            self._watch(watch, local, run.clock.steps, step, rows, inactive, result.kept, covered, user_masks,
                        run.plan)
        edit = result.edit
        run.after_step(result.momentum, uncond, preds, edit)
        if run.recording is not None and edit is not None and local not in run.recording.terms:
            run.recording.terms[local] = edit.detach().clone()
        return edit

    def _watch(self, watch, local, steps, step, rows, inactive, kept, covered, user_masks, plan: Plan) -> None:
        """Hands one step's kept positions to the run's MaskWatch, limited to where each concept
        can act (its area or conditioning mask, and its SEGA Concept mask); `plan` is the run's."""
        active = plan.acts(step, inactive)
        weights = []
        for k, c in enumerate(rows):
            if kept is not None and covered[k] is not None:
                kept[k] &= covered[k]
            m = None if user_masks is None else user_masks[c]
            weights.append(None if m is None else m.reshape(m.shape[0], *m.shape[-2:]))
        watch.add(local, steps, rows, active, kept, weights)


class _Run(RunState):
    """State of one SEGA sampling run: lives in that run's model_options and dies with it."""

    def __init__(self, patch: _Patch, guider, keys: list, sigmas: torch.Tensor):
        super().__init__(patch, sigmas)
        # the concepts' windows in steps of this run's full schedule (start_at_step and the run's
        # own steps), resolved once here: windows given as fractions of the schedule become steps
        self.plan: Plan = patch.plan.for_steps(patch.start_at_step + self.clock.steps)
        self.areas_checked = False
        self.guider = guider
        self.keys = keys
        self.pending: Optional[PendingStep] = None  # from calc_cond_batch to post-cfg
        self.step = None  # the step whose momentum is being formed
        self.momentum = None  # momentum entering self.step
        self.next_momentum = None
        self.first_call = False
        self.bad = []  # (step, what) device flags, read once after sampling
        self.record = None  # RecordSpec when the model went through SEGA Save Edit
        self.recording = None  # the EditRecord it fills
        self._masks = None  # (shape, device, dtype, masks) of the concepts' user masks, once resized
        self.watch = None  # MaskWatch when a preview or the concept_masks output wants the kept positions
        self.capture = None  # AttentionCapture when a concept's mask_from needs its cross-attention map

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

    def check_areas(self, x_in: torch.Tensor) -> None:
        """Once per run, before the first evaluation: a concept whose area (ConditioningSetArea, as
        resolved for this latent) lies outside the latent gets a SEGAError naming it, where ComfyUI's
        own evaluation would stop with a raw torch error."""
        if self.areas_checked:
            return
        self.areas_checked = True
        dims = tuple(x_in.shape[2:])
        for c, key in enumerate(self.keys):
            for e in self.guider.conds.get(key) or []:
                area = e.get("area")
                if area is None or isinstance(area[0], str):
                    continue
                area = comfy.samplers.add_area_dims(list(area), len(dims))
                half = len(area) // 2
                sizes, offsets = area[:len(dims)], area[half:half + len(dims)]
                if all(0 <= o < d and s > 0 for s, o, d in zip(sizes, offsets, dims)):
                    continue
                size = f"{dims[-2]} high and {dims[-1]} wide"
                at = ", ".join(f"{n}={o}" for n, o in zip("yx", offsets[-2:]))
                raise SEGAError(
                    f"{self.patch.node}: {self.patch.specs[c].describe(c)}: its area (ConditioningSetArea) lies "
                    f"outside the image: it starts at {at} (in latent cells, pixels / 8) but the latent is {size}. "
                    f"Move the area inside the image (x below the width, y below the height) or enlarge the "
                    f"image.")

    def masks_for(self, x: torch.Tensor) -> Optional[list]:
        """The concepts' user masks resized to x's latent (bilinear, like ComfyUI's noise masks), one
        entry per concept (None for no mask), shaped (B or 1, 1, [1 for time], H, W) on x's device."""
        specs = self.patch.specs
        if all(s.mask is None for s in specs):
            return None
        if self._masks is not None and self._masks[:3] == (x.shape, x.device, x.dtype):
            return self._masks[3]
        masks = [None if s.mask is None else _fit_mask(s.mask, x) for s in specs]
        self._masks = (x.shape, x.device, x.dtype, masks)
        return masks

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


def _fit_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A MASK ((H, W) or (N, H, W), any size) as a weight on latent x (B, C, [T,] H, W)."""
    m = mask.to(device=x.device, dtype=torch.float32)
    m = m.reshape(-1, 1, m.shape[-2], m.shape[-1])
    m = torch.nn.functional.interpolate(m, size=tuple(x.shape[-2:]), mode="bilinear")
    m = m.clamp(0.0, 1.0).to(x.dtype)
    return m.view(m.shape[0], 1, *([1] * (x.dim() - 4)), *x.shape[-2:])


def _in_range(entry: dict, sigma: float) -> bool:
    """The timestep test of comfy.samplers.get_area_and_mult, on the host."""
    start, end = entry.get("timestep_start"), entry.get("timestep_end")
    return not ((start is not None and sigma > start) or (end is not None and sigma < end))
