"""Edit a real photo as LEDITS++ does: SEGA Invert Photo, SEGA Photo Edit, SEGA Photo Guider and
SEGA Inversion Sampler.

LEDITS++ (Brack et al., CVPR 2024, arXiv 2311.16711) inverts the photo's latent with the
edit-friendly DDPM inversion (Huberman-Spiegelglas et al., arXiv 2304.06140): one independent noisy
draw x_t of the photo per step and the noise map z_t that makes the sampler's step from one draw
land exactly on the next. Replaying those maps with the same predictions rebuilds the photo; adding
concept terms to the prediction edits it and leaves the rest. The math is sega_core.ledits'; here
it runs inside ComfyUI's own sampling (a CFGGuider with a KSAMPLER whose function is the inversion
or replay loop), so conditionings go through process_conds and the model through its usual wrappers.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers
import comfy.supported_models
from comfy_api.latest import io

from ..sega_core import Plan, SEGAValueError, sega_step
from ..sega_core import ledits
from .concept_masks import MaskWatch, PreviewTarget, preview_target
from .concept_nodes import Concepts, _chain
from .errors import SEGAError
from .patch import _fit_mask, remove_sega
from .schema import CATEGORY, schema

SEGA_INVERSION = "SEGA_INVERSION"
Inversion = io.Custom(SEGA_INVERSION)
SDXL_ZERO_NOISE_STEPS = 3  # LEDITS++ SDXL's num_zero_noise_steps


@dataclass(frozen=True, eq=False)
class PhotoInversion:
    """What SEGA Invert Photo made: everything an edit needs to replay the photo's noise.

    Tensors are in ComfyUI's sampler space (the latent after the model's process_latent_in), on the
    CPU in float32. Never modified after it is made: ComfyUI's cache hands the same object to every
    later edit.
    """

    start: torch.Tensor  # the first draw x_{t_0}, where the edit starts
    zs: torch.Tensor  # (N, *latent) one noise map per step
    sigmas: torch.Tensor  # (N + 1,) the schedule, ending with 0
    correction: torch.Tensor  # photo latent minus the last step's mean: makes reconstruction exact
    latent_shape: tuple  # the LATENT's samples shape
    family: str  # type(model_config).__name__ of the model that made it
    rule: str  # the sampler step: "dpmpp_2m_sde" (eps / v models) or "euler_ancestral_rf" (flow models)
    uncond: list  # CONDITIONING the predictions were measured against
    source: Optional[list] = None  # the source prompt's CONDITIONING, when given
    source_guidance: float = 1.0
    skip: float = 0.15
    seed: int = 0
    zero_noise_steps: int = 0

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.start, self.zs, self.sigmas, self.correction))

    def check_model(self, node: str, model) -> None:
        family = _family(model)
        if family != self.family:
            raise SEGAError(
                f"{node}: the inversion was made with a {self.family} model but the model input is {family}. "
                f"Invert the photo with the model you edit with (SEGA Invert Photo's model input).")

    def check_latent(self, node: str, shape: tuple, what: str = "latent") -> None:
        if tuple(shape) != tuple(self.start.shape):
            raise SEGAError(
                f"{node}: the {what} is {_size(shape)} but the inversion was made from a {_size(self.start.shape)} "
                f"latent. Use the latent of the photo you inverted (the same VAE Encode).")

    def check_sigmas(self, node: str, sigmas: torch.Tensor) -> None:
        n = sigmas.shape[-1] - 1
        if n != self.steps:
            raise SEGAError(
                f"{node}: the sigmas have {n} steps but the inversion has {self.steps}. Connect SEGA Inversion "
                f"Sampler's sigmas output (the inversion's own schedule) to the sampler.")
        if not torch.allclose(sigmas.detach().float().cpu(), self.sigmas, rtol=1e-5, atol=1e-6):
            raise SEGAError(
                f"{node}: the sigmas are not the inversion's schedule (same {n} steps, other noise levels). "
                f"Connect SEGA Inversion Sampler's sigmas output to the sampler.")


def _family(model) -> str:
    return type(model.model.model_config).__name__


def _size(shape) -> str:
    shape = tuple(shape)
    return f"{shape[0]}x{shape[1]}x" + "x".join(str(s) for s in shape[2:])


def _is_flow(model) -> bool:
    return isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def _zero_noise_steps(model) -> int:
    return SDXL_ZERO_NOISE_STEPS if isinstance(model.model.model_config, comfy.supported_models.SDXL) else 0


def inversion_sigmas(model, steps: int, skip: float, where: str = "SEGA Invert Photo") -> torch.Tensor:
    """The inversion's N + 1 noise levels, noisiest first, ending with 0.

    eps and v models: LEDITS++'s timesteps (diffusers' "leading" DPM spacing over int(N (1 + skip))
    steps, the last N) as sigmas of this model's schedule. Flow models: ComfyUI's "simple" schedule
    over int(N (1 + skip)) steps, the last N + 1 (skip drops the noisiest part the same way).
    """
    ms = model.get_model_object("model_sampling")
    if _is_flow(model):
        total = int(steps * (1 + skip))
        return comfy.samplers.calculate_sigmas(ms, "simple", total)[-(steps + 1):].float().cpu()
    try:
        ts = ledits.ledits_timesteps(steps, skip, where=where)
    except SEGAValueError as e:
        raise SEGAError(str(e)) from None
    sig = ms.sigma(torch.tensor(ts, dtype=torch.float32)).float().cpu()
    return torch.cat([sig, sig.new_zeros(1)])


def _draws(shape, steps: int, seed: int) -> torch.Tensor:
    """One independent standard normal draw per step, from `seed` on the CPU, in diffusers' order
    (a torch.Generator seeded alike in diffusers' invert() gives the same draws)."""
    return ledits.draw_noises(shape, steps, torch.Generator(device="cpu").manual_seed(int(seed)))


def _interruptible(model, extra_args):
    """The sampler model as a denoise(x, sigma) callable for sega_core.ledits, checking for a cancel each call."""
    def denoise(x, sigma):
        comfy.model_management.throw_exception_if_processing_interrupted()
        s = sigma if torch.is_tensor(sigma) else torch.tensor(float(sigma))
        s_in = x.new_ones([x.shape[0]]) * s.to(x)
        return model(x, s_in, **extra_args)
    return denoise


# -- SEGA Invert Photo ---------------------------------------------------------------------------

class SEGAInvertPhoto(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SEGAInvertPhoto",
            display_name="SEGA Invert Photo",
            category=CATEGORY,
            description="Inverts a photo's latent (edit-friendly DDPM inversion, as LEDITS++ does) so that SEGA "
                        "Photo Edit can add or remove concepts while the rest of the photo stays. Invert once, "
                        "edit many times: ComfyUI's cache keeps the inversion while its inputs stay the same.",
            search_aliases=["ledits", "ledits++", "invert image", "photo edit", "ddpm inversion"],
            inputs=[
                io.Model.Input("model", tooltip="The model to invert with; edit with the same model."),
                io.Latent.Input("latent", tooltip="The photo's latent (VAE Encode of the photo). Its sides "
                                                  "should be multiples of 32 pixels, as in LEDITS++."),
                io.Conditioning.Input(
                    "uncond", tooltip="The unconditional prompt the edit measures concepts against: a CLIP Text "
                                      "Encode with empty text (LEDITS++'s \"\"), or a negative prompt."),
                io.Int.Input(
                    "steps", default=30, min=1, max=1000,
                    tooltip="Inversion steps, which the edit replays (LEDITS++'s num_inversion_steps): 30 is its "
                            "SD default, the SDXL reference uses 50. More steps follow the photo more closely."),
                io.Float.Input(
                    "skip", default=0.15, min=0.0, max=0.99, step=0.01, round=0.001,
                    tooltip="How much of the noisiest part of the schedule is dropped (LEDITS++'s skip, 0.15): "
                            "higher keeps more of the photo's layout, 0 starts from almost pure noise. Must be "
                            "in [0, 1). For SDXL models the last 3 noise maps are set to zero, as LEDITS++ SDXL "
                            "does (num_zero_noise_steps=3); other families keep all."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Seed of the inversion's random draws (one noisy copy of the photo per step)."),
                io.Conditioning.Input(
                    "source", optional=True,
                    tooltip="Optional: a prompt describing the photo (LEDITS++'s source_prompt). The inversion "
                            "then uses classifier-free guidance towards it (2 model rows per step instead of 1), "
                            "and the edit uses the same prediction, so the photo is still reconstructed exactly. "
                            "Empty: no source prompt."),
                io.Float.Input(
                    "source_guidance", default=3.5, min=0.0, max=30.0, step=0.1, round=0.01, optional=True,
                    tooltip="Guidance scale towards the source prompt (LEDITS++'s source_guidance_scale, 3.5); "
                            "only used with a source prompt. 1 is the source prompt's own prediction."),
            ],
            outputs=[Inversion.Output(display_name="inversion",
                                      tooltip="The inverted photo: connect to SEGA Photo Edit or SEGA Inversion Sampler.")],
        )

    @classmethod
    def validate_inputs(cls, skip=0.15):
        if not isinstance(skip, (int, float)) or not (0.0 <= skip < 1.0):
            return f"SEGA Invert Photo: skip must be in [0, 1) (0.15 drops the noisiest 15%), got {skip}."
        return True

    @classmethod
    def execute(cls, model, latent, uncond, steps, skip, seed, source=None, source_guidance=3.5) -> io.NodeOutput:
        return io.NodeOutput(invert_photo(model, latent, uncond, steps, skip, seed, source, source_guidance))


def invert_photo(model, latent: dict, uncond, steps: int, skip: float, seed: int, source=None,
                 source_guidance: float = 3.5, node: str = "SEGA Invert Photo") -> PhotoInversion:
    """Inverts `latent` (a LATENT dict) with `model` through ComfyUI's guider and sampler machinery."""
    if not (isinstance(skip, (int, float)) and 0.0 <= skip < 1.0):
        raise SEGAError(f"{node}: skip must be in [0, 1) (0.15 drops the noisiest 15%), got {skip}.")
    if steps < 1:
        raise SEGAError(f"{node}: steps must be at least 1, got {steps}.")
    samples = latent["samples"] if isinstance(latent, dict) else None
    if not torch.is_tensor(samples) or samples.dim() < 4:
        raise SEGAError(f"{node}: the latent input must be a LATENT from VAE Encode.")
    if getattr(samples, "is_nested", False):
        raise SEGAError(f"{node}: the latent holds several latents (a nested latent); invert one image latent.")
    if not bool(torch.isfinite(samples).all()):
        raise SEGAError(f"{node}: the latent holds NaN or inf values; check the node that made it "
                        f"(a loaded .latent file, a VAE Encode of a broken image).")
    if min(samples.shape[-2:]) < 2:
        raise SEGAError(f"{node}: the latent is only {samples.shape[-1]}x{samples.shape[-2]}; the photo is too small "
                        f"to invert. Use an image of at least 64x64 pixels (LEDITS++ expects multiples of 32).")
    if "noise_mask" in latent:
        raise SEGAError(f"{node}: the latent has a noise mask (Set Latent Noise Mask); invert the whole photo "
                        f"and give each concept a mask instead (SEGA Concept's mask input).")
    if not uncond:
        raise SEGAError(f"{node}: the uncond input is empty; wire a CLIP Text Encode with empty text into it.")
    _check_width(node, "source", source, uncond)
    flow = _is_flow(model)
    sigmas = inversion_sigmas(model, int(steps), float(skip), node)
    draws = _draws(samples.shape, int(steps), seed)
    zero_steps = _zero_noise_steps(model)
    rule = "euler_ancestral_rf" if flow else "dpmpp_2m_sde"
    result = []

    def invert_fn(model_k, x, sigmas_in, extra_args=None, callback=None, disable=None):
        x0 = model_k.latent_image  # the photo's latent in sampler space (process_latent_in applied)
        if x0 is None or x0.shape != x.shape:
            x0 = torch.zeros_like(x)
        denoise = _interruptible(model_k, extra_args or {})
        seen = []

        def recorded(xk, sigma):
            out = denoise(xk, sigma)
            seen.append(out)
            return out

        try:
            inv = ledits.invert(x0.float(), sigmas_in.float(), draws.to(x0.device), recorded, rule=rule,
                                zero_noise_steps=min(zero_steps, len(sigmas_in) - 1), callback=callback, where=node)
        except SEGAValueError as e:
            raise SEGAError(str(e)) from None
        correction = inv.correction
        if zero_steps and inv.zs.shape[0] > 1:
            correction = _zeroed_correction(x0.float(), sigmas_in.float(), inv, seen, denoise, rule, zero_steps)
        result.append((inv, correction))
        return x0

    m = model.clone()
    remove_sega(m)  # a SEGA-patched model inverts as the plain model
    guider = comfy.samplers.CFGGuider(m)
    if source:
        guider.set_conds(source, uncond)
        guider.set_cfg(float(source_guidance))
    else:
        guider.set_conds(uncond, uncond)  # cfg 1 computes the positive (here the uncond) only: 1 row
        guider.set_cfg(1.0)
    noise = torch.zeros_like(samples, dtype=torch.float32)
    guider.sample(noise, samples.float(), comfy.samplers.KSAMPLER(invert_fn), sigmas.clone(), disable_pbar=True,
                  seed=int(seed))
    inv, correction = result[-1]
    cpu = torch.device("cpu")
    return PhotoInversion(
        start=inv.start.detach().to(cpu, torch.float32), zs=inv.zs.detach().to(cpu, torch.float32),
        sigmas=sigmas, correction=correction.detach().to(cpu, torch.float32),
        latent_shape=tuple(samples.shape), family=_family(model), rule=rule, uncond=uncond,
        source=source if source else None, source_guidance=float(source_guidance) if source else 1.0,
        skip=float(skip), seed=int(seed), zero_noise_steps=zero_steps)


def _zeroed_correction(x0, sigmas, inv, seen: list, denoise, rule: str, zero_steps: int) -> torch.Tensor:
    """The correction that makes reconstruction exact when the last noise maps are zeroed (SDXL).

    With zeroed maps the replay leaves the inversion's chain on its last `zero_steps` steps, so the
    chain's own last mean does not give the replay's. The replay is run once here: its first steps
    are the chain's (their predictions are the recorded ones, no model call), the last ones call the
    model (zero_steps - 1 extra model evaluations, once per inversion).
    """
    n = inv.zs.shape[0]
    first_new = n - zero_steps + 1  # steps from here on see an input the chain never had
    calls = []

    def cached(xk, sigma):
        k = len(calls)
        calls.append(k)
        return seen[k] if k < first_new else denoise(xk, sigma)

    return x0 - ledits.replay(inv.start, sigmas, inv.zs, cached, rule=rule)


def _check_width(node: str, name: str, cond, uncond) -> None:
    if not cond or not uncond:
        return
    u = next((c[0] for c in uncond if torch.is_tensor(c[0])), None)
    for entry in cond:
        if torch.is_tensor(entry[0]) and u is not None and entry[0].shape[-1] != u.shape[-1]:
            raise SEGAError(
                f"{node}: {name} is {entry[0].shape[-1]} wide but the uncond is {u.shape[-1]}: it was encoded for "
                f"another model. Encode both with the CLIP of the model you use.")


# -- the replay sampler ----------------------------------------------------------------------------

def replay_sampler(inversion: PhotoInversion, reconstruction: str = "exact", node: str = "SEGA Inversion Sampler",
                   record: Optional[list] = None):
    """A SAMPLER that replays the inversion's noise maps from its start (the incoming noise is not used).

    record: a list to which every step's (x, sigma, denoised) is appended (for tests)."""
    exact = reconstruction == "exact"

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

        try:
            return ledits.replay(inversion.start.to(x), sigmas.to(x), inversion.zs.to(x), denoise,
                                 rule=inversion.rule, correction=inversion.correction.to(x) if exact else None,
                                 callback=callback, where=node)
        except SEGAValueError as e:
            raise SEGAError(str(e)) from None

    return comfy.samplers.KSAMPLER(replay_fn)


# -- the photo guider: uncond (or the inversion's source CFG) plus the concepts ---------------------

class PhotoGuider(comfy.samplers.CFGGuider):
    """A guider for replaying an inversion: the inversion's own base prediction (the uncond, or its
    source-prompt CFG) plus the concepts' terms, combined as LEDITS++ ("ledits") or SEGA ("sega") does.

    One model call per step with 1 (2 with a source prompt) + the concepts acting at that step rows.
    """

    def __init__(self, model_patcher, inversion: PhotoInversion, specs: list, plan: Plan, combination: str,
                 node: str, preview: Optional[PreviewTarget] = None, tally: bool = False):
        m = model_patcher.clone()
        remove_sega(m)
        super().__init__(m)
        self.inversion = inversion
        self.specs = specs
        self.plan = plan
        self.combination = combination
        self.node = node
        conds = {"negative": inversion.uncond}
        if inversion.source:
            conds["positive"] = inversion.source
        self.keys = []
        for i, spec in enumerate(specs):
            key = f"sega_concept_{i}"
            conds[key] = spec.conditioning
            self.keys.append(key)
        self.inner_set_conds(conds)
        self.cfg = inversion.source_guidance
        self._sigmas = [float(s) for s in inversion.sigmas]
        self._momentum = None
        self._momentum_step = None
        self._next_momentum = None
        self.rows_per_step: list = []  # model rows of each evaluation of the last run (for tests and benchmarks)
        self.preview = preview  # the node the page draws each concept's kept positions on
        self.tally = tally  # gather the kept positions for a concept_masks output
        self.watch: Optional[MaskWatch] = None  # the last run's MaskWatch

    def sample(self, *args, **kwargs):
        self._momentum = self._next_momentum = None
        self._momentum_step = None
        self.rows_per_step = []
        labels = [s.label or f"#{i + 1}" for i, s in enumerate(self.specs)]
        self.watch = MaskWatch.for_run(labels, self.preview, self.tally) if self.specs else None
        return super().sample(*args, **kwargs)

    def _step(self, timestep: torch.Tensor) -> int:
        s = float(timestep.flatten()[0])
        return min(range(len(self._sigmas) - 1), key=lambda i: abs(self._sigmas[i] - s))

    def _rows(self, step: int) -> list:
        plan = self.plan
        if self.combination == "sega":
            return plan.rows(step)
        return ledits.ledits_rows(plan, step)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        step = self._step(timestep)
        rows = self._rows(step)
        base_conds = [self.conds.get("negative")]
        if self.inversion.source:
            base_conds.append(self.conds.get("positive"))
        conds = base_conds + [self.conds[self.keys[c]] for c in rows]
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        self.rows_per_step.append(len(conds) * x.shape[0])
        uncond_denoised = out[0]
        if self.inversion.source:
            # CFG towards the source prompt, as the inversion computed it (the correct sign)
            denoised = uncond_denoised + (out[1] - uncond_denoised) * self.cfg
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
            kept = None
            if self.combination == "sega":
                if step != self._momentum_step:
                    if self._momentum_step is not None:
                        self._momentum = self._next_momentum
                    self._momentum_step = step
                result = sega_step(uncond, preds, rows, step, self.plan, self._momentum, (), masks, return_kept=want)
                edit, self._next_momentum = result[0], result[1]
                kept = result[2] if want else None
            elif want:
                edit, kept = ledits.ledits_guidance(uncond, preds, rows, step, self.plan, masks, return_kept=True)
            else:
                edit = ledits.ledits_guidance(uncond, preds, rows, step, self.plan, masks)
            if want:
                self._watch(step, rows, kept, masks)
            if edit is not None:
                denoised = denoised - sigma * edit
        for fn in model_options.get("sampler_post_cfg_function", []):
            denoised = fn({"denoised": denoised, "cond": self.conds.get("positive"),
                           "uncond": self.conds.get("negative"), "cond_scale": self.cfg, "model": self.inner_model,
                           "uncond_denoised": uncond_denoised, "cond_denoised": out[1] if self.inversion.source
                           else uncond_denoised, "sigma": timestep, "model_options": model_options, "input": x})
        return denoised

    def _watch(self, step: int, rows: list, kept, masks) -> None:
        plan = self.plan
        if self.combination == "sega":
            active = [step >= plan.warmup[c] and step < plan.cooldown[c] and plan.weight[c] > 0.0
                      for c in range(len(plan))]
        else:
            acting = set(ledits.ledits_rows(plan, step))
            active = [c in acting for c in range(len(plan))]
        weights = []
        for c in rows:
            m = None if masks is None else masks[c]
            weights.append(None if m is None else m.reshape(m.shape[0], *m.shape[-2:]))
        self.watch.add(step, self.inversion.steps, rows, active, kept, weights)

    def _masks(self, x):
        if all(s.mask is None for s in self.specs):
            return None
        return [None if s.mask is None else _fit_mask(s.mask, x) for s in self.specs]


def photo_guider(model, inversion, concepts, combination: str, node: str, preview: Optional[PreviewTarget] = None,
                 tally: bool = False) -> PhotoGuider:
    if not isinstance(inversion, PhotoInversion):
        raise SEGAError(f"{node}: the inversion input must come from a SEGA Invert Photo node.")
    if combination not in ("ledits", "sega"):
        raise SEGAError(f"{node}: combination must be 'ledits' or 'sega', got {combination!r}.")
    inversion.check_model(node, model)
    specs = _chain(concepts)
    try:
        for i, spec in enumerate(specs):
            spec.concept.validate(spec.describe(i))
        # LEDITS++ has no momentum; SEGA's combination here uses none either (the photo is replayed,
        # not sampled afresh)
        plan = Plan.build([s.concept for s in specs], 0.0, 0.0)
    except SEGAValueError as e:
        raise SEGAError(f"{node}: {e}") from None
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
    return PhotoGuider(model, inversion, specs, plan, combination, node, preview, tally)


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
                io.Combo.Input(
                    "reconstruction", options=["exact", "as diffusers"], default="exact",
                    tooltip="exact (default): the last step lands on the photo's own latent, so with no concept "
                            "the output is the photo (float32, within 1e-4). as diffusers: the last step ends on "
                            "the model's x0-prediction, as diffusers' LEDITS++ does (slightly softer)."),
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
    def execute(cls, model, inversion, combination, reconstruction, concepts=None) -> io.NodeOutput:
        guiders = []
        latent = photo_edit(model, inversion, concepts, combination, reconstruction, guider_out=guiders,
                            preview=preview_target(cls.hidden))
        return io.NodeOutput(latent, concept_masks(model, guiders[0], inversion))


def photo_edit(model, inversion, concepts=None, combination: str = "ledits", reconstruction: str = "exact",
               node: str = "SEGA Photo Edit", guider_out: Optional[list] = None,
               preview: Optional[PreviewTarget] = None) -> dict:
    """Edits an inverted photo: the LATENT. guider_out: a list that receives the PhotoGuider (its
    rows_per_step and the MaskWatch of the kept positions)."""
    if reconstruction not in ("exact", "as diffusers"):
        raise SEGAError(f"{node}: reconstruction must be 'exact' or 'as diffusers', got {reconstruction!r}.")
    guider = photo_guider(model, inversion, concepts, combination, node, preview, tally=guider_out is not None)
    if guider_out is not None:
        guider_out.append(guider)
    latent = torch.zeros(inversion.latent_shape, dtype=torch.float32)
    out = guider.sample(torch.zeros_like(latent), latent, replay_sampler(inversion, reconstruction, node),
                        inversion.sigmas.clone(), disable_pbar=True, seed=inversion.seed)
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
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced.")],
            hidden=[io.Hidden.unique_id, io.Hidden.dynprompt],
        )

    @classmethod
    def execute(cls, model, inversion, combination, concepts=None) -> io.NodeOutput:
        return io.NodeOutput(photo_guider(model, inversion, concepts, combination, "SEGA Photo Guider",
                                          preview=preview_target(cls.hidden)))


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
                io.Combo.Input(
                    "reconstruction", options=["exact", "as diffusers"], default="exact",
                    tooltip="exact (default): the last step lands on the photo's own latent. as diffusers: it ends "
                            "on the model's x0-prediction, as diffusers' LEDITS++ does."),
            ],
            outputs=[io.Sampler.Output(tooltip="Replays the inversion; connect to SamplerCustomAdvanced."),
                     io.Sigmas.Output(tooltip="The inversion's schedule; connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, inversion, reconstruction) -> io.NodeOutput:
        node = "SEGA Inversion Sampler"
        if not isinstance(inversion, PhotoInversion):
            raise SEGAError(f"{node}: the inversion input must come from a SEGA Invert Photo node.")
        if reconstruction not in ("exact", "as diffusers"):
            raise SEGAError(f"{node}: reconstruction must be 'exact' or 'as diffusers', got {reconstruction!r}.")
        return io.NodeOutput(replay_sampler(inversion, reconstruction, node), inversion.sigmas.clone())


NODES = [SEGAInvertPhoto, SEGAPhotoEdit, SEGAPhotoGuider, SEGAInversionSampler]
