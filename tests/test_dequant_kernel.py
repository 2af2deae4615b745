"""The Triton dequantizing gathers (`gather_pages_packed`, `gather_blocks_packed`) against their torch references
(`PageCodec.decode`, `PageCodec.decode_blocks`), bit for bit: a code times a float16 scale is exact in float32, so
fused or not the kernel rounds the same sum once, and the cast rounds to nearest even as torch does (to bfloat16 on
the bits, so Triton's interpreter agrees too). TRITON_INTERPRET=1 on the CPU (set in conftest.py), where the
"host pool" is one more CPU tensor; plus runs on CUDA with a pinned packed pool, read in place."""

from __future__ import annotations

import pytest
import torch

from offload.kernels.gather import (
    gather_blocks_packed,
    gather_blocks_packed_reference,
    gather_pages_packed,
    gather_pages_packed_reference,
)
from offload.quant import SETTINGS, PageCodec
from test_gather_kernel import _same_bits, _same_on_cuda, bad_index_cases  # tests/ is on sys.path under pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = -7.0  # what rows and entries left untouched still hold
QUANT = [s for s in SETTINGS if s != "none"]


def _pages(s: int, h: int, p: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random full-precision pages k, v [s, H, P, D] (float32, CPU): keys with channels of unequal magnitude and
    one constant channel (a zero scale), values with a constant token."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(s, h, p, d, generator=gen) * (0.5 + 8 * torch.rand(d, generator=gen) ** 4)
    v = torch.randn(s, h, p, d, generator=gen)
    k[..., 0] = 1.5
    v[:, :, 0] = -0.25
    return k, v


def _packed_pool(codec: PageCodec, s: int, seed: int = 0, device: str = DEVICE, pin: bool = False):
    """(k, v, host_kq, host_vq): s random pages and their packed rows, on `device` (pinned CPU rows with pin)."""
    k, v = _pages(s, codec.kv_heads, codec.page_size, codec.head_dim, seed)
    kq, vq = codec.encode(k, v)
    kq, vq = kq.to(device), vq.to(device)
    if pin:
        kq, vq = kq.pin_memory(), vq.pin_memory()
    return k, v, kq, vq


def _outs(shape: tuple[int, ...], dtype: torch.dtype):
    return tuple(torch.full(shape, SENTINEL, dtype=dtype, device=DEVICE) for _ in range(2))


def _both_pages(codec: PageCodec, kq: torch.Tensor, vq: torch.Tensor, slots: list[int], dtype: torch.dtype):
    """(kernel outputs, reference outputs) for the same slots, both starting from the sentinel."""
    s = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    shape = (len(slots), codec.kv_heads, codec.page_size, codec.head_dim)
    got, want = _outs(shape, dtype), _outs(shape, dtype)
    gather_pages_packed(*got, kq, vq, s, codec)
    gather_pages_packed_reference(*want, kq, vq, s, codec)
    return got, want


# (H, P, D): D=12 and 7 not powers of two (at 4 and 2 bits, rows padded to whole bytes); D=40 at 2 bits has two
# value groups of 20 (parameters loaded per channel), D=64 two of 32 (loaded once a token and spread).
PAGE_SHAPES = {
    "k8v8": [(2, 16, 12), (1, 8, 7)],
    "k8v4": [(2, 16, 12), (1, 8, 7)],
    "k4v2": [(2, 16, 12), (1, 8, 7), (1, 4, 40), (1, 4, 64)],
}
PAGE_CASES = [(s, *shape) for s in QUANT for shape in PAGE_SHAPES[s]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("setting,h,p,d", PAGE_CASES)
def test_pages_match_reference_bit_for_bit(setting, h, p, d, dtype):
    codec = PageCodec.of(setting, h, p, d)
    _, _, kq, vq = _packed_pool(codec, 5, seed=1)
    got, want = _both_pages(codec, kq, vq, [3, -1, 0, 4, 3, -1], dtype)
    for g, w in zip(got, want):
        _same_bits(g, w)


def test_pages_float16_output():
    codec = PageCodec.of("k8v4", 2, 16, 12)
    _, _, kq, vq = _packed_pool(codec, 3, seed=2)
    got, want = _both_pages(codec, kq, vq, [2, 0, -1], torch.float16)
    for g, w in zip(got, want):
        _same_bits(g, w)


def test_pages_rows_hold_their_pages_and_padding_is_untouched():
    """Checked against `codec.decode` of each addressed row, not only against the reference: rows of -1 keep what
    they held, and the packed pool is unchanged."""
    codec = PageCodec.of("k4v2", 2, 8, 12)
    _, _, kq, vq = _packed_pool(codec, 4, seed=3)
    before = kq.clone(), vq.clone()
    slots = [2, -1, 0, 3, -1]
    got, _ = _both_pages(codec, kq, vq, slots, torch.bfloat16)
    for i, s in enumerate(slots):
        if s < 0:
            assert (got[0][i] == SENTINEL).all() and (got[1][i] == SENTINEL).all()
            continue
        k, v = codec.decode(kq[s:s + 1], vq[s:s + 1], torch.bfloat16)
        _same_bits(got[0][i], k[0])
        _same_bits(got[1][i], v[0])
    assert torch.equal(kq, before[0]) and torch.equal(vq, before[1])


@pytest.mark.parametrize("setting,h,p,d", [("k8v8", 2, 8, 12), ("k8v4", 1, 16, 7), ("k4v2", 2, 8, 12),
                                           ("k4v2", 1, 4, 40)])
def test_pages_are_within_the_codec_error_bound_of_the_encoded_pages(setting, h, p, d):
    """Property: encode random pages, gather them back dequantized (float32): every value within
    `codec.error_bound` of the original."""
    codec = PageCodec.of(setting, h, p, d)
    k, v, kq, vq = _packed_pool(codec, 4, seed=4)
    slots = [1, 3, 0, 2]
    got, _ = _both_pages(codec, kq, vq, slots, torch.float32)
    bk, bv = codec.error_bound(k, v)
    for out, orig, bound in ((got[0], k, bk), (got[1], v, bv)):
        err = (out.cpu() - orig[slots]).abs()
        assert (err <= bound[slots]).all(), f"{setting}: worst excess {(err - bound[slots]).max().item()}"


def test_pages_all_padding_and_empty_slots_leave_outputs_untouched():
    codec = PageCodec.of("k8v4", 2, 8, 12)
    _, _, kq, vq = _packed_pool(codec, 2)
    got, _ = _both_pages(codec, kq, vq, [-1, -1], torch.float32)
    assert all((t == SENTINEL).all() for t in got)
    got, _ = _both_pages(codec, kq, vq, [], torch.float32)
    assert all(t.numel() == 0 for t in got)


def _bad_page_inputs():
    """(name of the parameter the message must name, the arguments with that one broken)."""
    codec = PageCodec.of("k8v4", 2, 8, 12)
    _, _, kq, vq = _packed_pool(codec, 3)
    out_k, out_v = _outs((3, 2, 8, 12), torch.float32)
    slots = torch.tensor([0, 2, -1], dtype=torch.int32, device=DEVICE)
    good = dict(out_k=out_k, out_v=out_v, host_kq=kq, host_vq=vq, slots=slots, codec=codec)
    wide = torch.zeros((3, codec.k_bytes + 16), dtype=torch.uint8, device=DEVICE)
    cases = [
        ("slots", dict(slots=slots.long())),
        ("slots", dict(slots=slots.view(3, 1))),
        ("codec", dict(codec=None)),
        ("host_kq", dict(host_kq=kq.view(torch.int8))),                   # wrong dtype
        ("host_kq", dict(host_kq=kq.view(torch.float16))),
        ("host_kq", dict(host_kq=kq[:, :-16])),                           # rows of another codec
        ("host_kq", dict(host_kq=kq[0])),                                 # 1-D
        ("host_kq", dict(host_kq=wide[:, :codec.k_bytes])),               # not contiguous
        ("host_vq", dict(host_vq=vq[:, :-16])),
        ("host_vq", dict(host_vq=vq[:2])),                                # fewer slots than host_kq
        ("host_vq", dict(host_vq=kq)),                                    # K rows for V
        ("out_k", dict(out_k=out_k[:2])),                                 # one row per slot
        ("out_k", dict(out_k=out_k[:, :, :4].contiguous(), out_v=out_v[:, :, :4].contiguous())),  # not [n, H, P, D]
        ("out_k", dict(out_k=out_k.int(), out_v=out_v.int())),            # not a float
        ("out_k", dict(out_k=out_k.transpose(2, 3))),                     # not contiguous
        ("out_v", dict(out_v=out_v[:2])),
        ("out_v", dict(out_v=out_v.to(torch.bfloat16))),
    ]
    return [(name, {**good, **change}) for name, change in cases]


@pytest.mark.parametrize("fn,module", [(gather_pages_packed, "_triton_dequant"),
                                       (gather_blocks_packed, "_triton_dequant")])
def test_missing_triton_is_one_clear_error(monkeypatch, fn, module):
    import sys

    monkeypatch.setitem(sys.modules, f"offload.kernels.{module}", None)  # import now fails
    codec = PageCodec.of("k8v8", 2, 8, 16)
    _, _, kq, vq = _packed_pool(codec, 1)
    if fn is gather_pages_packed:
        out = _outs((1, 2, 8, 16), torch.float32)
        args = (*out, kq, vq, torch.tensor([0], dtype=torch.int32), codec)
    else:
        out = _outs((1, 2, 4, 16), torch.float32)
        dev = _outs((1, 2, 8, 16), torch.float32)
        args = (*out, *dev, kq, vq, torch.tensor([[0, 5]], dtype=torch.int32), 1, codec)
    with pytest.raises(RuntimeError, match=f"{fn.__name__} needs triton"):
        fn(*args)


# Block gather over a device pool and a packed host pool.

def _dev_pool(codec: PageCodec, s: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shape = (s, codec.kv_heads, codec.page_size, codec.head_dim)
    return tuple(torch.randn(shape, generator=gen).to(dtype).to(DEVICE) for _ in range(2))


def _random_index(n: int, ho: int, total: int, seed: int, holes: float = 0.25) -> list[list[int]]:
    """[n][ho] block ids over the `total` blocks of the unified pool, about `holes` of them -1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, total, (n, ho), generator=gen)
    ids[torch.rand(n, ho, generator=gen) < holes] = -1
    return ids.tolist()


def _both_blocks(codec, dev_k, dev_v, kq, vq, index: list[list[int]], split: int, b: int, ho: int | None = None):
    """(kernel outputs, reference outputs) of the block gather for the same index, both from the sentinel."""
    n = len(index)
    ho = len(index[0]) if n else ho
    idx = torch.tensor(index, dtype=torch.int32, device=DEVICE).reshape(n, ho)
    shape = (n, ho, b, codec.head_dim)
    got, want = _outs(shape, dev_k.dtype), _outs(shape, dev_k.dtype)
    gather_blocks_packed(*got, dev_k, dev_v, kq, vq, idx, split, codec)
    gather_blocks_packed_reference(*want, dev_k, dev_v, kq, vq, idx, split, codec)
    return got, want


# (H, P, B, D, S_dev, S_host, n, Ho); split = S_dev
BLOCK_SHAPES = [
    (2, 16, 4, 12, 2, 3, 3, 4),    # Ho = 2H, mixed device and packed blocks
    (1, 16, 8, 7, 1, 2, 2, 3),
    (2, 16, 16, 12, 0, 2, 2, 2),   # B = P, no device pool: all packed
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("setting", QUANT)
@pytest.mark.parametrize("h,p,b,d,s_dev,s_host,n,ho", BLOCK_SHAPES)
def test_blocks_match_reference_bit_for_bit(h, p, b, d, s_dev, s_host, n, ho, setting, dtype):
    codec = PageCodec.of(setting, h, p, d)
    _, _, kq, vq = _packed_pool(codec, s_host, seed=5)
    dev_k, dev_v = _dev_pool(codec, s_dev, dtype, seed=6)
    index = _random_index(n, ho, (s_dev + s_host) * h * (p // b), seed=7)
    got, want = _both_blocks(codec, dev_k, dev_v, kq, vq, index, s_dev, b)
    for g, w in zip(got, want):
        _same_bits(g, w)


def test_blocks_hold_their_tokens_and_holes_are_untouched():
    """Checked against the pools directly: a device block is the device pool's tokens bit for bit, a packed block
    the same tokens of `codec.decode` of its page, whatever the column (Ho = 4 over H = 2), -1 keeps what the entry
    held, and the pools are unchanged."""
    h, p, b, d, split, s_host, ho, dtype = 2, 16, 4, 12, 2, 3, 4, torch.bfloat16
    r = p // b
    codec = PageCodec.of("k4v2", h, p, d)
    _, _, kq, vq = _packed_pool(codec, s_host, seed=8)
    dev_k, dev_v = _dev_pool(codec, split, dtype, seed=9)
    before = [t.clone() for t in (dev_k, dev_v, kq, vq)]
    picks = [(4, 1, 3), (0, 0, 1), None, (2, 0, 0), (1, 1, 2), (3, 1, 0), None, (0, 1, 3)]  # (slot, head, j)
    flat = [-1 if pk is None else (pk[0] * h + pk[1]) * r + pk[2] for pk in picks]
    index = [flat[i:i + ho] for i in range(0, len(flat), ho)]
    got, _ = _both_blocks(codec, dev_k, dev_v, kq, vq, index, split, b)
    for e, pk in enumerate(picks):
        i, c = divmod(e, ho)
        if pk is None:
            assert (got[0][i, c] == SENTINEL).all() and (got[1][i, c] == SENTINEL).all()
            continue
        slot, head, j = pk
        if slot < split:
            pk_, pv_ = dev_k[slot], dev_v[slot]
        else:
            s = slot - split
            pk_, pv_ = (t[0] for t in codec.decode(kq[s:s + 1], vq[s:s + 1], dtype))
        _same_bits(got[0][i, c], pk_[head, j * b:(j + 1) * b])
        _same_bits(got[1][i, c], pv_[head, j * b:(j + 1) * b])
    for a, bf in zip((dev_k, dev_v, kq, vq), before):
        assert torch.equal(a, bf)


def test_blocks_all_holes_and_empty_index_leave_outputs_untouched():
    codec = PageCodec.of("k8v8", 2, 8, 12)
    _, _, kq, vq = _packed_pool(codec, 2)
    dev_k, dev_v = _dev_pool(codec, 1, torch.float32, seed=0)
    got, _ = _both_blocks(codec, dev_k, dev_v, kq, vq, [[-1, -1], [-1, -1]], 1, 4)
    assert all((t == SENTINEL).all() for t in got)
    got, _ = _both_blocks(codec, dev_k, dev_v, kq, vq, [], 1, 4, ho=2)
    assert all(t.shape == (0, 2, 4, 12) for t in got)


def _bad_block_inputs():
    """(text the message must hold, the arguments with one thing broken)."""
    codec = PageCodec.of("k8v4", 2, 8, 12)
    _, _, kq, vq = _packed_pool(codec, 2)
    dev_k, dev_v = _dev_pool(codec, 2, torch.float32, seed=0)
    out_k, out_v = _outs((3, 2, 4, 12), torch.float32)
    index = torch.tensor([[0, 9], [-1, 3], [15, 2]], dtype=torch.int32, device=DEVICE)
    good = dict(out_k=out_k, out_v=out_v, dev_k=dev_k, dev_v=dev_v, host_kq=kq, host_vq=vq, index=index, split=2,
                codec=codec)
    odd_k, odd_v = _outs((3, 2, 3, 12), torch.float32)
    cases = [
        *bad_index_cases(index),
        ("codec", dict(codec=PageCodec.of("none", 2, 8, 12))),
        ("host_kq", dict(host_kq=kq.view(torch.int8))),
        ("host_kq", dict(host_kq=kq[:, :-16])),
        ("host_vq", dict(host_vq=vq[:1])),
        ("out_k block size B=3 must divide the page size P=8", dict(out_k=odd_k, out_v=odd_v)),
        ("out_k head_dim", dict(out_k=out_k[..., :8].contiguous(), out_v=out_v[..., :8].contiguous())),
        ("out_k", dict(out_k=out_k.transpose(2, 3))),                     # not contiguous
        ("out_k", dict(out_k=out_k.double(), out_v=out_v.double(), dev_k=dev_k.double(), dev_v=dev_v.double())),
        ("out_v", dict(out_v=out_v[:, :, :2].contiguous())),
        ("out_v", dict(out_v=out_v.to(torch.bfloat16))),
        ("dev_k", dict(dev_k=dev_k.to(torch.bfloat16))),
        ("dev_k", dict(dev_k=dev_k[:, :, :4].contiguous())),              # not the codec's page shape
        ("dev_v", dict(dev_v=dev_v[:1])),
    ]
    return [(text, {**good, **change}) for text, change in cases]


@pytest.mark.parametrize("fn,cases", [(gather_pages_packed, _bad_page_inputs),
                                      (gather_pages_packed_reference, _bad_page_inputs),
                                      (gather_blocks_packed, _bad_block_inputs),
                                      (gather_blocks_packed_reference, _bad_block_inputs)])
def test_bad_inputs_are_refused_naming_the_parameter(fn, cases):
    for text, kwargs in cases():
        with pytest.raises(ValueError, match=text) as e:
            fn(**kwargs)
        assert "\n" not in str(e.value)


# On CUDA: the packed pool pinned in CPU memory, read by the kernel in place.

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("setting", QUANT)
def test_cuda_pages_read_the_pinned_packed_pool_in_place(setting):
    codec = PageCodec.of(setting, 8, 64, 128)
    k, v, kq, vq = _packed_pool(codec, 12, seed=10, device="cpu", pin=True)
    assert kq.is_pinned() and vq.is_pinned()
    slots = [11, 0, -1, 5, 7, 3, -1, 9]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        _same_on_cuda(*_both_pages(codec, kq, vq, slots, dtype))
    got, _ = _both_pages(codec, kq, vq, [s for s in slots if s >= 0], torch.float32)
    keep = [s for s in slots if s >= 0]
    bk, bv = codec.error_bound(k, v)
    assert ((got[0].cpu() - k[keep]).abs() <= bk[keep]).all()
    assert ((got[1].cpu() - v[keep]).abs() <= bv[keep]).all()


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("setting", QUANT)
def test_cuda_blocks_read_the_pinned_packed_pool_in_place(setting):
    h, p, b, d, split, s_host = 8, 64, 16, 128, 3, 6
    codec = PageCodec.of(setting, h, p, d)
    _, _, kq, vq = _packed_pool(codec, s_host, seed=11, device="cpu", pin=True)
    dev_k, dev_v = _dev_pool(codec, split, torch.bfloat16, seed=12)
    for ho in (h, 4 * h):
        index = _random_index(24, ho, (split + s_host) * h * (p // b), seed=ho)
        _same_on_cuda(*_both_blocks(codec, dev_k, dev_v, kq, vq, index, split, b))


@pytest.mark.gpu
@CUDA
def test_cuda_refuses_a_pageable_packed_pool():
    codec = PageCodec.of("k8v4", 2, 8, 16)
    _, _, kq, vq = _packed_pool(codec, 2, device="cpu")
    out = _outs((1, 2, 8, 16), torch.float32)
    with pytest.raises(ValueError, match="host_kq must be a pinned CPU tensor"):
        gather_pages_packed(*out, kq, vq, torch.tensor([1], dtype=torch.int32, device="cuda"), codec)
    dev_k, dev_v = _dev_pool(codec, 1, torch.float32, seed=0)
    out = _outs((1, 2, 4, 16), torch.float32)
    with pytest.raises(ValueError, match="host_kq must be a pinned CPU tensor"):
        gather_blocks_packed(*out, dev_k, dev_v, kq, vq, torch.tensor([[0, 5]], dtype=torch.int32, device="cuda"),
                             1, codec)
