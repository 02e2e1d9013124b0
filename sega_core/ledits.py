"""LEDITS++ photo editing in pure torch: edit-friendly inversion, replay, concept guidance.

LEDITS++ (Brack et al., CVPR 2024, arXiv:2311.16711) inverts a photo with the edit-friendly DDPM
inversion (Huberman-Spiegelglas et al., arXiv:2304.06140): independent noisy versions x_k of the
photo's latent x0 are drawn for every step, and the noise map z_k that carries one step of a
stochastic sampler from x_k exactly to x_{k+1} is stored. Replaying those maps with the same
sampler reproduces the photo; adding masked concept terms to the prediction edits it.

Convention: ComfyUI's sampler space (k-diffusion). EPS / V models: x_sigma = x0 + sigma * eps
(diffusers' VP latent is x_sigma / sqrt(1 + sigma^2)); flow (CONST) models:
x_sigma = (1 - sigma) * x0 + sigma * eps. A model is a `denoise(x, sigma) -> denoised` callable;
eps = (x - denoised) / sigma. `sigmas` holds the N step sigmas, noisiest first, then 0.

Nothing here imports ComfyUI.
"""
from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .attention import combine_masks
from .concepts import Plan, SEGAValueError, concept_acts
from .guidance import StepResult, quantile_threshold

Denoise = Callable[[torch.Tensor, object], torch.Tensor]
RULES = ("dpmpp_2m_sde", "euler_ancestral_rf")


class Inversion(NamedTuple):
    """The result of `invert`.

    start:      the first draw x_0 (at sigmas[0]), where the replay begins.
    zs:         (N, *x0.shape) noise maps, zs[k] for the step sigmas[k] -> sigmas[k + 1].
    correction: x0 minus the last step's mean; added on the replay's last step it makes the
                reconstruction exact (diffusers ends on the model's x0-prediction instead).
    """

    start: torch.Tensor
    zs: torch.Tensor
    correction: torch.Tensor


def ledits_timesteps(num_steps: int, skip: float, num_train_timesteps: int = 1000,
                     where: str = "LEDITS++") -> List[int]:
    """The N inversion / edit timesteps of diffusers' LEDITS++, noisiest first.

    diffusers sets DPMSolverMultistepScheduler to "leading" spacing with M = int(N * (1 + skip))
    steps (a truncated Python float: N=100, skip=0.15 gives 114) and keeps the last N:
    t = r * j + 1 for j = N ... 1, r = num_train_timesteps // (M + 1). `skip` drops the M - N
    noisiest steps.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise SEGAValueError(f"{where}: steps must be a whole number >= 1, got {num_steps!r}.")
    if not (isinstance(skip, (int, float)) and 0.0 <= skip < 1.0):
        raise SEGAValueError(
            f"{where}: skip must be in [0, 1) (the share of the noisiest steps left out; 0.15 is LEDITS++'s "
            f"default), got {skip!r}.")
    m = int(num_steps * (1 + skip))
    r = num_train_timesteps // (m + 1)
    if r < 1:
        raise SEGAValueError(
            f"{where}: steps={num_steps} with skip={skip} needs {m} of the model's {num_train_timesteps} "
            f"timesteps plus one; use fewer steps.")
    return [r * j + 1 for j in range(num_steps, 0, -1)]


def draw_noises(shape: Sequence[int], num_steps: int, generator: Optional[torch.Generator] = None,
                dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(N, *shape) standard normal noises, noises[k] for sigmas[k], drawn as diffusers draws them.

    diffusers' invert() draws one tensor per step in ascending timestep order (the least noisy step
    first), so the same generator state gives the same draws here: noises[N - 1] is drawn first.
    """
    draws = [torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device) for _ in range(num_steps)]
    return torch.stack(draws[::-1])


def noisy_latents(x0: torch.Tensor, sigmas, noises: torch.Tensor, flow: bool = False) -> torch.Tensor:
    """The inversion's independent draws x_k = x0 + sigma_k * eps_k (flow: (1 - sigma_k) * x0 + sigma_k * eps_k),
    one for each sigma in `sigmas` (without the final 0); (N, *x0.shape)."""
    out = torch.empty((len(noises),) + tuple(x0.shape), dtype=x0.dtype, device=x0.device)
    for k in range(len(noises)):
        s = float(sigmas[k])
        eps = noises[k].to(device=x0.device, dtype=x0.dtype)
        out[k] = ((1.0 - s) * x0 + s * eps) if flow else (x0 + s * eps)
    return out


def _half_log_snr(sigma: float, flow: bool) -> float:
    """lambda = log(alpha / sigma): -log(sigma) in sampler space, log((1 - sigma) / sigma) for flow."""
    return math.log((1.0 - sigma) / sigma) if flow else -math.log(sigma)


def dpmpp_2m_sde_step(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next, history=None,
                      flow: bool = False) -> Tuple[torch.Tensor, float, Optional[tuple]]:
    """One step of SDE-DPM-Solver++(2M) (Lu et al., arXiv:2211.01095), midpoint, eta 1.

    As ComfyUI's `sample_dpmpp_2m_sde` and diffusers' DPMSolverMultistepScheduler
    (algorithm_type="sde-dpmsolver++", solver_order=2) compute it: h = lambda_next - lambda,
    mean = (sigma_next / sigma) e^{-h} x + alpha_next (1 - e^{-2h}) D, where D is `denoised` on the
    first step and denoised + (denoised - previous) / (2 r), r = h_previous / h, later;
    std = sigma_next sqrt(1 - e^{-2h}); x_next = mean + std * z. At sigma_next == 0:
    mean = denoised, std = 0 (diffusers' first-order final step).
    history: (previous denoised, previous h) or None on the first step. Returns (mean, std, history').
    """
    s, s_next = float(sigma), float(sigma_next)
    if s_next == 0.0:
        return denoised, 0.0, (denoised, None)
    lam, lam_next = _half_log_snr(s, flow), _half_log_snr(s_next, flow)
    h = lam_next - lam
    alpha_next = (1.0 - s_next) if flow else 1.0
    a = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
    coef_d = alpha_next * a
    mean = x * (s_next / s * math.exp(-h)) + denoised * coef_d
    if history is not None and history[1] is not None:
        old, h_last = history
        mean = mean + (denoised - old) * (0.5 * coef_d * h / h_last)
    std = s_next * math.sqrt(a)
    return mean, std, (denoised, h)


def euler_ancestral_rf_step(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next) -> Tuple[torch.Tensor, float]:
    """One step of ComfyUI's `sample_euler_ancestral_RF` with eta 1 (fresh noise each step), for flow models.

    sigma_down = sigma_next^2 / sigma; Euler to sigma_down, then rescaled by
    (1 - sigma_next) / (1 - sigma_down) and renoised with
    std = sqrt(sigma_next^2 - sigma_down^2 (1 - sigma_next)^2 / (1 - sigma_down)^2).
    At sigma_next == 0: mean = denoised, std = 0. Returns (mean, std).
    """
    s, s_next = float(sigma), float(sigma_next)
    if s_next == 0.0:
        return denoised, 0.0
    s_down = s_next * s_next / s
    ratio = s_down / s
    scale = (1.0 - s_next) / (1.0 - s_down)
    mean = x * (ratio * scale) + denoised * ((1.0 - ratio) * scale)
    var = s_next ** 2 - s_down ** 2 * (1.0 - s_next) ** 2 / (1.0 - s_down) ** 2
    return mean, math.sqrt(max(var, 0.0))


def _check(sigmas, rule: str, where: str) -> Tuple[List[float], bool]:
    if rule not in RULES:
        raise SEGAValueError(f"{where}: rule must be one of {', '.join(RULES)}, got {rule!r}.")
    s = [float(v) for v in sigmas]
    flow = rule == "euler_ancestral_rf"
    if len(s) < 2 or s[-1] != 0.0:
        raise SEGAValueError(f"{where}: sigmas must hold at least one step and end with 0, got {s}.")
    if any(not (a > b) for a, b in zip(s, s[1:])) or not all(math.isfinite(v) for v in s):
        raise SEGAValueError(f"{where}: sigmas must be finite and strictly decreasing, got {s}.")
    if flow and s[0] > 1.0:
        raise SEGAValueError(f"{where}: a flow model's sigmas must be at most 1, got {s[0]}.")
    return s, flow


class _Stepper:
    """The chosen rule as one `(x, denoised, k) -> (mean, std)` call with its history as a local."""

    def __init__(self, rule: str, sigmas: List[float], flow: bool):
        self.rule, self.sigmas, self.flow, self.history = rule, sigmas, flow, None

    def __call__(self, x, denoised, k):
        s, s_next = self.sigmas[k], self.sigmas[k + 1]
        if self.rule == "euler_ancestral_rf":
            return euler_ancestral_rf_step(x, denoised, s, s_next)
        mean, std, self.history = dpmpp_2m_sde_step(x, denoised, s, s_next, self.history, self.flow)
        return mean, std


def _advance(mean: torch.Tensor, std: float, z: torch.Tensor) -> torch.Tensor:
    """x_{k+1} = mean + std * z: one expression, so inversion and replay round alike."""
    return mean + std * z if std > 0.0 else mean


def invert(x0: torch.Tensor, sigmas, noises: torch.Tensor, denoise: Denoise, rule: str = "dpmpp_2m_sde",
           zero_noise_steps: int = 0, callback: Optional[Callable[[dict], None]] = None,
           where: str = "LEDITS++") -> Inversion:
    """Edit-friendly inversion (Huberman-Spiegelglas et al., arXiv:2304.06140), as LEDITS++ uses it.

    x0: the photo's latent; sigmas: N step sigmas then 0; noises: (N, *x0.shape), eps_k of the draw
    at sigmas[k] (`draw_noises` draws them as diffusers does). For k = 0 ... N-1: predict at x_k
    (x_0 = the first draw, later the value written back), take the rule's (mean, std) towards
    sigmas[k + 1], z_k = (target - mean) / std with target the draw at sigmas[k + 1] (0 where
    std == 0, i.e. the last step), and write back x_{k+1} = mean + std * z_k, which is what the
    replay computes. The last `zero_noise_steps` maps are then set to 0 (diffusers' SDXL
    num_zero_noise_steps, default 3 there): that replay no longer reconstructs exactly.
    `callback` gets {'x', 'i', 'sigma', 'sigma_hat', 'denoised'} after each prediction.
    """
    s, flow = _check(sigmas, rule, where)
    n = len(s) - 1
    if noises.shape[0] != n or tuple(noises.shape[1:]) != tuple(x0.shape):
        raise SEGAValueError(f"{where}: noises must have shape {(n, *x0.shape)}, got {tuple(noises.shape)}.")
    if not (0 <= zero_noise_steps <= n):
        raise SEGAValueError(f"{where}: zero_noise_steps must be in [0, {n}], got {zero_noise_steps}.")
    if not bool(torch.isfinite(x0).all()):
        raise SEGAValueError(f"{where}: the latent to invert holds NaN or infinite values.")
    draws = noisy_latents(x0, s[:n], noises, flow)
    step = _Stepper(rule, s, flow)
    zs = torch.zeros((n,) + tuple(x0.shape), dtype=x0.dtype, device=x0.device)
    x = draws[0]
    mean = x
    for k in range(n):
        denoised = denoise(x, sigmas[k])
        if callback is not None:
            callback({"x": x, "i": k, "sigma": sigmas[k], "sigma_hat": sigmas[k], "denoised": denoised})
        mean, std = step(x, denoised, k)
        if std > 0.0:
            target = draws[k + 1] if k + 1 < n else x0
            zs[k] = (target - mean) / std
        x = _advance(mean, std, zs[k])
    correction = x0 - mean
    if zero_noise_steps:
        zs[n - zero_noise_steps:] = 0
    return Inversion(draws[0].clone(), zs, correction)


def replay(start: torch.Tensor, sigmas, zs: torch.Tensor, denoise: Denoise, rule: str = "dpmpp_2m_sde",
           correction: Optional[torch.Tensor] = None, callback: Optional[Callable[[dict], None]] = None,
           where: str = "LEDITS++", keep: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """The LEDITS++ edit loop (arXiv:2311.16711): x_{k+1} = mean + std * zs[k] for every step.

    `denoise` gives the (edited) prediction: with the inversion's own prediction every step repeats
    the inversion. The last step ends on its mean (the x0-prediction, as diffusers does) or, with
    `correction` (Inversion.correction), on mean + correction: exactly x0 for the inversion's
    prediction. `callback` as in `invert`.
    keep: None (LEDITS++), or a `(k, x_{k+1}) -> x_{k+1}` called after every step k (after the
    correction on the last one), whose result the replay continues from (`keep_photo` makes one).
    """
    s, flow = _check(sigmas, rule, where)
    n = len(s) - 1
    if zs.shape[0] != n or tuple(zs.shape[1:]) != tuple(start.shape):
        raise SEGAValueError(f"{where}: the noise maps have shape {tuple(zs.shape)}, but {n} steps of a "
                             f"{tuple(start.shape)} latent need {(n, *start.shape)}.")
    step = _Stepper(rule, s, flow)
    x = start
    for k in range(n):
        denoised = denoise(x, sigmas[k])
        if callback is not None:
            callback({"x": x, "i": k, "sigma": sigmas[k], "sigma_hat": sigmas[k], "denoised": denoised})
        mean, std = step(x, denoised, k)
        x = _advance(mean, std, zs[k].to(device=mean.device, dtype=mean.dtype))
        if k == n - 1 and correction is not None:
            x = x + correction.to(device=x.device, dtype=x.dtype)
        if keep is not None:
            x = keep(k, x)
    return x


def blend_outside(x: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """m * x + (1 - m) * reference: the edit `x` where the soft mask m (values in [0, 1], broadcastable
    to x) is 1, `reference` where it is 0, a blend between."""
    m = mask.to(device=x.device, dtype=x.dtype)
    return m * x + (1.0 - m) * reference.to(device=x.device, dtype=x.dtype)


def keep_photo(mask: torch.Tensor, x0: torch.Tensor, sigmas, noises: torch.Tensor, flow: bool = False,
               end: Optional[torch.Tensor] = None) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A `keep` for `replay` that holds the latent outside `mask` on the reconstruction's trajectory.

    Beyond LEDITS++ (whose edit term is zero outside a user mask, while the latent still drifts a
    little there, since the model sees the whole latent). The reconstruction follows the inversion's
    chain: after step k it is at the draw at sigmas[k + 1] (`noisy_latents` of x0 with noises[k + 1]),
    and after the last step at `end` (x0, the exact reconstruction's end, by default). Each step's
    latent becomes blend_outside(x, that point, mask). noises: the inversion's (N, *x0.shape) draws.
    """
    s = [float(v) for v in sigmas]
    n = len(s) - 1
    if noises.shape[0] != n or tuple(noises.shape[1:]) != tuple(x0.shape):
        raise SEGAValueError(f"keep_photo: noises must have shape {(n, *x0.shape)}, got {tuple(noises.shape)}.")
    target_end = x0 if end is None else end

    def keep(k: int, x: torch.Tensor) -> torch.Tensor:
        if k + 1 < n:
            ref = noisy_latents(x0.to(device=x.device, dtype=x.dtype), s[k + 1:k + 2], noises[k + 1:k + 2], flow)[0]
        else:
            ref = target_end
        return blend_outside(x, ref, mask)

    return keep


def ledits_rows(plan: Plan, step: int, inactive: Sequence[int] = ()) -> List[int]:
    """Concepts that act at `step` under LEDITS++'s combination: warm-up <= step < cool-down and a
    non-zero scale (weights do not take part). Only these need a model row."""
    return [c for c in range(len(plan))
            if concept_acts(step, plan.warmup[c], plan.cooldown[c], plan.signed_scale[c]) and c not in inactive]


def implicit_mask(g: torch.Tensor, threshold: float) -> torch.Tensor:
    """LEDITS++'s implicit mask M2 (arXiv:2311.16711) of a guidance term g (B, C, ...):
    a = sum over channels of |g|; keep the positions with a >= the per-sample threshold-quantile of
    a over all positions (torch.quantile, linear, float32). Binary, (B, 1, ...), the same in every channel.
    """
    a = g.abs().sum(dim=1, keepdim=True).float()
    q = quantile_threshold(a.flatten(1), threshold)
    return a >= q.view(-1, *([1] * (a.dim() - 1)))


def ledits_guidance(uncond: torch.Tensor, preds: Optional[torch.Tensor], rows: Sequence[int], step: int,
                    plan: Plan, user_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
                    inactive: Sequence[int] = (), return_kept: bool = False,
                    attn_masks: Optional[Sequence[Optional[torch.Tensor]]] = None, intersect_both: bool = True):
    """LEDITS++'s edit for one step (arXiv:2311.16711).

    uncond: (B, C, ...) eps; preds: (len(rows), B, C, ...) eps of the plan's concepts `rows` (as
    `ledits_rows` gives them; others in `rows` are skipped). For each concept acting at `step`:
    g = signed_scale * (pred - uncond), times its user mask if any (before the quantile, as
    diffusers does), then masked by `implicit_mask`; the edit is the plain sum over concepts (no
    weights, no normalisation, no momentum). In eps units: eps = uncond + edit, i.e.
    denoised_final = denoised_uncond - sigma * edit.
    user_masks: one entry per concept of the plan, None or broadcastable to (B, C, ...).
    attn_masks: one entry per concept of the plan: None, or its cross-attention mask M1 (B, 1, ...)
    (sega_core.attention.attention_mask), used by the concepts whose plan.mask_from is "attention"
    (M1 in place of M2) or "intersect" (M1 * M2 when `intersect_both`, else M1: see
    sega_core.attention.intersects).
    Returns a StepResult, as sega_step does: the edit (None when no concept acts), no momentum,
    and with return_kept `kept`, a bool (len(rows), B, C, ...) of the positions each row's mask
    keeps (False for rows that do not act; None without rows).
    """
    acting = set(ledits_rows(plan, step, inactive))
    edit = None
    kept = None
    if rows and return_kept:
        kept = torch.zeros((len(rows),) + tuple(uncond.shape), dtype=torch.bool, device=uncond.device)
    for k, c in enumerate(rows):
        if c not in acting:
            continue
        g = (preds[k] - uncond) * plan.signed_scale[c]
        if user_masks is not None and user_masks[c] is not None:
            g = g * user_masks[c].to(device=g.device, dtype=g.dtype)
        mode = plan.mask_from[c] if plan.mask_from else "implicit"
        if mode == "implicit":
            m = implicit_mask(g, plan.threshold[c])
        else:
            m1 = None if attn_masks is None else attn_masks[c]
            m2 = implicit_mask(g, plan.threshold[c]) if mode == "intersect" and intersect_both else None
            m = combine_masks(mode, m1, m2, intersect_both)
        g = torch.where(m, g, torch.zeros((), dtype=g.dtype, device=g.device))
        edit = g if edit is None else edit + g
        if kept is not None:
            kept[k] = m.expand_as(uncond)
    return StepResult(edit, None, kept)
