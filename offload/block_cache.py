"""Sparse mode's block cache: device copies of the blocks a decode step read from the host pool.

A sparse step attends each head's own blocks of `select_block` tokens, spread over many pages, while the device
pool holds whole pages. The blocks on host pages cross the link at every step that chooses them, and steps in a row
choose mostly the same ones. The cache keeps a copy of each block the step read from the host pool, in device
slots set aside for it (`block_cache`), so the next steps that choose it read it on the device.

Entries are (layer row, block, head). `row` maps each entry to the unified block id a step reads: its home (a
device or host pool block, from the layer's view) or its copy in the cache. A step's gather reads `row`, then
`fill` copies the entries it read from the host pool into the next slots of a ring, with the copies it read in
the ring's older half (a second chance: a block chosen step after step stays, and copies read while still new
take no slot), taking each slot's old entry back to its home. Everything is a tensor op with a fixed count per step
and no read on the host:
  take = from the host, or a copy aged past half the ring -> those copies' old slots freed -> inclusive cumsum ->
  ring position (ptr + rank - 1) mod entries, the rest to the spare slot -> old owners back home -> new owners
  point at their slots -> K and V copied from the gathered blocks.
The last slot of the ring and the last entry of `row` are spares that hits write to, so no step needs a mask's
count on the host. The ring holds at least as many slots as a step can read blocks (`fits`), so a step never
writes a slot twice. Host pages are full and never change, so a copy stays valid until the sequence ends
(`forget`); a block whose page later moves to the device keeps its copy until the ring passes it.
"""

from __future__ import annotations

import torch

NONE = -1


class BlockCache:
    def __init__(self, first: int, entries: int, layers: int, blocks: int, heads: int, device: torch.device):
        """`entries` + 1 unified block ids from `first` on hold the copies (the last is the spare); `layers` rows of
        `blocks` blocks per head, `heads` gathered heads."""
        self.first, self.entries = first, entries
        self.blocks, self.heads, self.device = blocks, heads, device
        self.spare_slot = entries
        self.resize(layers)

    def resize(self, layers: int) -> None:
        """Tables for `layers` rows (one per layer and sequence of a batch); the cache starts empty."""
        with torch.inference_mode(False):  # updated in place in every step, inside inference_mode() or not
            self._tables(layers)

    def _tables(self, layers: int) -> None:
        self.layers = layers
        n = layers * self.blocks * self.heads
        self.spare_entry = n
        # Per entry: the block id its home holds, and the one a step reads (home or copy); the spare entry last.
        self.home = torch.full((n + 1,), NONE, dtype=torch.int64, device=self.device)
        self.row = self.home.clone()
        self.owner = torch.full((self.entries + 1,), n, dtype=torch.int64, device=self.device)  # per slot
        self.ptr = torch.zeros((), dtype=torch.int64, device=self.device)  # slots handed out so far, minus one
        self.ptr -= 1
        self.slot_ids = torch.arange(self.first, self.first + self.entries + 1, device=self.device)
        self.dst = torch.empty(self.entries + 1, dtype=torch.int64, device=self.device)  # the kernels' fill
        # Per row: entry index of (block 0, head h) as [heads, 1] (for head-major steps) and [1, heads].
        offsets = (torch.arange(layers, device=self.device)[:, None] * (self.blocks * self.heads)
                   + torch.arange(self.heads, device=self.device))
        self.offset_hm, self.offset_bm = list(offsets[:, :, None]), list(offsets[:, None, :])
        self.rows = self.row[:n].view(layers, self.blocks, self.heads)  # a row's blocks for the views
        self.homes = self.home[:n].view(layers, self.blocks, self.heads)

    def forget(self) -> None:
        """A new sequence: every copy dropped; entries read their homes, which the views set again when they are
        rebuilt."""
        self.row.copy_(self.home)
        self.owner.fill_(self.spare_entry)
        self.ptr.fill_(-1)

    def drop_rows(self, rows: torch.Tensor) -> None:
        """The copies of rows `rows` dropped (beam search: those rows go on from other rows' blocks). Host work, at
        a reorder."""
        owners = self.owner[:self.entries]
        mine = torch.isin(owners // (self.blocks * self.heads), rows.to(self.device)).nonzero().flatten()
        if mine.numel():
            entries = owners[mine]
            self.row.index_copy_(0, entries, self.home.index_select(0, entries))
            self.owner.index_fill_(0, mine, self.spare_entry)

    def fits(self, reads: int) -> bool:
        """Whether a step that reads `reads` blocks can copy them all (host ints only)."""
        return reads <= self.entries

    def set_home(self, layer: int, home: torch.Tensor) -> torch.Tensor:
        """A rebuilt view's block ids [blocks, heads] of `layer`: recorded as the homes, and the rows the steps read
        returned (its entries with a copy in the cache read the copy). At page boundaries only."""
        n = home.shape[0]
        self.homes[layer, :n].copy_(home)
        rows = self.rows[layer]
        rows[:n].copy_(home)
        lo = layer * self.blocks * self.heads
        owners = self.owner[:self.entries]
        mine = ((owners >= lo) & (owners < lo + n * self.heads)).nonzero().flatten()
        if mine.numel():
            self.row.index_copy_(0, owners[mine], self.slot_ids[mine])
        return rows[:n]

    def entries_of(self, layer: int, blocks: torch.Tensor, head_major: bool) -> torch.Tensor:
        """Entry indices, flat, of the blocks [count, choosers] a step of `layer` chose, in the order its gather
        wrote them: head-major (every block of head 0, then head 1, ...) or block-major."""
        if head_major:
            return torch.add(self.offset_hm[layer], blocks.t(), alpha=self.heads).reshape(-1)
        return torch.add(self.offset_bm[layer], blocks, alpha=self.heads).view(-1)

    def entries_batch(self, rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Entry indices, flat, of the blocks [B, E, choosers] that rows `rows` [B] (sequences of a batch) chose in
        one step, block-major per row, as the batch's gather wrote them."""
        B, E, _ = blocks.shape
        head = torch.arange(self.heads, device=self.device)
        return ((rows.view(B, 1, 1) * self.blocks + blocks.expand(B, E, self.heads)) * self.heads + head).view(-1)

    def fill(self, entries: torch.Tensor, ids: torch.Tensor, host_blocks: int, k: torch.Tensor, v: torch.Tensor,
             flat_k: torch.Tensor, flat_v: torch.Tensor) -> None:
        """After a step's gather: the `entries` [n] it read from the unified block `ids` [n] (the host pool's at
        >= `host_blocks`, the cache's from `first`), with their K and V [n, B, D], copied into the next slots of the
        ring in `flat_k`/`flat_v` (the pools as [blocks, B, D]). Copies the step read in the ring's older half move
        to its head too."""
        slot = ids - self.first
        cached = (ids >= self.first) & (ids < host_blocks)
        # A copy read in the older half of the ring moves to its head (second chance): blocks chosen step after
        # step stay, and the copies read in the newer half take no slot.
        aged = cached.logical_and_((self.ptr - slot).remainder_(self.entries) >= self.entries // 2)
        take = (ids >= host_blocks).logical_or_(aged)
        self.owner.index_fill_(0, torch.where(aged, slot, self.spare_slot), self.spare_entry)  # their old slots
        pos = take.cumsum(0).add_(self.ptr).remainder_(self.entries)
        pos = torch.where(take, pos, self.spare_slot)
        old = self.owner.index_select(0, pos)
        self.row.index_copy_(0, old, self.home.index_select(0, old))
        slots = self.slot_ids.index_select(0, pos)
        new = torch.where(take, entries, self.spare_entry)
        self.row.index_copy_(0, new, slots)
        self.owner.index_copy_(0, pos, new)
        flat_k.index_copy_(0, slots, k)
        flat_v.index_copy_(0, slots, v)
        self.ptr.add_(take.sum())
