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
from typing import Optional, Sequence, Tuple

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


def attention_chunks(heads: int, q_len: int, latent: Optional[int], held: int, per_query: int) -> Tuple[int, int]:
    """How `token_attention` splits one row's work into fused attention calls: (heads per group, query
    positions per call), so that what a call holds stays below `latent` elements (one row's latent,
    C x H x W). `held`: float32 elements kept per head while a group's calls run (its keys, when they
    are made; 0 when the given keys are used as they are); `per_query`: elements per query and head
    that a call makes (the attention's output row, and the query row when it is made).

    A group's keys take at most a quarter of a latent (one head at least); each call gets half of
    what is left, so few calls run. `latent` None: one call for everything.
    """
    if latent is None:
        return heads, q_len
    group = heads if held == 0 else max(1, min(heads, (latent // 4) // held))
    room = max(0, latent - group * held) // 2
    if room < group * per_query:  # not one query of every head of the group: fewer heads
        group = max(1, room // per_query)
        room = max(0, latent - group * held) // 2
    return group, max(1, min(q_len, room // (group * per_query)))


def _indicator(positions: torch.Tensor, t_len: int, width: int, dtype, device) -> torch.Tensor:
    """The attention's value: (1, 1, T, width) whose first column is 1 at `positions`, 0 elsewhere, as
    a view of T + width - 1 elements (row j is elements j .. j + width - 1; only column 0 is read).
    The CPU's fused kernel needs a value as wide as the queries (a narrower one falls back to the math
    kernel, which holds every probability); this one costs T + width elements, not T x width."""
    ind = torch.zeros(t_len + width - 1, dtype=dtype, device=device)
    ind.index_fill_(0, positions.to(device), 1.0)
    return ind.as_strided((1, 1, t_len, width), (0, 0, 1, 1))


def _indicator_sum(rows: int, q_len: int, heads: int, t_len: int, width: int, scale: float,
                   positions: torch.Tensor, group: int, chunk: int, dtype, device, queries, keys) -> torch.Tensor:
    """The (rows, Q) float32 sum over heads of sum_{j in positions} softmax(q k^T * scale)_ij, as the
    output of attention whose value is the indicator of the positions: sum_j p_ij v_j with
    v_j = 1[j in P]. scaled_dot_product_attention's fused kernels (flash / memory-efficient on CUDA,
    flash on the CPU) never hold the probabilities: one call per head group and query chunk holds its
    output (g, c, width), and its queries and keys where they are made. keys(r, h0, h1): row r's keys
    of heads h0..h1, (1, g, T, width); queries(r, h0, h1, c0, c1): its queries at positions c0..c1,
    (1, g, c, width); both of `dtype`."""
    out = torch.zeros(rows, q_len, dtype=torch.float32, device=device)
    ind = _indicator(positions, t_len, width, dtype, device)
    for r in range(rows):
        for h0 in range(0, heads, group):
            h1 = min(heads, h0 + group)
            k = keys(r, h0, h1)  # kept for the group's calls
            v = ind.expand(1, h1 - h0, t_len, width)
            for c0 in range(0, q_len, chunk):
                c1 = min(q_len, c0 + chunk)
                o = F.scaled_dot_product_attention(queries(r, h0, h1, c0, c1), k, v, scale=scale)
                out[r, c0:c1] += o[0, :, :, 0].float().sum(dim=0)
                del o
            del k  # freed before the next group's keys are made
    return out


def token_attention(q: torch.Tensor, k: torch.Tensor, heads: int, positions: torch.Tensor,
                    latent: Optional[int] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of one attention layer, summed over its heads and over the key
    `positions`: (B, Q) float32 from q (B, Q, heads*d) and k (B, T, heads*d), or q (B, heads, Q, d)
    and k (B, heads, T, d).

    One fused attention with an indicator value per head group and query chunk (`_indicator_sum`) on
    q and k as they are (views, no copy), in their dtype: float32 stays float32; with float16 /
    bfloat16 inputs the fused kernels compute the softmax in float32 inside, and only each head's
    sum is rounded to the inputs' precision before the float32 sum over heads (a float32 copy of
    SD3's keys at 1024 px alone would be larger than a latent). The calls are sized from `latent` (the
    elements of one row's latent, C x H x W; see `attention_chunks`) so that their outputs stay below
    it. The caller divides the sum over layers by the number of heads x layers (the mean).
    """
    if q.dim() == 3:
        q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))  # views
    k = k.to(q.dtype)
    b, heads, nq, d = q.shape
    t_len = k.shape[2]
    group, chunk = attention_chunks(heads, nq, latent, 0, d)

    def keys(r, h0, h1):
        return k[r:r + 1, h0:h1]

    def queries(r, h0, h1, c0, c1):
        return q[r:r + 1, h0:h1, c0:c1]

    return _indicator_sum(b, nq, heads, t_len, d, d ** -0.5, positions, group, chunk, q.dtype, q.device, queries,
                          keys)


def projected_token_attention(x: torch.Tensor, context: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                              heads: int, positions: torch.Tensor, latent: Optional[int] = None,
                              q_bias: Optional[torch.Tensor] = None,
                              k_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`token_attention` of the layer's own projections q = x W_q^T (+ b_q), k = context W_k^T (+ b_k),
    projected call by call: x (B, Q, C), context (B, T, C_ctx), q_weight (heads*d, C), k_weight
    (heads*d, C_ctx). Neither q nor k of all heads is ever held: per call, the queries of its heads
    and positions; per head group, its keys. Where one head's keys alone would take half a latent
    or more (SD 1.5 at 512 px and below), no keys are made and no fused kernel runs (`_folded_sum`).
    The projections run in the inputs' dtype (as the layer runs them), the attention in float32."""
    b, nq, _ = x.shape
    d = q_weight.shape[0] // heads
    t_len, width = context.shape[1], context.shape[2]
    if latent is not None and t_len * d >= latent // 2:
        return _folded_sum(x, context, q_weight, k_weight, heads, positions, latent, q_bias)
    group, chunk = attention_chunks(heads, nq, latent, t_len * d, 2 * d)

    def keys(r, h0, h1):
        bias = None if k_bias is None else k_bias[h0 * d:h1 * d]
        kr = F.linear(context[r], k_weight[h0 * d:h1 * d], bias).float()  # (T, g*d)
        return kr.view(1, t_len, h1 - h0, d).transpose(1, 2)

    def queries(r, h0, h1, c0, c1):
        bias = None if q_bias is None else q_bias[h0 * d:h1 * d]
        qr = F.linear(x[r, c0:c1], q_weight[h0 * d:h1 * d], bias).float()  # (c, g*d)
        return qr.view(1, c1 - c0, h1 - h0, d).transpose(1, 2)

    return _indicator_sum(b, nq, heads, t_len, d, d ** -0.5, positions, group, chunk, torch.float32, x.device,
                          queries, keys)


def _folded_sum(x, context, q_weight, k_weight, heads: int, positions: torch.Tensor, latent: int, q_bias=None):
    """`projected_token_attention` where one head's keys would take half the latent or more: per head
    and chunk of query positions, the scores (c, T) as (q W_k) context^T (no keys; + q b_k is the same
    for every key of a query, the softmax leaves it out), their softmax's numerators summed over the
    positions with one product. The fused kernel is not used here: it would need the head's keys."""
    b, nq, _ = x.shape
    d = q_weight.shape[0] // heads
    t_len, width = context.shape[1], context.shape[2]
    chunk = max(1, min(nq, (latent // 2) // (d + width + t_len + 4)))  # a query, its q W_k, scores, sums
    sel = torch.zeros(t_len, dtype=torch.float32, device=x.device).index_fill_(0, positions.to(x.device), 1.0)
    out = torch.zeros(b, nq, dtype=torch.float32, device=x.device)
    scale = d ** -0.5
    for r in range(b):
        for h in range(heads):
            wq, wk = q_weight[h * d:(h + 1) * d], k_weight[h * d:(h + 1) * d]
            bias = None if q_bias is None else q_bias[h * d:(h + 1) * d]
            for c0 in range(0, nq, chunk):
                c1 = min(nq, c0 + chunk)
                q = F.linear(x[r, c0:c1], wq, bias)
                s = torch.matmul(torch.matmul(q.to(wk.dtype), wk), context[r].t()).float().mul_(scale)
                del q
                s.sub_(s.amax(dim=-1, keepdim=True)).exp_()  # softmax's numerators, in place
                out[r, c0:c1] += torch.matmul(s, sel).div_(s.sum(dim=-1))
                del s
    return out


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
