"""One SEGA step (Brack et al. 2023, Eq. 3-8), as small pure functions.

All predictions are noise-space (eps) tensors of shape (B, C, *rest): 4-D images,
5-D video, any channel count. State (the momentum) goes in and out explicitly.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .concepts import Plan


def _rank(q: float, n: int) -> Tuple[int, int, torch.Tensor]:
    """Indices and weight of the linear-interpolation quantile, rounded as torch.quantile rounds them.

    torch.quantile takes q in the input's dtype (float32) and forms q * (n - 1) in double.
    """
    rank = torch.tensor(q, dtype=torch.float32).item() * (n - 1)
    lo = math.floor(rank)
    hi = math.ceil(rank)
    return lo, hi, torch.tensor(rank - lo, dtype=torch.float32)


def quantile_threshold(a: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of `a` over its last axis, equal to torch.quantile(a, q, dim=-1).

    Selects the two neighbouring order statistics instead of sorting, and has no
    limit on the number of elements (torch.quantile refuses more than 2**24).
    """
    n = a.shape[-1]
    lo, hi, w = _rank(q, n)
    below = a.kthvalue(lo + 1, dim=-1).values
    if hi == lo:
        return below
    above = a.kthvalue(hi + 1, dim=-1).values
    return torch.lerp(below, above, w.to(a.device))


def threshold_edit(d: torch.Tensor, q: float, lead: int = 1) -> torch.Tensor:
    """Keep the entries of `d` with |d| >= the q-quantile of |d| (Eq. 5), zero the rest.

    The quantile is taken for every sample and channel separately, over all remaining
    axes (height, width and, for video, time). `lead` is the number of leading axes
    before (B, C): 1 for a stack of concepts (K, B, C, ...). Computed in float32.
    """
    a = d.abs().flatten(lead + 2).float()
    t = quantile_threshold(a, q)
    keep = (a >= t.unsqueeze(-1)).view_as(d)
    return torch.where(keep, d, torch.zeros((), dtype=d.dtype, device=d.device))


def _per_concept(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """A (K, 1, 1, ...) tensor broadcasting one value per concept over a (K, B, ...) stack."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


def sega_step(
    uncond: torch.Tensor,
    concept_preds: Optional[torch.Tensor],
    rows: Sequence[int],
    step: int,
    plan: Plan,
    momentum: Optional[torch.Tensor],
    inactive: Sequence[int] = (),
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """SEGA's edit for one sampler step, and the momentum after it.

    uncond:        (B, C, ...) unconditional noise prediction.
    concept_preds: (len(rows), B, C, ...) noise predictions of the concepts `rows`
                   (as given by `plan.rows(step)`); None when `rows` is empty.
    momentum:      (B, C, ...) momentum v_t, or None for zero.
    inactive:      concepts that make no edit this step, as if cooled down (e.g. outside the
                   timestep range of their conditioning).
    Returns (edit, momentum'): edit is added to the CFG noise prediction
    (eps = u + s_g (t - u) + edit), or None for no edit this step.

    Matches diffusers' SemanticStableDiffusionPipeline step for step, except that
    warmed-up concepts whose weights are all zero give no edit (the reference divides
    0 by 0 and returns NaN) and thresholds are always computed in float32.
    """
    n = len(plan)
    live = [step < plan.cooldown[c] and c not in inactive for c in range(n)]
    warmed = plan.warmed(step)
    n_warm = sum(warmed)
    total = None
    partial = None
    if rows:
        d = (concept_preds - uncond.unsqueeze(0)) * _per_concept([plan.signed_scale[c] for c in rows], concept_preds)
        qs = [plan.threshold[c] for c in rows]
        if len(set(qs)) == 1:
            d = threshold_edit(d, qs[0])
        else:
            d = torch.stack([threshold_edit(d[k], q, lead=0) for k, q in enumerate(qs)])
        w = [plan.weight[c] if live[c] else 0.0 for c in rows]
        total = (d * _per_concept(w, d)).sum(0)  # Eq. 6 without normalisation, as in the reference
        if 0 < n_warm < n:
            # Only some concepts warmed up: their weights are normalised to sum 1 (cooled-down
            # concepts count with weight 0); no momentum in this branch.
            norm = sum(plan.weight[c] for c in range(n) if warmed[c] and live[c])
            ks = [k for k, c in enumerate(rows) if warmed[c]]
            if norm > 0 and ks:
                sel = d[ks] if len(ks) < len(rows) else d
                partial = (sel * _per_concept([w[k] / norm for k in ks], sel)).sum(0)
    if momentum is not None and plan.momentum_scale != 0.0:
        total = plan.momentum_scale * momentum if total is None else total + plan.momentum_scale * momentum
    beta = plan.momentum_beta
    if total is None:
        new_momentum = None if momentum is None else beta * momentum
    elif momentum is None:
        new_momentum = (1 - beta) * total
    else:
        new_momentum = beta * momentum + (1 - beta) * total
    if n > 0 and n_warm == n:
        return total, new_momentum
    return partial, new_momentum
