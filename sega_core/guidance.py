"""One SEGA step (Brack et al. 2023, Eq. 3-8), as small pure functions.

All predictions are noise-space (eps) tensors of shape (B, C, *rest): 4-D images,
5-D video, any channel count. State (the momentum) goes in and out explicitly.

Speed: the concepts are processed as one stack (no loop over concepts), constants are
built once per value and device (no per-step host-to-device copies), nothing reads a
device tensor back to the host, and the threshold selects the two order statistics it
needs instead of sorting (on the CPU with a histogram of the float bits, elsewhere with one
kthvalue and a pass for the next order statistic), while staying equal to torch.quantile.
"""
from __future__ import annotations

import functools
import math
import struct
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from .concepts import Plan, SEGAValueError, concept_acts

# The histogram selection is used on the CPU for rows of at least this many elements, in blocks
# of at least _HISTOGRAM_MIN_BLOCK: below that its fixed cost outweighs kthvalue (measured with
# bench/sega_math.py); other devices use kthvalue.
_HISTOGRAM_MIN = 4096
_HISTOGRAM_MIN_BLOCK = 1 << 16
# Elements per block of rows thresholded at once on the CPU (1 MiB of float32).
_BLOCK = 1 << 18


def _f32(x: float) -> float:
    """x rounded to float32 (round to nearest), as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


@functools.lru_cache(maxsize=1)
def _rank_in_float32() -> bool:
    """Whether this torch's quantile forms the rank q * (n - 1) in float32 (torch 2.13 and older
    releases do) rather than in double (2.14 does): q = 1/3 over 7 values is rank 2 exactly in
    float32 and 2.0000000596 in double, which reaches into the next value."""
    probe = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], device="cpu")
    return float(torch.quantile(probe, 1 / 3)) == 0.0


@functools.lru_cache(maxsize=256)
def _rank(q: float, n: int) -> Tuple[int, int, float]:
    """Indices and weight of the linear-interpolation quantile, rounded as torch.quantile rounds them.

    torch.quantile takes q in the input's dtype (float32) and forms q * (n - 1) either in float32
    (then the weight rank - lo is exact) or in double (then the weight is rounded to float32),
    depending on the torch release; the thresholds equal the running torch's bit for bit. Releases
    that use float32 refuse more than 2**24 values, so longer rows take the double rank.
    """
    if n <= 2**24 and _rank_in_float32():
        rank = _f32(_f32(q) * _f32(n - 1))  # the exact product, rounded once to float32
        lo = math.floor(rank)
        return lo, math.ceil(rank), rank - lo
    rank = _f32(q) * (n - 1)
    lo = math.floor(rank)
    hi = math.ceil(rank)
    return lo, hi, _f32(rank - lo)


@functools.lru_cache(maxsize=128)
def _constant_pair(values: tuple, dtype: torch.dtype, device: torch.device):
    # the host copy is made on the CPU whatever torch's default device is
    host = torch.tensor(values, dtype=dtype, device="cpu")
    return host, host if device.type == "cpu" else host.to(device, non_blocking=True)


def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of `values`, built once per (values, dtype, device) and never modified.

    The cache keeps the host copy alive too, so the copy to an accelerator can be
    non-blocking: sampling never waits for it.
    """
    return _constant_pair(values, dtype, torch.device(device))[1]


@functools.lru_cache(maxsize=64)
def _bucket_offsets(rows: int, per_row: int) -> torch.Tensor:
    return torch.arange(0, rows * per_row, per_row, dtype=torch.int32, device="cpu").unsqueeze(1)


@functools.lru_cache(maxsize=64)
def _rank_pairs(lo: int, hi: int, rows: int) -> torch.Tensor:
    return torch.tensor([[lo, hi]] * rows, device="cpu")


def _order_stats_histogram(a: torch.Tensor, lo: int, hi: int):
    """(order statistic of rank lo, of rank hi, NaN per row) of every row of `a` (R, n), or None.

    `a` must be a CPU float32 tensor with no negative values (an abs()). The bits of a
    non-negative float order like the float, so a histogram of their top bits (one bincount
    for all rows) finds the bucket holding each rank; only the few elements of those buckets
    are then selected exactly. Returns None where it does not apply (a rank in the inf/NaN
    bucket): the caller then uses kthvalue. The per-row bookkeeping is done in Python on a few
    numbers per row, which is cheaper than a dozen tiny tensor operations.
    """
    rows, n = a.shape
    bits = min(12, max(8, n.bit_length() - 3))  # about n / 8 buckets, at most 4096 per row
    shift = 31 - bits
    per_row = 1 << bits
    special = 0x7F800000 >> shift  # the first bucket of inf and NaN
    if rows * per_row >= 2**31:
        return None
    offset = _bucket_offsets(rows, per_row)
    key = a.view(torch.int32) >> shift
    key += offset
    hist = torch.bincount(key.view(-1), minlength=rows * per_row).view(rows, per_row)
    cum = hist.cumsum(1)
    bucket = torch.searchsorted(cum, _rank_pairs(lo, hi, rows), right=True)  # buckets of ranks lo, hi
    if int(bucket.max()) >= special:
        return None
    info = torch.cat([bucket, cum.gather(1, bucket), hist.gather(1, bucket[:, :1]),
                      hist[:, special:].sum(1, keepdim=True)], 1).tolist()
    # per row: b_lo, b_hi, elements up to b_lo, up to b_hi, in b_lo, inf or NaN
    before = [r[2] - r[4] for r in info]  # elements below the bucket of rank lo
    count = [r[3] - b for r, b in zip(info, before)]  # elements in the buckets of ranks lo and hi
    rank_in = [lo - b for b in before]  # rank lo among them
    first = (bucket[:, :1] + offset).to(torch.int32)
    inside = torch.empty_like(key)  # an int32 mask: comparisons into bool are several times slower
    if all(r[0] == r[1] for r in info):
        torch.eq(key, first, out=inside)
    else:
        torch.ge(key, first, out=inside)
        inside.mul_(torch.le(key, (bucket[:, 1:] + offset).to(torch.int32), out=key))
    del key
    values = a.view(-1).index_select(0, inside.view(-1).nonzero().squeeze(1))  # row by row
    del inside
    # A table with one row per input row, left-padded with -1 so that rank lo sits in column k.
    k = max(rank_in)
    pad = [k - r for r in rank_in]
    width = max(p + c for p, c in zip(pad, count))
    cpu = a.device  # explicit: torch's default device may be another one
    left = torch.arange(width, device=cpu) < torch.tensor(pad, device=cpu).unsqueeze(1)
    table = torch.where(left, -1.0, math.inf)
    first, shifts = 0, []
    for row, (p, c) in enumerate(zip(pad, count)):
        shifts.append(row * width + p - first)
        first += c
    where_to = torch.arange(values.numel(), device=cpu) + torch.repeat_interleave(
        torch.tensor(shifts, device=cpu), torch.tensor(count, device=cpu))
    table.view(-1)[where_to] = values
    below = table.kthvalue(k + 1, dim=1).values
    above = below if hi == lo else table.kthvalue(k + 2, dim=1).values
    if any(r[5] for r in info):
        has_nan = torch.isnan(a).any(-1)
    else:
        has_nan = torch.zeros(rows, dtype=torch.bool, device=cpu)
    return below, above, has_nan


def _next_order_stat(flat: torch.Tensor, below: torch.Tensor, hi: int) -> torch.Tensor:
    """The order statistic of rank hi of each row, given `below`, that of rank hi - 1.

    It is `below` itself where more than hi elements are <= below (a tie), else the least
    element above it: a few passes over the rows instead of a second selection.
    """
    col = below.unsqueeze(-1)
    at_most = torch.le(flat, col, out=torch.empty_like(flat))  # 1.0 where flat <= below
    tied = at_most.sum(-1, dtype=torch.float64 if flat.shape[-1] >= 2**24 else None) > hi  # exact counts
    # 1 * inf = inf where flat <= below, 0 * inf = NaN elsewhere, and fmax(x, NaN) = x
    least_above = torch.fmax(flat, at_most.mul_(math.inf)).amin(-1)
    return torch.where(tied, below, least_above)


def _quantile(a: torch.Tensor, q: float, nonneg: bool) -> torch.Tensor:
    """torch.quantile(a, q, dim=-1) by selection; `nonneg`: `a` holds no negative values or -0.0."""
    n = a.shape[-1]
    lo, hi, w = _rank(q, n)
    flat = a.reshape(-1, n)
    stats = None
    if (nonneg and n >= _HISTOGRAM_MIN and flat.numel() >= _HISTOGRAM_MIN_BLOCK and flat.device.type == "cpu"
            and flat.dtype == torch.float32):
        stats = _order_stats_histogram(flat.contiguous(), lo, hi)
    if stats is None:
        below = flat.kthvalue(lo + 1, dim=-1).values
        above = below if hi == lo else _next_order_stat(flat, below, hi)
        # torch.quantile gives NaN for a row holding a NaN (kthvalue would rank it last)
        has_nan = torch.isnan(flat.sum(-1)) if nonneg else torch.isnan(flat).any(-1)
    else:
        below, above, has_nan = stats
    t = torch.lerp(below, above, w)  # also when lo == hi: torch.quantile turns an infinite rank into NaN
    return t.masked_fill(has_nan, math.nan).view(a.shape[:-1])


def quantile_threshold(a: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of `a` over its last axis, equal to torch.quantile(a, q, dim=-1).

    Selects the two neighbouring order statistics instead of sorting, and has no
    limit on the number of elements (torch.quantile refuses more than 2**24).
    """
    return _quantile(a, q, nonneg=False)


def _threshold_rows(rows: torch.Tensor, q: float, keep: Optional[torch.Tensor] = None) -> None:
    """Zero, in place, the entries of each row of `rows` (R, n) whose |value| is below the row's
    q-quantile of |value| (taken in float32). `keep`, if given (R, n, bool), receives the kept entries.

    On the CPU the rows go in blocks of about 1 MiB, so that the passes over a block stay in cache.
    """
    n = rows.shape[-1]
    step = max(1, _BLOCK // n) if rows.device.type == "cpu" else rows.shape[0]
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step]
        a = block.abs().float()  # a new tensor: it becomes the mask below
        t = _quantile(a, q, nonneg=True)
        block.mul_(torch.ge(a, t.unsqueeze(-1), out=a))  # 1 where |d| >= t, else 0: faster than where
        if keep is not None:
            keep[start:start + step] = a


def _threshold_in_place(d: torch.Tensor, qs: Sequence[float], keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Zero the entries of the (K, B, C, ...) stack `d` below their threshold (Eq. 5); returns d.
    `keep`, if given (a bool tensor shaped like d), receives the kept entries.

    One selection per distinct q, not per concept.
    """
    n = math.prod(d.shape[3:])
    if len(set(qs)) == 1:
        _threshold_rows(d.view(-1, n), qs[0], None if keep is None else keep.view(-1, n))
        return d
    for q in sorted(set(qs)):
        index = _constant(tuple(k for k, x in enumerate(qs) if x == q), torch.long, d.device)
        part = d.index_select(0, index)
        part_keep = None if keep is None else torch.empty(part.shape, dtype=torch.bool, device=d.device)
        _threshold_rows(part.view(-1, n), q, None if part_keep is None else part_keep.view(-1, n))
        d.index_copy_(0, index, part)
        if part_keep is not None:
            keep.index_copy_(0, index, part_keep)
    return d


def threshold_edit(d: torch.Tensor, q: float, lead: int = 1) -> torch.Tensor:
    """Keep the entries of `d` with |d| >= the q-quantile of |d| (Eq. 5), zero the rest.

    The quantile is taken for every sample and channel separately, over all remaining
    axes (height, width and, for video, time). `lead` is the number of leading axes
    before (B, C): 1 for a stack of concepts (K, B, C, ...). Computed in float32.
    """
    stack = d.reshape(-1, *d.shape[lead:]) if lead != 1 else d
    out = _threshold_in_place(stack.clone(memory_format=torch.contiguous_format), [q] * stack.shape[0])
    return out.view(d.shape)


def _per_concept(values: Sequence[float], like: torch.Tensor):
    """One value per concept, broadcasting over a (K, B, ...) stack: a Python float when all agree.

    Per-concept values are kept in at least float32 (an in-place product with a float16/bfloat16
    stack still rounds once, as with a Python float), so 5.3 stays 5.3 and not bfloat16's 5.3125."""
    if len(set(values)) == 1:
        return values[0]
    dtype = torch.promote_types(like.dtype, torch.float32)
    return _constant(tuple(values), dtype, like.device).view(-1, *([1] * (like.dim() - 1)))


def _weighted_sum(weights: Sequence[float], d: torch.Tensor) -> torch.Tensor:
    """sum_k w_k d_k over the first axis of the stack `d` (one matrix-vector product)."""
    if len(weights) == 1:
        return d[0] * weights[0]
    return torch.tensordot(_constant(tuple(weights), d.dtype, d.device), d, dims=1)


class StepResult(NamedTuple):
    """What `sega_step` returns, whether or not the kept positions were asked for."""

    edit: Optional[torch.Tensor]  # added to the CFG noise prediction; None for no edit this step
    momentum: Optional[torch.Tensor]  # the momentum entering the next step
    kept: Optional[torch.Tensor] = None  # with return_kept: the entries each concept's threshold keeps


def _attention_masks(d: torch.Tensor, rows: Sequence[int], plan, attn_masks, both: bool,
                     kept: Optional[torch.Tensor]) -> None:
    """Masks the (K, B, C, ...) stack `d` in place by each row's plan.mask_from: the threshold
    (Eq. 5) for "implicit" (and "intersect" when `both`), then M1 for "attention" and "intersect"."""
    modes = [plan.mask_from[c] for c in rows]
    thr = [k for k, m in enumerate(modes) if m == "implicit" or (m == "intersect" and both)]
    if kept is not None:
        kept.fill_(True)
    if thr:
        index = _constant(tuple(thr), torch.long, d.device)
        part = d.index_select(0, index)
        part_keep = None if kept is None else torch.empty(part.shape, dtype=torch.bool, device=d.device)
        _threshold_in_place(part, [plan.threshold[rows[k]] for k in thr], part_keep)
        d.index_copy_(0, index, part)
        if part_keep is not None:
            kept.index_copy_(0, index, part_keep)
    for k, c in enumerate(rows):
        if modes[k] == "implicit":
            continue
        m1 = None if attn_masks is None else attn_masks[c]
        if m1 is None:
            raise SEGAValueError(
                f"concept #{c + 1}: mask_from {modes[k]!r} needs its attention mask, and none was given.")
        m1 = m1.to(device=d.device, dtype=torch.bool)
        d[k].mul_(m1)
        if kept is not None:
            kept[k] &= m1


def sega_step(
    uncond: torch.Tensor,
    concept_preds: Optional[torch.Tensor],
    rows: Sequence[int],
    step: int,
    plan: Plan,
    momentum: Optional[torch.Tensor],
    inactive: Sequence[int] = (),
    masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    return_kept: bool = False,
    attn_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    intersect_both: bool = True,
) -> StepResult:
    """SEGA's edit for one sampler step, and the momentum after it.

    uncond:        (B, C, ...) unconditional noise prediction.
    concept_preds: (len(rows), B, C, ...) noise predictions of the concepts `rows`
                   (as given by `plan.rows(step)`); None when `rows` is empty.
    momentum:      (B, C, ...) momentum v_t, or None for zero.
    inactive:      concepts that make no edit this step, as if cooled down (e.g. outside the
                   timestep range of their conditioning).
    masks:         optional, one entry per concept of the plan: None, or a spatial weight
                   broadcastable to (B, C, ...) with values in [0, 1] that multiplies the
                   concept's thresholded edit, so it acts only where the weight is non-zero (a
                   user's region; not in the paper). The threshold is still taken over the whole
                   latent, and the momentum is formed from the masked edits.
    return_kept:   also return `kept`, a bool tensor (len(rows), B, C, ...): the entries each
                   concept's threshold keeps (Eq. 5, before any mask), or None when `rows` is
                   empty. Costs one extra copy of the mask; off, nothing extra is computed.
    attn_masks:    optional, one entry per concept of the plan: None, or its cross-attention mask
                   M1 (B, 1, ...) (LEDITS++, arXiv:2311.16711; sega_core.attention), used by the
                   concepts whose plan.mask_from is "attention" (M1 in place of the threshold) or
                   "intersect" (the threshold's entries inside M1 when `intersect_both`, else M1).
                   `kept` then holds the mask used.
    Returns a StepResult (edit, momentum', kept): edit is added to the CFG noise prediction
    (eps = u + s_g (t - u) + edit), or None for no edit this step; kept is None without return_kept.

    Matches diffusers' SemanticStableDiffusionPipeline step for step, except that
    warmed-up concepts whose weights are all zero give no edit (the reference divides
    0 by 0 and returns NaN) and thresholds are always computed in float32.
    """
    n = len(plan)
    # as in the reference, a concept counts with its weight from step 0 until its cool-down, whatever
    # its scale: the warm-up only decides which edit (total or partial) is applied
    live = [concept_acts(step, 0, plan.cooldown[c]) and c not in inactive for c in range(n)]
    warmed = plan.warmed(step)
    n_warm = sum(warmed)
    total = None
    partial = None
    kept = None
    if rows:
        d = (concept_preds - uncond.unsqueeze(0)).contiguous()  # a new tensor: modified in place below
        d.mul_(_per_concept([plan.signed_scale[c] for c in rows], d))  # Eq. 4, reverse concepts negated
        if return_kept:
            kept = torch.empty(d.shape, dtype=torch.bool, device=d.device)
        if not plan.mask_from or all(plan.mask_from[c] == "implicit" for c in rows):
            _threshold_in_place(d, [plan.threshold[c] for c in rows], kept)  # Eq. 5
        else:
            _attention_masks(d, rows, plan, attn_masks, intersect_both, kept)
        if masks is not None:
            for k, c in enumerate(rows):
                if masks[c] is not None:
                    d[k].mul_(masks[c].to(device=d.device, dtype=d.dtype))
        w = [plan.weight[c] if live[c] else 0.0 for c in rows]
        total = _weighted_sum(w, d)  # Eq. 6 without normalisation, as in the reference
        if 0 < n_warm < n:
            # Only some concepts warmed up: their weights are normalised to sum 1 (cooled-down
            # concepts count with weight 0); no momentum in this branch.
            norm = sum(plan.weight[c] for c in range(n) if warmed[c] and live[c])
            if norm > 0 and any(warmed[c] for c in rows):
                partial = _weighted_sum([w[k] / norm if warmed[c] else 0.0 for k, c in enumerate(rows)], d)
    s_m, beta = plan.momentum_scale, plan.momentum_beta
    if momentum is not None and s_m != 0.0:
        total = s_m * momentum if total is None else total.add_(momentum, alpha=s_m)  # Eq. 7
    if total is None:
        new_momentum = None if momentum is None else beta * momentum
    elif momentum is None:
        new_momentum = (1 - beta) * total
    else:
        new_momentum = torch.add(beta * momentum, total, alpha=1 - beta)  # Eq. 8
    edit = total if n > 0 and n_warm == n else partial
    return StepResult(edit, new_momentum, kept)
