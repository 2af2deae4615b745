"""Where pages go: placement of new pages at prefill, device slots for tail pages, eviction with write-back,
and promotion of pages loaded for sparse attention. Mixed into `Runtime`; the policies in `policies/` rank the
candidates, these methods move the page-table entries and start the copies."""

from __future__ import annotations

import time

import torch

from offload.engine import Transfer


class PlacementMixin:
    """Methods of `Runtime` that decide slots and evict (see offload/runtime.py for the state they share)."""

    def _device_slots(self, n: int) -> list[int]:
        dev = self.device_tier
        slots = dev.allocate(n)
        if slots is not None:
            return slots
        self._evict_device(n - dev.num_free)
        slots = dev.allocate(n)
        if slots is None:
            raise ValueError("device_budget: too small for the pages that must stay on the device; raise it")
        return slots

    def _evict_device(self, n: int) -> None:
        t = self.table
        # NOTE: pages a sliding window released hold no slot in any tier, so they are never eligible here, nor in
        # `_evict_host` and `_promote`.
        on_dev = t.slot["device"] >= 0
        eligible = on_dev & (t.busy == 0)
        for l in range(self.layers):
            if t.tokens[l] % self.page_size:
                eligible[l, t.pages(l) - 1] = False  # an open tail page is written in place
        victims = self.eviction.victims(eligible & self._unpinned(), n)
        if len(victims) < n:
            # Sinks and the recent window stay while anything else can go; under a tight budget they go too.
            taken = set(victims)
            more = self.eviction.victims(eligible, n + len(victims))
            victims += [v for v in more if v not in taken][: n - len(victims)]
        if len(victims) < n:
            raise ValueError("device_budget: too small for the pages that must stay on the device; raise it")
        for l, p in victims:
            s = int(t.slot["device"][l, p])
            if int(t.slot["host"][l, p]) < 0 and int(t.slot["disk"][l, p]) < 0:
                self._write_back(l, p, s)
            t.set("device", l, p, -1)
            self.device_tier.release([s])
            self.counters["evictions"]["device"] += 1
            if self.tracer is not None:
                self.tracer.instant("policy", "evict", tier="device", layer=l, pages=1)

    def _promote(self, layer: int, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Sparse mode: keeps pages just loaded for attention on the device, in free slots or in place of pages
        that the eviction policy ranks lower and that were not attended this step. Only pages with a copy in a
        lower tier are given up, so promotion never writes anything back."""
        if not self.sparse or pages.numel() == 0:
            return
        t = self.table
        n = pages.numel()
        free = max(0, self.device_tier.num_free - self.layers)  # keep room for every layer's next tail page
        slots = self.device_tier.allocate(min(n, free)) or []
        if len(slots) < n:
            clean = (t.slot["host"] >= 0) | (t.slot["disk"] >= 0)
            eligible = (t.slot["device"] >= 0) & clean & (t.busy == 0) & (t.last_use < self.step)
            for l, p in self.eviction.victims(eligible & self._unpinned(), n - len(slots)):
                slots.append(int(t.slot["device"][l, p]))
                t.set("device", l, p, -1)
                self.counters["evictions"]["device"] += 1
        if not slots:
            return
        m = len(slots)
        self.counters["loads"]["promoted"] += m
        idx = torch.tensor(slots, device=self.device)
        self.device_tier.k.index_copy_(0, idx, k[:m])
        self.device_tier.v.index_copy_(0, idx, v[:m])
        t.set("device", layer, pages[:m], slots)

    def _unpinned(self) -> torch.Tensor:
        """Bool [layers, max_pages]: pages eviction may take (sinks and the recent window stay)."""
        mask = torch.ones(self.layers, self.max_pages, dtype=torch.bool)
        if self.config.attention == "sparse":
            sinks = -(-self.config.sink_tokens // self.page_size)
            mask[:, :sinks] = False
            for l in range(self.layers):
                last = self.table.pages(l)
                recent = -(-self.config.recent_tokens // self.page_size) + 1
                mask[l, max(0, last - recent):last] = False
        return mask

    def _write_back(self, layer: int, page: int, dev_slot: int) -> None:
        """Copies a page that lives only on the device to the host (or disk), before its slot is reused."""
        host = self._host()
        slots = host.allocate(1) if host is not None else None
        if slots is None and host is not None and self._disk() is not None:
            self._evict_host(1)
            slots = host.allocate(1)
        dk, dv = self.device_tier.k, self.device_tier.v
        if slots is not None:
            t = self.engine.copy("device->host", (dk, dv), [dev_slot], (host.k, host.v), slots, layer, "store")
            self.stall(layer, t.wait())
            self.table.set("host", layer, page, slots[0])
            return
        disk = self._disk()
        dslots = disk.allocate(1) if disk is not None else None
        if dslots is None:
            raise ValueError("budgets: the KV no longer fits device, host and disk budgets; raise host_budget or "
                             "disk_budget")
        t0 = time.perf_counter()
        k, v = dk[dev_slot:dev_slot + 1].cpu(), dv[dev_slot:dev_slot + 1].cpu()
        if self.device.type != "cpu":
            self.engine.account("device->host", self.shape.page_bytes, t0, layer, "store")
        self.stall(layer, self.engine.disk_write(disk, dslots, k, v, layer).wait())
        self.table.set("disk", layer, page, dslots[0])

    def _evict_host(self, n: int) -> None:
        t = self.table
        eligible = (t.slot["host"] >= 0) & (t.busy == 0)
        victims = self.eviction.victims(eligible, n)
        disk = self._disk()
        host = self.host_tier
        for l, p in victims:
            s = int(t.slot["host"][l, p])
            if int(t.slot["disk"][l, p]) < 0:
                dslots = disk.allocate(1)
                if dslots is None:
                    raise ValueError("disk_budget: the KV no longer fits the disk budget; raise it")
                self.stall(l, self.engine.disk_write(disk, dslots, host.k[s:s + 1], host.v[s:s + 1], l).wait())
                t.set("disk", l, p, dslots[0])
            t.set("host", l, p, -1)
            host.release([s])
            self.counters["evictions"]["host"] += 1
            if self.tracer is not None:
                self.tracer.instant("policy", "evict", tier="host", layer=l, pages=1)

    def _place_device(self, layer: int, pages: list[int], kp: torch.Tensor, vp: torch.Tensor) -> None:
        slots = self._device_slots(len(pages))
        idx = torch.tensor(slots, device=self.device)
        self.device_tier.k.index_copy_(0, idx, kp)
        self.device_tier.v.index_copy_(0, idx, vp)
        self.table.set("device", layer, pages, slots)

    def _place_lower(self, layer: int, pages: list[int], kp: torch.Tensor, vp: torch.Tensor) -> None:
        """Stores full pages that don't fit the device: host first, then disk."""
        host = self._host()
        n_host = min(len(pages), host.num_free if host else 0)
        n_host = max(0, n_host)
        if n_host:
            slots = host.allocate(n_host)
            t = self.engine.copy("device->host", (kp, vp), list(range(n_host)), (host.k, host.v), slots, layer, "store")
            self.stall(layer, t.wait() if self.device.type != "cuda" else self._sync(t))
            self.table.set("host", layer, pages[:n_host], slots)
        rest = len(pages) - n_host
        if rest:
            disk = self._disk()
            slots = disk.allocate(rest) if disk is not None else None
            if slots is None:
                raise ValueError("budgets: the KV no longer fits device, host and disk budgets; raise one of them")
            src_k, src_v = kp[n_host:], vp[n_host:]
            if src_k.device.type != "cpu":
                t0 = time.perf_counter()
                src_k, src_v = src_k.cpu(), src_v.cpu()
                self.engine.account("device->host", rest * self.shape.page_bytes, t0, layer, "store")
            t = self.engine.disk_write(disk, slots, src_k, src_v, layer)
            self.stall(layer, t.wait())
            self.table.set("disk", layer, pages[n_host:], slots)

    def _device_pages(self, layer: int) -> int:
        return int((self.table.slot["device"][layer] >= 0).sum())

    def _room_below(self) -> int:
        """Pages the host and disk tiers can still take, slots of tiers not created yet included."""
        plan = self.plan
        host = self.host_tier.num_free if self.host_tier is not None else plan.host_pages - plan.host_staging_pages
        disk = self.disk_tier.capacity - self.disk_tier.num_used if self.disk_tier is not None else plan.disk_pages
        return max(0, host) + max(0, disk)

    def _tails_still_needed(self, layer: int) -> int:
        """Layers other than `layer` that hold no page yet each need a device slot for their tail."""
        return sum(1 for l in range(self.layers) if l != layer and self.table.tokens[l] == 0)

    @staticmethod
    def _sync(t: Transfer) -> float:
        t0 = time.perf_counter()
        t.event.synchronize()  # the source is a temporary that must outlive the copy
        return time.perf_counter() - t0
