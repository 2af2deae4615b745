"""Triton kernels behind `offload.kernels.gather`'s packed gathers (imports triton; loaded only when called).

A packed page (layout in `offload.quant`) is read in tiles of T tokens: each tile loads the T code rows of one head
as contiguous bytes [T, BLOCK_R] (so the loads vectorize, as the plain gather's do), splits every byte into its
f = 8 // bits codes [T, BLOCK_R, f] with shifts, and lays them out as channels [T, BLOCK_R * f] (channel d is code
d % f of byte d // f); the float16 parameters are loaded next to it (key parameters once a tile; value parameters
once a token where they spread over the channels by a reshape, else per channel), and the tile is stored as
`code * scale + minimum` in float32, then the output's dtype, through integers of its width.

Exactness: a code is below 2**8 and a float16 scale has 11 significant bits, so `code * scale` is exact in
float32 (at least 2**-24 when not zero, far above float32's smallest normal); a fused multiply-add then rounds
once where the torch decoder rounds the same sum once, and the results agree bit for bit either way. The cast to
the output's dtype rounds to nearest even in both (to bfloat16 on the bits, see `_cast`).

As in `_triton_gather`, on CUDA a pinned CPU tensor is passed as it is and read in place over the bus.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from offload.kernels.launch import as_bits
from offload.kernels.launch import launch as run

# Elements each program dequantizes (tokens of one head times the padded channels): a page of 64 tokens at D=128
# is one program a head, which loads the head's key parameters once and 8 KiB of codes of K and of V at 8 bits (as
# the plain gather's 8 KiB a program), on 8 warps (about 60 registers a thread, none spilled, at H=8, P=64, D=128).
_TILE_ELEMS = 8192
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _codes(row_ptr, rows, rows_ok, row_bytes, BITS: tl.constexpr, T: tl.constexpr, BLOCK_R: tl.constexpr):
    """float32 codes [T, BLOCK_R * (8 // BITS)] of code rows `rows` (int64 [T], masked by `rows_ok`) of
    `row_bytes` bytes each, counted from `row_ptr`. Columns past the row's channels hold junk: mask them."""
    r = tl.arange(0, BLOCK_R)
    b = tl.load(row_ptr + rows[:, None] * row_bytes + r[None, :], mask=rows_ok[:, None] & (r < row_bytes)[None, :],
                other=0)
    if BITS == 8:
        c = b
    else:
        F: tl.constexpr = 8 // BITS
        shift = (tl.arange(0, F) * BITS).to(tl.uint8)
        c = tl.reshape((b[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1), (T, BLOCK_R * F))
    return c.to(tl.float32)


@triton.jit
def _dequant_k(kq_ptr, kp_ptr, slot, head, rows, rows_ok, D, k_bytes, k_codes, k_row,
               BITS: tl.constexpr, T: tl.constexpr, BLOCK_R: tl.constexpr):
    """Keys [T, BLOCK_R * (8 // BITS)] float32 of code rows `rows` of packed slot `slot`, head `head`: one scale
    and minimum a channel, over the page's tokens."""
    d = tl.arange(0, BLOCK_R * (8 // BITS))
    codes = _codes(kq_ptr + slot * k_bytes, rows, rows_ok, k_row, BITS, T, BLOCK_R)
    p = kp_ptr + slot * (k_bytes // 2) + k_codes // 2 + head * 2 * D + d  # params float16 [H, 2, D]
    scale = tl.load(p, mask=d < D, other=0).to(tl.float32)
    low = tl.load(p + D, mask=d < D, other=0).to(tl.float32)
    return codes * scale[None, :] + low[None, :]


@triton.jit
def _dequant_v(vq_ptr, vp_ptr, slot, rows, rows_ok, D, G, group, v_bytes, v_codes, v_row,
               BITS: tl.constexpr, T: tl.constexpr, BLOCK_R: tl.constexpr, GP: tl.constexpr):
    """Values [T, BLOCK_R * (8 // BITS)] float32 of code rows `rows` (h * P + token) of packed slot `slot`: one
    scale and minimum a token and group of `group` channels. GP > 0: the parameters of a token are loaded once,
    [T, GP] (GP = G, a power of two), and spread over the channels (one group, or D a power of two, so channel d
    is in group d // (W // GP)); GP = 0: loaded per channel (d // group), for any D and G."""
    W: tl.constexpr = BLOCK_R * (8 // BITS)
    d = tl.arange(0, W)
    codes = _codes(vq_ptr + slot * v_bytes, rows, rows_ok, v_row, BITS, T, BLOCK_R)
    base = vp_ptr + slot * (v_bytes // 2) + v_codes // 2  # params float16 [H, P, G, 2]
    if GP > 0:
        g = tl.arange(0, GP)
        p = base + (rows[:, None] * G + g[None, :]) * 2
        scale = tl.load(p, mask=rows_ok[:, None], other=0).to(tl.float32)
        low = tl.load(p + 1, mask=rows_ok[:, None], other=0).to(tl.float32)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (T, GP, W // GP)), (T, W))
        low = tl.reshape(tl.broadcast_to(low[:, :, None], (T, GP, W // GP)), (T, W))
    else:
        ok = rows_ok[:, None] & (d < D)[None, :]
        p = base + (rows[:, None] * G + (d // group)[None, :]) * 2
        scale = tl.load(p, mask=ok, other=0).to(tl.float32)
        low = tl.load(p + 1, mask=ok, other=0).to(tl.float32)
    return codes * scale + low


@triton.jit
def _cast(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE, rounding to nearest even as torch does. To bfloat16 the rounding is done on the bits
    (torch's own formula, NaN to 0x7FC0), the same on every backend: Triton's interpreter would round ties up."""
    if DTYPE == tl.float32:
        return x
    elif DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _dequant_into(out_k_ptr, out_v_ptr, out, kq_ptr, vq_ptr, kp_ptr, vp_ptr, slot, head, rows, t_ok,
                  D, G, group, k_bytes, v_bytes, k_codes, v_codes, k_row, v_row,
                  OUT_DTYPE: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, T: tl.constexpr,
                  BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr, GP: tl.constexpr):
    """Dequantizes code rows `rows` (int64 [T], h * P + token) of head `head` of packed slot `slot`, K and V, to
    OUT_DTYPE and stores their bits at element offsets out [T, 1] + channel of the integer outputs."""
    k = _dequant_k(kq_ptr, kp_ptr, slot, head, rows, t_ok, D, k_bytes, k_codes, k_row, K_BITS, T, BLOCK_RK)
    d = tl.arange(0, BLOCK_RK * (8 // K_BITS))
    tl.store(out_k_ptr + out + d[None, :], _cast(k, OUT_DTYPE).to(out_k_ptr.dtype.element_ty, bitcast=True),
             mask=t_ok[:, None] & (d < D)[None, :])
    v = _dequant_v(vq_ptr, vp_ptr, slot, rows, t_ok, D, G, group, v_bytes, v_codes, v_row, V_BITS, T, BLOCK_RV, GP)
    d = tl.arange(0, BLOCK_RV * (8 // V_BITS))
    tl.store(out_v_ptr + out + d[None, :], _cast(v, OUT_DTYPE).to(out_v_ptr.dtype.element_ty, bitcast=True),
             mask=t_ok[:, None] & (d < D)[None, :])


@triton.jit
def _pages_kernel(
    out_k_ptr, out_v_ptr, kq_ptr, vq_ptr, kp_ptr, vp_ptr, slots_ptr,
    P, D, G, group, k_bytes, v_bytes, k_codes, v_codes, k_row, v_row,
    OUT_DTYPE: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, T: tl.constexpr,
    BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr, GP: tl.constexpr,
):
    """One (entry i, head h, tile c): tokens c*T .. c*T+T-1 of head h of packed slot slots[i], K and V,
    dequantized into row i of the outputs [n, H, P, D] (integers of the element's width); a slot of -1 leaves the
    row as it is."""
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots_ptr + i).to(tl.int64)  # int64 offsets: slot * k_bytes can pass 2**31 on large pools
    if slot >= 0:
        t = tl.program_id(2).to(tl.int64) * T + tl.arange(0, T)
        out = (i * tl.num_programs(1) + h) * P * D + t[:, None] * D
        _dequant_into(out_k_ptr, out_v_ptr, out, kq_ptr, vq_ptr, kp_ptr, vp_ptr, slot, h, h * P + t, t < P,
                      D, G, group, k_bytes, v_bytes, k_codes, v_codes, k_row, v_row,
                      OUT_DTYPE, K_BITS, V_BITS, T, BLOCK_RK, BLOCK_RV, GP)


@triton.jit
def _blocks_kernel(
    out_k_ptr, out_v_ptr, dev_k_ptr, dev_v_ptr, kq_ptr, vq_ptr, kp_ptr, vp_ptr, index_ptr,
    dev_blocks, HR, R, B, D, G, group, k_bytes, v_bytes, k_codes, v_codes, k_row, v_row,
    OUT_DTYPE: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, T: tl.constexpr,
    BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr, GP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (entry e = i*Ho + c, tile): tokens tile*T .. tile*T+T-1 of block index[e] into out[e] [B, D]. The
    outputs and the device pool come as integers of the element's width: a device block is copied bit for bit,
    a packed block dequantized to OUT_DTYPE and stored through its bits. A block id of -1 leaves the entry."""
    e = tl.program_id(0).to(tl.int64)
    u = tl.load(index_ptr + e).to(tl.int64)
    if u >= 0:
        t = tl.program_id(1).to(tl.int64) * T + tl.arange(0, T)
        t_ok = t < B
        out = e * B * D + t[:, None] * D
        if u < dev_blocks:
            d = tl.arange(0, BLOCK_D)
            ok = t_ok[:, None] & (d < D)[None, :]
            src = u * B * D + t[:, None] * D + d[None, :]
            tl.store(out_k_ptr + out + d[None, :], tl.load(dev_k_ptr + src, mask=ok), mask=ok)
            tl.store(out_v_ptr + out + d[None, :], tl.load(dev_v_ptr + src, mask=ok), mask=ok)
        else:
            slot = (u - dev_blocks) // HR
            hr = (u - dev_blocks) % HR  # h * R + j: the block is code rows hr*B .. hr*B+B-1 of the slot's H*P
            _dequant_into(out_k_ptr, out_v_ptr, out, kq_ptr, vq_ptr, kp_ptr, vp_ptr, slot, hr // R, hr * B + t,
                          t_ok, D, G, group, k_bytes, v_bytes, k_codes, v_codes, k_row, v_row,
                          OUT_DTYPE, K_BITS, V_BITS, T, BLOCK_RK, BLOCK_RV, GP)


def _layout(codec) -> tuple:
    """The codec's runtime layout arguments: D, G, group, k_bytes, v_bytes, k_codes, v_codes, k_row, v_row."""
    return (codec.head_dim, codec.v_groups, codec.v_group, codec.k_bytes, codec.v_bytes, codec.k_codes,
            codec.v_codes, codec.k_row, codec.v_row)


def _tiles(codec, tokens: int) -> dict:
    """Launch sizes: T tokens a tile (a power of two, up to `tokens`'s) of the padded channels, the padded code
    bytes of a K and a V row, GP, the value groups a token when their parameters can be loaded once and spread over
    the padded channels (one group, or no padding), else 0, and the warps."""
    block_d = triton.next_power_of_2(codec.head_dim)
    t = max(1, min(triton.next_power_of_2(tokens), _TILE_ELEMS // block_d))
    block_rv = triton.next_power_of_2(codec.v_row)
    compact = codec.v_groups == 1 or block_rv * codec.v_per_byte == codec.head_dim
    return dict(T=t, BLOCK_RK=triton.next_power_of_2(codec.k_row), BLOCK_RV=block_rv,
                GP=codec.v_groups if compact else 0, num_warps=8 if t * block_d >= _TILE_ELEMS else 4)


def _packed(host_kq: torch.Tensor, host_vq: torch.Tensor) -> list[torch.Tensor]:
    """The packed pool as bytes (codes) and as float16 (parameters: every section starts on a 16-byte boundary)."""
    return [host_kq, host_vq, host_kq.view(torch.float16), host_vq.view(torch.float16)]


def launch_pages(out_k: torch.Tensor, out_v: torch.Tensor, host_kq: torch.Tensor, host_vq: torch.Tensor,
                 slots: torch.Tensor, codec) -> None:
    """Arguments already checked by `gather_pages_packed` (n >= 1, slots on the outputs' device)."""
    n, h, p = out_k.shape[:3]
    tiles = _tiles(codec, p)
    grid = (n, h, triton.cdiv(p, tiles["T"]))  # stored through integers: the kernel rounds, not the store
    run(_pages_kernel, grid, out_k.device, as_bits(out_k), as_bits(out_v), *_packed(host_kq, host_vq),
        slots, p, *_layout(codec), OUT_DTYPE=_TL_DTYPE[out_k.dtype], K_BITS=codec.k_bits, V_BITS=codec.v_bits,
        **tiles)


def launch_blocks(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
                  host_kq: torch.Tensor, host_vq: torch.Tensor, index: torch.Tensor, split: int, codec) -> None:
    """Arguments already checked by `gather_blocks_packed` (non-empty outputs [n, Ho, B, D], index [n, Ho] on
    their device)."""
    n, ho, b, d = out_k.shape
    h, r = codec.kv_heads, codec.page_size // b
    tiles = _tiles(codec, b)
    ints = [as_bits(t) for t in (out_k, out_v, dev_k, dev_v)]
    grid = (n * ho, triton.cdiv(b, tiles["T"]))
    run(_blocks_kernel, grid, out_k.device, *ints, *_packed(host_kq, host_vq), index.reshape(-1), split * h * r,
        h * r, r, b, *_layout(codec), OUT_DTYPE=_TL_DTYPE[out_k.dtype], K_BITS=codec.k_bits,
        V_BITS=codec.v_bits, BLOCK_D=triton.next_power_of_2(d), **tiles)
