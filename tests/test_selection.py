"""Selection policies on their own: the bound each one computes, its outliers and its query probe, and the contract
every registered policy keeps (shapes, dtypes, no host reads, a fixed number of ops whatever the block count)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.opcount import OpCounter, ReadCounter
from policies import SELECTION
from policies.selection import ChannelsSelection, LandmarkSelection, ProbeSelection, SketchSelection, minmax_bound

pytestmark = pytest.mark.usefixtures("torch_one_thread")

seeds = st.integers(0, 2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- minmax ---------------------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 16), st.sampled_from([0.125, 1.0, 2.5]), seeds)
def test_minmax_bound_is_at_least_every_scaled_score_of_the_block(heads, rows, block, scaling, seed) -> None:
    g = _gen(seed)
    k = torch.randn(6, heads, block, 8, generator=g) * torch.rand(1, generator=g) * 10
    q = torch.randn(heads, rows, 8, generator=g) * 3
    policy = SELECTION.create("minmax")
    bound = policy.bound(q, policy.summarize(k), scaling)  # [n, H, M]
    true = torch.einsum("hmd,nhbd->nhmb", q, k).amax(-1) * scaling
    assert bool((bound >= true - 1e-4 * (1 + true.abs())).all())


# -- channels -------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 8), st.integers(1, 32), seeds)
def test_channels_over_every_channel_is_minmax(heads, rows, block, head_dim, seed) -> None:
    g = _gen(seed)
    k = torch.randn(5, heads, block, head_dim, generator=g)
    q = torch.randn(heads, rows, head_dim, generator=g)
    policy = ChannelsSelection()
    policy.share = 1.0
    summaries = policy.summarize(k)
    assert torch.allclose(policy.bound(q, summaries, 0.3), minmax_bound(q, summaries) * 0.3, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(2, 8), st.integers(0, 5), seeds)
def test_channels_rank_a_key_on_the_query_s_largest_channels_first(heads, block, target, seed) -> None:
    g = _gen(seed)
    d = 32
    policy = ChannelsSelection()
    q = torch.randn(heads, 1, d, generator=g)
    k = torch.randn(6, heads, block, d, generator=g) * 0.01
    r = policy.channels(d)
    top = q.abs().topk(r, dim=-1).indices[:, 0]  # [H, r]
    aligned = torch.zeros(heads, d)
    aligned.scatter_(-1, top, q[:, 0].gather(-1, top) * 4)
    k[target, :, block // 2] = aligned
    bound = policy.bound(q, policy.summarize(k), d ** -0.5)
    assert bound[:, :, 0].argmax(0).tolist() == [target] * heads


def test_channels_leave_out_the_small_channels() -> None:
    """A key that matches q only where |q| is small scores no more than a block of zeros."""
    policy = ChannelsSelection()
    policy.share = 0.25
    q = torch.tensor([[[4.0, -3.0, 0.1, 0.1, -0.1, 0.1, 0.1, 0.1]]])  # r = 2 channels of 8
    k = torch.zeros(2, 1, 2, 8)
    k[1, 0, 0, 2:] = torch.sign(q[0, 0, 2:]) * 50
    bound = policy.bound(q, policy.summarize(k), 1.0)
    assert policy.channels(8) == 2 and torch.equal(bound[0], bound[1])
    assert bool((minmax_bound(q, policy.summarize(k))[1] > 10).all())  # all channels: the key counts


# -- landmark -------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 16), seeds)
def test_landmark_of_identical_keys_scores_their_exact_score(heads, rows, block, seed) -> None:
    g = _gen(seed)
    key = torch.randn(4, heads, 1, 16, generator=g) * 3
    k = key.expand(4, heads, block, 16).contiguous()
    q = torch.randn(heads, rows, 16, generator=g)
    policy = LandmarkSelection()
    summaries = policy.summarize(k)
    true = torch.einsum("hmd,nhd->nhm", q, key[:, :, 0]) * 0.25
    assert torch.allclose(policy.bound(q, summaries, 0.25), true, atol=1e-4, rtol=1e-4)
    assert not bool(policy.keep(summaries).any())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(4, 64), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seeds)
def test_landmark_keeps_a_block_with_an_outlier_key_and_not_smooth_ones(heads, block, dtype, seed) -> None:
    g = _gen(seed)
    d = 32
    base = torch.randn(1, heads, 1, d, generator=g) * 3
    k = base + 0.3 * torch.randn(6, heads, block, d, generator=g)  # smooth: every key near the block's mean
    k[2, 0, block // 3] = -base[0, 0, 0] * 2  # one key far from the others, on head 0 only
    policy = LandmarkSelection()
    keep = policy.keep(policy.summarize(k.to(dtype)))
    expected = torch.zeros(6, heads, dtype=torch.bool)
    expected[2, 0] = True
    assert torch.equal(keep, expected)


# -- probe ----------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 8), seeds)
def test_probe_of_a_constant_query_is_the_query(heads, rows, steps, seed) -> None:
    q = torch.randn(heads, rows, 8, generator=_gen(seed))
    policy = ProbeSelection()
    for _ in range(steps):
        assert torch.allclose(policy.query(0, q), q, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), seeds)
def test_probe_follows_recent_queries_per_layer_and_reset_forgets(heads, rows, seed) -> None:
    g = _gen(seed)
    a, b = torch.randn(2, heads, rows, 8, generator=g)
    policy = ProbeSelection()
    for _ in range(5):
        policy.query(0, a)
    probe = policy.query(0, b)
    assert not torch.allclose(probe, b, atol=1e-3)  # pulled towards the earlier queries
    assert torch.allclose(probe - b, (1 - policy.weight) * policy.decay * (a - b), atol=1e-5)
    assert torch.allclose(policy.query(1, b), b)  # another layer has its own history
    policy.reset()
    assert torch.allclose(policy.query(0, b), b)


# -- sketch ---------------------------------------------------------------------------------------------------
def _sketch(bits: int) -> SketchSelection:
    policy = SketchSelection()
    policy.bits = bits
    return policy


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([1, 2, 4]), st.integers(1, 3), st.integers(1, 4), st.integers(1, 20), st.sampled_from(
    [torch.float32, torch.bfloat16, torch.float16]), seeds)
def test_sketch_scores_each_key_rebuilt_at_the_middle_of_its_step(bits, heads, rows, block, dtype, seed) -> None:
    """The block's weight is the largest q.k' * scaling over its keys k' (or their logsumexp), each channel rebuilt
    as the middle of the one of 2**bits equal steps between the block's minimum and maximum (in the keys' dtype) the
    key falls in; the packed codes take the summary's size in every dtype, whatever the block."""
    g = _gen(seed)
    k = (torch.randn(5, heads, block, 8, generator=g) * 3).to(dtype)
    q = torch.randn(heads, rows, 8, generator=g)
    policy = _sketch(bits)
    summaries = policy.summarize(k)
    assert summaries.shape == (5, policy.summary_size(block, dtype), heads, 8) and summaries.dtype == dtype
    lo, hi = (x.float()[:, :, None] for x in (k.amin(2), k.amax(2)))
    step = (hi - lo) / 2 ** bits
    codes = ((k.float() - lo) / step.clamp_min(1e-30)).floor().clamp(0, 2 ** bits - 1)
    weight = ((codes + 0.5) / 2 ** bits).to(dtype)  # of the way from the minimum to the maximum, in the keys' dtype
    rebuilt = torch.lerp(lo.to(dtype), hi.to(dtype), weight).float()
    expected = (torch.einsum("hmd,nhbd->nhmb", q, rebuilt) * 0.3).amax(-1)
    assert torch.allclose(policy.bound(q, summaries, 0.3), expected, atol=1e-4, rtol=1e-5)
    policy.block_weight = "logsumexp"  # over the block's keys only, whatever room the codes' bytes leave
    mass = (torch.einsum("hmd,nhbd->nhmb", q, rebuilt) * 0.3).logsumexp(-1)
    assert torch.allclose(policy.bound(q, summaries, 0.3), mass, atol=1e-4, rtol=1e-5)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([1, 2]), st.integers(1, 3), st.integers(1, 4), st.integers(1, 24), st.sampled_from(
    [0.125, 1.0, 2.5]), seeds)
def test_sketch_misses_the_block_s_largest_score_by_at_most_half_a_step_per_channel(bits, heads, rows, block,
                                                                                    scaling, seed) -> None:
    """Each rebuilt key is within half a step of the true key in every channel, so the block's estimated largest
    score is within scaling * sum_d |q_d| * step_d / 2 of the true largest score q.k * scaling."""
    g = _gen(seed)
    k = torch.randn(6, heads, block, 8, generator=g) * torch.rand(1, generator=g) * 10
    q = torch.randn(heads, rows, 8, generator=g) * 3
    policy = _sketch(bits)
    estimate = policy.bound(q, policy.summarize(k), scaling)
    true = (torch.einsum("hmd,nhbd->nhmb", q, k) * scaling).amax(-1)
    step = (k.amax(2) - k.amin(2)) / 2 ** bits  # [n, H, D]
    slack = scaling * torch.einsum("hmd,nhd->nhm", q.abs(), step) / 2
    assert bool(((estimate - true).abs() <= slack + 1e-4 * (1 + true.abs())).all())


def test_sketch_at_one_bit_rebuilds_keys_of_plus_and_minus_one_as_halves() -> None:
    """At one bit, a channel whose keys are -1 or 1 (both present in the block) has two steps of 1 and its keys are
    rebuilt at their middles, -1/2 and 1/2."""
    g = _gen(7)
    signs = torch.randint(0, 2, (4, 2, 16, 8), generator=g).float() * 2 - 1
    signs[:, :, 0], signs[:, :, 1] = 1.0, -1.0  # both levels in every channel of every block
    q = torch.randn(2, 3, 8, generator=g)
    policy = _sketch(1)
    expected = (torch.einsum("hmd,nhbd->nhmb", q, signs / 2)).amax(-1)
    assert torch.allclose(policy.bound(q, policy.summarize(signs), 1.0), expected, atol=1e-5)


# -- every registered policy ----------------------------------------------------------------------------------
def _state(policy) -> list[tuple[int, ...]]:
    """Shapes of the tensors a policy holds (in attributes, lists and dicts)."""
    shapes = []
    for value in vars(policy).values():
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        shapes += [tuple(v.shape) for v in values if isinstance(v, torch.Tensor)]
    return sorted(shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", SELECTION.names())
def test_selection_policy_contract(name: str, dtype: torch.dtype) -> None:
    g = _gen(3)
    policy = SELECTION.create(name)
    fresh = _state(policy)
    heads, rows, d = 2, 3, 16
    for n in (1, 9):
        k = (torch.randn(n, heads, 8, d, generator=g) * 4).to(dtype)
        summaries = policy.summarize(k)
        assert summaries.shape == (n, policy.summary_size(8, dtype), heads, d) and summaries.dtype == dtype
        q = policy.query(0, torch.randn(heads, rows, d, generator=g))
        assert q.shape == (heads, rows, d)
        bound = policy.bound(q, summaries, d ** -0.5)
        assert bound.shape == (n, heads, rows) and bound.dtype == torch.float32 and bool(torch.isfinite(bound).all())
        keep = policy.keep(summaries)
        assert keep is None or (keep.shape == (n, heads) and keep.dtype == torch.bool)
    # State: at most one set of tensors per layer, however many steps.
    for layer in (0, 1):
        policy.query(layer, torch.randn(heads, rows, d, generator=g))
    held = _state(policy)
    assert len(held) <= 2
    for _ in range(10):
        for layer in (0, 1):
            policy.query(layer, torch.randn(heads, rows, d, generator=g))
    assert _state(policy) == held
    policy.reset()
    assert _state(policy) == fresh


def _counts(fn) -> tuple[int, int]:
    ops, reads = OpCounter(), ReadCounter()
    with torch.no_grad(), reads, ops:
        fn()
    return ops.ops, reads.reads


@pytest.mark.parametrize("name", SELECTION.names())
def test_selection_policy_reads_nothing_on_the_host_and_its_ops_do_not_grow_with_blocks(name: str) -> None:
    g = _gen(5)
    policy = SELECTION.create(name)
    q = torch.randn(3, 2, 16, generator=g)
    policy.query(0, q)  # a policy's first query for a layer may set up its state
    counts = []
    for n in (2, 40):
        k = torch.randn(n, 3, 16, 16, generator=g)
        summaries = policy.summarize(k)
        counts.append([_counts(lambda: policy.summarize(k)), _counts(lambda: policy.query(0, q)),
                       _counts(lambda: policy.bound(q, summaries, 0.25)), _counts(lambda: policy.keep(summaries))])
    assert counts[0] == counts[1]
    assert all(reads == 0 for _, reads in counts[0])
