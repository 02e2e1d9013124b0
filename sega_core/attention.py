"""Where a concept acts, from cross-attention: LEDITS++'s attention mask M1, in pure torch.

LEDITS++ (Brack et al., CVPR 2024, arXiv:2311.16711) masks each concept's guidance term with the
pixels that attend to the concept's text (M1), alone or intersected with the implicit mask M2 of
its noise difference (`implicit_mask` in sega_core.ledits). As diffusers' reference computes it:
the softmax attention probabilities of the concept's prediction at the cross-attention layers whose
query map is a quarter of the latent (down and up blocks, not the middle), averaged over layers and
heads and summed over the token positions after the start token; smoothed with a 3x3 Gaussian
(reflect padding); kept where at least the per-sample threshold-quantile; resized (nearest) to the
latent. A host reduces the probabilities as the model runs (`token_attention`) and hands the sums
here.

Nothing here imports ComfyUI.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .concepts import MASK_FROM, SEGAValueError
from .guidance import quantile_threshold

CLIP_CHUNK = 77  # CLIP's context: start token, 75 positions, one more (end or padding)
INTERSECT_MAX_T = 800  # LEDITS++ on SD intersects M1 and M2 only at timesteps t <= 800


def token_positions(context_len: int, words: Optional[int] = None, device=None) -> torch.Tensor:
    """The token positions whose attention M1 sums, as an index tensor.

    diffusers sums positions 1 .. 75 of CLIP's 77 (all after the start token: the words, the end
    token and the padding; `words=None`). With `words` (the number of word tokens of the concept's
    prompt) only positions 1 .. words count. A context made of several 77-token CLIP chunks (a long
    prompt) uses the same positions of every chunk; a context of another length (not CLIP) uses
    every position (or the first `words`). Built on `device` (no copy from the host).
    """
    if context_len < 1:
        raise SEGAValueError(f"attention mask: the text context has no tokens ({context_len}).")
    if words is not None and words < 1:
        raise SEGAValueError(f"attention mask: words must be >= 1, got {words}.")
    if context_len % CLIP_CHUNK:
        n = context_len if words is None else min(words, context_len)
        return torch.arange(n, device=device)
    per_chunk = CLIP_CHUNK - 2 if words is None else min(words, CLIP_CHUNK - 2)
    starts = torch.arange(0, context_len, CLIP_CHUNK, device=device).unsqueeze(1)
    return (starts + 1 + torch.arange(per_chunk, device=device)).flatten()


def token_attention(q: torch.Tensor, k: torch.Tensor, heads: int, positions: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of one cross-attention layer, summed over its heads and over the
    token `positions`, at once: (B, Q) from q (B, Q, heads*d) and k (B, T, heads*d).

    Computed in float32. Only this sum is kept, never the (B, heads, Q, T) probabilities beyond the
    call; the caller divides the sum over layers by the number of heads x layers (the mean).
    """
    b, nq, inner = q.shape
    d = inner // heads
    qh = q.float().view(b, nq, heads, d).transpose(1, 2)
    kh = k.float().view(b, k.shape[1], heads, d).transpose(1, 2)
    p = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1)  # (B, heads, Q, T)
    return p.index_select(-1, positions.to(p.device)).sum(dim=(1, 3))


def smoothing_kernel(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """LEDITS++'s 3x3 smoothing kernel: the normalised outer product of [e^-1, 1, e^-1]
    (diffusers calls it sigma 0.5; it is a Gaussian with sigma 1/sqrt(2)). (1, 1, 3, 3).
    Made once per dtype and device (a copy from the host would wait for the device every step)."""
    return _kernel(dtype, torch.device("cpu") if device is None else torch.device(device))


@functools.lru_cache(maxsize=None)
def _kernel(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.tensor([math.exp(-1.0), 1.0, math.exp(-1.0)], dtype=torch.float32)
    k = torch.outer(g, g)
    return (k / k.sum()).view(1, 1, 3, 3).to(dtype=dtype, device=device)


def smooth(attn: torch.Tensor) -> torch.Tensor:
    """The map (B, h, w) smoothed with `smoothing_kernel`, reflect-padded by 1 (same size)."""
    x = F.pad(attn.unsqueeze(1), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(x, smoothing_kernel(attn.dtype, attn.device)).squeeze(1)


def attention_mask(attn: torch.Tensor, threshold: float, size: Sequence[int]) -> torch.Tensor:
    """M1 (arXiv:2311.16711) from a concept's mean attention map `attn` (B, h, w) (`token_attention`
    summed over layers, divided by heads x layers): smoothed, kept where >= the per-sample
    threshold-quantile (torch.quantile's, float32), resized (nearest) to the latent's `size` (H, W).
    Binary, (B, 1, H, W), bool."""
    if attn.dim() != 3:
        raise SEGAValueError(f"attention mask: the map must be (B, h, w), got shape {tuple(attn.shape)}.")
    if min(attn.shape[-2:]) < 2:
        raise SEGAValueError(
            f"attention mask: the attention map is {attn.shape[-2]}x{attn.shape[-1]}; the smoothing needs at "
            f"least 2x2 (a latent of at least 8x8).")
    s = smooth(attn.float())
    q = quantile_threshold(s.flatten(1), threshold)
    m = (s >= q.view(-1, 1, 1)).float().unsqueeze(1)
    return F.interpolate(m, size=tuple(size), mode="nearest") > 0.5


def intersects(t: float, always: bool) -> bool:
    """Whether `intersect` uses M1 and M2 at timestep t (0..1000 scale): SDXL always (`always`),
    SD only at t <= 800 (M1 alone above), as diffusers' LEDITS++ does."""
    return always or t <= INTERSECT_MAX_T


def combine_masks(mask_from: str, m1: Optional[torch.Tensor], m2: Optional[torch.Tensor], both: bool) -> torch.Tensor:
    """The mask a concept's guidance term is multiplied with, by its `mask_from`:
    implicit: M2; attention: M1; intersect: M1 * M2 when `both` (see `intersects`), else M1."""
    if mask_from == "implicit":
        return m2
    if mask_from not in MASK_FROM:
        raise SEGAValueError(f"mask_from must be one of {', '.join(MASK_FROM)}, got {mask_from!r}.")
    if m1 is None:
        raise SEGAValueError(f"mask_from {mask_from!r} needs the concept's attention mask, and none was given.")
    m1 = m1.to(torch.bool)
    return m1 & m2 if mask_from == "intersect" and both else m1
