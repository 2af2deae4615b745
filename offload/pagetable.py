"""The page table: where each page of each layer lives. The only state shared by deciding and moving.

Page p of layer l holds tokens [p*P, (p+1)*P). A page lives in one or more tiers at once: full pages never change,
so a copy of a full page in a lower tier stays valid, and dropping the device copy of such a page costs nothing.
The last page of a layer (the "tail") is still being filled and always lives on the device only.
On a layer with a sliding window, the pages before `first[layer]` fell out of the window for good: they were
released from every tier and live nowhere. So did every page of a finished sequence of a batch (first = pages).
A batch has a row per layer and sequence (offload/batch.py); "layer" below means a row.

All fields are CPU tensors of shape [layers, max_pages] so that policies work with tensor ops, not Python loops.
"""

from __future__ import annotations

import torch

NONE = -1
TIERS = ("device", "host", "disk")


def window_start(window: int | None, n: int, page_size: int) -> tuple[int, int]:
    """(page, offset) of the first token that the query at position n-1 sees with a sliding window of `window`
    tokens (None: full attention, (0, 0)). transformers' sliding mask: key > query - window."""
    lo = 0 if window is None else max(0, n - window)
    return lo // page_size, lo % page_size


class PageTable:
    # Normal tensors even when a sequence starts inside inference_mode(): the next one may drain this table
    # outside it, and in-place updates of inference tensors are refused there.
    @torch.inference_mode(False)
    def __init__(self, layers: int, max_pages: int):
        self.layers = layers
        self.max_pages = max_pages
        shape = (layers, max_pages)
        # Slot of the page in each tier, or -1.
        self.slot = {name: torch.full(shape, NONE, dtype=torch.int32) for name in TIERS}
        # In-flight transfers reading or writing the page; a busy page is never evicted (two-phase transfers).
        self.busy = torch.zeros(shape, dtype=torch.int16)
        # Eviction inputs: the step each page was last attended, and its decayed attention mass.
        self.last_use = torch.zeros(shape, dtype=torch.int64)
        self.score = torch.zeros(shape, dtype=torch.float32)
        self.tokens = [0] * layers
        # Per layer: the first page still held; 0 unless a sliding window released the pages before it.
        self.first = [0] * layers
        # Per layer: bumped by every change of where its pages live (`set`, `release`), so that device-side views
        # built from this table know when they are stale without comparing tensors.
        self.version = [0] * layers

    def set(self, tier: str, layer: int, pages, slots) -> None:
        """Records that `pages` of `layer` (an int, a list or a tensor of page ids) live in `slots` of `tier`
        (-1: no longer there)."""
        if isinstance(slots, (list, tuple)):
            slots = torch.tensor(slots, dtype=torch.int32)
        self.slot[tier][layer, pages] = slots
        self.version[layer] += 1

    def release(self, layer: int, upto: int) -> None:
        """Clears pages first..upto-1 of `layer` in every tier (the caller freed their slots)."""
        a = self.first[layer]
        for name in TIERS:
            self.slot[name][layer, a:upto] = NONE
        self.last_use[layer, a:upto] = 0
        self.score[layer, a:upto] = 0
        self.first[layer] = upto
        self.version[layer] += 1

    def pages(self, layer: int) -> int:
        """Number of pages holding at least one token."""
        return -(-self.tokens[layer] // self.page_size) if self.tokens[layer] else 0

    page_size: int = 0  # set by the runtime
    batch: int = 1  # sequences: row l * batch + b is layer l of sequence b (set by the runtime)

    def resident(self, tier: str) -> torch.Tensor:
        """Bool [layers, max_pages]: the page has a copy in `tier`."""
        return self.slot[tier] >= 0

    def check_invariants(self) -> None:
        """Pages before the layer's first held page (out of its sliding window) and beyond its last token live
        nowhere; every page in between lives somewhere; an open tail page is on the device. For tests."""
        for layer in range(self.layers):
            n = self.pages(layer)
            first = self.first[layer]
            anywhere = torch.stack([self.slot[t][layer] >= 0 for t in TIERS]).any(0)
            if not bool(anywhere[first:n].all()):
                missing = (first + (~anywhere[first:n]).nonzero().flatten()).tolist()
                raise AssertionError(f"layer {layer}: pages {missing} live in no tier")
            if bool(anywhere[:first].any()):
                held = anywhere[:first].nonzero().flatten().tolist()
                raise AssertionError(f"layer {layer}: pages {held} left the sliding window but still hold slots")
            if bool(anywhere[n:].any()):
                raise AssertionError(f"layer {layer}: pages beyond the last token still hold slots")
            if self.tokens[layer] % self.page_size and first < n and int(self.slot["device"][layer, n - 1]) < 0:
                raise AssertionError(f"layer {layer}: the tail page {n - 1} is not on the device")
