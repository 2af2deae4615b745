"""Page and block gather: copy scattered pages, or blocks of pages, from two pools into a dense buffer in one launch;
the packed variants dequantize pages stored quantized in the host pool on the way.

Shapes (same page-major layout as the tiers store):
- pools `dev_k`, `dev_v`: [S_dev, H, P, D], the device pool; `host_k`, `host_v`: [S_host, H, P, D], the host pool
  (on CUDA a pinned CPU tensor, read by the kernel in place through unified virtual addressing);
- `slots`: int32 [n] of *unified* slot ids: s < split is device slot s, s >= split is host slot s - split, and -1
  is "no page" (padding for static shapes);
- outputs `out_k`, `out_v`: [n, H, P, D]; row i receives the page of slots[i], and rows whose slot is -1 are left
  untouched.

Block gather (`gather_blocks`): the same copy at the grain of B-token blocks of a page, picked per head, for
sparse attention that keeps a few blocks of each head rather than whole pages:
- B divides P, R = P // B blocks per page; the unified pool (device slots 0..split-1, then host slots split..) is
  read as an array of [B, D] blocks, block id u = (slot * H + h) * R + j being tokens j*B .. j*B+B-1 of KV head h
  of unified slot `slot` (u < split*H*R on the device, the rest on the host);
- `index`: int32 [n, Ho] of block ids, -1 for "no block"; Ho is free (H, or the number of query heads when each
  query head picks its own blocks): any column may take any head's block;
- outputs `out_k`, `out_v`: [n, Ho, B, D]; out[i, c] receives block index[i, c], and entries of -1 are left
  untouched. Read as a pool of W = n pages of B tokens over Ho heads, the result is what `paged_decode_static`
  attends over (slots = arange(W)).

Packed gathers (`gather_pages_packed`, `gather_blocks_packed`): the same gathers where the host pool holds pages
quantized by an `offload.quant.PageCodec` (setting "k8v8", "k8v4" or "k4v2"), dequantized on the way:
- the packed pool `host_kq`, `host_vq`: uint8 [S_host, codec.k_bytes] and [S_host, codec.v_bytes], one row of
  codes and float16 parameters a page (on CUDA pinned, read in place, or on the device);
- `gather_pages_packed`: `slots` int32 [n] of *host* slots (no device pool; -1 is "no page"); row i of out_k,
  out_v [n, H, P, D] (float32, float16 or bfloat16) receives `codec.decode` of slot slots[i];
- `gather_blocks_packed`: a device pool dev_k, dev_v [S_dev, H, P, D] of the outputs' dtype and the packed host
  pool, unified as above (block u < split*H*R copied from the device bit for bit, u >= split*H*R dequantized from
  block u - split*H*R of the packed pool, numbered as `PageCodec.decode_blocks` does); outputs [n, Ho, B, D].
Codes become `code * scale + minimum` in float32 and then the output's dtype, in registers: the only
full-precision copy written is the output, and the result equals the torch references (`codec.decode`,
`codec.decode_blocks`) bit for bit.

NOTE: slots and block ids are not bounds-checked by the kernel (that would read them back to the host); one past
either pool is undefined behaviour there, while the torch references raise.
"""

from __future__ import annotations

import importlib

import torch
from torch.utils.weak import WeakIdKeyDictionary

from offload.quant import PageCodec


def _check(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
           host_k: torch.Tensor, host_v: torch.Tensor, slots: torch.Tensor, split: int) -> int:
    """Validates shapes, dtypes and layout; returns n (nothing is read from `slots`)."""
    if not isinstance(slots, torch.Tensor) or slots.dtype != torch.int32 or slots.dim() != 1:
        got = f"{slots.dtype} {tuple(slots.shape)}" if isinstance(slots, torch.Tensor) else type(slots).__name__
        raise ValueError(f"slots must be a 1-D int32 tensor, got {got}")
    tensors = _check_layout(out_k, out_v, dev_k, dev_v, host_k, host_v, split)
    n = slots.numel()
    for name, t in tensors.items():
        if t.shape[1:] != out_k.shape[1:]:
            raise ValueError(f"{name} page shape {tuple(t.shape[1:])} differs from out_k {tuple(out_k.shape[1:])}")
    for name, t in (("out_k", out_k), ("out_v", out_v)):
        if t.shape[0] != n:
            raise ValueError(f"{name} must have one row per slot ({n}), got {t.shape[0]}")
    return n


def _check_split(split: int) -> None:
    if isinstance(split, bool) or not isinstance(split, int) or split < 0:
        raise ValueError(f"split must be a non-negative int, got {split!r}")


def _check_dense(tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor 4-D, contiguous, of out_k's dtype."""
    dtype = tensors["out_k"].dtype
    for name, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if t.dtype != dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from out_k dtype {dtype}")


def _check_layout(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
                  host_k: torch.Tensor, host_v: torch.Tensor, split: int) -> dict[str, torch.Tensor]:
    """What both gathers require: `split` a non-negative int; every tensor 4-D, contiguous, of out_k's dtype; K and
    V pools with as many slots. Returns the tensors by name."""
    _check_split(split)
    tensors = {"out_k": out_k, "out_v": out_v, "dev_k": dev_k, "dev_v": dev_v, "host_k": host_k, "host_v": host_v}
    _check_dense(tensors)
    if dev_v.shape[0] != dev_k.shape[0]:
        raise ValueError(f"dev_v has {dev_v.shape[0]} slots, dev_k {dev_k.shape[0]}")
    if host_v.shape[0] != host_k.shape[0]:
        raise ValueError(f"host_v has {host_v.shape[0]} slots, host_k {host_k.shape[0]}")
    return tensors


def gather_pages_reference(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
                           host_k: torch.Tensor, host_v: torch.Tensor, slots: torch.Tensor, split: int) -> None:
    """Torch reference: two `index_select`s per tensor (device slots, host slots), rows of -1 skipped. Reads the
    slots back to pick the rows, so it is for tests, not for the decode path."""
    _check(out_k, out_v, dev_k, dev_v, host_k, host_v, slots, split)
    s = slots.to("cpu", torch.long)
    on_dev = ((s >= 0) & (s < split)).nonzero().squeeze(1)
    on_host = (s >= split).nonzero().squeeze(1)
    for rows, src_slots, (pk, pv) in ((on_dev, s[on_dev], (dev_k, dev_v)),
                                      (on_host, s[on_host] - split, (host_k, host_v))):
        if rows.numel() == 0:
            continue
        dst = rows.to(out_k.device)
        out_k.index_copy_(0, dst, pk.index_select(0, src_slots.to(pk.device)).to(out_k.device))
        out_v.index_copy_(0, dst, pv.index_select(0, src_slots.to(pv.device)).to(out_v.device))


def _kernels(name: str, module: str = "_triton_gather"):
    try:
        return importlib.import_module(f"offload.kernels.{module}")
    except ImportError as e:  # triton itself missing, or broken
        raise RuntimeError(f"{name} needs triton (pip install 'offload[gpu]'): {e}") from e


# Host pools found pinned, by tensor object: the decode step passes the same ones at every launch, and asking
# CUDA again would be host work at every step.
_PINNED = WeakIdKeyDictionary()


def _pinned(t: torch.Tensor) -> bool:
    known = _PINNED.get(t)
    if known is None:
        known = _PINNED[t] = t.is_pinned()
    return known


def _check_launch(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
                  host_k: torch.Tensor, host_v: torch.Tensor) -> None:
    """What the kernel needs beyond the shapes: an integer of the element's width, the outputs and the device
    pool on one device, and on CUDA a host pool that is pinned (or already on that device)."""
    if out_k.element_size() not in (1, 2, 4, 8):
        raise ValueError(f"out_k dtype {out_k.dtype} has no integer of its width to copy through")
    device = out_k.device
    for name, t in (("out_v", out_v), ("dev_k", dev_k), ("dev_v", dev_v)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, out_k on {device}")
    if device.type == "cuda":
        for name, t in (("host_k", host_k), ("host_v", host_v)):
            if t.device != device and not (t.device.type == "cpu" and _pinned(t)):
                raise ValueError(f"{name} must be a pinned CPU tensor (pin_memory=True) or on {device}, "
                                 f"got {t.device}{' (not pinned)' if t.device.type == 'cpu' else ''}")


def gather_pages(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
                 host_k: torch.Tensor, host_v: torch.Tensor, slots: torch.Tensor, split: int) -> None:
    """Triton gather: one launch over (entry, block of the page's H*P*D elements) copying K and V together, the
    bits unchanged (any dtype of 1, 2, 4 or 8 bytes). `n` is `slots.numel()` and `split` a Python int; the slots
    are read on the device, so nothing is read back to the host. On CUDA the host pool must be pinned: the kernel
    reads it over the bus in place, and the pages must stay unchanged until the launch has run on the current
    stream."""
    tg = _kernels("gather_pages")
    n = _check(out_k, out_v, dev_k, dev_v, host_k, host_v, slots, split)
    _check_launch(out_k, out_v, dev_k, dev_v, host_k, host_v)
    if n == 0 or out_k[0].numel() == 0:
        return
    tg.launch(out_k, out_v, dev_k, dev_v, host_k, host_v, slots.to(out_k.device), n, split)


def _check_index(index: torch.Tensor) -> None:
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int32 or index.dim() != 2:
        got = f"{index.dtype} {tuple(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"index must be a 2-D int32 tensor [n, Ho], got {got}")


def _check_block_out(out_k: torch.Tensor, out_v: torch.Tensor, index: torch.Tensor, h: int, p: int, d: int,
                     slots: int, whose: str) -> int:
    """What both block gathers require of their outputs [n, Ho, B, D] and index [n, Ho], for pools of `slots`
    unified slots of H=h, P=p, D=d (`whose` names where those come from); returns R = P // B."""
    b = out_k.shape[2]
    if b < 1 or p % b:
        raise ValueError(f"out_k block size B={b} must divide the page size P={p}")
    if out_k.shape[3] != d:
        raise ValueError(f"out_k head_dim {out_k.shape[3]} differs from {whose} {d}")
    if out_v.shape != out_k.shape:
        raise ValueError(f"out_v shape {tuple(out_v.shape)} differs from out_k {tuple(out_k.shape)}")
    if index.shape != out_k.shape[:2]:
        raise ValueError(f"index shape {tuple(index.shape)} must be out_k's [n, Ho] {tuple(out_k.shape[:2])}")
    r = p // b
    if slots * h * r > 2**31:
        raise ValueError(f"the unified pool's {slots * h * r} blocks pass the int32 range of index")
    return r


def _check_blocks(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
                  host_k: torch.Tensor, host_v: torch.Tensor, index: torch.Tensor, split: int) -> int:
    """Validates shapes, dtypes and layout of a block gather; returns R = P // B, the blocks per page (nothing is
    read from `index`)."""
    _check_index(index)
    tensors = _check_layout(out_k, out_v, dev_k, dev_v, host_k, host_v, split)
    h, p, d = dev_k.shape[1:]
    for name in ("dev_v", "host_k", "host_v"):
        if tensors[name].shape[1:] != dev_k.shape[1:]:
            raise ValueError(f"{name} page shape {tuple(tensors[name].shape[1:])} differs from dev_k "
                             f"{tuple(dev_k.shape[1:])}")
    return _check_block_out(out_k, out_v, index, h, p, d, split + host_k.shape[0], "the pools'")


def gather_blocks_reference(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
                            host_k: torch.Tensor, host_v: torch.Tensor, index: torch.Tensor, split: int) -> None:
    """Torch reference of `gather_blocks`: the pools viewed as [S*H*R, B, D] blocks, two `index_select`s per
    tensor (device blocks, host blocks), entries of -1 skipped. Reads the index back to pick the blocks, so it is
    for tests, not for the decode path."""
    r = _check_blocks(out_k, out_v, dev_k, dev_v, host_k, host_v, index, split)
    n, ho, b, d = out_k.shape
    dev_blocks = split * dev_k.shape[1] * r
    u = index.to("cpu", torch.long).reshape(-1)
    on_dev = ((u >= 0) & (u < dev_blocks)).nonzero().squeeze(1)
    on_host = (u >= dev_blocks).nonzero().squeeze(1)
    flat_k, flat_v = out_k.view(n * ho, b, d), out_v.view(n * ho, b, d)
    for rows, src, (pk, pv) in ((on_dev, u[on_dev], (dev_k, dev_v)),
                                (on_host, u[on_host] - dev_blocks, (host_k, host_v))):
        if rows.numel() == 0:
            continue
        dst = rows.to(out_k.device)
        flat_k.index_copy_(0, dst, pk.view(-1, b, d).index_select(0, src.to(pk.device)).to(out_k.device))
        flat_v.index_copy_(0, dst, pv.view(-1, b, d).index_select(0, src.to(pv.device)).to(out_v.device))


def gather_blocks(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
                  host_k: torch.Tensor, host_v: torch.Tensor, index: torch.Tensor, split: int) -> None:
    """Triton block gather: out[i, c] = block index[i, c] of the unified pool, K and V in one launch over
    (entry, part of the block's B*D elements), the bits unchanged (any dtype of 1, 2, 4 or 8 bytes). n and Ho come
    from `out_k`'s shape and `split` is a Python int; the index is read on the device, so nothing is read back to
    the host. On CUDA the host pool must be pinned, read in place as by `gather_pages`."""
    tg = _kernels("gather_blocks")
    _check_blocks(out_k, out_v, dev_k, dev_v, host_k, host_v, index, split)
    _check_launch(out_k, out_v, dev_k, dev_v, host_k, host_v)
    if out_k.numel() == 0:
        return
    tg.launch_blocks(out_k, out_v, dev_k, dev_v, host_k, host_v, index.to(out_k.device), split)


# Packed gathers (`gather_pages_packed`, `gather_blocks_packed`): the host pool holds quantized pages.

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_packed(host_kq: torch.Tensor, host_vq: torch.Tensor, codec: PageCodec) -> None:
    """A packed pool: uint8 rows [S, k_bytes] and [S, v_bytes] of `codec`, contiguous, as many of each."""
    if not isinstance(codec, PageCodec):
        raise ValueError(f"codec must be a PageCodec (PageCodec.of a setting other than 'none'), got "
                         f"{type(codec).__name__}")
    for name, t, row in (("host_kq", host_kq, codec.k_bytes), ("host_vq", host_vq, codec.v_bytes)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 2:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D uint8 tensor of packed rows, got {got}")
        if t.shape[1] != row:
            raise ValueError(f"{name} rows are {t.shape[1]} bytes, the codec's ({codec.setting}) are {row}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if host_vq.shape[0] != host_kq.shape[0]:
        raise ValueError(f"host_vq has {host_vq.shape[0]} slots, host_kq {host_kq.shape[0]}")


def _check_out(out_k: torch.Tensor, out_v: torch.Tensor) -> None:
    """Outputs of a packed gather: a floating dtype the codec decodes to, out_v of out_k's shape."""
    if out_k.dtype not in _FLOATS:
        raise ValueError(f"out_k dtype {out_k.dtype} must be float32, float16 or bfloat16")
    if out_v.shape != out_k.shape:
        raise ValueError(f"out_v shape {tuple(out_v.shape)} differs from out_k {tuple(out_k.shape)}")


def _check_pages_packed(out_k: torch.Tensor, out_v: torch.Tensor, host_kq: torch.Tensor, host_vq: torch.Tensor,
                        slots: torch.Tensor, codec: PageCodec) -> int:
    """Validates a packed page gather; returns n (nothing is read from `slots`)."""
    if not isinstance(slots, torch.Tensor) or slots.dtype != torch.int32 or slots.dim() != 1:
        got = f"{slots.dtype} {tuple(slots.shape)}" if isinstance(slots, torch.Tensor) else type(slots).__name__
        raise ValueError(f"slots must be a 1-D int32 tensor, got {got}")
    _check_packed(host_kq, host_vq, codec)
    _check_dense({"out_k": out_k, "out_v": out_v})
    _check_out(out_k, out_v)
    n = slots.numel()
    want = (n, codec.kv_heads, codec.page_size, codec.head_dim)
    if tuple(out_k.shape) != want:
        raise ValueError(f"out_k shape {tuple(out_k.shape)} must be [n, H, P, D] {want} (one row per slot)")
    return n


def _check_launch_packed(out_k: torch.Tensor, others: dict[str, torch.Tensor], host_kq: torch.Tensor,
                         host_vq: torch.Tensor) -> None:
    """`others` on out_k's device; the packed pool there too, or on CUDA pinned in CPU memory."""
    device = out_k.device
    for name, t in others.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, out_k on {device}")
    for name, t in (("host_kq", host_kq), ("host_vq", host_vq)):
        if t.device == device:
            continue
        if device.type == "cuda" and t.device.type == "cpu":
            if not _pinned(t):
                raise ValueError(f"{name} must be a pinned CPU tensor (pin_memory=True) or on {device}, got "
                                 f"{t.device} (not pinned)")
        else:
            raise ValueError(f"{name} is on {t.device}, out_k on {device}")


def gather_pages_packed_reference(out_k: torch.Tensor, out_v: torch.Tensor, host_kq: torch.Tensor,
                                  host_vq: torch.Tensor, slots: torch.Tensor, codec: PageCodec) -> None:
    """Torch reference of `gather_pages_packed`: `codec.decode` of the addressed rows, rows of -1 skipped. Reads
    the slots back to pick the rows, so it is for tests, not for the decode path."""
    _check_pages_packed(out_k, out_v, host_kq, host_vq, slots, codec)
    s = slots.to("cpu", torch.long)
    rows = (s >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    src = s[rows].to(host_kq.device)
    k, v = codec.decode(host_kq.index_select(0, src), host_vq.index_select(0, src), out_k.dtype)
    dst = rows.to(out_k.device)
    out_k.index_copy_(0, dst, k.to(out_k.device))
    out_v.index_copy_(0, dst, v.to(out_v.device))


def gather_pages_packed(out_k: torch.Tensor, out_v: torch.Tensor, host_kq: torch.Tensor, host_vq: torch.Tensor,
                        slots: torch.Tensor, codec: PageCodec) -> None:
    """Triton dequantizing gather: row i of out_k, out_v [n, H, P, D] (float32, float16 or bfloat16) receives
    `codec.decode` of packed host slot slots[i] (int32 [n]; -1 leaves the row untouched), K and V in one launch
    over (entry, head, tile of tokens). The packed rows are read and dequantized in registers: no full-precision
    copy is written anywhere but the outputs, and the slots are read on the device, so nothing is read back to the
    host. On CUDA the packed pool must be pinned (read over the bus in place, and unchanged until the launch has
    run on the current stream) or on the outputs' device; the outputs match `gather_pages_packed_reference` bit
    for bit."""
    tq = _kernels("gather_pages_packed", "_triton_dequant")
    n = _check_pages_packed(out_k, out_v, host_kq, host_vq, slots, codec)
    _check_launch_packed(out_k, {"out_v": out_v}, host_kq, host_vq)
    if n == 0 or out_k[0].numel() == 0:
        return
    tq.launch_pages(out_k, out_v, host_kq, host_vq, slots.to(out_k.device), codec)


def _check_blocks_packed(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
                         host_kq: torch.Tensor, host_vq: torch.Tensor, index: torch.Tensor, split: int,
                         codec: PageCodec) -> int:
    """Validates a block gather over a device pool and a packed host pool; returns R = P // B (nothing is read
    from `index`)."""
    _check_index(index)
    _check_split(split)
    _check_packed(host_kq, host_vq, codec)
    _check_dense({"out_k": out_k, "out_v": out_v, "dev_k": dev_k, "dev_v": dev_v})
    _check_out(out_k, out_v)
    h, p, d = codec.kv_heads, codec.page_size, codec.head_dim
    for name, t in (("dev_k", dev_k), ("dev_v", dev_v)):
        if tuple(t.shape[1:]) != (h, p, d):
            raise ValueError(f"{name} page shape {tuple(t.shape[1:])} differs from the codec's {(h, p, d)}")
    if dev_v.shape[0] != dev_k.shape[0]:
        raise ValueError(f"dev_v has {dev_v.shape[0]} slots, dev_k {dev_k.shape[0]}")
    return _check_block_out(out_k, out_v, index, h, p, d, split + host_kq.shape[0], "the codec's")


def gather_blocks_packed_reference(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor,
                                   dev_v: torch.Tensor, host_kq: torch.Tensor, host_vq: torch.Tensor,
                                   index: torch.Tensor, split: int, codec: PageCodec) -> None:
    """Torch reference of `gather_blocks_packed`: device blocks by `index_select` of the pools viewed as
    [S*H*R, B, D], packed blocks by `codec.decode_blocks`, entries of -1 skipped. Reads the index back, so it is
    for tests, not for the decode path."""
    r = _check_blocks_packed(out_k, out_v, dev_k, dev_v, host_kq, host_vq, index, split, codec)
    n, ho, b, d = out_k.shape
    dev_blocks = split * codec.kv_heads * r
    u = index.to("cpu", torch.long).reshape(-1)
    on_dev = ((u >= 0) & (u < dev_blocks)).nonzero().squeeze(1)
    on_host = (u >= dev_blocks).nonzero().squeeze(1)
    flat_k, flat_v = out_k.view(n * ho, b, d), out_v.view(n * ho, b, d)
    if on_dev.numel():
        src, dst = u[on_dev].to(dev_k.device), on_dev.to(out_k.device)
        flat_k.index_copy_(0, dst, dev_k.view(-1, b, d).index_select(0, src).to(out_k.device))
        flat_v.index_copy_(0, dst, dev_v.view(-1, b, d).index_select(0, src).to(out_v.device))
    if on_host.numel():
        ids = u[on_host] - dev_blocks
        k, v = codec.decode_blocks(host_kq, host_vq, ids.to(host_kq.device), b, out_k.dtype)
        dst = on_host.to(out_k.device)
        flat_k.index_copy_(0, dst, k.to(out_k.device))
        flat_v.index_copy_(0, dst, v.to(out_v.device))


def gather_blocks_packed(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
                         host_kq: torch.Tensor, host_vq: torch.Tensor, index: torch.Tensor, split: int,
                         codec: PageCodec) -> None:
    """Triton block gather over a device pool dev_k, dev_v [S_dev, H, P, D] (out_k's dtype) and a packed host
    pool: out[i, c] = block index[i, c] of the unified pool, a device block copied bit for bit, a packed block
    dequantized as `codec.decode_blocks` does, K and V in one launch over (entry, tile of the block's tokens).
    n and Ho come from `out_k`'s shape and `split` is a Python int; the index is read on the device, so nothing is
    read back to the host. On CUDA the packed pool must be pinned or on the device, as for `gather_pages_packed`;
    the outputs match `gather_blocks_packed_reference` bit for bit."""
    tq = _kernels("gather_blocks_packed", "_triton_dequant")
    _check_blocks_packed(out_k, out_v, dev_k, dev_v, host_kq, host_vq, index, split, codec)
    _check_launch_packed(out_k, {"out_v": out_v, "dev_k": dev_k, "dev_v": dev_v}, host_kq, host_vq)
    if out_k.numel() == 0:
        return
    tq.launch_blocks(out_k, out_v, dev_k, dev_v, host_kq, host_vq, index.to(out_k.device), split, codec)
