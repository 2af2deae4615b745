"""The Triton page gather against its torch reference, bit for bit (TRITON_INTERPRET=1 on the CPU, set in
conftest.py; there the "host pool" is one more CPU tensor), plus one run on CUDA with a pinned host pool."""

from __future__ import annotations

import pytest
import torch

from offload.kernels.gather import gather_pages, gather_pages_reference

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
    pools = _pools(h, p, d, split, 10, torch.bfloat16, seed=3, host_device="cpu", pin=True)
    assert pools[2].is_pinned() and pools[0].is_cuda
    slots = [12, 0, -1, 5, 15, 6, 3, -1, 9]
    got, want = _both(pools, slots, split)
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
