"""The CPU histogram selection of the threshold (sega_core/guidance.py) equals torch.quantile bit for bit.

sega_step uses that path only for rows of at least _HISTOGRAM_MIN elements in blocks of at least
_HISTOGRAM_MIN_BLOCK, so the other core tests, on tiny tensors, never reach it. Here both limits
are lowered to 1, so that every CPU float32 selection takes it, and a spy checks that it did.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import sega_core.guidance as guidance
from sega_core import threshold_edit

HYPOTHESIS = dict(deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
KINDS = ["randn", "ties", "constant", "zeros", "wide", "subnormal", "inf", "nan", "zeros-and-tiny"]


class Spy:
    """Wraps _order_stats_histogram: `used` counts its answers, `declined` its None (kthvalue fallback)."""

    def __init__(self, real):
        self.real = real
        self.reset()

    def reset(self):  # the fixture is shared by all examples of a hypothesis test
        self.used = self.declined = 0

    def __call__(self, *args):
        out = self.real(*args)
        if out is None:
            self.declined += 1
        else:
            self.used += 1
        return out


@pytest.fixture
def spy(monkeypatch):
    monkeypatch.setattr(guidance, "_order_stats_histogram", Spy(guidance._order_stats_histogram))
    return guidance._order_stats_histogram


@pytest.fixture
def histogram_everywhere(monkeypatch, spy):
    monkeypatch.setattr(guidance, "_HISTOGRAM_MIN", 1)
    monkeypatch.setattr(guidance, "_HISTOGRAM_MIN_BLOCK", 1)
    return spy


def make_rows(kind: str, rows: int, n: int, seed: int, fraction: float = 0.3) -> torch.Tensor:
    """Non-negative float32 rows (an |edit|), of one of KINDS."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, n, generator=g)
    if kind == "ties":  # a few distinct values: ranks lo and hi often share a value
        a = torch.randint(0, 1 + seed % 4, (rows, n), generator=g).float() * 0.25
    elif kind == "constant":
        a = torch.full((rows, n), [1.0, 3.7, 1e-30, 1e30, 2.0**-149][seed % 5])
    elif kind == "zeros":
        a = torch.zeros(rows, n)
    elif kind == "wide":  # exponents over most of float32's range: many histogram buckets
        a = a * torch.exp(torch.randn(rows, n, generator=g) * 20)
    elif kind == "subnormal":
        a = a * 1e-40
    elif kind == "inf":  # ranks may fall in the inf bucket: the selection must decline, kthvalue decides
        a[torch.rand(rows, n, generator=g) < fraction] = math.inf
    elif kind == "nan":  # torch.quantile gives NaN for every row holding a NaN
        a[torch.rand(rows, n, generator=g) < fraction * 0.2] = math.nan
    elif kind == "zeros-and-tiny":
        a[:, ::3] = 0.0
        a[0, 0] = 2.0**-149
    return a.abs()


def assert_same(got: torch.Tensor, want: torch.Tensor):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    assert torch.equal(got.nan_to_num(nan=0.0), want.nan_to_num(nan=0.0)), (got - want).abs().max()


quantiles = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1 - 2**-24]),
                      st.floats(0.0, 1.0, exclude_max=True))


@settings(max_examples=300, **HYPOTHESIS)
@given(kind=st.sampled_from(KINDS), rows=st.integers(1, 6),
       n=st.one_of(st.integers(1, 40), st.sampled_from([64, 100, 257, 1000, 4096, 5003])),
       q=quantiles, seed=st.integers(0, 2**31 - 1), fraction=st.floats(0.0, 1.0))
def test_histogram_selection_equals_torch_quantile(histogram_everywhere, kind, rows, n, q, seed, fraction):
    histogram_everywhere.reset()
    a = make_rows(kind, rows, n, seed, fraction)
    got = guidance._quantile(a, q, nonneg=True)
    assert_same(got, torch.quantile(a, q, dim=-1))
    spy = histogram_everywhere
    assert spy.used + spy.declined == 1
    if kind not in ("inf", "nan"):
        assert spy.used == 1, "the histogram selection declined finite rows"


@settings(max_examples=120, **HYPOTHESIS)
@given(dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       stack=st.integers(1, 3), batch=st.integers(1, 3), channels=st.integers(1, 4),
       rest=st.lists(st.integers(1, 9), min_size=2, max_size=3), q=quantiles,
       ties=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_threshold_edit_through_histogram(histogram_everywhere, dtype, stack, batch, channels, rest, q, ties, seed):
    """The public threshold_edit (4-D and 5-D, any dtype) on the histogram path keeps exactly the entries
    that torch.quantile of |d| in float32 keeps."""
    histogram_everywhere.reset()
    g = torch.Generator().manual_seed(seed)
    shape = (stack, batch, channels, *rest)
    d = torch.randn(shape, generator=g)
    if ties:
        d = torch.randint(-3, 4, shape, generator=g).float()
    d = d.to(dtype)
    out = threshold_edit(d, q)
    flat = d.abs().float().flatten(3)
    keep = (flat >= torch.quantile(flat, q, dim=-1, keepdim=True)).view(shape)
    assert out.dtype == dtype
    assert torch.equal(out, torch.where(keep, d, torch.zeros((), dtype=dtype)))
    assert histogram_everywhere.used >= 1 and histogram_everywhere.declined == 0


def test_threshold_per_concept_quantiles_through_histogram(histogram_everywhere):
    """A stack whose concepts have different thresholds (one selection per distinct q)."""
    g = torch.Generator().manual_seed(3)
    qs = [0.9, 0.0, 0.9, 0.5, 0.999]
    d = torch.randn(len(qs), 2, 4, 5, 7, generator=g)
    d[1, 0, 0] = 0.25  # a constant channel
    out = guidance._threshold_in_place(d.clone(), qs)
    for k, q in enumerate(qs):
        flat = d[k].abs().flatten(2)
        keep = (flat >= torch.quantile(flat, q, dim=-1, keepdim=True)).view_as(d[k])
        assert torch.equal(out[k], torch.where(keep, d[k], 0.0)), f"concept {k}, q {q}"
    assert histogram_everywhere.used == len(set(qs))


@pytest.mark.parametrize("n", [4096, 50_001, 262_147])
def test_rank_rounding_on_long_rows(histogram_everywhere, n):
    """Distinct values 0 .. n-1 (shuffled): the result shows the exact ranks and weight, which torch.quantile
    forms from q in float32 and q * (n - 1) in double; a float32 product would round onto another rank."""
    a = torch.randperm(n, generator=torch.Generator().manual_seed(n)).float().view(1, n)
    for q in [0.9, 0.95, 0.99, 0.3, 1 / 3, 0.123456789, 1 - 2**-24]:
        assert_same(guidance._quantile(a, q, nonneg=True), torch.quantile(a, q, dim=-1))
    assert histogram_everywhere.used == 7


def test_default_dispatch_uses_histogram_for_large_rows(spy):
    """With the shipped limits: a large float32 CPU block takes the histogram path, a small one does not."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(2, 2, 4, 64, 64, generator=g)  # rows of 4096, blocks of 65536 elements
    assert 64 * 64 >= guidance._HISTOGRAM_MIN and big.numel() >= guidance._HISTOGRAM_MIN_BLOCK
    out = threshold_edit(big, 0.9)
    flat = big.abs().flatten(3)
    keep = (flat >= torch.quantile(flat, 0.9, dim=-1, keepdim=True)).view_as(big)
    assert torch.equal(out, torch.where(keep, big, 0.0))
    assert spy.used >= 1
    used = spy.used
    threshold_edit(torch.randn(2, 2, 4, 8, 8, generator=g), 0.9)
    assert spy.used == used  # small rows: kthvalue


@pytest.mark.parametrize("path", ["histogram", "kthvalue"])
def test_ranks_near_an_integer_round_as_torch_quantile(monkeypatch, path):
    """q * (n - 1) close to an integer (1/3 of 6 is 2 in float32 and 2.0000000596 in double; 0.9 of 63
    rounds differently in float32 and double): the selection uses the running torch's rounding, so the
    thresholds equal torch.quantile's bit for bit on either kind of release."""
    monkeypatch.setattr(guidance, "_HISTOGRAM_MIN", 1 if path == "histogram" else 10**9)
    monkeypatch.setattr(guidance, "_HISTOGRAM_MIN_BLOCK", 1)
    g = torch.Generator().manual_seed(0)
    for n, q in [(7, 1 / 3), (64, 0.9), (100, 0.95), (1000, 0.99), (4096, 2 / 3), (5003, 0.1), (31, 0.7)]:
        a = torch.rand(3, n, generator=g) * torch.tensor([[1.0], [0.05], [1e3]])
        assert_same(guidance._quantile(a, q, nonneg=True), torch.quantile(a, q, dim=-1))
