"""Where a concept acts, from cross-attention: LEDITS++'s attention mask M1, in pure torch.

LEDITS++ (Brack et al., CVPR 2024, arXiv:2311.16711) masks each concept's guidance term with the
pixels that attend to the concept's text (M1), alone or intersected with the implicit mask M2 of
its noise difference (`implicit_mask` in sega_core.ledits). As diffusers' reference computes it:
the softmax attention probabilities of the concept's prediction at the cross-attention layers whose
query map is a quarter of the latent (down and up blocks, not the middle), averaged over layers and
heads and summed over the token positions after the start token; smoothed with a 3x3 Gaussian
(reflect padding); kept where at least the per-sample threshold-quantile; resized (nearest) to the
latent. A host reduces the probabilities as the model runs (`token_attention`: chunked scores, or
on CUDA fused attention calls whose value is the indicator of the token positions, never every
probability at once) and hands the sums here.

Nothing here imports ComfyUI.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .concepts import MASK_FROM, SEGAValueError
from .guidance import quantile_threshold

CLIP_CHUNK = 77  # CLIP's context: start token, 75 positions, one more (end or padding)
FUSED_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
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


def attention_chunks(heads: int, d: int, q_len: int, t_len: int, latent: Optional[int],
                     fold_width: int = 0) -> Tuple[int, int, bool]:
    """How `token_attention` splits one row's work: (heads per group, query positions per chunk,
    fold), from the sizes, so that what it holds at once stays below `latent` elements (one row's
    latent, C x H x W), down to a latent that holds one query's scores.

    A group's keys (d x T per head, float32) are computed once and kept while its query chunks run;
    they take at most a quarter of a latent (one head at least). Each chunk then holds its queries
    (c x d per head) and their scores (c x T per head); the chunk gets half of what is left below one
    latent: the largest chunk the memory target allows, so few chunks run. When one head's keys alone
    are a latent or more (a small latent: SD 1.5 below 512 px), no keys are kept (fold): a chunk of
    one head computes its scores from the text itself, (q W_k) context^T, holding `fold_width`
    floats per query more (the text's width; 0 when the keys are given), within three quarters of a
    latent (nothing else is held then; fewer chunks: on SD3's 256 px bench model 18% less time).
    `latent` None: everything at once (one group, one chunk).
    """
    if latent is None:
        return heads, q_len, False
    group = max(1, min(heads, (latent // 4) // max(1, t_len * d)))
    keys = group * t_len * d
    fold = keys >= latent  # group is 1 then
    room = latent * 3 // 4 if fold else (latent - keys) // 2
    per_query = group * (d + t_len + 4) + (fold_width if fold else 0)  # a query row, its scores, max, sums
    return group, max(1, min(q_len, room // per_query)), fold


def _selector(positions: torch.Tensor, t_len: int, device) -> torch.Tensor:
    """A float32 (T,) vector with 1 at `positions`: the scores' sum over the positions as one product."""
    sel = torch.zeros(t_len, dtype=torch.float32, device=device)
    return sel.index_fill_(0, positions.to(device), 1.0)


def _token_sum(rows: int, q_len: int, heads: int, d: int, t_len: int, positions: torch.Tensor, latent, device,
               queries, keys, folded, fold_width: int = 0) -> torch.Tensor:
    """The (rows, Q) sum over heads and `positions` of softmax(q k^T / sqrt(d)), chunked by
    `attention_chunks`. keys(r, h0, h1, scale): row r's float32 keys of heads h0..h1 times `scale`
    (the scores' 1/sqrt(d), applied once per group), a new (g, d, T) tensor, (d, T) for one head;
    queries(r, h0, h1): a function (c0, c1) -> the float32 queries of those heads at query positions
    c0..c1, (g, c, d), (c, d) for one head (matrix products: fewer steps per chunk);
    folded(r, h, q, scale): the scores (c, T) of head h's queries q without its keys (fold)."""
    group, chunk, fold = attention_chunks(heads, d, q_len, t_len, latent, fold_width)
    out = torch.zeros(rows, q_len, dtype=torch.float32, device=device)
    sel = _selector(positions, t_len, device)
    scale = d ** -0.5
    for r in range(rows):
        acc = out[r]
        for h0 in range(0, heads, group):
            h1 = min(heads, h0 + group)
            kt = None if fold else keys(r, h0, h1, scale)  # kept for the group's chunks
            chunk_queries = queries(r, h0, h1)
            for c0 in range(0, q_len, chunk):
                c1 = min(q_len, c0 + chunk)
                q = chunk_queries(c0, c1)
                s = folded(r, h0, q, scale) if fold else torch.matmul(q, kt)  # the scores
                del q
                s.sub_(s.amax(dim=-1, keepdim=True)).exp_()  # softmax's numerators, in place
                part = torch.matmul(s, sel).div_(s.sum(dim=-1))  # softmax summed over the positions
                del s
                acc[c0:c1].add_(part if part.dim() == 1 else part.sum(dim=0))
            del kt  # freed before the next group's keys are made
    return out


def fused_chunks(heads: int, q_len: int, latent: Optional[int], held: int, per_query: int) -> Tuple[int, int]:
    """How the fused way (`_indicator_sum`) splits one row's work into attention calls: (heads per
    group, query positions per call), so that what a call holds stays below `latent` elements (one
    row's latent, C x H x W). `held`: float32 elements kept per head while a group's calls run (its keys, when they
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
    a view of 8 (T - 1) + width elements (row j starts at element 8 j, rows overlap; only column 0 is
    read; a row stride of 8 elements keeps every row 16-byte aligned, as CUDA's kernels load them).
    The CPU's fused kernel needs a value as wide as the queries (a narrower one falls back to the math
    kernel, which holds every probability); this one costs 8 T + width elements, not T x width."""
    ind = torch.zeros(8 * (t_len - 1) + width, dtype=dtype, device=device)
    ind.index_fill_(0, positions.to(device) * 8, 1.0)
    return ind.as_strided((1, 1, t_len, width), (0, 0, 8, 1))


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


def fused_token_attention(q: torch.Tensor, k: torch.Tensor, heads: int, positions: torch.Tensor,
                          latent: Optional[int] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of one attention layer, summed over its heads and over the key
    `positions`: (B, Q) float32 from q (B, Q, heads*d) and k (B, T, heads*d), or q (B, heads, Q, d)
    and k (B, heads, T, d).

    `token_attention`'s fused way (the default off the CPU: CUDA and other accelerators): one fused attention with an indicator value
    per head group and query chunk (`_indicator_sum`) on q and k as they are (views, no copy), in
    their dtype: float32 stays float32; with float16 / bfloat16 inputs the fused kernels compute the
    softmax in float32 inside, and only each head's sum is rounded to the inputs' precision before
    the float32 sum over heads (a float32 copy of SD3's keys at 1024 px alone would be larger than a
    latent). The calls are sized from `latent` (the elements of one row's latent, C x H x W; see
    `fused_chunks`) so that their outputs stay below it. The math kernel is excluded: where no fused
    kernel takes the inputs, a RuntimeError.
    """
    if q.dim() == 3:
        q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))  # views
    k = k.to(q.dtype)
    b, heads, nq, d = q.shape
    t_len = k.shape[2]
    group, chunk = fused_chunks(heads, nq, latent, 0, d)

    def keys(r, h0, h1):
        return k[r:r + 1, h0:h1]

    def queries(r, h0, h1, c0, c1):
        return q[r:r + 1, h0:h1, c0:c1]

    with sdpa_kernel(FUSED_KERNELS):  # never the math kernel: it would hold every probability
        return _indicator_sum(b, nq, heads, t_len, d, d ** -0.5, positions, group, chunk, q.dtype, q.device,
                              queries, keys)


def token_attention(q: torch.Tensor, k: torch.Tensor, heads: int, positions: torch.Tensor,
                    latent: Optional[int] = None, fused: Optional[bool] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of one cross-attention layer, summed over its heads and over the
    token `positions`: (B, Q) from q (B, Q, heads*d) and k (B, T, heads*d).

    Computed in float32, in chunks of heads and query positions sized from `latent` (the elements of
    one row's latent, C x H x W; see `attention_chunks`): never the (B, heads, Q, T) probabilities
    at once. The caller divides the sum over layers by the number of heads x layers (the mean).

    `fused` (default: on any device but the CPU) computes the same sums with the fused attention kernels instead
    (`fused_token_attention`); where none takes the inputs, the chunks above. Not the default on the
    CPU: its fused kernel needs a value as wide as the queries, so it does twice the products of the
    scores (measured on the CPU: 2 to 2.5 times the time of these chunks, at the same memory bound).
    """
    if fused if fused is not None else q.device.type != "cpu":
        try:
            return fused_token_attention(q, k, heads, positions, latent)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # no fused kernel takes these inputs: the chunks below (the same bound)
            pass
    b, nq, inner = q.shape
    d = inner // heads
    t_len = k.shape[1]

    def keys(r, h0, h1, scale):
        kt = k[r, :, h0 * d:h1 * d].t().reshape(h1 - h0, d, t_len)  # a view of k
        kt = kt.to(torch.float32, copy=True).mul_(scale)
        return kt[0] if h1 == h0 + 1 else kt

    def queries(r, h0, h1):
        qr, g = q[r, :, h0 * d:h1 * d], h1 - h0
        if g == 1:
            return lambda c0, c1: qr[c0:c1].float()
        return lambda c0, c1: qr[c0:c1].float().view(c1 - c0, g, d).transpose(0, 1)

    def folded(r, h, qc, scale):  # the given keys as they are (a copy only from another dtype)
        return torch.matmul(qc, k[r, :, h * d:(h + 1) * d].float().t()).mul_(scale)

    return _token_sum(b, nq, heads, d, t_len, positions, latent, q.device, queries, keys, folded)


def projected_token_attention(x: torch.Tensor, context: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                              heads: int, positions: torch.Tensor, latent: Optional[int] = None,
                              q_bias: Optional[torch.Tensor] = None,
                              k_bias: Optional[torch.Tensor] = None, fused: Optional[bool] = None) -> torch.Tensor:
    """`token_attention` of the layer's own projections q = x W_q^T (+ b_q), k = context W_k^T (+ b_k),
    projected chunk by chunk: x (B, Q, C), context (B, T, C_ctx), q_weight (heads*d, C), k_weight
    (heads*d, C_ctx). Neither q nor k of all heads is ever held: per chunk, the queries of its heads
    and positions; per head group, its keys (or, for a latent smaller than one head's keys, none:
    the scores as (q W_k) context^T). The projections run in the inputs' dtype (as the layer runs
    them), the rest in float32. `fused` (default: on any device but the CPU): the heads' keys (float32) and the queries
    per call are projected the same way, and each call is one fused attention with an indicator value
    (`_indicator_sum`), where one head's keys take less than half the latent."""
    b, nq, _ = x.shape
    d = q_weight.shape[0] // heads
    t_len = context.shape[1]
    if (fused if fused is not None else x.device.type != "cpu") and (latent is None or t_len * d < latent // 2):
        try:
            return _fused_projected(x, context, q_weight, k_weight, heads, positions, latent, q_bias, k_bias)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # no fused kernel takes these inputs: the chunks below (the same bound)
            pass

    def keys(r, h0, h1, scale):
        kt = torch.matmul(k_weight[h0 * d:h1 * d], context[r].t())  # (g*d, T): the keys, already transposed
        if k_bias is not None:
            kt += k_bias[h0 * d:h1 * d].unsqueeze(1)
        kt = kt.float().mul_(scale)  # .float(): a copy only from another dtype
        return kt if h1 == h0 + 1 else kt.view(h1 - h0, d, t_len)

    def queries(r, h0, h1):
        xr, w, g = x[r], q_weight[h0 * d:h1 * d], h1 - h0
        bias = None if q_bias is None else q_bias[h0 * d:h1 * d]
        if g == 1:
            return lambda c0, c1: F.linear(xr[c0:c1], w, bias).float()
        return lambda c0, c1: F.linear(xr[c0:c1], w, bias).float().view(c1 - c0, g, d).transpose(0, 1)

    def folded(r, h, qc, scale):  # q k^T = (q W_k) context^T (+ q b_k): no keys held
        wk = k_weight[h * d:(h + 1) * d]
        s = torch.matmul(torch.matmul(qc.to(wk.dtype), wk), context[r].t()).float()
        if k_bias is not None:
            s += torch.matmul(qc, k_bias[h * d:(h + 1) * d].float()).unsqueeze(1)
        return s.mul_(scale)

    return _token_sum(b, nq, heads, d, t_len, positions, latent, x.device, queries, keys, folded,
                      context.shape[2])


def _fused_projected(x, context, q_weight, k_weight, heads: int, positions: torch.Tensor, latent, q_bias, k_bias):
    """`projected_token_attention` through the fused kernels (`_indicator_sum`): per head group its keys
    (float32), per call its queries."""
    b, nq, _ = x.shape
    d = q_weight.shape[0] // heads
    t_len = context.shape[1]
    group, chunk = fused_chunks(heads, nq, latent, t_len * d, 2 * d)

    def keys(r, h0, h1):
        bias = None if k_bias is None else k_bias[h0 * d:h1 * d]
        kr = F.linear(context[r], k_weight[h0 * d:h1 * d], bias).float()  # (T, g*d)
        return kr.view(1, t_len, h1 - h0, d).transpose(1, 2)

    def queries(r, h0, h1, c0, c1):
        bias = None if q_bias is None else q_bias[h0 * d:h1 * d]
        qr = F.linear(x[r, c0:c1], q_weight[h0 * d:h1 * d], bias).float()  # (c, g*d)
        return qr.view(1, c1 - c0, h1 - h0, d).transpose(1, 2)

    with sdpa_kernel(FUSED_KERNELS):
        return _indicator_sum(b, nq, heads, t_len, d, d ** -0.5, positions, group, chunk, torch.float32, x.device,
                              queries, keys)


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
