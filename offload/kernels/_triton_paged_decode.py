"""Triton kernels behind `offload.kernels.paged_decode` (imports triton; loaded only when called)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from offload.kernels.launch import launch as run


@triton.jit
def _attend_page(q, k, v, seen, m_i, l_i, acc, scaling, softcap, HAS_SOFTCAP: tl.constexpr, USE_DOT: tl.constexpr):
    """One page of an online softmax: queries q [BG, D] over keys k and values v [P, D] (float32), keys where
    `seen` [P] is False hidden. Returns the running (max, sum, accumulator) updated."""
    if USE_DOT:
        # float32 "ieee" dots: exact float32 products, and no [BG, P, D] temporary held in registers.
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling  # [BG, P]
    else:
        # Pages under 16 tokens, too small for tl.dot: a broadcast product.
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scaling  # [BG, P]
    if HAS_SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates correctly at both ends (exp -> inf or 0).
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    s = tl.where(seen[None, :], s, float("-inf"))
    # Rows not seen may hold anything (a tail page's unfilled rows were never written): 0 * NaN would be NaN.
    v = tl.where(seen[:, None], v, 0.0)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BG]
    # A page with nothing seen leaves m at -inf: shift by 0 instead so exp gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])  # [BG, P]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if USE_DOT:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit
def _start(q_ptr, row, stride_qh, stride_qg, G, BLOCK_G: tl.constexpr, D: tl.constexpr):
    """A program's queries (row `row` of q: [BLOCK_G, D] in float32, padded rows zeros, never stored) and its
    online softmax's empty state (max, sum, accumulator)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + row * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :], mask=(offs_g < G)[:, None],
                other=0.0).to(tl.float32)
    return q, tl.full([BLOCK_G], float("-inf"), tl.float32), tl.zeros([BLOCK_G], tl.float32), \
        tl.zeros([BLOCK_G, D], tl.float32)


@triton.jit
def _store_partial(o_ptr, lse_ptr, row, acc, m_i, l_i, offs_d, g_ok, D: tl.constexpr):
    """Writes a program's partial (o normalized, lse) into `row` [BG] of o_ptr [rows, D] and lse_ptr [rows]. A row
    that saw nothing (or an empty split) gets (o = 0, lse = -inf), which weighs nothing in the merge."""
    o = acc / tl.maximum(l_i, 1.1754943508222875e-38)[:, None]
    lse = m_i + tl.log(tl.maximum(l_i, 1.1754943508222875e-38))  # l = 0 only where m = -inf
    tl.store(o_ptr + row[:, None] * D + offs_d[None, :], o, mask=g_ok[:, None])
    tl.store(lse_ptr + row, lse, mask=g_ok)


@triton.jit(do_not_specialize=["n_arg", "valid_arg", "start_arg"])
def _split_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, meta_ptr, n_arg, valid_arg, start_arg, o_ptr, lse_ptr,
    stride_qh, stride_qg,
    stride_ks, stride_kh, stride_kp,
    stride_vs, stride_vh, stride_vp,
    capacity, pages_per_split, scaling, softcap,
    G, H,
    BLOCK_G: tl.constexpr, P: tl.constexpr, D: tl.constexpr, HAS_SOFTCAP: tl.constexpr, USE_DOT: tl.constexpr,
    META_ON_DEVICE: tl.constexpr,
):
    """One (KV head, split): online softmax over pages [split*pps, min((split+1)*pps, n)).
    (n, valid_last, start) are read from meta_ptr on the device with META_ON_DEVICE, so the launch does not depend
    on them (a graph replays it for any values); otherwise they are the arguments n_arg, valid_arg, start_arg, so
    that no tensor is written from the host. n is clamped to the slots' capacity so that no read passes the end of
    `slots`. A split left with no page (n small) writes o = 0, lse = -inf. Writes o [BLOCK_G, D] (normalized) and
    lse [BLOCK_G] into the split's rows of the partial buffers o_ptr [splits, H, G, D], lse_ptr [splits, H, G]."""
    h = tl.program_id(0)
    split = tl.program_id(1)
    if META_ON_DEVICE:
        n = tl.minimum(tl.load(meta_ptr), capacity)
        valid_last = tl.load(meta_ptr + 1)
        start = tl.load(meta_ptr + 2)
    else:
        n = tl.minimum(n_arg, capacity)
        valid_last = valid_arg
        start = start_arg
    offs_g = tl.arange(0, BLOCK_G)
    offs_p = tl.arange(0, P)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    q, m_i, l_i, acc = _start(q_ptr, h, stride_qh, stride_qg, G, BLOCK_G, D)
    lo = split * pages_per_split
    hi = tl.minimum(lo + pages_per_split, n)
    for i in range(lo, hi):
        slot = tl.load(slots_ptr + i).to(tl.int64)  # int64: slot * stride can pass 2**31 on large pools
        k = tl.load(k_ptr + slot * stride_ks + h * stride_kh + offs_p[:, None] * stride_kp
                    + offs_d[None, :]).to(tl.float32)  # [P, D]
        v = tl.load(v_ptr + slot * stride_vs + h * stride_vh + offs_p[:, None] * stride_vp
                    + offs_d[None, :]).to(tl.float32)  # [P, D]
        seen = ((i != n - 1) | (offs_p < valid_last)) & ((i != 0) | (offs_p >= start))  # [P]
        m_i, l_i, acc = _attend_page(q, k, v, seen, m_i, l_i, acc, scaling, softcap, HAS_SOFTCAP, USE_DOT)
    _store_partial(o_ptr, lse_ptr, (split * H + h) * G + offs_g, acc, m_i, l_i, offs_d, g_ok, D)


@triton.jit(do_not_specialize=["ahead"])
def _ragged_split_kernel(
    q_ptr, k_ptr, v_ptr, hk_ptr, hv_ptr, slots_ptr, begin_ptr, count_ptr, shift_ptr, low_ptr, ahead, o_ptr, lse_ptr,
    split, stride_qh, stride_qg, stride_s, stride_h, stride_p, pages_per_split, scaling, softcap, G, H,
    BLOCK_G: tl.constexpr, P: tl.constexpr, D: tl.constexpr, HAS_SOFTCAP: tl.constexpr, USE_DOT: tl.constexpr,
    HEAD_SLOTS: tl.constexpr,
):
    """One (sequence b, head h, split): online softmax over pages [split*pps, min((split+1)*pps, count[b])) of
    sequence b, whose unified slots are slots[begin[b]:begin[b] + count[b]] (s < `split`: device pool slot s, else
    host pool slot s - split, read in place); with HEAD_SLOTS each head has its own, slots[(begin[b] + i) * H + h],
    which then name a head's page (a block) on their own. Token t of its page i is seen where rel = i*P + t +
    shift[b] is below `ahead` and rel - ahead is at least low[b]. Writes the partial into row (split, b*H + h) of
    o_ptr [splits, B*H, G, D], lse_ptr [splits, B*H, G]."""
    bh = tl.program_id(0)
    part = tl.program_id(1)
    b = bh // H
    h = bh % H
    begin = tl.load(begin_ptr + b)
    n = tl.load(count_ptr + b)
    shift = tl.load(shift_ptr + b)
    low = tl.load(low_ptr + b)
    offs_g = tl.arange(0, BLOCK_G)
    offs_p = tl.arange(0, P)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    q, m_i, l_i, acc = _start(q_ptr, bh, stride_qh, stride_qg, G, BLOCK_G, D)
    within = offs_p[:, None] * stride_p + offs_d[None, :]  # [P, D]: a head of a page
    if not HEAD_SLOTS:
        within += h * stride_h
    lo = part * pages_per_split
    hi = tl.minimum(lo + pages_per_split, n)
    for i in range(lo, hi):
        if HEAD_SLOTS:
            slot = tl.load(slots_ptr + (begin + i) * H + h).to(tl.int64)
        else:
            slot = tl.load(slots_ptr + begin + i).to(tl.int64)
        if slot < split:
            k = tl.load(k_ptr + slot * stride_s + within).to(tl.float32)
            v = tl.load(v_ptr + slot * stride_s + within).to(tl.float32)
        else:
            k = tl.load(hk_ptr + (slot - split) * stride_s + within).to(tl.float32)
            v = tl.load(hv_ptr + (slot - split) * stride_s + within).to(tl.float32)
        rel = i * P + offs_p + shift
        seen = (rel < ahead) & (rel - ahead >= low)
        m_i, l_i, acc = _attend_page(q, k, v, seen, m_i, l_i, acc, scaling, softcap, HAS_SOFTCAP, USE_DOT)
    _store_partial(o_ptr, lse_ptr, (part * tl.num_programs(0) + bh) * G + offs_g, acc, m_i, l_i, offs_d, g_ok, D)


@triton.jit
def _merge_kernel(
    po_ptr, plse_ptr, o_ptr, lse_ptr, splits, G, H,
    BLOCK_G: tl.constexpr, D: tl.constexpr,
):
    """One KV head: log-sum-exp merge of the split partials po [splits, H, G, D], plse [splits, H, G] into
    o [H, G, D], lse [H, G]."""
    h = tl.program_id(0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for s in range(0, splits):
        row = (s * H + h) * G + offs_g
        lse = tl.load(plse_ptr + row, mask=g_ok, other=float("-inf"))
        o = tl.load(po_ptr + row[:, None] * D + offs_d[None, :], mask=g_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        w = tl.exp(lse - m_safe)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m_i = m_new
    _store_partial(o_ptr, lse_ptr, h * G + offs_g, acc, m_i, l_i, offs_d, g_ok, D)


def launch(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
           meta: torch.Tensor | tuple[int, int, int],
           scaling: float, softcap: float | None, pages_per_split: int, o: torch.Tensor, lse: torch.Tensor,
           po: torch.Tensor, plse: torch.Tensor) -> None:
    """Arguments already checked by `paged_decode_static`: writes (o [H, G, D], lse [H, G]) in float32 through
    the split buffers po [splits, H, G, D], plse [splits, H, G] (views of o and lse when splits == 1: no merge).
    Allocates nothing, reads nothing back: the same launch for any (n, valid_last, start) in a meta tensor; a
    tuple of ints passes them as arguments instead."""
    h, g, d = q.shape
    on_device = isinstance(meta, torch.Tensor)
    n, valid_last, start = (0, 0, 0) if on_device else meta
    page_size = k_pool.shape[2]
    splits = po.shape[0]
    block_g = triton.next_power_of_2(g)
    use_dot = page_size >= 16  # tl.dot needs every dimension >= 16: the query rows are then padded to 16
    split_block_g = max(block_g, 16) if use_dot else block_g
    run(
        _split_kernel, (h, splits), q.device, q, k_pool, v_pool, slots, meta if on_device else slots, n, valid_last,
        start, po, plse, q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        slots.numel(), pages_per_split, float(scaling), float(softcap or 1.0),
        g, h,
        BLOCK_G=split_block_g, P=page_size, D=d, HAS_SOFTCAP=softcap is not None, USE_DOT=use_dot,
        META_ON_DEVICE=on_device,
    )
    if splits > 1:
        run(_merge_kernel, (h,), q.device, po, plse, o, lse, splits, g, h, BLOCK_G=block_g, D=d)


def launch_ragged(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, host_k: torch.Tensor,
                  host_v: torch.Tensor, split: int, pages, ahead: int, block: int | None, scaling: float,
                  softcap: float | None, pages_per_split: int, o: torch.Tensor, lse: torch.Tensor, po: torch.Tensor,
                  plse: torch.Tensor) -> None:
    """Arguments already checked by `paged_decode_ragged`: q [B*H, G, D] (H: the heads attended); writes
    (o [B*H, G, D], lse [B*H, G]) through the split buffers po [splits, B*H, G, D], plse [splits, B*H, G] (views
    of o and lse when splits == 1), the merge being `_merge_kernel`'s over B*H rows. `block`: pages.slots are
    each head's blocks of `block` tokens, numbered in the pools seen as [blocks, block, D]."""
    bh, g, d = q.shape
    h = bh // pages.begin.numel()
    if block is None:
        page_size, strides = k_pool.shape[2], (k_pool.stride(0), k_pool.stride(1), k_pool.stride(2))
    else:
        page_size, strides = block, (block * d, 0, d)
    splits = po.shape[0]
    block_g = triton.next_power_of_2(g)
    use_dot = page_size >= 16
    run(
        _ragged_split_kernel, (bh, splits), q.device, q, k_pool, v_pool, host_k, host_v, pages.slots, pages.begin,
        pages.count, pages.shift, pages.low, int(ahead), po, plse, split, q.stride(0), q.stride(1), *strides,
        pages_per_split, float(scaling), float(softcap or 1.0), g, h,
        BLOCK_G=max(block_g, 16) if use_dot else block_g, P=page_size, D=d, HAS_SOFTCAP=softcap is not None,
        USE_DOT=use_dot, HEAD_SLOTS=block is not None,
    )
    if splits > 1:
        run(_merge_kernel, (bh,), q.device, po, plse, o, lse, splits, g, bh, BLOCK_G=block_g, D=d)
