"""Edit an inverted photo as LEDITS++ does: SEGA Photo Edit, SEGA Photo Guider and SEGA Inversion Sampler.

The edit replays the inversion's noise maps (SEGA Invert Photo, photo_invert.py) from its start with
the same sampler step; with the inversion's own prediction that rebuilds the photo, and the concepts'
terms added to the prediction edit it (LEDITS++, Brack et al., CVPR 2024, arXiv 2311.16711). The
math is sega_core.ledits'; the replay is a KSAMPLER whose function is ledits.replay, and the
prediction comes from a guider that evaluates the uncond and the acting concepts in one batch.
"""
from __future__ import annotations

from typing import Optional

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..sega_core import Plan, SEGAValueError, sega_step
from ..sega_core import ledits
from . import attention_masks
from .concept_masks import MaskWatch, PreviewTarget, preview_target
from .concept_nodes import Concepts, _chain
from .errors import SEGAError
from .patch import _fit_mask, remove_sega
from .photo_invert import Inversion, PhotoInversion, SEGAInvertPhoto, _check_width, _interruptible
from .schema import CATEGORY, schema


# -- the replay sampler ----------------------------------------------------------------------------

OUTSIDE_MASKS = ("as LEDITS++", "keep the photo")
RECONSTRUCTION = ("exact", "as diffusers")


def _check_reconstruction(node: str, reconstruction: str) -> None:
    if reconstruction not in RECONSTRUCTION:
        raise SEGAError(f"{node}: reconstruction must be 'exact' or 'as diffusers', got {reconstruction!r}.")


def _reconstruction_input(tooltip: str, optional: bool = False):
    return io.Combo.Input("reconstruction", options=list(RECONSTRUCTION), default=RECONSTRUCTION[0],
                          optional=optional, tooltip=tooltip)


def _outside_masks_input():
    return io.Combo.Input(
        "outside_masks", options=list(OUTSIDE_MASKS), default=OUTSIDE_MASKS[0], optional=True,
        tooltip="as LEDITS++ (default): the edit term is zero outside a concept's mask, but the latent there still "
                "changes a little (the model sees the whole image). keep the photo (beyond LEDITS++): after every "
                "step the latent outside the concepts' masks (their union, soft values blend) is set back to the "
                "reconstruction's own path, so the photo stays there. Needs SEGA Photo Guider's concepts (SEGA "
                "Photo Edit's own); if any concept has no mask, nothing is kept.")


def _check_outside(node: str, outside_masks: str) -> None:
    if outside_masks not in OUTSIDE_MASKS:
        raise SEGAError(f"{node}: outside_masks must be one of {', '.join(repr(o) for o in OUTSIDE_MASKS)}, "
                        f"got {outside_masks!r}.")


def _keep_outside(inversion: PhotoInversion, guider, x: torch.Tensor, sigmas: torch.Tensor, exact: bool, node: str):
    """The replay's `keep` for "keep the photo": None when a concept has no mask (or there is none)."""
    if not isinstance(guider, PhotoGuider):
        raise SEGAError(f"{node}: outside_masks 'keep the photo' takes the masks of SEGA Photo Guider's concepts, "
                        f"but the guider is a {type(guider).__name__}; use SEGA Photo Guider or set outside_masks "
                        f"to 'as LEDITS++'.")
    if not guider.specs or any(s.mask is None for s in guider.specs):
        return None
    if inversion.photo is None:
        raise SEGAError(f"{node}: outside_masks 'keep the photo' needs an inversion that holds the photo's latent; "
                        f"run SEGA Invert Photo again.")
    mask = None
    for s in guider.specs:  # the union of the masks, each resized to the latent as the patch resizes it
        m = _fit_mask(s.mask, x)
        mask = m if mask is None else torch.maximum(mask, m)
    x0 = inversion.photo.to(x)
    end = x0 if exact else x0 - inversion.correction.to(x)  # where the reconstruction itself ends
    return ledits.keep_photo(mask, x0, sigmas, inversion.draws(), flow=inversion.rule == "euler_ancestral_rf",
                             end=end)


def replay_sampler(inversion: PhotoInversion, reconstruction: str = "exact", node: str = "SEGA Inversion Sampler",
                   record: Optional[list] = None, outside_masks: str = "as LEDITS++"):
    """A SAMPLER that replays the inversion's noise maps from its start (the incoming noise is not used).

    record: a list to which every step's (x, sigma, denoised) is appended (for tests).
    outside_masks: "as LEDITS++", or "keep the photo": the latent outside the union of the PhotoGuider's
    concept masks follows the reconstruction (ledits.keep_photo)."""
    exact = reconstruction == "exact"
    _check_outside(node, outside_masks)

    def replay_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        inversion.check_sigmas(node, sigmas)
        inversion.check_latent(node, x.shape, "latent image")
        inversion.check_model(node, model_k.inner_model.model_patcher)
        denoise = _interruptible(model_k, extra_args or {})
        if record is not None:
            inner = denoise

            def denoise(xk, sigma):
                out = inner(xk, sigma)
                record.append((xk.clone(), float(sigma), out.clone()))
                return out

        keep = None
        if outside_masks == "keep the photo":
            keep = _keep_outside(inversion, model_k.inner_model, x, sigmas, exact, node)
        try:
            return ledits.replay(inversion.start.to(x), sigmas.to(x), inversion.zs.to(x), denoise,
                                 rule=inversion.rule, correction=inversion.correction.to(x) if exact else None,
                                 callback=callback, where=node, keep=keep)
        except SEGAValueError as e:
            raise SEGAError(str(e)) from None

    return comfy.samplers.KSAMPLER(replay_fn)


# -- the photo guider: uncond (or the inversion's source CFG) plus the concepts ---------------------

class PhotoGuider(comfy.samplers.CFGGuider):
    """A guider for replaying an inversion: the base prediction plus the concepts' terms, combined as
    LEDITS++ ("ledits") or SEGA ("sega") does. The base is the inversion's own prediction (the uncond,
    or with a source prompt its source-guided CFG) for the "exact" reconstruction, the uncond alone
    "as diffusers" (whose edit drops the source prompt).

    One model call per step with the base rows (1, or 2 for a source prompt's exact reconstruction)
    and the concepts acting at that step. On the first step the edit is at the inversion's start, on
    its first noise level: with the inversion's model the base rows are the inversion's own first
    predictions (PhotoInversion.first_step) and are not computed again.
    """

    def __init__(self, model_patcher, inversion: PhotoInversion, specs: list, plan: Plan, combination: str,
                 node: str, preview: Optional[PreviewTarget] = None, tally: bool = False,
                 reconstruction: str = "exact"):
        m = model_patcher.clone()
        remove_sega(m)
        super().__init__(m)
        self.inversion = inversion
        self.specs = specs
        self.plan = plan
        self.combination = combination
        self.node = node
        # the source-guided base, as the inversion computed it; "as diffusers" edits from the uncond alone
        self.source = bool(inversion.source) and reconstruction == "exact"
        conds = {"negative": inversion.uncond}
        if self.source:
            conds["positive"] = inversion.source
        self.keys = []
        for i, spec in enumerate(specs):
            key = f"sega_concept_{i}"
            conds[key] = spec.conditioning
            self.keys.append(key)
        self.inner_set_conds(conds)
        self.cfg = inversion.source_guidance
        self._sigmas = [float(s) for s in inversion.sigmas]
        self._first = inversion.first_step.for_model(m) if inversion.first_step is not None else None
        self.rows_per_step: list = []  # model rows of each evaluation of the last run (for tests and benchmarks)
        self.preview = preview  # the node the page draws each concept's kept positions on
        self.tally = tally  # gather the kept positions for a concept_masks output
        self.watch: Optional[MaskWatch] = None  # the last run's MaskWatch
        self.capture = None  # the run's AttentionCapture when a concept's mask_from needs its attention map
        self._fitted = None  # (shape, device, dtype) and the user masks resized to that latent
        if plan.attention:
            attention_masks.check_model(m, plan, lambda c: f"{node}: {specs[c].describe(c)}")
            attention_masks.install(m)

    def sample(self, *args, **kwargs):
        self.rows_per_step = []
        labels = [s.label or f"#{i + 1}" for i, s in enumerate(self.specs)]
        self.watch = MaskWatch.for_run(labels, self.preview, self.tally) if self.specs else None
        self.capture = None
        return super().sample(*args, **kwargs)

    def _step(self, timestep: torch.Tensor) -> int:
        s = float(timestep.flatten()[0])
        return min(range(len(self._sigmas) - 1), key=lambda i: abs(self._sigmas[i] - s))

    def _rows(self, step: int) -> list:
        plan = self.plan
        if self.combination == "sega":
            return plan.rows(step)
        return ledits.ledits_rows(plan, step)

    def _known_base(self, x: torch.Tensor, timestep: torch.Tensor) -> Optional[list]:
        """The base rows' denoised predictions when the inversion computed them already (at its start,
        on its first noise level, with this model), else None."""
        first = self._first
        if first is None or float(timestep.flatten()[0]) != self._sigmas[0]:
            return None
        base = [first.uncond] + ([first.source] if self.source else [])
        if any(t is None for t in base) or not torch.equal(x, self.inversion.start.to(x)):
            return None
        return [t.to(x) for t in base]

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        step = self._step(timestep)
        rows = self._rows(step)
        known = self._known_base(x, timestep)
        base_conds = [] if known is not None else [self.conds.get("negative")] + (
            [self.conds.get("positive")] if self.source else [])
        conds = base_conds + [self.conds[self.keys[c]] for c in rows]
        # concept k of `rows` is cond index len(base_conds) + k in this evaluation
        attn = {len(base_conds) + k: c for k, c in enumerate(rows) if c in self.plan.attention}
        if attn:
            if self.capture is None or model_options.get("transformer_options", {}).get(
                    attention_masks.ATTN_KEY) is not self.capture:
                self.capture = attention_masks.start_capture(model_options, self.model_patcher, self.plan.mask_words)
            self.capture.begin(attn, x.shape[-2:])
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options) if conds else []
        maps = self.capture.end() if attn else None
        self.rows_per_step.append(len(conds) * x.shape[0])
        base = known if known is not None else out[:len(base_conds)]
        uncond_denoised = base[0]
        source_denoised = base[1] if self.source else uncond_denoised
        if self.source:
            # CFG towards the source prompt, as the inversion computed it (the correct sign)
            denoised = uncond_denoised + (source_denoised - uncond_denoised) * self.cfg
        else:
            denoised = uncond_denoised
        outs = out[len(base_conds):]
        if rows:
            sigma = timestep.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
            uncond = (x - uncond_denoised) / sigma
            preds = (x.unsqueeze(0) - torch.stack(outs)) / sigma
            masks = self._masks(x)
            watch = self.watch
            want = watch is not None and watch.wants(step, self.inversion.steps, True)
            attn_masks, both = None, True
            if maps is not None:
                attn_masks = attention_masks.masks_for(maps, list(attn.values()), self.plan, x,
                                                       lambda c: f"{self.node}: {self.specs[c].describe(c)}")
                both = attention_masks.intersect_now(self.capture, self.model_patcher, self._sigmas[step])
            # the one place where the concepts' predictions become the edit (no momentum: the photo is
            # replayed, not sampled afresh)
            if self.combination == "sega":
                result = sega_step(uncond, preds, rows, step, self.plan, None, (), masks, return_kept=want,
                                   attn_masks=attn_masks, intersect_both=both)
            else:
                result = ledits.ledits_guidance(uncond, preds, rows, step, self.plan, masks, return_kept=want,
                                                attn_masks=attn_masks, intersect_both=both)
            if want:
                self._watch(step, rows, result.kept, masks)
            if result.edit is not None:
                denoised = denoised - sigma * result.edit
        for fn in model_options.get("sampler_post_cfg_function", []):
            denoised = fn({"denoised": denoised, "cond": self.conds.get("positive"),
                           "uncond": self.conds.get("negative"), "cond_scale": self.cfg, "model": self.inner_model,
                           "uncond_denoised": uncond_denoised, "cond_denoised": source_denoised, "sigma": timestep,
                           "model_options": model_options, "input": x})
        return denoised

    def _watch(self, step: int, rows: list, kept, masks) -> None:
        # without momentum, a step's rows are exactly the concepts that act at it (both combinations)
        active = [c in rows for c in range(len(self.plan))]
        weights = []
        for c in rows:
            m = None if masks is None else masks[c]
            weights.append(None if m is None else m.reshape(m.shape[0], *m.shape[-2:]))
        self.watch.add(step, self.inversion.steps, rows, active, kept, weights)

    def _masks(self, x):
        """The concepts' user masks resized to x's latent, once per shape, device and dtype (not per step)."""
        if all(s.mask is None for s in self.specs):
            return None
        key = (x.shape, x.device, x.dtype)
        if self._fitted is None or self._fitted[0] != key:
            self._fitted = (key, [None if s.mask is None else _fit_mask(s.mask, x) for s in self.specs])
        return self._fitted[1]


def photo_guider(model, inversion, concepts, combination: str, node: str, preview: Optional[PreviewTarget] = None,
                 tally: bool = False, reconstruction: str = "exact") -> PhotoGuider:
    if not isinstance(inversion, PhotoInversion):
        raise SEGAError(f"{node}: the inversion input must come from a SEGA Invert Photo node.")
    if combination not in ("ledits", "sega"):
        raise SEGAError(f"{node}: combination must be 'ledits' or 'sega', got {combination!r}.")
    _check_reconstruction(node, reconstruction)
    inversion.check_model(node, model)
    specs = _chain(concepts)
    try:
        # LEDITS++ has no momentum; SEGA's combination here uses none either (the photo is replayed,
        # not sampled afresh). Windows given as fractions of the schedule become steps of the
        # inversion's schedule, here, once: the edit replays exactly the inversion's steps.
        plan = Plan.build([s.concept for s in specs], 0.0, 0.0, names=[s.describe(i) for i, s in enumerate(specs)],
                          where=node).for_steps(inversion.steps)
    except SEGAValueError as e:
        raise SEGAError(str(e)) from None
    for i, spec in enumerate(specs):
        if not isinstance(spec.conditioning, list) or not spec.conditioning:
            raise SEGAError(f"{spec.describe(i)}: its conditioning input is empty; wire a CLIP Text Encode into it.")
        _check_width(f"{node}: {spec.describe(i)}", "its conditioning", spec.conditioning, inversion.uncond)
        for entry in spec.conditioning:
            extra = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if "area" in extra or "mask" in extra or extra.get("start_percent", 0.0) > 0.0 \
                    or extra.get("end_percent", 1.0) < 1.0:
                raise SEGAError(
                    f"{node}: {spec.describe(i)}: its conditioning has an area, a mask or a timestep range "
                    f"(ConditioningSetArea / ConditioningSetMask / ConditioningSetTimestepRange), which photo edits "
                    f"do not support; use SEGA Concept's mask input and its warmup / cooldown instead.")
    return PhotoGuider(model, inversion, specs, plan, combination, node, preview, tally, reconstruction)



def _combination_input():
    return io.Combo.Input(
        "combination", options=["ledits", "sega"], default="ledits",
        tooltip="How the concepts are combined. ledits (default): LEDITS++'s plain sum, each concept kept where "
                "the sum over channels of its edit is in its top (1 - threshold) of positions (one mask for all "
                "channels). sega: SEGA's per-channel threshold and weights (no momentum).")


def _concepts_input():
    return Concepts.Input(
        "concepts", optional=True,
        tooltip="From a SEGA Concept or SEGA Concept Stack (LEDITS++ uses warmup 0 and threshold 0.9). Left "
                "empty, or every edit_scale 0: the photo is reconstructed.")


class SEGAPhotoEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SEGAPhotoEdit",
            display_name="SEGA Photo Edit",
            category=CATEGORY,
            description="Adds or removes concepts in an inverted photo (LEDITS++): replays the inversion's noise "
                        "with the concepts' guidance. With no concept the photo comes back unchanged.",
            search_aliases=["ledits", "ledits++", "edit photo", "image edit"],
            inputs=[
                io.Model.Input("model", tooltip="The model the photo was inverted with (other model patches and "
                                                "LoRAs are fine)."),
                Inversion.Input("inversion", tooltip="From SEGA Invert Photo."),
                _concepts_input(),
                _combination_input(),
                _reconstruction_input(
                    "exact (default): the last step lands on the photo's own latent, so with no concept the output "
                    "is the photo (float32, within 1e-4); with a source prompt the edit keeps the inversion's "
                    "source-guided prediction (one more model row per step). as diffusers: as diffusers' LEDITS++: "
                    "the last step ends on the model's x0-prediction (slightly softer) and the edit starts from the "
                    "uncond alone (with a source prompt the photo is then not reconstructed)."),
                _outside_masks_input(),
            ],
            outputs=[
                io.Latent.Output(tooltip="The edited latent; VAE Decode it."),
                io.Mask.Output(
                    "concept_masks", display_name="concept_masks",
                    tooltip="Where each concept acted: per concept, then per image, the fraction of the concept's "
                            "active steps in which its mask kept each position, at image size (as SEGA KSampler's)."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.dynprompt],
        )

    @classmethod
    def execute(cls, model, inversion, combination, reconstruction, concepts=None,
                outside_masks="as LEDITS++") -> io.NodeOutput:
        guiders = []
        latent = photo_edit(model, inversion, concepts, combination, reconstruction, guider_out=guiders,
                            preview=preview_target(cls.hidden), outside_masks=outside_masks)
        return io.NodeOutput(latent, concept_masks(model, guiders[0], inversion))


def photo_edit(model, inversion, concepts=None, combination: str = "ledits", reconstruction: str = "exact",
               node: str = "SEGA Photo Edit", guider_out: Optional[list] = None,
               preview: Optional[PreviewTarget] = None, outside_masks: str = "as LEDITS++") -> dict:
    """Edits an inverted photo: the LATENT. guider_out: a list that receives the PhotoGuider (its
    rows_per_step and the MaskWatch of the kept positions). outside_masks: as replay_sampler's."""
    _check_reconstruction(node, reconstruction)
    _check_outside(node, outside_masks)
    guider = photo_guider(model, inversion, concepts, combination, node, preview, tally=guider_out is not None,
                          reconstruction=reconstruction)
    if guider_out is not None:
        guider_out.append(guider)
    latent = torch.zeros(inversion.latent_shape, dtype=torch.float32)
    callback = latent_preview.prepare_callback(guider.model_patcher, inversion.steps)
    out = guider.sample(torch.zeros_like(latent), latent,
                        replay_sampler(inversion, reconstruction, node, outside_masks=outside_masks),
                        inversion.sigmas.clone(), callback=callback,
                        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=inversion.seed)
    out = out.to(comfy.model_management.intermediate_device())
    if not bool(torch.isfinite(out).all()):
        raise SEGAError(f"{node}: the edit gave NaN or inf. Check the model (fp16 overflow?) and lower the "
                        f"concepts' edit_scale.")
    return {"samples": out}


def concept_masks(model, guider: PhotoGuider, inversion: PhotoInversion) -> torch.Tensor:
    """SEGA Photo Edit's concept_masks: (concepts x batch, H, W) at image size."""
    ratio = getattr(model.get_model_object("latent_format"), "spacial_downscale_ratio", 8)
    shape = inversion.latent_shape
    size = (shape[-2] * ratio, shape[-1] * ratio)
    if guider.watch is None or all(s is None for s in guider.watch.sums):
        return torch.zeros(max(1, len(guider.specs)) * shape[0], *size)
    return guider.watch.result(shape[0], size)


class SEGAPhotoGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SEGAPhotoGuider",
            display_name="SEGA Photo Guider",
            category=CATEGORY,
            description="A GUIDER for SamplerCustomAdvanced that edits an inverted photo as SEGA Photo Edit does; "
                        "use it with SEGA Inversion Sampler's sampler and sigmas.",
            search_aliases=["ledits guider", "photo edit guider"],
            inputs=[
                io.Model.Input("model", tooltip="The model the photo was inverted with."),
                Inversion.Input("inversion", tooltip="From SEGA Invert Photo: its uncond (and source prompt) "
                                                     "form the base prediction."),
                _concepts_input(),
                _combination_input(),
                _reconstruction_input(
                    "Matters only with a source prompt; set it as on SEGA Inversion Sampler. exact (default): the "
                    "base prediction is the inversion's source-guided one (one more model row per step), so the "
                    "photo is reconstructed. as diffusers: the base is the uncond alone, as diffusers' LEDITS++ "
                    "edit (the photo is then not reconstructed).", optional=True),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced.")],
            hidden=[io.Hidden.unique_id, io.Hidden.dynprompt],
        )

    @classmethod
    def execute(cls, model, inversion, combination, concepts=None, reconstruction="exact") -> io.NodeOutput:
        return io.NodeOutput(photo_guider(model, inversion, concepts, combination, "SEGA Photo Guider",
                                          preview=preview_target(cls.hidden), reconstruction=reconstruction))


class SEGAInversionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SEGAInversionSampler",
            display_name="SEGA Inversion Sampler",
            category=CATEGORY,
            description="For SamplerCustomAdvanced: a SAMPLER that replays an inverted photo's noise maps from the "
                        "inversion's start, and the inversion's SIGMAS. Use it with SEGA Photo Guider, SEGA Guider "
                        "or any guider; the noise input of the sampler is not used (Disable Noise is fine).",
            search_aliases=["ledits sampler", "inversion replay", "replay noise"],
            inputs=[
                Inversion.Input("inversion", tooltip="From SEGA Invert Photo."),
                _reconstruction_input(
                    "exact (default): the last step lands on the photo's own latent. as diffusers: it ends on the "
                    "model's x0-prediction, as diffusers' LEDITS++ does. Set SEGA Photo Guider's alike."),
                _outside_masks_input(),
            ],
            outputs=[io.Sampler.Output(tooltip="Replays the inversion; connect to SamplerCustomAdvanced."),
                     io.Sigmas.Output(tooltip="The inversion's schedule; connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, inversion, reconstruction, outside_masks="as LEDITS++") -> io.NodeOutput:
        node = "SEGA Inversion Sampler"
        if not isinstance(inversion, PhotoInversion):
            raise SEGAError(f"{node}: the inversion input must come from a SEGA Invert Photo node.")
        _check_reconstruction(node, reconstruction)
        return io.NodeOutput(replay_sampler(inversion, reconstruction, node, outside_masks=outside_masks),
                             inversion.sigmas.clone())


NODES = [SEGAInvertPhoto, SEGAPhotoEdit, SEGAPhotoGuider, SEGAInversionSampler]
