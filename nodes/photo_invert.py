"""SEGA Invert Photo: the edit-friendly DDPM inversion of a photo's latent, as LEDITS++ makes it.

LEDITS++ (Brack et al., CVPR 2024, arXiv 2311.16711) inverts the photo's latent with the
edit-friendly DDPM inversion (Huberman-Spiegelglas et al., arXiv 2304.06140): one independent noisy
draw x_t of the photo per step and the noise map z_t that makes the sampler's step from one draw
land exactly on the next. The math is sega_core.ledits'; here it runs inside ComfyUI's own sampling
(a CFGGuider with a KSAMPLER whose function is the inversion loop), so the conditionings go through
process_conds and the model through its usual wrappers. SEGA Photo Edit (photo_edit.py) replays it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.supported_models
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..sega_core import SEGAValueError
from ..sega_core import ledits
from .errors import SEGAError
from .patch import remove_sega
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
    # the photo's latent x0 in sampler space: where the reconstruction ends, and (with the draws, which
    # the seed gives again) its chain, for SEGA Photo Edit's outside_masks "keep the photo". One latent
    # (1 / steps of zs' memory); None for an inversion made without it.
    photo: Optional[torch.Tensor] = None
    # the model's predictions at the start (the first step), which an edit's first step reuses: the
    # edit starts at `start`, on the same noise level, so with the same model its uncond (and source)
    # rows would be computed again to the same values. None for an inversion made without it.
    first_step: Optional["FirstStep"] = None

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def nbytes(self) -> int:
        first = self.first_step.tensors() if self.first_step is not None else ()
        return sum(t.numel() * t.element_size() for t in (self.start, self.zs, self.sigmas, self.correction, self.photo,
                                                           *first) if t is not None)

    def draws(self) -> torch.Tensor:
        """The inversion's (N, *latent) standard normal draws again, from its seed (as SEGA Invert Photo drew
        them): N latents on the CPU while a replay uses them, not stored with the inversion."""
        return _draws(self.latent_shape, self.steps, self.seed)

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


@dataclass(frozen=True, eq=False)
class FirstStep:
    """The denoised predictions of the inversion's first model call, at `start` and the first noise level:
    of the uncond and of the source prompt (each None where that call did not compute it; the uncond is
    not computed with a source prompt at guidance 1). float32, on the CPU, in sampler space."""

    model_key: tuple  # model_key() of the model that computed them
    uncond: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None

    def tensors(self) -> tuple:
        return self.uncond, self.source

    def for_model(self, model) -> Optional["FirstStep"]:
        """These predictions when `model` computes what the inversion's model did, else None."""
        return self if model_key(model) == self.model_key else None


def model_key(model) -> tuple:
    """What a ModelPatcher computes, as a comparable key: its weights (the patcher lineage's
    patches_uuid, which a LoRA or any weight patch renews, and the model object) and its options (every
    wrapper, patch and CFG function, by identity). A clone of the same MODEL has the same key; any
    patch added or removed changes it."""
    return model.patches_uuid, id(model.model), _identity(model.model_options)


def _identity(value):
    if isinstance(value, dict):
        return tuple(sorted(((repr(k), _identity(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_identity(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return "id", id(value)


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
                                      "Encode with empty text (LEDITS++'s \"\"), or a negative prompt. LEDITS++ "
                                      "SDXL uses an all-zero one: pass the empty prompt through ConditioningZeroOut."),
                io.Int.Input(
                    "steps", default=30, min=1, max=1000,
                    tooltip="Inversion steps, which the edit replays (LEDITS++'s num_inversion_steps): 30 is its "
                            "SD default, the SDXL reference uses 50; typical 20 to 100. For SDXL models the noise "
                            "maps of the last 3 steps are set to zero automatically, as LEDITS++ SDXL does "
                            "(num_zero_noise_steps=3); the photo is still reconstructed exactly (2 extra model calls "
                            "once). Other families keep every map."),
                io.Float.Input(
                    "skip", default=0.15, min=0.0, max=0.99, step=0.01, round=0.001,
                    tooltip="How much of the noisiest part of the schedule is dropped (LEDITS++'s skip, 0.15): "
                            "higher keeps more of the photo's layout, 0 starts from almost pure noise; typical 0.1 "
                            "to 0.3. Must be in [0, 1)."),
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
            outputs=[Inversion.Output(
                display_name="inversion",
                tooltip="The inverted photo: connect to SEGA Photo Edit, SEGA Photo Guider or SEGA Inversion Sampler."
            )],
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
        seen = []  # the predictions, kept only where the zeroed maps' correction replays them

        def recorded(xk, sigma):
            out = denoise(xk, sigma)
            if zero_steps:
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
        result.append((inv, correction, x0.float()))
        return x0

    m = model.clone()
    remove_sega(m)  # a SEGA-patched model inverts as the plain model
    first = _record_first_step(m, bool(source))
    guider = comfy.samplers.CFGGuider(m)
    if source:
        guider.set_conds(source, uncond)
        guider.set_cfg(float(source_guidance))
    else:
        guider.set_conds(uncond, uncond)  # cfg 1 computes the positive (here the uncond) only: 1 row
        guider.set_cfg(1.0)
    noise = torch.zeros_like(samples, dtype=torch.float32)
    # the progress bar and previews of ComfyUI's own samplers (common_ksampler's)
    callback = latent_preview.prepare_callback(m, int(steps))
    guider.sample(noise, samples.float(), comfy.samplers.KSAMPLER(invert_fn), sigmas.clone(), callback=callback,
                  disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=int(seed))
    inv, correction, photo = result[-1]
    cpu = torch.device("cpu")
    return PhotoInversion(
        start=inv.start.detach().to(cpu, torch.float32), zs=inv.zs.detach().to(cpu, torch.float32),
        sigmas=sigmas, correction=correction.detach().to(cpu, torch.float32),
        latent_shape=tuple(samples.shape), family=_family(model), rule=rule, uncond=uncond,
        source=source if source else None, source_guidance=float(source_guidance) if source else 1.0,
        skip=float(skip), seed=int(seed), zero_noise_steps=zero_steps, photo=photo.detach().to(cpu, torch.float32),
        first_step=first())


def _record_first_step(m, source: bool):
    """Has the inversion's model `m` keep its first call's uncond and source predictions (a post-CFG
    function that only reads them); returns a function giving the FirstStep after sampling (None when
    the model has pre-CFG functions, which change the predictions after the model call)."""
    key = model_key(m)  # before the recorder is added: the key of the model as the edit receives it
    if m.model_options.get("sampler_pre_cfg_function"):
        return lambda: None
    seen = []

    def record(args):
        if not seen:
            # ComfyUI's cfg 1 shortcut computes the positive alone (args["uncond"] is None)
            seen.append((args["uncond_denoised"] if args["uncond"] is not None else None, args["cond_denoised"]))
        return args["denoised"]

    m.set_model_sampler_post_cfg_function(record)

    def first() -> Optional[FirstStep]:
        if not seen:
            return None
        uncond, positive = (None if t is None else t.detach().to("cpu", torch.float32).clone() for t in seen[0])
        if not source:  # the positive is the uncond itself
            return FirstStep(key, uncond=positive)
        return FirstStep(key, uncond=uncond, source=positive)

    return first


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
