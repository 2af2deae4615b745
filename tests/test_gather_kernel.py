"""The Triton page and block gathers against their torch references, bit for bit (TRITON_INTERPRET=1 on the CPU,
set in conftest.py; there the "host pool" is one more CPU tensor), plus runs on CUDA with a pinned host pool."""

from __future__ import annotations

import pytest
import torch

from offload.kernels.gather import gather_blocks, gather_blocks_reference, gather_pages, gather_pages_reference

pytest.importorskip("triton")
pytestmark = pytest.mark.kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = -7.0  # what rows left untouched still hold


def _pools(h: int, p: int, d: int, s_dev: int, s_host: int, dtype: torch.dtype, seed: int = 0,
           host_device: str = DEVICE, pin: bool = False):
    """Random device and host pools [S, H, P, D]; every page distinct."""
    gen = torch.Generator().manual_seed(seed)

    def pool(s: int) -> torch.Tensor:
        return torch.randn(s, h, p, d, generator=gen).to(dtype)

    dev_k, dev_v = pool(s_dev).to(DEVICE), pool(s_dev).to(DEVICE)
    host_k, host_v = pool(s_host).to(host_device), pool(s_host).to(host_device)
    if pin:
        host_k, host_v = host_k.pin_memory(), host_v.pin_memory()
    return dev_k, dev_v, host_k, host_v


def _outs(n: int, h: int, p: int, d: int, dtype: torch.dtype):
    return tuple(torch.full((n, h, p, d), SENTINEL, dtype=dtype, device=DEVICE) for _ in range(2))


def _both(pools, slots: list[int], split: int):
    """(kernel outputs, reference outputs) for the same slots, both starting from the sentinel."""
    dev_k = pools[0]
    n, (h, p, d) = len(slots), dev_k.shape[1:]
    s = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    got, want = _outs(n, h, p, d, dev_k.dtype), _outs(n, h, p, d, dev_k.dtype)
    gather_pages(*got, *pools, s, split)
    gather_pages_reference(*want, *pools, s, split)
    return got, want


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


# (H, P, D, S_dev, S_host, slots, dtype); split = S_dev
CASES = [
    (2, 4, 16, 5, 6, [6, 0, -1, 10, 3, 5, -1, 8], torch.float32),  # mixed, shuffled, padded
    (2, 8, 16, 4, 4, [7, 1, 4, 2, -1], torch.bfloat16),
    (2, 16, 16, 3, 3, [2, 5, -1, 0], torch.float16),
    (2, 4, 16, 3, 2, [4], torch.float32),                           # a single entry, on the host
    (2, 4, 16, 3, 2, [1], torch.bfloat16),                          # a single entry, on the device
    (3, 4, 16, 2, 3, [3, 0, 4, -1], torch.bfloat16),                # 192 elements in a block of 256
    (3, 32, 48, 1, 2, [2, 0, 1], torch.float32),                    # 4608 elements: blocks of 2048, the third partial
    (2, 4, 16, 0, 3, [2, -1, 0], torch.float16),                    # empty device pool: all from the host
    (2, 4, 16, 3, 0, [2, -1, 0], torch.float32),                    # empty host pool
]


@pytest.mark.parametrize("h,p,d,s_dev,s_host,slots,dtype", CASES)
def test_matches_reference_bit_for_bit(h, p, d, s_dev, s_host, slots, dtype):
    pools = _pools(h, p, d, s_dev, s_host, dtype)
    got, want = _both(pools, slots, s_dev)
    for g, w in zip(got, want):
        _same_bits(g, w)


def test_rows_hold_their_pages_and_padding_is_untouched():
    """Checked against the pools directly, not only against the reference: row i is the addressed page, rows of
    -1 keep what they held, and the pools are unchanged."""
    dtype, split = torch.bfloat16, 3
    pools = _pools(2, 4, 16, split, 4, dtype, seed=1)
    before = [t.clone() for t in pools]
    slots = [5, -1, 2, 3, -1, 0]
    got, _ = _both(pools, slots, split)
    dev_k, dev_v, host_k, host_v = pools
    for i, s in enumerate(slots):
        if s < 0:
            assert (got[0][i] == SENTINEL).all() and (got[1][i] == SENTINEL).all()
        elif s < split:
            _same_bits(got[0][i], dev_k[s])
            _same_bits(got[1][i], dev_v[s])
        else:
            _same_bits(got[0][i], host_k[s - split])
            _same_bits(got[1][i], host_v[s - split])
    for a, b in zip(pools, before):
        _same_bits(a, b)


def test_nan_payloads_survive():
    """The copy moves bits, not values: a NaN with a payload and -0.0 come out as they went in."""
    pools = _pools(2, 4, 16, 1, 1, torch.float32, seed=2)
    pools[2].view(torch.int32)[0, 0, 0, :2] = torch.tensor([0x7FC00123, -0x80000000], dtype=torch.int32)
    got, want = _both(pools, [1, 0], 1)
    _same_bits(got[0], want[0])
    assert got[0].view(torch.int32)[0, 0, 0, 0].item() == 0x7FC00123


def test_all_padding_and_empty_slots_leave_outputs_untouched():
    pools = _pools(2, 4, 16, 2, 2, torch.float32)
    got, _ = _both(pools, [-1, -1], 2)
    assert all((t == SENTINEL).all() for t in got)
    got, _ = _both(pools, [], 2)
    assert all(t.numel() == 0 for t in got)


def _bad_inputs():
    """(name of the parameter the message must name, the arguments with that one broken)."""
    h, p, d, dtype = 2, 4, 16, torch.float32
    dev_k, dev_v, host_k, host_v = _pools(h, p, d, 2, 2, dtype)
    out_k, out_v = _outs(3, h, p, d, dtype)
    slots = torch.tensor([0, 2, -1], dtype=torch.int32, device=DEVICE)
    good = dict(out_k=out_k, out_v=out_v, dev_k=dev_k, dev_v=dev_v, host_k=host_k, host_v=host_v, slots=slots,
                split=2)
    cases = [
        ("slots", dict(slots=slots.long())),
        ("slots", dict(slots=slots.view(3, 1))),
        ("split", dict(split=-1)),
        ("out_k", dict(out_k=out_k[:2])),
        ("out_v", dict(out_v=out_v[:2])),
        ("out_v", dict(out_v=out_v.to(torch.bfloat16))),
        ("dev_k", dict(dev_k=dev_k.to(torch.bfloat16))),
        ("dev_v", dict(dev_v=dev_v[:, :, :2])),
        ("dev_v", dict(dev_v=dev_v[:1])),
        ("host_k", dict(host_k=host_k.transpose(2, 3))),             # not contiguous
        ("host_k", dict(host_k=host_k[0])),                          # 3-D
        ("host_v", dict(host_v=host_v[:1])),
    ]
    return [(name, {**good, **change}) for name, change in cases]


@pytest.mark.parametrize("fn", [gather_pages, gather_pages_reference])
def test_rejects_bad_inputs_naming_the_parameter(fn):
    for name, kwargs in _bad_inputs():
        with pytest.raises(ValueError, match=name):
            fn(**kwargs)


def test_missing_triton_is_one_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "offload.kernels._triton_gather", None)  # import now fails
    pools = _pools(2, 4, 16, 1, 1, torch.float32)
    out = _outs(1, 2, 4, 16, torch.float32)
    with pytest.raises(RuntimeError, match="needs triton"):
        gather_pages(*out, *pools, torch.tensor([0], dtype=torch.int32), 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_reads_the_pinned_host_pool_in_place():
    h, p, d, split = 8, 64, 128, 6
    pools = _pinned_pools(h, p, d, split, 10, seed=3)
    slots = [12, 0, -1, 5, 15, 6, 3, -1, 9]
    _same_on_cuda(*_both(pools, slots, split))


def _pinned_pools(h: int, p: int, d: int, split: int, s_host: int, seed: int):
    """bf16 pools: the device pool on CUDA, the host pool pinned in CPU memory."""
    pools = _pools(h, p, d, split, s_host, torch.bfloat16, seed=seed, host_device="cpu", pin=True)
    assert pools[2].is_pinned() and pools[0].is_cuda
    return pools


def _same_on_cuda(got, want) -> None:
    torch.cuda.synchronize()
    for g, w in zip(got, want):
        assert g.is_cuda
        _same_bits(g, w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_refuses_a_pageable_host_pool():
    pools = _pools(2, 4, 16, 2, 2, torch.float32, host_device="cpu")
    out = _outs(1, 2, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="host_k"):
        gather_pages(*out, *pools, torch.tensor([2], dtype=torch.int32, device="cuda"), 2)


# Block gather (`gather_blocks`): per-head blocks of B tokens from the unified pool into [n, Ho, B, D].

def _block_id(slot: int, head: int, j: int, h: int, r: int) -> int:
    """The unified flat block id of block j of KV head `head` of unified slot `slot`."""
    return (slot * h + head) * r + j


def _random_index(n: int, ho: int, h: int, r: int, s_dev: int, s_host: int, seed: int = 0,
                  holes: float = 0.25) -> list[list[int]]:
    """[n][ho] block ids over the whole unified pool (any column any head's block), about `holes` of them -1."""
    gen = torch.Generator().manual_seed(seed)
    total = (s_dev + s_host) * h * r
    ids = torch.randint(0, total, (n, ho), generator=gen)
    ids[torch.rand(n, ho, generator=gen) < holes] = -1
    return ids.tolist()


def _block_outs(n: int, ho: int, b: int, d: int, dtype: torch.dtype):
    return tuple(torch.full((n, ho, b, d), SENTINEL, dtype=dtype, device=DEVICE) for _ in range(2))


def _both_blocks(pools, index: list[list[int]], split: int, b: int, ho: int | None = None):
    """(kernel outputs, reference outputs) of the block gather for the same index, both from the sentinel."""
    n = len(index)
    ho = len(index[0]) if n else ho
    d, dtype = pools[0].shape[3], pools[0].dtype
    idx = torch.tensor(index, dtype=torch.int32, device=DEVICE).reshape(n, ho)
    got, want = _block_outs(n, ho, b, d, dtype), _block_outs(n, ho, b, d, dtype)
    gather_blocks(*got, *pools, idx, split)
    gather_blocks_reference(*want, *pools, idx, split)
    return got, want


# (H, P, B, D, S_dev, S_host, n, Ho, dtype); split = S_dev
BLOCK_CASES = [
    (2, 8, 4, 16, 3, 2, 5, 2, torch.float32),      # Ho = H, mixed device and host
    (2, 8, 2, 16, 2, 3, 3, 4, torch.bfloat16),     # Ho = 2H: one column per query head
    (2, 8, 8, 16, 2, 2, 4, 2, torch.float16),      # B = P: whole pages, per head
    (3, 4, 1, 16, 2, 2, 3, 6, torch.bfloat16),     # single-token blocks
    (2, 6, 3, 48, 2, 1, 3, 2, torch.float32),      # B*D = 144 in a block of 256
    (1, 64, 32, 128, 1, 1, 2, 2, torch.float32),   # B*D = 4096: two programs per block
    (2, 16, 4, 32, 0, 3, 4, 2, torch.float16),     # empty device pool: all from the host
    (2, 8, 4, 16, 3, 0, 4, 4, torch.bfloat16),     # empty host pool
]


@pytest.mark.parametrize("h,p,b,d,s_dev,s_host,n,ho,dtype", BLOCK_CASES)
def test_blocks_match_reference_bit_for_bit(h, p, b, d, s_dev, s_host, n, ho, dtype):
    pools = _pools(h, p, d, s_dev, s_host, dtype, seed=4)
    index = _random_index(n, ho, h, p // b, s_dev, s_host, seed=5)
    got, want = _both_blocks(pools, index, s_dev, b)
    for g, w in zip(got, want):
        _same_bits(g, w)


@pytest.mark.parametrize("ho", [2, 4])
def test_blocks_hold_their_tokens_and_holes_are_untouched(ho):
    """Checked against the pools directly: out[i, c] is tokens j*B..j*B+B-1 of head `head` of the addressed slot,
    whatever the column (Ho = 4 over H = 2: columns take either head's blocks), -1 keeps what the entry held, and
    the pools are unchanged."""
    h, p, b, d, split, s_host, dtype = 2, 8, 4, 16, 2, 3, torch.bfloat16
    r = p // b
    pools = _pools(h, p, d, split, s_host, dtype, seed=6)
    before = [t.clone() for t in pools]
    picks = [(4, 1, 0), (0, 0, 1), None, (2, 0, 1), (1, 1, 1), (3, 1, 0), None, (0, 1, 0)]  # (slot, head, j)
    index = [[-1 if pk is None else _block_id(*pk, h, r) for pk in picks[i * ho:(i + 1) * ho]]
             for i in range(len(picks) // ho)]
    got, _ = _both_blocks(pools, index, split, b)
    dev_k, dev_v, host_k, host_v = pools
    for e, pk in enumerate(picks):
        i, c = divmod(e, ho)
        if pk is None:
            assert (got[0][i, c] == SENTINEL).all() and (got[1][i, c] == SENTINEL).all()
            continue
        slot, head, j = pk
        pk_, pv_ = (dev_k[slot], dev_v[slot]) if slot < split else (host_k[slot - split], host_v[slot - split])
        _same_bits(got[0][i, c], pk_[head, j * b:(j + 1) * b])
        _same_bits(got[1][i, c], pv_[head, j * b:(j + 1) * b])
    for a, bf in zip(pools, before):
        _same_bits(a, bf)


def test_blocks_all_holes_and_empty_index_leave_outputs_untouched():
    pools = _pools(2, 8, 16, 2, 2, torch.float32)
    got, _ = _both_blocks(pools, [[-1, -1], [-1, -1]], 2, 4)
    assert all((t == SENTINEL).all() for t in got)
    got, _ = _both_blocks(pools, [], 2, 4, ho=2)
    assert all(t.shape == (0, 2, 4, 16) for t in got)


def bad_index_cases(index: torch.Tensor) -> list[tuple[str, dict]]:
    """Bad `index` and `split` arguments of a block gather (int32 [3, 2] `index`, split 2), each with the name its
    error must give."""
    return [
        ("index", dict(index=index.long())),
        ("index", dict(index=index.view(-1))),
        ("index", dict(index=index[:2])),  # n differs from out_k's
        ("index", dict(index=index[:, :1])),  # Ho differs from out_k's
        ("index", dict(split=2**31)),  # block ids past int32
        ("split", dict(split=-1)),
    ]


def _bad_block_inputs():
    """(text the message must hold, the arguments with one thing broken)."""
    h, p, b, d, dtype = 2, 8, 4, 16, torch.float32
    dev_k, dev_v, host_k, host_v = _pools(h, p, d, 2, 2, dtype)
    out_k, out_v = _block_outs(3, 2, b, d, dtype)
    index = torch.tensor([[0, 9], [-1, 3], [15, 2]], dtype=torch.int32, device=DEVICE)
    good = dict(out_k=out_k, out_v=out_v, dev_k=dev_k, dev_v=dev_v, host_k=host_k, host_v=host_v, index=index,
                split=2)
    odd_k, odd_v = _block_outs(3, 2, 3, d, dtype)
    cases = [
        *bad_index_cases(index),
        ("out_k block size B=3 must divide the page size P=8", dict(out_k=odd_k, out_v=odd_v)),
        ("out_k block size B=0", dict(out_k=out_k[:, :, :0], out_v=out_v[:, :, :0])),
        ("out_k head_dim", dict(out_k=out_k[..., :8].contiguous(), out_v=out_v[..., :8].contiguous())),
        ("out_k", dict(out_k=out_k.transpose(2, 3))),                # not contiguous
        ("out_v", dict(out_v=out_v[:, :, :2].contiguous())),
        ("out_v", dict(out_v=out_v.to(torch.bfloat16))),
        ("dev_k", dict(dev_k=dev_k.to(torch.bfloat16))),
        ("dev_v", dict(dev_v=dev_v[:, :, :4].contiguous())),
        ("dev_v", dict(dev_v=dev_v[:1])),
        ("host_k", dict(host_k=host_k.transpose(2, 3))),             # not contiguous
        ("host_k", dict(host_k=host_k[0])),                          # 3-D
        ("host_v", dict(host_v=host_v[:1])),
    ]
    return [(text, {**good, **change}) for text, change in cases]


@pytest.mark.parametrize("fn", [gather_blocks, gather_blocks_reference])
def test_blocks_reject_bad_inputs_naming_the_parameter(fn):
    for text, kwargs in _bad_block_inputs():
        with pytest.raises(ValueError, match=text) as e:
            fn(**kwargs)
        assert "\n" not in str(e.value)


def test_gather_blocks_missing_triton_is_one_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "offload.kernels._triton_gather", None)  # import now fails
    pools = _pools(2, 8, 16, 1, 1, torch.float32)
    out = _block_outs(1, 2, 4, 16, torch.float32)
    with pytest.raises(RuntimeError, match="gather_blocks needs triton"):
        gather_blocks(*out, *pools, torch.tensor([[0, 1]], dtype=torch.int32), 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gathers_blocks_from_the_pinned_host_pool_in_place():
    h, p, b, d, split, s_host = 8, 64, 16, 128, 6, 10
    pools = _pinned_pools(h, p, d, split, s_host, seed=7)
    for ho in (h, 4 * h):
        index = _random_index(24, ho, h, p // b, split, s_host, seed=ho)
        _same_on_cuda(*_both_blocks(pools, index, split, b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gather_blocks_refuses_a_pageable_host_pool():
    pools = _pools(2, 8, 16, 2, 2, torch.float32, host_device="cpu")
    out = _block_outs(1, 2, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="host_k"):
        gather_blocks(*out, *pools, torch.tensor([[2, 20]], dtype=torch.int32, device="cuda"), 2)
