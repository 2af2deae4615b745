"""Pages that come back damaged from disk or the host pool: found, rebuilt, and written back, so attention never
sees a wrong page.

The host tier checks a page's checksum whenever it is copied out (tiers/host.py); a page that fails is rebuilt in
its slot (`host_pages_damaged`) from another copy, the prefix cache or the model, as in step 3 below, before the
copy goes on.

The disk tier checksums every page (tiers/disk.py). When a read fails (a checksum mismatch, a short read, an I/O
error), the load's `recover` callback (offload/engine.py) lands here, on the thread that waits for the load:

1. Read each page of the load again, one at a time: a transient error passes, and the pages that still fail are
   known exactly.
2. Scrub: read every other disk page of every layer too. A file that was truncated or overwritten has lost more
   than this load's pages, and one pass finds them all.
3. Rebuild each damaged page from, in order: a full copy on the device, or an intact one in the host tier (or,
   for a host page, on disk); the prefix cache's entry for the page (when
   one is configured and holds it); or the model, re-run over the tokens up to the last damaged page with its
   ordinary DynamicCache (the tokens come from the runtime's token log).
4. Write the rebuilt pages back to their slots (packed, with `kv_quant`) and fill the load's destination.

When none of the sources has a page (a sequence fed as embeddings has no tokens to re-run), the error names the
tier, the layer, the page and the cause, and the run stops: a wrong token is never produced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from offload.cache import CACHE_KWARG
from tiers.base import PageError, WorkerDied

if TYPE_CHECKING:
    from offload.runtime import Runtime

log = logging.getLogger(__name__)

# Tokens per forward when the model re-runs a prefix (bounds the activations, not the KV it returns).
RECOMPUTE_CHUNK = 2048


class Unrecoverable(OSError):
    """A page below the device that no copy and no recomputation could rebuild."""


class Recovery:
    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.counts = {"damaged": 0, "from_device": 0, "from_host": 0, "from_disk": 0, "from_prefix_cache": 0,
                       "recomputed": 0, "reread": 0}
        self.events = 0  # failed loads that needed a rebuild

    def disk_load_failed(self, layer: int, pages: Sequence[int], slots: Sequence[int], k_out: torch.Tensor,
                         v_out: torch.Tensor, exc: BaseException) -> None:
        """The load of `pages` (disk `slots`) of `layer` into k_out, v_out ([n, H, P, D], full precision, on the
        compute device) failed with `exc`: fills k_out, v_out with the right pages, or raises."""
        if not isinstance(exc, OSError) or isinstance(exc, WorkerDied):
            raise exc  # a bug, or no I/O can complete any more: nothing to rebuild from
        rt = self.rt
        disk = rt.disk_tier
        damaged: dict[tuple[int, int], int] = {}
        pages = [int(p) for p in pages]  # a tensor on the load's path: read only here, on failure
        for i, (page, slot) in enumerate(zip(pages, slots)):
            got = self._read(disk, slot)
            if got is None:
                damaged[(layer, page)] = slot
            else:
                got = rt.placement.unpack(*got)
                k_out[i].copy_(got[0][0])
                v_out[i].copy_(got[1][0])
                self.counts["reread"] += 1
        if not damaged:
            return
        damaged.update(self._scrub(exclude=set(damaged)))
        pages_kv = self._rebuild(damaged, exc)
        for i, page in enumerate(pages):
            if (layer, page) in damaged:
                k, v = pages_kv[(layer, page)]
                k_out[i].copy_(k)
                v_out[i].copy_(v)

    # -- finding -----------------------------------------------------------------------------------------------
    def _read(self, disk, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One page as the disk stores it; None when it can't be read intact."""
        kq, vq = self.rt.engine.scratch(disk.shape, 1)
        try:
            disk.read([slot], kq, vq)
        except OSError:
            return None
        return kq, vq

    def _scrub(self, exclude: set[tuple[int, int]]) -> dict[tuple[int, int], int]:
        """Every page of every layer whose only copy below the device is a disk page that can't be read intact."""
        rt, t = self.rt, self.rt.table
        disk = rt.disk_tier
        found = {}
        on_disk = (t.slot["disk"] >= 0) & (t.slot["host"] < 0) & (t.slot["device"] < 0)
        for layer, page in on_disk.nonzero().tolist():
            if (layer, page) in exclude:
                continue
            slot = int(t.slot["disk"][layer, page])
            if self._read(disk, slot) is None:
                found[(layer, page)] = slot
        return found

    def host_pages_damaged(self, damaged: dict[tuple[int, int], int]) -> None:
        """Host pages ((layer, page) -> host slot) that failed their checksum on their way out of the host pool:
        each rebuilt in its slot and sealed again, or raises."""
        self._rebuild(damaged, PageError("host", list(damaged.values()), "checksum mismatch"), tier="host")

    # -- rebuilding --------------------------------------------------------------------------------------------
    def _rebuild(self, damaged: dict[tuple[int, int], int], exc: BaseException, tier: str = "disk") -> dict:
        """The right K and V ([H, P, D] on the compute device) of every damaged (layer, page) of `tier` (slot
        values), each also written back to its slot there."""
        rt = self.rt
        self.counts["damaged"] += len(damaged)
        cause = exc.cause if isinstance(exc, PageError) else str(exc)
        where = rt.disk_tier.path if tier == "disk" else "the host pool"
        self.events += 1
        if self.events & (self.events - 1) == 0:  # the 1st, 2nd, 4th, 8th, ... time: a failing disk doesn't flood
            log.warning("offload: %d %s page%s of %s damaged (%s); rebuilding (%d time%s so far)", len(damaged),
                        tier, "s" if len(damaged) != 1 else "", where, cause, self.events,
                        "s" if self.events != 1 else "")
        out: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # 1. A copy in another tier.
        for (layer, page) in damaged:
            got = self._other_copy(tier, layer, page)
            if got is not None:
                out[(layer, page)] = got
        left = [key for key in damaged if key not in out]
        # 2. The prefix cache.
        ids = rt.token_log.list()
        if left and rt.prefix is not None and ids is not None:
            stored = rt.prefix.pages_of(ids, sorted({page for _, page in left}))
            for layer, page in left:
                if page in stored:
                    entry = stored[page][layer].to(rt.device, rt.dtype)  # [2, H, P, D]
                    out[(layer, page)] = (entry[0], entry[1])
                    self.counts["from_prefix_cache"] += 1
            left = [key for key in left if key not in out]
        # 3. The model, over the tokens up to the last page left.
        if left:
            end = (max(page for _, page in left) + 1) * rt.page_size
            if ids is None or len(ids) < end:
                layer, page = left[0]
                why = ("a batch keeps no token ids per sequence" if rt.batch > 1
                       else "the sequence was fed as embeddings, so its tokens are unknown" if ids is None
                       else "its tokens are not all known")
                raise Unrecoverable(
                    exc.errno or 5,
                    f"{tier}: {rt.row_name(layer)} page {page} (slot {damaged[(layer, page)]} of {where}) is "
                    f"unreadable: {cause}; no other copy, and it can't be recomputed: {why}",
                ) from exc
            keys, values = self._recompute(ids[:end])
            P = rt.page_size
            for layer, page in left:
                out[(layer, page)] = (keys[layer][:, page * P:(page + 1) * P], values[layer][:, page * P:(page + 1) * P])
                self.counts["recomputed"] += 1
        for (layer, page), slot in damaged.items():
            k, v = out[(layer, page)]
            self._write_back(tier, slot, k, v)
        return out

    def _other_copy(self, tier: str, layer: int, page: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The page from a tier other than `tier` that holds it intact ([H, P, D] each, full precision, on the
        compute device), or None."""
        rt, t = self.rt, self.rt.table
        s = int(t.slot["device"][layer, page])
        if tier != "device" and s >= 0 and (page + 1) * rt.page_size <= t.tokens[layer]:  # full pages only
            self.counts["from_device"] += 1
            return rt.device_tier.k[s].clone(), rt.device_tier.v[s].clone()
        host, s = rt.host_tier, int(t.slot["host"][layer, page])
        if tier != "host" and host is not None and s >= 0 and not host.damaged([s]):
            k, v = rt.placement.unpack(host.k[s:s + 1], host.v[s:s + 1])
            self.counts["from_host"] += 1
            return k[0], v[0]
        s = int(t.slot["disk"][layer, page])
        if tier != "disk" and s >= 0 and (got := self._read(rt.disk_tier, s)) is not None:
            k, v = rt.placement.unpack(*got)
            self.counts["from_disk"] += 1
            return k[0], v[0]
        return None

    @torch.no_grad()
    def _recompute(self, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values of every layer ([H, T, D] each) for tokens `ids`, from the model with its ordinary cache
        (the runtime's attention function serves forwards with another cache by plain attention)."""
        from transformers import DynamicCache

        rt = self.rt
        cache = DynamicCache()
        tokens = torch.tensor([ids], dtype=torch.long, device=rt.device)
        for a in range(0, tokens.shape[1], RECOMPUTE_CHUNK):
            chunk = {"input_ids": tokens[:, a:a + RECOMPUTE_CHUNK], CACHE_KWARG: cache, "use_cache": True}
            try:
                rt.model(**chunk, logits_to_keep=1)  # no logits over the whole prefix
            except TypeError:
                rt.model(**chunk)
        return [lay.keys[0] for lay in cache.layers], [lay.values[0] for lay in cache.layers]

    def _write_back(self, tier: str, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The rebuilt page into its slot of `tier`, so the next step reads it intact: a host slot is sealed
        again; a disk slot that can't be written is left (the page is rebuilt again when next read)."""
        rt = self.rt
        kp, vp = rt.placement.pack(k.unsqueeze(0).to(rt.dtype), v.unsqueeze(0).to(rt.dtype))
        if tier == "host":
            rt.host_tier.write([slot], kp, vp)
            rt.host_tier.seal([slot])
            return
        try:
            rt.disk_tier.write([slot], kp.cpu().contiguous(), vp.cpu().contiguous())
        except OSError as e:
            log.warning("offload: rewriting disk slot %d failed (%s); the page is rebuilt when next read", slot, e)
