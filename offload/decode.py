"""The decode step on the device: one gather and one attention call per layer, steered by device tensors.

The page table's host mirror (`offload.pagetable.PageTable`) decides; this module only reads what it decided,
through a `LayerView` per layer: the unified slot of each page as an int32 tensor on the compute device. A view is
rebuilt on the host when the layer's pages moved (the table's version changed, or a page was opened), which
happens at page boundaries, at prefill and when a sliding window moves past a page. In every other step nothing
is read back on the host: the step's shapes follow from host integers (tokens, budgets) alone.

Unified slots: slot s < `split` is slot s of the device pool, slot s >= `split` is slot s - split of the host
pool. Where host and device share memory (the CPU), both pools are views of one allocation, so one
`index_select` per K and V gathers a layer's pages from both; on CUDA the gather kernel
(`offload.kernels.gather`) reads the pinned host pool in place through unified virtual addressing. With `kv_quant`
the host pool holds packed pages (`offload.quant`): the CUDA step's gathers unpack them in the same launch, and the
torch step unpacks the host's pages (exact) or the chosen blocks (sparse) after gathering the device's.

  exact:  gather pages first..last (tail last) into the head-major workspace -> SDPA over tokens off..n-1.
  batch:  every sequence's pages in one gather -> one SDPA call (equal lengths) or one pass over pages with the
          softmax reduced per sequence (any lengths, windows, soft-caps); with the kernels, one launch over each
          sequence's pages read in place from both pools. Sparse steps of a batch choose together (one scoring,
          one top-k) and attend in one pass, or with the kernels one launch over each head's own blocks.
  sparse: score the window's blocks (`select_block` tokens) from their summaries, per chooser (a KV head, a query
          head, or one for all) -> top-k among those not forced -> forced (sinks, recent window) + top-k + the
          tail's blocks -> unified block ids -> one gather of each head's own blocks -> SDPA, the first block cut
          where a sliding window starts inside it.
Uses of pages (the step and the predicted attention mass) are recorded in device tensors and handed to the
eviction policy at the next page boundary (`absorb`), so eviction decides from them there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload import attention_math as am
from offload.block_cache import BlockCache
from offload.host_attention import pages_partial_host
from offload.kernels.launch import as_bits

NONE = -1


def attend_token(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, softcap: float | None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query token [1, Hq, 1, D] over contiguous keys and values [1, H, S, D] -> [1, 1, Hq, D]; `mask`
    [1, 1, 1, S] (True: attend) or None. Soft-capped scores (which framework SDPA can't cap) take the manual path,
    which needs no mask where it is used."""
    q_heads, kv_heads = query.shape[1], k.shape[1]
    if softcap is not None:
        o, _ = am.dense_partial(am.group_queries(query, kv_heads), k[0], v[0], scaling, softcap=softcap)
        return am.ungroup_output(o, q_heads, 1).to(query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling,
                                                           enable_gqa=q_heads != kv_heads)
    return out.transpose(1, 2)


def top_blocks(forced: torch.Tensor, scores: torch.Tensor, bias: torch.Tensor, free: int, fb: int,
               *after: torch.Tensor) -> torch.Tensor:
    """The blocks a step attends per chooser, int64 [count, choosers]: the fixed ones `forced` [nf, choosers], the
    `free` best of `scores` [nb, choosers] outside them (`bias` [nb, 1] is -inf on them; candidates are blocks
    fb..fb+nb-1), then the blocks in `after` (the tail's). One top-k and one concatenation, on the device."""
    if free <= 0:
        return torch.cat([forced, *after]) if after else forced
    top = torch.topk(scores + bias, free, dim=0).indices
    return torch.cat([forced, top.add_(fb) if fb else top, *after])


@dataclass
class LayerView:
    """What the device needs to know of one layer's pages, valid while the layer's table version is `version`
    and it holds `pages` pages."""

    version: int
    pages: int  # pages holding tokens, the open tail included
    first: int  # the first page still held (a sliding window released those before it)
    host: int  # pages among first..pages-1 that are read from the host pool
    lower: bool  # some page first..pages-1 lives only on disk: the streaming path serves this layer
    slots: torch.Tensor  # int32 [count], unified slots of the pages gathered (page order, tail last)
    count: int = 0  # pages gathered: first..pages-1 but those the host attends
    # The pages read from the host pool and their host slots, as Python ints, once the runtime has needed them
    # (`Runtime.check_in_place`).
    host_pages: tuple[list[int], list[int]] | None = None
    # Exact mode with host attention (offload/host_attention.py): the host slots of the pages the host attends
    # (int64, CPU), which the gather leaves out; None when it attends none.
    host_attend: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # bool [pages - first], CPU: the pages gathered, when the host attends some
    # Sparse mode: the unified block id of every block of pages 0..pages-1 per gathered head, int64
    # [pages * R, heads] ((slot * H + kv head) * R + block), and the tail page's blocks [R, choosers].
    blockrow: torch.Tensor | None = None
    tail_blocks: torch.Tensor | None = None
    # The kernel backend's: slots of pages first..last in the device pool's tensor (host pages in workspace rows),
    # and the gather that brings the host pages there (unified source slots, host slots when they are packed;
    # first row and count).
    attn: torch.Tensor | None = None
    gather_src: torch.Tensor | None = None
    gather_dst: tuple[int, int] = (0, 0)
    # Packed host pages (kv_quant), torch backend: device slots of pages first..last with host pages at slot 0,
    # and the host pages' positions among them and their host slots (int64 on the device).
    dev_slots: torch.Tensor | None = None
    host_pos: torch.Tensor | None = None
    host_src: torch.Tensor | None = None
    # A view with pages on disk (`lower`): the view of its pages in the pools alone, once needed (`in_pools`),
    # which gives the page number of each of its pages (int64 on the device; None: pages first..pages-1).
    in_pools: LayerView | None = None
    numbers: torch.Tensor | None = None


class DeviceDecode:
    """Owns the device side of decode: the layer views, the gather workspace and the use records."""

    def __init__(self, pools: tuple[torch.Tensor, torch.Tensor], split: int, layers: int, max_pages: int,
                 q_heads: int, kv_heads: int, device: torch.device, block: int | None = None,
                 head_selection: str = "kv", codec=None, cache_pages: int = 0):
        """`codec` (offload.quant.PageCodec): the host pool holds packed pages (attached by `attach_host`), and
        `pools` are the device's alone; None: `pools` are the unified pool, device slots then host slots.
        `cache_pages`: sparse mode, the last of the `split` device slots hold the block cache
        (offload/block_cache.py), not pages of the device tier."""
        self.pool_k, self.pool_v = pools  # [split + host slots, H, P, D]: the unified pool
        self.split = split
        self.codec = codec
        self.host_k = self.host_v = None  # the packed host pool, once attached
        self.layers, self.max_pages = layers, max_pages
        self.q_heads, self.kv_heads = q_heads, kv_heads
        self.page_size, self.head_dim = self.pool_k.shape[2], self.pool_k.shape[3]
        self.device = device
        # Exact mode: (layer, host pages, device pages) -> how many of the host pages the host attends; set by the
        # runtime when host attention is on (offload/host_attention.py).
        self.host_split = None
        # Sparse mode's blocks: R per page; a choice has one column per chooser, and each gathered head (a KV head,
        # or a query head when each chooses alone) reads its chooser's blocks.
        self.selecting = block is not None
        self.block = block or self.page_size
        self.per_page = self.page_size // self.block
        self.choosers = {"shared": 1, "kv": kv_heads, "query": q_heads}[head_selection]
        self.heads = q_heads if head_selection == "query" else kv_heads
        self.head_of = torch.arange(self.heads, device=device) // (self.heads // kv_heads)
        self.block_ids = torch.arange(self.per_page, device=device)
        self.host_blocks = split * kv_heads * self.per_page  # unified block ids from here on are in the host pool
        self.keep_mass = False
        self.cache: BlockCache | None = None
        self.resize(layers)
        if self.selecting and cache_pages:  # sized for `layers` rows; `resize` resizes it with the batch
            per = kv_heads * self.per_page
            self.cache = BlockCache((split - cache_pages) * per, cache_pages * per - 1, layers,
                                    max_pages * self.per_page, self.heads, device)
        # `exact_batch`'s and `exact_ragged`'s gather target, grown as needed
        self.batch_k = self.batch_v = torch.empty(0, device=device)
        # Blocks (of one KV head each) read from the host pool by sparse steps (exact steps count their pages on
        # the host, from the view), and the blocks the last sparse step gathered [count, choosers].
        self.host_reads = torch.zeros((), dtype=torch.int64, device=device)
        self.last_blocks: torch.Tensor | None = None
        self.ws_k = self.ws_v = torch.empty(0, device=device)
        self.ws_views: dict[int, tuple] = {}
        # Sparse mode's gather target: blocks head-major, [heads * count, B, D] in use.
        self.bk = self.bv = torch.empty(0, device=device)
        self.bk_views: dict[int, tuple] = {}
        self.flat = tuple(p.view(-1, self.block, self.head_dim) for p in pools)  # the pools as [blocks, B, D]

    def resize(self, layers: int) -> None:
        """Per-layer state for a page table of `layers` rows (one per layer and sequence of a batch)."""
        self.layers, device = layers, self.device
        self.views: list[LayerView | None] = [None] * layers
        # The unified slot of every page, one row per layer and sequence.
        self.rows = torch.full((1, layers, self.max_pages), NONE, dtype=torch.int32, device=device)
        # Uses since the last boundary: the step a block was last attended (-1: not since), and the predicted
        # attention mass of each block per chooser (kept for the score eviction policy alone).
        blocks = self.max_pages * self.per_page
        self.use_step = torch.full((layers, blocks), NONE, dtype=torch.int64, device=device)
        self.mass = torch.zeros((layers, blocks, self.choosers), dtype=torch.float32, device=device)
        self.use_rows, self.mass_rows = list(self.use_step), list(self.mass)  # per-layer views, made once
        # `exact_batch`'s and `exact_ragged`'s gather indices per layer of the model
        self.batch_index: dict[int, tuple] = {}
        self.ragged_index: dict[int, tuple] = {}
        self.append_index: dict[int, tuple] = {}  # `append_batch`'s
        if self.cache is not None:
            self.cache.resize(layers)

    # -- views ---------------------------------------------------------------------------------------------
    def view(self, layer: int, table, pages: int) -> LayerView:
        """The layer's view, rebuilt from the host mirror when stale (host work at page boundaries only)."""
        v = self.views[layer]
        if v is not None and v.version == table.version[layer] and v.pages == pages:
            return v
        dev, host = table.slot["device"][layer], table.slot["host"][layer]
        row = torch.where(dev >= 0, dev, torch.where(host >= 0, host + self.split, NONE)).to(torch.int32)
        first = table.first[layer]
        held = row[first:pages]
        self.rows[0, layer].copy_(row)
        on_host = (dev[first:pages] < 0) & (host[first:pages] >= 0)
        v = LayerView(
            version=table.version[layer], pages=pages, first=first, host=int(on_host.sum()),
            lower=bool((held < 0).any()), slots=self.rows[0, layer, first:pages], count=pages - first,
        )
        if self.host_split is not None and not self.selecting and v.host and not v.lower:
            take = self.host_split(layer, v.host, v.count - v.host)
            if take:  # the oldest host pages
                at = on_host.nonzero().flatten()[:take]
                v.keep = torch.ones(v.count, dtype=torch.bool)
                v.keep[at] = False
                v.host_attend = host[first:pages][at].long()
                held = held[v.keep]
                v.slots = held.to(self.device)
                v.count -= take
                v.host -= take
        if self.codec is not None and not v.lower:
            self._packed(v, held)
        if self.selecting:
            R = self.per_page
            base = self.rows[0, layer, :pages].long()[:, None] * self.kv_heads + self.head_of  # [pages, heads]
            v.blockrow = (base[:, None, :] * R + self.block_ids[None, :, None]).reshape(pages * R, self.heads)
            if self.cache is not None:  # blocks with a copy in the cache read the copy
                v.blockrow = self.cache.set_home(layer, v.blockrow)
            v.tail_blocks = ((pages - 1) * R + self.block_ids)[:, None].expand(R, self.choosers)
        self.views[layer] = v
        self._reserve(v.count)
        return v

    def _packed(self, v: LayerView, held: torch.Tensor) -> None:
        """With packed host pages: the device slots of the view's pages `held` (unified slots, page order) with
        host pages at slot 0, and the host pages' positions among them and their host slots."""
        on_host = held >= self.split
        pos = on_host.nonzero().flatten()
        v.dev_slots = torch.where(on_host, 0, held).to(self.device, torch.long)
        v.host_pos = pos.to(self.device)
        v.host_src = (held[pos] - self.split).to(self.device, torch.long)

    def serves_exact(self, view: LayerView) -> bool:
        """Whether an exact step of the layer can run here: every page it holds is in a pool."""
        return not view.lower

    def attach_host(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """The host pool, once it exists, where it is not part of `pools` (packed, or another device's memory)."""
        self.host_k, self.host_v = k, v

    def forget(self) -> None:
        """A new sequence: every view is stale."""
        self.views = [None] * self.layers
        self.batch_index.clear()
        self.ragged_index.clear()
        self.append_index.clear()
        self.use_step.fill_(NONE)
        self.mass.zero_()
        if self.cache is not None:
            self.cache.forget()

    def _reserve(self, pages: int) -> None:
        """Grows the head-major workspace [H, pages, P, D] to hold `pages` pages (at boundaries only)."""
        have = self.ws_k.shape[1] if self.ws_k.dim() == 4 else 0
        if pages <= have:
            return
        cap = max(pages, have + have // 4, 8)
        with torch.inference_mode(False):
            shape = (self.kv_heads, cap, self.page_size, self.head_dim)
            self.ws_k = torch.empty(shape, dtype=self.pool_k.dtype, device=self.device)
            self.ws_v = torch.empty_like(self.ws_k)
        self.ws_views: dict[int, tuple] = {}  # views of the workspace per page count, made once

    # -- the step ------------------------------------------------------------------------------------------
    def exact(self, layer: int, view: LayerView, query: torch.Tensor, valid: int, start: int, scaling: float,
              softcap: float | None) -> torch.Tensor:
        """Attention of one token over pages first..last, from token `start` of the first page to token `valid`
        of the tail. query [1, Hq, 1, D] -> [1, 1, Hq, D]."""
        k, v = self.gather(view)
        tokens = (view.count - 1) * self.page_size + valid
        return attend_token(query, k.narrow(2, start, tokens - start), v.narrow(2, start, tokens - start), scaling,
                            softcap)

    def append_batch(self, layer: int, tails: list[int], at: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """The new tokens of sequences of a batch, k and v [B, H, 1, D], into row `at[b]` of device page `tails[b]`,
        every head, in one `index_copy_` per K and V (the device pool seen as [slots * H * P, D] rows). The index
        is made again only when a tail page changes: between, every row moves on by one a step."""
        H, P, D = self.kv_heads, self.page_size, self.head_dim
        have = self.append_index.get(layer)
        if have is None or have[0] != tails or any(a - b != at[0] - have[1][0] for a, b in zip(at, have[1])):
            index = torch.tensor([(s * H + h) * P + a for s, a in zip(tails, at) for h in range(H)], device=self.device)
            have = self.append_index[layer] = (list(tails), list(at), index)
        ahead = at[0] - have[1][0]
        index = have[2] + ahead if ahead else have[2]
        self.pool_k.view(-1, D).index_copy_(0, index, k.to(self.pool_k.dtype).reshape(-1, D))
        self.pool_v.view(-1, D).index_copy_(0, index, v.to(self.pool_v.dtype).reshape(-1, D))

    def exact_batch(self, layer: int, rows: list[int], views: list[LayerView], query: torch.Tensor, tokens: int,
                    scaling: float) -> torch.Tensor:
        """One layer of sequences of a batch (page table `rows`, their `views`) in one gather and one attention
        call, each sequence attending over the first `tokens` tokens of its view's pages (all of equal count; no
        window, soft-cap or packed pages). query [B, Hq, 1, D] -> [B, 1, Hq, D]."""
        B, H, P, D = len(views), self.kv_heads, self.page_size, self.head_dim
        count = views[0].count
        # A row's slots change only with its table version (or its page count): rebuilt at page boundaries.
        key = (*rows, *((v.version, v.count) for v in views))
        have = self.batch_index.get(layer)
        if have is None or have[0] != key:
            slots = torch.stack([v.slots for v in views]).long()  # [B, count]
            # Row (b, h, c) of the pools seen as [slots * H, P, D]: page c of sequence b, head h; gathered so, the
            # pages are head-major [B, H, count * P, D] with no other copy.
            index = (slots[:, None, :] * H + torch.arange(H, device=self.device)[None, :, None]).flatten()
            have = self.batch_index[layer] = (key, index)
        index = have[1]
        k, v = self._batch_target(index.numel())
        torch.index_select(self.pool_k.view(-1, P, D), 0, index, out=k)
        torch.index_select(self.pool_v.view(-1, P, D), 0, index, out=v)
        k = k.view(B, H, count * P, D).narrow(2, 0, tokens)
        v = v.view(B, H, count * P, D).narrow(2, 0, tokens)
        # One query token: the G query heads of a KV head attend as G query rows of that head (no repeat of K, V).
        q = query.reshape(B, H, query.shape[1] // H, D)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)
        return out.reshape(B, 1, query.shape[1], D)

    def exact_ragged(self, layer: int, rows: list[int], views: list[LayerView], query: torch.Tensor,
                     tokens: list[int], scaling: float, softcap: float | None, window: int | None,
                     partial: bool = False) -> torch.Tensor | am.Partial:
        """One layer of sequences of a batch of any lengths (page table `rows`, their `views`) in one gather and one
        attention pass (`attention_math.segment_attention`): sequence b attends over its view's pages to its token
        `tokens[b]` (exclusive), and with a sliding `window` over the last `window` of them alone. Nothing is
        padded: the gather holds each sequence's own pages, and only its tail page's unfilled rows are hidden.
        Packed host pages (`kv_quant`) are unpacked into the gather in one pass for the batch. query [B, Hq, 1, D]
        -> [B, 1, Hq, D]; with `partial`, (o [B, H, G, D], lse [B, H, G]) in float32 to merge with other pages'
        (views of `in_pools`)."""
        B, H, D = len(views), self.kv_heads, self.head_dim
        # (a layer's partial step keeps its own layout: both may run in one step, for different sequences)
        (index, seq, rel, k, v, host), ahead = self._ragged((layer, partial), rows, views, tokens)
        torch.index_select(self.pool_k, 0, index, out=k)
        torch.index_select(self.pool_v, 0, index, out=v)
        if host is not None and host[0].numel():
            self.unpack_into(k, v, *host)
        # Every sequence gained `ahead` tokens since the layout was made (one a step): a token is hidden from
        # there on, and before the window's start.
        hidden = rel >= ahead
        if window is not None:
            hidden |= rel < ahead - window
        q = query.reshape(B, H, -1, D)
        if partial:
            return am.segment_partial(q, k, v, seq, scaling, softcap, hidden)
        out = am.segment_attention(q, k, v, seq, scaling, softcap, hidden)
        return out.to(query.dtype).view(B, 1, query.shape[1], D)

    def in_pools(self, view: LayerView) -> LayerView:
        """A view of the pages of `view` in the pools alone (those on disk left out), for the ragged step's partial
        over them (`exact_ragged(partial=True)`); each keeps its page number (`numbers`). Made once per view."""
        if view.in_pools is None:
            keep = (view.slots >= 0).nonzero().flatten()  # (a read on the host, when the view is new)
            view.in_pools = LayerView(view.version, view.pages, view.first, view.host, False,
                                      view.slots.index_select(0, keep), keep.numel(), numbers=keep + view.first)
            if self.codec is not None:
                self._packed(view.in_pools, view.in_pools.slots.cpu())
        return view.in_pools

    def _batch_target(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `rows` rows [rows, P, D] of the batch steps' gather targets, grown as needed (at page
        boundaries). Growing drops `exact_ragged`'s layouts, whose targets are views of the old buffers."""
        if self.batch_k.shape[0] < rows:
            with torch.inference_mode(False):
                shape = (rows, self.page_size, self.head_dim)
                self.batch_k = torch.empty(shape, dtype=self.pool_k.dtype, device=self.device)
                self.batch_v = torch.empty_like(self.batch_k)
            self.ragged_index.clear()
        return self.batch_k[:rows], self.batch_v[:rows]

    def _ragged(self, layer: int | tuple, rows: list[int], views: list[LayerView], tokens: list[int],
                window: int | None = None) -> tuple[tuple, int]:
        """`exact_ragged`'s layout of a layer for sequences (page table `rows`, their `views`) holding `tokens`,
        and how many tokens each gained since it was made (one a step). It is made again when a row's pages
        changed (page boundaries), so between them a step builds nothing."""
        key = (*rows, *((v.version, v.count, v.first) for v in views))
        have = self.ragged_index.get(layer)
        ahead = tokens[0] - have[1][0] if have is not None and have[0] == key else -1
        if ahead < 0 or any(t - b != ahead for t, b in zip(tokens, have[1])):
            have = self.ragged_index[layer] = (key, list(tokens), self._ragged_layout(views, tokens, window))
            ahead = 0
        return have[2], ahead

    def _ragged_layout(self, views: list[LayerView], tokens: list[int], window: int | None) -> tuple:
        """The pool slots of every sequence's pages one after another, the sequence of each, each page's token
        positions less its sequence's `tokens` [N, P], and the gather's targets (the window is applied per step)."""
        B, H, P, D = len(views), self.kv_heads, self.page_size, self.head_dim
        counts, firsts, ends = torch.tensor([[v.count for v in views], [v.first for v in views], tokens],
                                            device=self.device)
        seq = torch.repeat_interleave(torch.arange(B, device=self.device), counts)
        n = seq.numel()
        if any(v.numbers is not None for v in views):  # (views of the pages in the pools, `in_pools`)
            page = torch.cat([v.numbers if v.numbers is not None else torch.arange(v.first, v.pages, device=self.device)
                              for v in views])
        else:
            # Page i of the gather is page i - (pages of the sequences before) + first of its sequence.
            page = torch.arange(n, device=self.device) + (firsts - counts.cumsum(0) + counts)[seq]
        rel = page[:, None] * P + torch.arange(P, device=self.device) - ends[seq][:, None]  # [N, P]
        out = tuple(t.view(n, H, P, D) for t in self._batch_target(n * H))
        if self.codec is None:
            return torch.cat([v.slots for v in views]).long(), seq, rel, *out, None
        # Packed host pages: the device's gathered, then the host's unpacked into their places (`unpack_into`).
        base = (counts.cumsum(0) - counts).tolist()
        host = (torch.cat([v.host_pos + b for v, b in zip(views, base)]), torch.cat([v.host_src for v in views]))
        return torch.cat([v.dev_slots for v in views]), seq, rel, *out, host

    def exact_partial(self, layer: int, view: LayerView, q: torch.Tensor, valid: int, scaling: float,
                      softcap: float | None) -> am.Partial:
        """`exact` over the gathered pages of a full-attention layer, as a partial: q [H, M, D] grouped -> (o, lse)
        float32, for a merge with the host's partial."""
        k, v = self.gather(view)
        tokens = (view.count - 1) * self.page_size + valid
        return pages_partial_host(q, k[0, :, :tokens], v[0, :, :tokens], scaling, softcap)

    def sparse(self, layer: int, view: LayerView, query: torch.Tensor, plan, scores: torch.Tensor,
               forced: torch.Tensor, bias: torch.Tensor, free: int, step: int, scaling: float,
               softcap: float | None) -> torch.Tensor:
        """Attention of one token over each head's own blocks: the fixed ones, the `free` best-scored others and
        the tail page's. `plan` is the step's `sparse.BlockPlan`; `scores` [nb, choosers] cover its candidate
        blocks and `bias` [nb, 1] is -inf on the fixed ones. query [1, Hq, 1, D] -> [1, 1, Hq, D]."""
        ids = self.pick(layer, view, plan, scores, forced, bias, free, step)
        count = ids.shape[0]
        k, v = self.gather_blocks(ids, count)
        if self.cache is not None and self.cache.fits(ids.numel()):
            order, out_k, out_v = self.gathered
            self.cache.fill(self.cache.entries_of(layer, self.last_blocks, True), order, self.host_blocks, out_k,
                            out_v, *self.flat)
        tokens = (count - self.per_page) * self.block + plan.valid
        return attend_token(query, k.narrow(2, plan.cut, tokens - plan.cut), v.narrow(2, plan.cut, tokens - plan.cut),
                            scaling, softcap)

    def sparse_batch(self, rows: list[int], views: list[LayerView], query: torch.Tensor, plans: list,
                     forced: list[list[int]], selection, step: int, scaling: float,
                     softcap: float | None, partial: bool = False):
        """`sparse` for sequences of a batch (page table `rows`, their `views` and `sparse.BlockPlan`s, the fixed
        blocks of each) in one pass: the blocks chosen together (`_batch_blocks`), one gather of each head's blocks,
        and one attention pass with the softmax reduced per sequence (`attention_math.segment_attention`), the
        padding, the tail's unfilled rows and the window's cut hidden. query [B, Hq, 1, D] -> [B, 1, Hq, D].

        With `partial`, for views with pages on disk: the chosen blocks on disk (unified id < 0) are hidden from the
        head that chose them too, and the result is (the partial (o [B, heads, M, D], lse [B, heads, M]) in float32,
        the unified ids [B, E, heads], the blocks [B, E, choosers]), for the runtime to attend those blocks as they
        load and merge them in; the block cache is not filled."""
        B, Hq, D, Bk = len(views), self.q_heads, self.head_dim, self.block
        ids, pad, valid, cut, blocks = self._batch_blocks(rows, views, query, plans, forced, selection, step, scaling)
        E = ids.shape[1]
        k, v = (torch.empty((ids.numel(), Bk, D), dtype=self.pool_k.dtype, device=self.device) for _ in range(2))
        self.read_blocks(ids.view(-1).clamp(min=0) if partial else ids.view(-1), k, v)
        if not partial and self.cache is not None and self.cache.fits(ids.numel()):  # every host block, copied
            self.cache.fill(self.cache.entries_batch(torch.tensor(rows, device=self.device), blocks),
                            ids.view(-1), self.host_blocks, k, v, *self.flat)
        k, v = k.view(B * E, self.heads, Bk, D), v.view(B * E, self.heads, Bk, D)
        # Hidden: padding entries, the tail's rows from `valid` on, and the first block's tokens before `cut`.
        e = torch.arange(E, device=self.device)[None, :, None]
        t = torch.arange(Bk, device=self.device)[None, None, :]
        tail = E - self.per_page
        hidden = pad[:, :, None] | ((e >= tail) & ((e - tail) * Bk + t >= valid[:, :, None]))
        hidden = hidden | ((e == 0) & (t < cut[:, :, None]))  # [B, E, Bk]
        seq = torch.arange(B, device=self.device).repeat_interleave(E)
        q = query.reshape(B, self.heads, -1, D)
        if partial:
            hidden = hidden[:, :, None, :] | (ids < 0)[:, :, :, None]  # [B, E, heads, Bk]
            return am.segment_partial(q, k, v, seq, scaling, softcap, hidden.view(B * E, self.heads, Bk)), ids, blocks
        out = am.segment_attention(q, k, v, seq, scaling, softcap, hidden.view(B * E, Bk))
        return out.to(query.dtype).view(B, 1, Hq, D)

    def _batch_blocks(self, rows: list[int], views: list[LayerView], query: torch.Tensor, plans: list,
                      forced: list[list[int]], selection, step: int, scaling: float) -> tuple[torch.Tensor, ...]:
        """The blocks sequences of a batch attend in a sparse step, chosen together: one scoring of every sequence's
        candidate blocks (`selection.scores_batch`) and one top-k. Sequences choose different numbers of blocks:
        each one's list is laid out as [fixed, padded to the most fixed | top-k, padded to the most chosen | the
        tail page's R blocks], the padding reading the tail's first block. Their uses are recorded, and the blocks
        read from the host pool counted. Returns each gathered head's unified block ids [B, E, heads], the padding
        [B, E] (bool), each sequence's tail tokens and first block's cut [B, 1], and the blocks [B, E, choosers].
        Host work: a few lists of the plans' integers."""
        B, H, Hq, D = len(views), self.kv_heads, self.q_heads, self.head_dim
        R, C, dev = self.per_page, self.choosers, self.device
        frees = [max(p.k_blocks - len(f), 0) for p, f in zip(plans, forced)]
        NF, F, NB = max(len(f) for f in forced), max(frees), max(p.nb for p in plans)
        E = NF + F + R  # blocks per sequence and chooser
        bases = [0]
        for v in views[:-1]:
            bases.append(bases[-1] + v.blockrow.shape[0])
        meta = torch.tensor([[p.fb for p in plans], [p.nb for p in plans], [len(f) for f in forced], frees,
                             [p.valid for p in plans], [p.cut for p in plans], [p.last * R for p in plans], bases,
                             rows], device=dev)
        fb, nb, nf, free, valid, cut, tail, base, row = meta[:, :, None]  # each [B, 1]
        fixed = torch.tensor([f + [p.last * R] * (NF - len(f)) for p, f in zip(plans, forced)], dtype=torch.long,
                             device=dev).view(B, NF)
        # The chosen blocks per sequence and chooser: fixed, top-k, tail.
        parts = [fixed[:, :, None].expand(B, NF, C)]
        if F:
            q = query.reshape(B, H, Hq // H, D).float()
            scores, cand, pad = selection.scores_batch(rows, row[:, 0], q, fb[:, 0], nb[:, 0], NB, scaling)
            if self.keep_mass:
                self.mass.view(-1, C).index_add_(0, cand.view(-1), scores.view(-1, C))
            bias = torch.where(pad, float("-inf"), 0.0)
            at = [b * NB + i - p.fb for b, (p, f) in enumerate(zip(plans, forced)) for i in f]
            if at:
                bias.view(-1).index_fill_(0, torch.tensor(at, device=dev), float("-inf"))
            top = torch.topk(scores + bias[:, :, None], F, dim=1).indices + fb[:, :, None]  # [B, F, C]
            extra = torch.arange(F, device=dev)[None, :, None] >= free[:, :, None]  # beyond a sequence's own
            parts.append(torch.where(extra, tail[:, :, None], top))
        parts.append((tail + torch.arange(R, device=dev))[:, :, None].expand(B, R, C))
        blocks = torch.cat(parts, dim=1)  # [B, E, C]
        self.use_step.view(-1).index_fill_(0, (row[:, :, None] * self.use_step.shape[1] + blocks).view(-1), step)
        # Each gathered head's unified block ids, through the views' block rows laid one after another.
        at = (blocks + base[:, :, None]).view(B * E, C)
        table = torch.cat([v.blockrow for v in views])
        ids = table.index_select(0, at.view(-1)) if C == 1 else table.gather(0, at)  # [B * E, heads]
        self.count_reads(ids)
        e = torch.arange(E, device=dev)[None, :]
        pad = ((e < NF) & (e >= nf)) | ((e >= NF) & (e < NF + F) & (e - NF >= free))  # [B, E]
        return ids.view(B, E, self.heads), pad, valid, cut, blocks

    def choose(self, layer: int, view: LayerView, fb: int, scores: torch.Tensor, forced: torch.Tensor,
               bias: torch.Tensor, free: int, step: int) -> torch.Tensor:
        """Blocks to attend per chooser (int64 [count, choosers] on the device: the fixed ones first, the tail's
        last), and their use recorded: the blocks attended (for LRU, by page at the next boundary) and, where the
        eviction policy asks for it, the predicted mass of every candidate block."""
        if self.keep_mass:
            self.mass_rows[layer].narrow(0, fb, scores.shape[0]).add_(scores)
        blocks = top_blocks(forced, scores, bias, free, fb, view.tail_blocks)
        self.use_rows[layer].index_fill_(0, blocks.view(-1), step)
        self.last_blocks = blocks
        return blocks

    def pick(self, layer: int, view: LayerView, plan, scores: torch.Tensor, forced: torch.Tensor,
             bias: torch.Tensor, free: int, step: int, count_reads: bool = True) -> torch.Tensor:
        """`choose`, then the unified block ids [count, heads] each gathered head reads, the host pool's counted
        (unless `count_reads` is False: the caller counts them)."""
        blocks = self.choose(layer, view, plan.fb, scores, forced, bias, free, step)
        if self.choosers == 1:
            ids = view.blockrow.index_select(0, blocks.view(-1))
        else:
            ids = view.blockrow.gather(0, blocks)
        if count_reads:
            self.count_reads(ids)
        return ids

    def count_reads(self, ids: torch.Tensor) -> None:
        """Adds the blocks of `ids` in the host pool to the step's count of host reads (on the device)."""
        self.host_reads.add_((ids >= self.host_blocks).sum())

    def gather_blocks(self, ids: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks at unified ids [count, heads] -> K and V [1, heads, count * B, D], each head its own blocks."""
        views = self.bk_views.get(count)
        if views is None:
            n = count * self.heads
            if self.bk.shape[0] < n:
                with torch.inference_mode(False):
                    shape = (max(n, self.bk.shape[0] + self.bk.shape[0] // 4), self.block, self.head_dim)
                    self.bk = torch.empty(shape, dtype=self.pool_k.dtype, device=self.device)
                    self.bv = torch.empty_like(self.bk)
                self.bk_views = {}
            shape = (1, self.heads, count * self.block, self.head_dim)
            out_k, out_v = self.bk[:n], self.bv[:n]
            views = self.bk_views[count] = (out_k, out_v, out_k.view(shape), out_v.view(shape))
        out_k, out_v, k, v = views
        order = ids.t().reshape(-1)  # head-major
        self.gathered = (order, out_k, out_v)
        self.read_blocks(order, out_k, out_v)
        return k, v

    def read_blocks(self, ids: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
        """Blocks at unified ids [n] -> out_k, out_v [n, B, D]."""
        if self.codec is None:
            torch.index_select(self.flat[0], 0, ids, out=out_k)
            torch.index_select(self.flat[1], 0, ids, out=out_v)
            return
        # Packed host pool: device blocks in place (host entries read block 0), then every entry unpacked from
        # the host pool (device entries read host block 0) and kept where the entry is the host's. Which entries
        # are the host's is known on the device only: both run whatever the choice, and the host reads nothing.
        on_device = ids.clamp(max=self.host_blocks - 1)
        torch.index_select(self.flat[0], 0, on_device, out=out_k)
        torch.index_select(self.flat[1], 0, on_device, out=out_v)
        if self.host_k is not None:
            kb, vb = self.codec.decode_blocks(self.host_k, self.host_v, (ids - self.host_blocks).clamp(min=0),
                                              self.block, out_k.dtype)
            from_host = (ids >= self.host_blocks).view(-1, 1, 1)
            torch.where(from_host, kb, out_k, out=out_k)
            torch.where(from_host, vb, out_v, out=out_v)

    def gather(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor]:
        """The view's gathered pages -> K and V [1, H, count * P, D], in page order."""
        count = view.count
        views = self.ws_views.get(count)
        if views is None:
            views = self.ws_views[count] = tuple(
                (ws[:, :count].permute(1, 0, 2, 3),
                 ws[:, :count].reshape(1, self.kv_heads, count * self.page_size, self.head_dim))
                for ws in (self.ws_k, self.ws_v))
        (k_out, k), (v_out, v) = views
        # One pass each: page-major rows straight into the head-major workspace through a permuted view.
        slots = view.slots if self.codec is None else view.dev_slots
        torch.index_select(self.pool_k, 0, slots, out=k_out)
        torch.index_select(self.pool_v, 0, slots, out=v_out)
        if self.codec is not None and view.host:  # packed host pages, unpacked into their rows
            self.unpack_into(k_out, v_out, view.host_pos, view.host_src)
        return k, v

    def unpack_into(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, src: torch.Tensor) -> None:
        """Packed host pages `src` (host slots), unpacked into pages `pos` of k, v [n, H, P, D]."""
        hk, hv = self.codec.decode(self.host_k.index_select(0, src), self.host_v.index_select(0, src), k.dtype)
        k.index_copy_(0, pos, hk)
        v.index_copy_(0, pos, hv)

    def absorb(self, eviction) -> torch.Tensor:
        """Hands the uses recorded since the last boundary to the eviction policy's host tables (a device read,
        at page boundaries only), starts a new record, and returns the step each page was last used in (-1: not
        since the last boundary), on the host."""
        used = self.use_step.view(self.layers, self.max_pages, self.per_page).amax(-1).cpu()
        eviction.absorb(used, self.mass.view(self.layers, self.max_pages, -1).sum(-1).cpu())
        self.use_step.fill_(NONE)
        self.mass.zero_()
        return used


class KernelDecode(DeviceDecode):
    """The decode step with the Triton kernels, for CUDA (and, in tests, the CPU under Triton's interpreter).

    The device pool and the pinned host pool are separate allocations here. The device pool's tensor has
    `workspace` rows after the device tier's `split` slots; the kernels attend over slots of that tensor.
      exact:  the layer's host pages are gathered (one launch, reading pinned memory in place) into workspace rows
              of the layer's parity; on CUDA this happens on a side stream while the layer before computes, and
              the compute stream waits on the layer's event. Paged decode then reads device pages in place and
              host pages from the workspace.
      sparse: each head's chosen blocks are gathered from both pools into a block workspace (one launch); paged
              decode reads it as a pool of `select_block`-token pages, with the block count, the last block's fill
              and the window's start in a device tensor, so that nothing about the selection is read on the host.
      batch:  the sequences a batch's step serves, in one launch of the ragged paged decode, which reads device
              pages (or, sparse, each head's chosen blocks) in place, and host ones in place from the pinned host
              pool (no workspace row).
    """

    def __init__(self, pools: tuple[torch.Tensor, torch.Tensor], split: int, workspace: int, layers: int,
                 max_pages: int, q_heads: int, kv_heads: int, device: torch.device, block: int | None = None,
                 head_selection: str = "kv", codec=None, cache_pages: int = 0):
        # Per block count: the workspace's rows as the gather writes them (`_bit_views`); the base class's
        # constructor resizes, which clears them.
        self.bits_out: dict[int, tuple] = {}
        super().__init__(pools, split, layers, max_pages, q_heads, kv_heads, device, block, head_selection, codec,
                         cache_pages)
        import importlib

        # Modules by path: the package re-exports functions of the same names.
        self.kgather = importlib.import_module("offload.kernels.gather")
        self.paged = importlib.import_module("offload.kernels.paged_decode")
        self.kcache = importlib.import_module("offload.kernels.cache")
        self.kappend = importlib.import_module("offload.kernels.append")
        self.workspace, self.half = workspace, workspace // 2
        # Attached at the first spill; packed host pools go through the dequantizing gathers.
        if codec is None:
            self.host_k = self.host_v = pools[0][:0]
        else:
            self.host_k = torch.empty((0, codec.k_bytes), dtype=torch.uint8, device=device)
            self.host_v = torch.empty((0, codec.v_bytes), dtype=torch.uint8, device=device)
        self.rows_ws = torch.arange(split, split + workspace, dtype=torch.int32, device=device)
        self.paged_out: dict = {}  # paged decode's float32 buffers, by split count and query shape
        self.block_out = None  # the same for the sparse step's static launch, allocated at its first call
        if self.selecting:  # the blocks a sparse step gathers, [workspace * R, heads, B, D], as a pool of B-token pages
            shape = (workspace * self.per_page, self.heads, self.block, self.head_dim)
            self.bk, self.bv = (torch.empty(shape, dtype=pools[0].dtype, device=device) for _ in range(2))
            self.rows_blocks = torch.arange(shape[0], dtype=torch.int32, device=device)
            self._bit_views()
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.side = torch.cuda.Stream(device)
            self.compute = torch.cuda.current_stream(device)
        self.ready: list[object | None] = [None] * layers  # per layer: the event of its gather ahead, if any
        self.ahead: set[int] = set()  # the layers that have had one since they were last dropped

    def resize(self, layers: int) -> None:
        super().resize(layers)
        self.ready = [None] * layers
        self.ahead = set()
        self.bits_out.clear()  # they hold rows of the cache's scratch, made again

    def append(self, slot: int, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A decode step's token k, v [1, H, 1, D] into row `row` of device page `slot`, in one launch."""
        k, v = k.to(self.pool_k.dtype), v.to(self.pool_k.dtype)  # (as they are, in the model's dtype)
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        self.kappend.append_token(self.pool_k, self.pool_v, slot, row, k, v)

    def attach_host(self, k: torch.Tensor, v: torch.Tensor) -> None:
        super().attach_host(k, v)
        if self.selecting:
            self._bit_views()

    def _bit_views(self) -> None:
        """Integer views of the block workspace, the pools and the host pool, which the block gather and the block
        cache copy as bits: made once (and again when the host pool is attached), not at every step."""
        self.bits_out.clear()
        if self.codec is not None:  # the packed gather writes floats
            self.bits_flat = self.flat
            return
        self.bits = tuple(as_bits(t) for t in (self.bk, self.bv, self.pool_k, self.pool_v, self.host_k, self.host_v))
        self.bits_flat = tuple(t.view(-1, self.block, self.head_dim) for t in self.bits[2:4])

    def serves_exact(self, view: LayerView) -> bool:
        """Whether an exact step of the layer fits: its host pages fit the workspace rows of its parity."""
        return not view.lower and view.host <= self.half

    def _reserve(self, pages: int) -> None:
        """The workspace rows are fixed: a layer needing more is served by the streaming path (`view.lower`)."""

    def view(self, layer: int, table, pages: int) -> LayerView:
        v = self.views[layer]
        if v is not None and v.version == table.version[layer] and v.pages == pages:
            return v
        v = super().view(layer, table, pages)
        dev, host = table.slot["device"][layer, v.first:pages], table.slot["host"][layer, v.first:pages]
        if v.keep is not None:  # the pages the host attends are neither gathered nor attended here
            dev, host = dev[v.keep], host[v.keep]
        on_host = (dev < 0) & (host >= 0)
        # Attention slots: device pages in place, host pages in the workspace rows of the layer's parity.
        attn = dev.clone()
        base = self.split + (layer % 2) * self.half
        attn[on_host] = base + torch.arange(v.host, dtype=torch.int32)
        v.attn = attn.to(self.device)
        # Unified slots, all in the host pool; host slots for the dequantizing gather.
        v.gather_src = (host[on_host] + (self.split if self.codec is None else 0)).to(self.device)
        v.gather_dst = (base, v.host)
        self.ready[layer] = None
        return v

    def forget(self) -> None:
        super().forget()
        self.ready = [None] * self.layers
        self.ahead = set()

    def _gather_into(self, rows: tuple[int, int], slots: torch.Tensor) -> None:
        base, n = rows
        if self.codec is not None:
            self.kgather.gather_pages_packed(self.pool_k[base:base + n], self.pool_v[base:base + n], self.host_k,
                                             self.host_v, slots, self.codec)
            return
        self.kgather.gather_pages(self.pool_k[base:base + n], self.pool_v[base:base + n], self.pool_k, self.pool_v,
                                 self.host_k, self.host_v, slots, self.split)

    def prefetch(self, layer: int, table, pages: int) -> None:
        """CUDA, exact mode: starts gathering `layer`'s host pages on the side stream, when its view holds for its
        next step (`pages` pages, no page boundary in between)."""
        v = self.views[layer]
        if (not self.cuda or v is None or v.version != table.version[layer] or v.pages != pages
                or not self.serves_exact(v) or not v.host or self.ready[layer] is not None):
            return
        self.side.wait_stream(self.compute)  # the rows may still be read by the layer two before
        with torch.cuda.stream(self.side):
            self._gather_into(v.gather_dst, v.gather_src)
            event = torch.cuda.Event()
            event.record()
        self.ready[layer] = event
        self.ahead.add(layer)

    def exact(self, layer: int, view: LayerView, query: torch.Tensor, valid: int, start: int, scaling: float,
              softcap: float | None) -> torch.Tensor:
        q = am.group_queries(query, self.kv_heads)
        o, _ = self.exact_partial(layer, view, q, valid, scaling, softcap, start)
        # A copy: the kernel's buffers are the next call's too (another row of a batch keeps this one's result).
        return am.ungroup_output(o, self.q_heads, 1).to(query.dtype, copy=True)

    def exact_partial(self, layer: int, view: LayerView, q: torch.Tensor, valid: int, scaling: float,
                      softcap: float | None, start: int = 0) -> am.Partial:
        skip = start // self.page_size  # pages still held before the window's first
        if view.host:
            event, self.ready[layer] = self.ready[layer], None
            if event is not None:
                self.compute.wait_event(event)
            else:
                self._gather_into(view.gather_dst, view.gather_src)
        return self.paged.paged_decode(q.to(self.pool_k.dtype), self.pool_k, self.pool_v, view.attn[skip:], valid,
                                       scaling, softcap, start % self.page_size, workspaces=self.paged_out)

    def exact_batch(self, layer: int, rows: list[int], views: list[LayerView], query: torch.Tensor, tokens: int,
                    scaling: float) -> torch.Tensor:
        return self.exact_ragged(layer, rows, views, query, [tokens] * len(views), scaling, None, None)

    def exact_ragged(self, layer: int, rows: list[int], views: list[LayerView], query: torch.Tensor,
                     tokens: list[int], scaling: float, softcap: float | None, window: int | None,
                     partial: bool = False) -> torch.Tensor | am.Partial:
        """The batch's step in one launch (`kernels.paged_decode.paged_decode_ragged`, and one merge launch when
        its pages are split): every sequence over its own pages, device pages read in place and host pages read
        in place from the pinned host pool, so no workspace row is used whatever the batch holds. With `partial`,
        (o [B, H, G, D], lse [B, H, G]) in float32, in buffers the next launch of the same shape overwrites."""
        if self.cuda:  # gathers started ahead for these rows: their workspace rows are not read now
            self._drop_ahead(rows)
        pages, ahead = self._ragged((layer, partial), rows, views, tokens, window)
        host_k, host_v, split = self.host_k, self.host_v, self.split
        if self.codec is not None:
            # Packed host pages: unpacked by one launch into the workspace rows, which the layout gives them in
            # place of host slots, and every slot is then the device pool's.
            pages, src, n = pages
            self._drop_ahead(self.ahead)
            self.ahead.clear()
            if n:
                self.kgather.gather_pages_packed(self.pool_k[split:split + n], self.pool_v[split:split + n],
                                                 self.host_k, self.host_v, src, self.codec)
            host_k = host_v = self.pool_k[:0]
            split = self.pool_k.shape[0]
        B, D = len(views), self.head_dim
        q = query.reshape(B, self.kv_heads, -1, D).to(self.pool_k.dtype)
        o, lse = self.paged.paged_decode_ragged(q, self.pool_k, self.pool_v, host_k, host_v, split,
                                                pages, ahead, scaling, softcap, workspaces=self.paged_out)
        if partial:
            return o, lse
        return o.view(B, 1, query.shape[1], D).to(query.dtype, copy=True)  # (the buffers are the next call's)

    def _ragged_layout(self, views: list[LayerView], tokens: list[int], window: int | None):
        """`ragged_pages` of the views. A view of the pages in the pools (`in_pools`, some pages left out on disk)
        is laid out as consecutive pages ending at its tail, which places the tail's tokens; the window's start,
        when its first page is among them, is placed on that page (the pages after it lie wholly in the window,
        whatever their numbers)."""
        P, K = self.page_size, self.paged
        firsts = [v.pages - v.count if v.numbers is not None else v.first for v in views]
        if self.codec is None:
            slots = [v.slots for v in views]
        else:  # packed host pages read from workspace rows, one after another over the sequences
            slots, n = [], 0
            for v in views:
                s, m = v.dev_slots.to(torch.int32), v.host_pos.numel()
                if m:
                    s = s.index_put((v.host_pos,), torch.arange(self.split + n, self.split + n + m,
                                                                dtype=torch.int32, device=self.device))
                slots.append(s)
                n += m
        pages = K.ragged_pages(slots, firsts, tokens, P, window)
        if window is not None and any(v.numbers is not None for v in views):
            low = [-window if v.numbers is None else
                   (-window + (f - v.first) * P if v.count and int(v.numbers[0]) == v.first else K.EVERY)
                   for v, f in zip(views, firsts)]
            pages = pages._replace(low=torch.tensor(low, dtype=torch.int32).to(pages.low.device))
        if self.codec is None:
            return pages
        return pages, torch.cat([v.host_src for v in views]).to(torch.int32), n

    def _drop_ahead(self, layers) -> None:
        """CUDA: the gathers the side stream started ahead for `layers` (`prefetch`) are waited for and dropped:
        their workspace rows are not read, or are written again; those layers gather on the compute stream when
        they run alone."""
        for r in layers:
            event, self.ready[r] = self.ready[r], None
            if event is not None:
                self.compute.wait_event(event)

    def sparse_batch(self, rows: list[int], views: list[LayerView], query: torch.Tensor, plans: list,
                     forced: list[list[int]], selection, step: int, scaling: float,
                     softcap: float | None, partial: bool = False):
        """The batch's sparse step in one launch of the ragged paged decode over blocks: the blocks chosen together
        (`_batch_blocks`), each sequence's list made compact on the device (its padding moved last, out of its
        count), each head's blocks read in place from the device pool or the pinned host pool (no gather, no
        workspace row). With `partial` (views with pages on disk, whose blocks a head may choose), packed host
        pages (`kv_quant`) or a block cache (filled from the blocks read), the torch step's pass over one block
        gather (`read_blocks`: one launch, or for packed host blocks the torch step's unpacking)."""
        if partial or self.codec is not None or self.cache is not None:
            return super().sparse_batch(rows, views, query, plans, forced, selection, step, scaling, softcap, partial)
        B, Bk, D, dev = len(views), self.block, self.head_dim, self.device
        ids, pad, valid, cut, _ = self._batch_blocks(rows, views, query, plans, forced, selection, step, scaling)
        E = ids.shape[1]
        order = torch.sort(pad.to(torch.int8), dim=1, stable=True).indices  # each sequence's padding last
        ids = ids.gather(1, order[:, :, None].expand_as(ids))
        count = E - pad.sum(1, keepdim=True)  # [B, 1]
        # Token t of entry i at rel = i*Bk + t + shift: the tail's R blocks end the list, its token `valid` at 0;
        # the first entry's tokens before `cut` below `low`.
        shift = -(count - self.per_page) * Bk - valid
        low = cut + shift
        meta = torch.cat([torch.arange(0, B * E, E, device=dev)[:, None], count, shift, low], 1).to(torch.int32)
        begin, count, shift, low = meta.t().contiguous()
        pages = self.paged.RaggedPages(ids.view(-1).to(torch.int32), begin, count, shift, low, E)
        q = query.reshape(B, self.heads, -1, D).to(self.pool_k.dtype)
        o, _ = self.paged.paged_decode_ragged(q, self.pool_k, self.pool_v, self.host_k, self.host_v,
                                              self.host_blocks, pages, 0, scaling, softcap, block=Bk,
                                              workspaces=self.paged_out)
        return o.view(B, 1, self.q_heads, D).to(query.dtype, copy=True)

    def read_blocks(self, ids: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
        """Blocks at unified ids [n] -> out_k, out_v [n, B, D], from the device pool or the pinned host pool in one
        launch (packed host pools as the torch step unpacks them)."""
        if self.codec is not None:
            super().read_blocks(ids, out_k, out_v)
            return
        n, shape = ids.numel(), (ids.numel(), 1, self.block, self.head_dim)
        self.kgather.gather_blocks(as_bits(out_k).view(shape), as_bits(out_v).view(shape), *self.bits[2:],
                                   ids.view(n, 1).to(torch.int32), self.split)

    def sparse(self, layer: int, view: LayerView, query: torch.Tensor, plan, scores: torch.Tensor,
               forced: torch.Tensor, bias: torch.Tensor, free: int, step: int, scaling: float,
               softcap: float | None) -> torch.Tensor:
        ids = self.pick(layer, view, plan, scores, forced, bias, free, step, count_reads=False)
        count = ids.shape[0]  # at most the block workspace's rows: the runtime streams a step that needs more
        B = self.block
        tail = -(-plan.valid // B)  # the tail's blocks holding tokens
        ids32 = ids.to(torch.int32)
        # Integer views of the outputs (and, below, of the pools) kept from step to step: the gathers copy bits.
        out = self.bits_out.get(count)
        if out is None:
            n, dims = count * self.heads, (-1, B, self.head_dim)
            bk, bv = (self.bk, self.bv) if self.codec is not None else self.bits[:2]
            out = self.bits_out[count] = (bk[:count], bv[:count], bk[:count].view(dims), bv[:count].view(dims),
                                          self.cache.dst[:n] if self.cache is not None else None)
        if self.codec is None:
            self.kgather.gather_blocks(out[0], out[1], *self.bits[2:], ids32, self.split)
        else:
            self.kgather.gather_blocks_packed(out[0], out[1], self.pool_k[:self.split], self.pool_v[:self.split],
                                              self.host_k, self.host_v, ids32, self.split, self.codec)
        if self.cache is not None and self.cache.fits(ids.numel()):
            # The blocks read from the host pool copied into the cache (block-major, as the gather wrote them),
            # and counted, in two launches.
            self.kcache.fill(self.cache, layer, self.last_blocks, ids32, self.host_blocks, out[2], out[3],
                             *self.bits_flat, self.host_reads, out[4])
        else:
            self.count_reads(ids)
        # (n, valid_last, start) as the kernel's arguments: nothing written to the device from the host.
        meta = (count - self.per_page + tail, plan.valid - (tail - 1) * B, plan.cut)
        q = am.group_queries(query, self.heads)
        if self.block_out is None:
            self.block_out = self.paged.paged_decode_workspace(q, self.rows_blocks.numel())
        o, _ = self.paged.paged_decode_static(q, self.bk, self.bv, self.rows_blocks, meta, scaling, softcap,
                                              out=self.block_out)
        return am.ungroup_output(o, self.q_heads, 1).to(query.dtype, copy=True)  # as `exact`
