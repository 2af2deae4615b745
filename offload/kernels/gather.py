"""Page and block gather: copy scattered pages, or blocks of pages, from two pools into a dense buffer in one launch.

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

NOTE: slots and block ids are not bounds-checked by the kernel (that would read them back to the host); one past
either pool is undefined behaviour there, while the torch references raise.
"""

from __future__ import annotations

import importlib

import torch


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


def _check_layout(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
                  host_k: torch.Tensor, host_v: torch.Tensor, split: int) -> dict[str, torch.Tensor]:
    """What both gathers require: `split` a non-negative int; every tensor 4-D, contiguous, of out_k's dtype; K and
    V pools with as many slots. Returns the tensors by name."""
    if isinstance(split, bool) or not isinstance(split, int) or split < 0:
        raise ValueError(f"split must be a non-negative int, got {split!r}")
    tensors = {"out_k": out_k, "out_v": out_v, "dev_k": dev_k, "dev_v": dev_v, "host_k": host_k, "host_v": host_v}
    for name, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if t.dtype != out_k.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from out_k dtype {out_k.dtype}")
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


def _kernels(name: str):
    try:
        return importlib.import_module("offload.kernels._triton_gather")
    except ImportError as e:  # triton itself missing, or broken
        raise RuntimeError(f"{name} needs triton (pip install 'offload[gpu]'): {e}") from e


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
            if t.device != device and not (t.device.type == "cpu" and t.is_pinned()):
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


def _check_blocks(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
                  host_k: torch.Tensor, host_v: torch.Tensor, index: torch.Tensor, split: int) -> int:
    """Validates shapes, dtypes and layout of a block gather; returns R = P // B, the blocks per page (nothing is
    read from `index`)."""
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int32 or index.dim() != 2:
        got = f"{index.dtype} {tuple(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"index must be a 2-D int32 tensor [n, Ho], got {got}")
    tensors = _check_layout(out_k, out_v, dev_k, dev_v, host_k, host_v, split)
    h, p, d = dev_k.shape[1:]
    for name in ("dev_v", "host_k", "host_v"):
        if tensors[name].shape[1:] != dev_k.shape[1:]:
            raise ValueError(f"{name} page shape {tuple(tensors[name].shape[1:])} differs from dev_k "
                             f"{tuple(dev_k.shape[1:])}")
    b = out_k.shape[2]
    if b < 1 or p % b:
        raise ValueError(f"out_k block size B={b} must divide the page size P={p}")
    if out_k.shape[3] != d:
        raise ValueError(f"out_k head_dim {out_k.shape[3]} differs from the pools' {d}")
    if out_v.shape != out_k.shape:
        raise ValueError(f"out_v shape {tuple(out_v.shape)} differs from out_k {tuple(out_k.shape)}")
    if index.shape != out_k.shape[:2]:
        raise ValueError(f"index shape {tuple(index.shape)} must be out_k's [n, Ho] {tuple(out_k.shape[:2])}")
    r = p // b
    if (split + host_k.shape[0]) * h * r > 2**31:
        raise ValueError(f"the unified pool's {(split + host_k.shape[0]) * h * r} blocks pass the int32 range "
                         "of index")
    return r


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
