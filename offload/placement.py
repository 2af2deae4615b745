"""Where pages go: the tiers, placement of new pages at prefill, device slots for tail pages, eviction with
write-back, promotion of pages loaded for sparse attention, and release of pages a sliding window left.

`Placement` owns the tiers and the eviction policy, and is the only writer of slots into the page table. Its
decisions are plain data computed from the table (`plan_device_evictions` -> `Eviction` records, testable with a
hand-made table and no model); its other methods carry them out with the transfer engine.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from offload.budgets import Plan, disk_reserve_pages
from offload.config import OffloadConfig
from offload.engine import Transfer, TransferEngine, WorkerDied
from offload.pagetable import PageTable
from offload.trace import Tracer
from policies.base import EvictionPolicy
from tiers import DeviceTier, HostTier, PageShape
from tiers.base import PageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Eviction:
    """Page `page` of `layer` gives up device slot `slot`; `write_back`: it has no copy below, so it is copied to
    the host (or disk) first."""

    layer: int
    page: int
    slot: int
    write_back: bool


def sink_pages(config: OffloadConfig, page_size: int) -> int:
    """Pages holding the sink tokens (`sink_tokens`)."""
    return -(-config.sink_tokens // page_size)


def dense_rows(table: PageTable, config: OffloadConfig) -> int:
    """Sparse mode: the rows of the dense layers, which come first (row l * batch + b is layer l of sequence b);
    0 in exact mode, where no layer is set apart."""
    return config.dense_layers * table.batch if config.attention == "sparse" else 0


def unpinned_pages(table: PageTable, config: OffloadConfig) -> torch.Tensor:
    """Bool [layers, max_pages]: pages eviction may take first (sparse mode keeps the sinks, the recent window and
    every page of the dense layers while anything else can go: a dense layer reads all its pages at every step)."""
    mask = torch.ones(table.layers, table.max_pages, dtype=torch.bool)
    P = table.page_size
    if config.attention == "sparse" or config.kv_quant != "none":
        # With kv_quant, too: the sinks draw much of the attention, and leaving the device would quantize them.
        mask[:, : sink_pages(config, P)] = False
    if config.attention == "sparse":
        recent = -(-config.recent_tokens // P) + 1
        for layer in range(table.layers):
            last = table.pages(layer)
            mask[layer, max(0, last - recent):last] = False
        mask[: dense_rows(table, config)] = False
    return mask


def plan_device_evictions(table: PageTable, policy: EvictionPolicy, config: OffloadConfig, n: int) -> list[Eviction]:
    """The `n` device pages to evict, best victim first: never a page being copied or the page a layer's next
    token goes to; sinks and the recent window only when nothing else is left. Raises ValueError when fewer than
    `n` can go."""
    # NOTE: pages a sliding window released hold no slot in any tier, so they are never eligible here, nor in
    # host eviction and promotion.
    eligible = (table.slot["device"] >= 0) & (table.busy == 0)
    for layer in range(table.layers):
        # The page the layer's next token goes to is written in place: the open tail, or a page a batch's step
        # opened for it a moment ago.
        page = table.tokens[layer] // table.page_size
        if page < table.max_pages:
            eligible[layer, page] = False
    victims = policy.victims(eligible & unpinned_pages(table, config), n)
    if len(victims) < n:
        # Sinks and the recent window stay while anything else can go; under a tight budget they go too.
        taken = set(victims)
        more = policy.victims(eligible, n + len(victims))
        victims += [v for v in more if v not in taken][: n - len(victims)]
    if len(victims) < n:
        raise ValueError("device_budget: too small for the pages that must stay on the device; raise it")
    return [Eviction(l, p, int(table.slot["device"][l, p]),
                     int(table.slot["host"][l, p]) < 0 and int(table.slot["disk"][l, p]) < 0) for l, p in victims]


class Placement:
    def __init__(self, plan: Plan, shape: PageShape, config: OffloadConfig, device_tier: DeviceTier,
                 engine: TransferEngine, policy: EvictionPolicy, stall: Callable[[int, float], None],
                 tracer: Tracer | None, windows: list[int | None],
                 host_storage: tuple[torch.Tensor, torch.Tensor] | None = None,
                 on_host: Callable[[HostTier], None] | None = None, codec=None):
        """`host_storage`: the host pool's tensors when the caller allocated them (see HostTier); `on_host` is
        called with the host tier once it exists. `codec` (offload.quant.PageCodec): pages below the device are
        stored packed by it, packed on their way down."""
        self.plan, self.shape, self.config = plan, shape, config
        self.codec = codec
        # Pages as the host and disk tiers store them.
        self.stored = shape if codec is None else dataclasses.replace(shape, packed=(codec.k_bytes, codec.v_bytes))
        self.device = device_tier
        self.host_tier: HostTier | None = None  # allocated once, at the first spill
        self.disk_tier = None
        self.engine, self.policy, self.stall, self.tracer = engine, policy, stall, tracer
        self.windows = windows
        # Called with (layer, page, device slot) for each page evicted from the device, before its slot is reused.
        self.leaving: Callable[[int, int, int], None] | None = None
        self.host_storage, self.on_host = host_storage, on_host
        self.expected_tokens: int | None = None  # sizes the disk file at the first spill
        self.evictions = {"device": 0, "host": 0}
        self.promoted = 0
        self.table: PageTable | None = None
        # Rebuilds host pages ((layer, page) -> slot) that failed their checksum (offload/recover.py).
        self.repair_host: Callable[[dict[tuple[int, int], int]], None] | None = None
        if config.disk_dir is not None and os.path.isdir(config.disk_dir):
            # A killed run's slot file is removed now, even if this run never spills (its own file comes later).
            from tiers.disk import remove_stale_files

            remove_stale_files(config.disk_dir)

    def new_sequence(self, table: PageTable) -> None:
        """Binds a new sequence's table; every slot is free again (but host staging)."""
        self.table = table
        self.policy.table = table
        for tier in (self.device, self.host_tier, self.disk_tier):
            if tier is not None:
                tier.reset(self.plan.host_staging_pages if tier is self.host_tier else 0)

    # -- lower tiers, created at the first spill -----------------------------------------------------------------
    # Pools outlive any inference_mode() they are made in, and are updated in place outside it (on I/O threads
    # too): they must be normal tensors.
    @torch.inference_mode(False)
    def host(self) -> HostTier | None:
        if self.host_tier is None and self.plan.host_pages > 0:
            self.host_tier = HostTier(self.stored, self.plan.host_pages, pin=self.device.device.type == "cuda",
                                      storage=self.host_storage)
            if self.plan.host_staging_pages:
                # Staging for disk -> GPU reads: host slots 0..W-1, one half per workspace half.
                assert self.host_tier.allocate(self.plan.host_staging_pages) == list(range(self.plan.host_staging_pages))
            if self.on_host is not None:
                self.on_host(self.host_tier)
        return self.host_tier

    @torch.inference_mode(False)
    def disk(self):
        if self.disk_tier is None and self.plan.disk_pages > 0:
            from tiers.disk import DiskTier

            # The file starts at what the expected sequence needs and grows up to the budget (tiers/disk.py).
            reserve = disk_reserve_pages(self.plan, self.expected_tokens, self.shape.page_size, self.windows)
            self.disk_tier = DiskTier(self.stored, self.plan.disk_pages, self.config.disk_dir, self.config.io_threads,
                                      reserve=reserve, engine=self.config.io_engine)
            self.host()
        return self.disk_tier

    def tiers(self) -> tuple[tuple[str, object], ...]:
        return (("device", self.device), ("host", self.host_tier), ("disk", self.disk_tier))

    def tier(self, name: str):
        """The tier called `name` ("device", "host" or "disk"), or None where there is none."""
        return {"device": self.device, "host": self.host_tier, "disk": self.disk_tier}[name]

    # -- device slots and eviction ---------------------------------------------------------------------------
    def device_slots(self, n: int) -> list[int]:
        slots = self.device.allocate(n)
        # A victim that left with a page sharing its slot (beams) frees nothing more: evict again while that helps.
        while slots is None:
            free = self.device.num_free
            self.evict_device(n - free)
            if self.device.num_free == free:
                raise ValueError("device_budget: too small for the pages that must stay on the device; raise it")
            slots = self.device.allocate(n)
        return slots

    def sharers(self, tier: str, slot: int, layer: int, page: int) -> list[tuple[int, int]]:
        """The pages besides page `page` of `layer` that hold `slot` of `tier` (beams sharing their common pages);
        a table scan only for a slot held more than once."""
        if not self.tier(tier).refs.get(slot):
            return []
        return [(l, p) for l, p in (self.table.slot[tier] == slot).nonzero().tolist() if (l, p) != (layer, page)]

    def shared(self, tier: str) -> torch.Tensor:
        """Bool [layers, max_pages]: the page's slot of `tier` is held by other pages too."""
        refs = self.tier(tier).refs
        if not refs:
            return torch.zeros(self.table.slot[tier].shape, dtype=torch.bool)
        return torch.isin(self.table.slot[tier], torch.tensor(list(refs), dtype=torch.int32))

    def _give_copies(self, layer: int, page: int, others: list[tuple[int, int]], tiers: tuple[str, ...]) -> None:
        """The copies in `tiers` of page `page` of `layer` become those of the pages sharing its slots."""
        t = self.table
        for name in tiers:
            s = int(t.slot[name][layer, page])
            for l, p in others:
                if s >= 0 and int(t.slot[name][l, p]) < 0:
                    t.set(name, l, p, s)
                    self.tier(name).share([s])

    def evict_device(self, n: int) -> None:
        t = self.table
        for e in plan_device_evictions(t, self.policy, self.config, n):
            if int(t.slot["device"][e.layer, e.page]) != e.slot:
                continue  # it left with a page sharing its slot
            # Pages that share the slot (beams) leave with it: only then is the slot free.
            others = self.sharers("device", e.slot, e.layer, e.page)
            if self.leaving is not None:
                self.leaving(e.layer, e.page, e.slot)
            if e.write_back:
                self._write_back(e.layer, e.page, e.slot)
            self._give_copies(e.layer, e.page, others, ("host", "disk"))
            for l, p in [(e.layer, e.page), *others]:
                t.set("device", l, p, -1)
                self.device.release([e.slot])
            self.evictions["device"] += 1
            if self.tracer is not None:
                self.tracer.instant("policy", "evict", tier="device", layer=e.layer, pages=1)

    def promote(self, layer: int, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: int) -> None:
        """Sparse mode: keeps pages just loaded for attention on the device, in free slots or in place of pages
        that the eviction policy ranks lower and that were not attended this `step`. Only pages with a copy in a
        lower tier are given up, so promotion never writes anything back."""
        if pages.numel() == 0:
            return
        t = self.table
        n = pages.numel()
        free = max(0, self.device.num_free - t.layers)  # keep room for every layer's next tail page
        slots = self.device.allocate(min(n, free)) or []
        if len(slots) < n:
            clean = (t.slot["host"] >= 0) | (t.slot["disk"] >= 0)
            # A slot that beams share is not taken over here: the other pages holding it would read the new page.
            eligible = (t.slot["device"] >= 0) & clean & (t.busy == 0) & (t.last_use < step) & ~self.shared("device")
            for l, p in self.policy.victims(eligible & unpinned_pages(t, self.config), n - len(slots)):
                slots.append(int(t.slot["device"][l, p]))
                t.set("device", l, p, -1)
                self.evictions["device"] += 1
        if not slots:
            return
        m = len(slots)
        self.promoted += m
        idx = torch.tensor(slots, device=self.device.device)
        self.device.k.index_copy_(0, idx, k[:m])
        self.device.v.index_copy_(0, idx, v[:m])
        t.set("device", layer, pages[:m], slots)

    def _write_back(self, layer: int, page: int, dev_slot: int) -> None:
        """Copies a page that lives only on the device to the host (or disk), before its slot is reused."""
        host = self.host()
        slots = host.allocate(1) if host is not None else None
        if slots is None and host is not None and self.disk() is not None:
            self.evict_host(1)
            slots = host.allocate(1)
        dk, dv = self.device.k, self.device.v
        if slots is not None:
            t = self.engine.copy("device->host", (dk, dv), [dev_slot], (host.k, host.v), slots, layer, "store",
                                 self.codec)
            self.stall(layer, t.wait())
            host.seal(slots, t.event)
            self.table.set("host", layer, page, slots[0])
            return
        disk = self.disk()
        dslots = disk.allocate(1) if disk is not None else None
        if dslots is None:
            raise ValueError("budgets: the KV no longer fits device, host and disk budgets; raise host_budget or "
                             "disk_budget")
        t0 = time.perf_counter()
        k, v = (t.cpu() for t in self.pack(dk[dev_slot:dev_slot + 1], dv[dev_slot:dev_slot + 1]))
        if self.device.device.type != "cpu":
            self.engine.account("device->host", self.stored.page_bytes, t0, layer, "store")
        self.table.set("disk", layer, page, self._to_disk(layer, [page], dslots, k, v)[0])

    def _to_disk(self, layer: int, pages: list[int], slots: list[int], k: torch.Tensor, v: torch.Tensor) -> list[int]:
        """Writes pages of `layer` to disk `slots` and returns the slots that hold them. A write that fails is tried
        once more in fresh slots (the failed ones stay out of use: their blocks may be bad); a full disk, or a second
        failure, stops the run with one line naming disk_dir, the layer and the pages."""
        disk, retried = self.disk_tier, False
        while True:
            try:
                self.stall(layer, self.engine.disk_write(disk, slots, k, v, layer).wait())
                return slots
            except (TimeoutError, WorkerDied):
                raise  # the copy itself never finished: no other slot would help
            except OSError as exc:
                shown = f"page {pages[0]}" if len(pages) == 1 else f"pages {pages[0]}..{pages[-1]}"
                where = f"writing layer {layer} {shown} to {disk.path}"
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ValueError(f"disk_dir: {self.config.disk_dir} is full ({where}); lower disk_budget or "
                                     "free space") from exc
                cause = getattr(exc, "cause", None) or exc.strerror or str(exc)
                fresh = None if retried else disk.allocate(len(slots))
                if fresh is None:
                    raise OSError(exc.errno or errno.EIO, f"disk_dir: {where} failed: {cause}") from exc
                logger.warning("offload: %s failed (%s); writing to other slots", where, cause)
                retried, slots = True, fresh

    def evict_host(self, n: int) -> None:
        t = self.table
        eligible = (t.slot["host"] >= 0) & (t.busy == 0)
        disk = self.disk()
        host = self.host_tier
        for l, p in self.policy.victims(eligible, n):
            s = int(t.slot["host"][l, p])
            if s < 0:
                continue  # it left with a page sharing its slot
            others = self.sharers("host", s, l, p)
            if any(int(t.busy[a, b]) for a, b in others):
                continue  # a page sharing the slot is being read from it
            if int(t.slot["disk"][l, p]) < 0:
                dslots = disk.allocate(1)
                if dslots is None:
                    raise ValueError("disk_budget: the KV no longer fits the disk budget; raise it")
                self.verify_host(l, [p], [s])  # a damaged page would reach the disk with a fresh checksum
                t.set("disk", l, p, self._to_disk(l, [p], dslots, host.k[s:s + 1], host.v[s:s + 1])[0])
            self._give_copies(l, p, others, ("disk",))
            for a, b in [(l, p), *others]:
                t.set("host", a, b, -1)
                host.release([s])
            self.evictions["host"] += 1
            if self.tracer is not None:
                self.tracer.instant("policy", "evict", tier="host", layer=l, pages=1)

    def verify_host(self, layer: int, pages, slots: list[int]) -> None:
        """Before host `slots` (pages `pages` of `layer`) are copied out: rebuilds those that fail their checksum."""
        bad = self.host_tier.damaged(slots)
        if bad:
            page_of = dict(zip(slots, [int(p) for p in pages]))
            if self.repair_host is None:
                raise PageError("host", bad, "checksum mismatch")
            self.repair_host({(layer, page_of[s]): s for s in bad})

    # -- new pages -------------------------------------------------------------------------------------------
    def place_device(self, layer: int, pages: list[int], kp: torch.Tensor, vp: torch.Tensor) -> None:
        slots = self.device_slots(len(pages))
        idx = torch.tensor(slots, device=self.device.device)
        self.device.k.index_copy_(0, idx, kp)
        self.device.v.index_copy_(0, idx, vp)
        self.table.set("device", layer, pages, slots)

    def pack(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages [n, H, P, D] as the tiers below the device store them (packed by the codec, if any), on their
        device."""
        return (k, v) if self.codec is None else self.codec.encode(k, v)

    def unpack(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages read from a tier below the device -> full precision [n, H, P, D] on the compute device."""
        k, v = k.to(self.device.device), v.to(self.device.device)
        return (k, v) if self.codec is None else self.codec.decode(k, v, self.shape.dtype)

    def place_lower(self, layer: int, pages: list[int], kp: torch.Tensor, vp: torch.Tensor) -> None:
        """Stores full pages that don't fit the device: host first, then disk."""
        kp, vp = self.pack(kp, vp)
        host = self.host()
        n_host = max(0, min(len(pages), host.num_free if host else 0))
        if n_host:
            slots = host.allocate(n_host)
            t = self.engine.copy("device->host", (kp, vp), list(range(n_host)), (host.k, host.v), slots, layer, "store")
            self.stall(layer, t.wait() if self.device.device.type != "cuda" else _sync(t))
            host.seal(slots)
            self.table.set("host", layer, pages[:n_host], slots)
        rest = len(pages) - n_host
        if rest:
            disk = self.disk()
            slots = disk.allocate(rest) if disk is not None else None
            if slots is None:
                raise ValueError("budgets: the KV no longer fits device, host and disk budgets; raise one of them")
            src_k, src_v = kp[n_host:], vp[n_host:]
            if src_k.device.type != "cpu":
                t0 = time.perf_counter()
                src_k, src_v = src_k.cpu(), src_v.cpu()
                self.engine.account("device->host", rest * self.stored.page_bytes, t0, layer, "store")
            self.table.set("disk", layer, pages[n_host:], self._to_disk(layer, pages[n_host:], slots, src_k, src_v))

    def split_new_pages(self, layer: int, first: int, count: int) -> tuple[list[int], list[int]]:
        """Of `count` new pages of `layer` from page `first` (the last one its tail), the indexes that go to the
        device and those that go below it. The newest go to the device while its share lasts; with kv_quant the
        sink pages too, ahead of them, so that they are never quantized."""
        on_device = self.new_pages_on_device(layer, count - 1)
        lower = count - 1 - on_device
        keep = min(on_device, max(0, sink_pages(self.config, self.shape.page_size) - first)) \
            if self.codec is not None and lower else 0
        return list(range(keep)) + list(range(lower + keep, count)), list(range(keep, lower + keep))

    def new_pages_on_device(self, layer: int, count: int) -> int:
        """Of `count` new full pages of `layer` (plus its tail, which stays on the device), how many go to the
        device: the layer's share while it lasts, more when the tiers below can't take the rest."""
        t = self.table
        share = max(0, self._device_share(layer) - 1 - int((t.slot["device"][layer] >= 0).sum()))
        # Layers other than this one that hold no page yet each need a device slot for their tail.
        tails = sum(1 for l in range(t.layers) if l != layer and t.tokens[l] == 0)
        spare = self.device.num_free - tails - 1
        on_device = max(0, min(count, share, spare))
        # Beyond the share when the tiers below can't take the rest (windowed models hold fewer pages in their
        # sliding layers, so a full layer may need more than an equal share of the device).
        short = count - on_device - self._room_below()
        if short > 0:
            on_device += min(short, max(0, spare - on_device))
        return on_device

    def _device_share(self, layer: int) -> int:
        """Device pages a layer's prefill may keep, its tail included: an equal share; in sparse mode a dense layer
        (which reads every page at every step) as many as it has, and the sparse layers share what those leave."""
        t, capacity = self.table, self.device.capacity
        dense = dense_rows(t, self.config)
        if not 0 < dense < t.layers:
            return -(-capacity // t.layers)
        if layer < dense:
            return t.max_pages
        held = int((t.slot["device"][:dense] >= 0).sum())
        return max(1, -(-(capacity - held) // (t.layers - dense)))

    def _room_below(self) -> int:
        """Pages the host and disk tiers can still take, slots of tiers not created yet included."""
        plan = self.plan
        host = self.host_tier.num_free if self.host_tier is not None else plan.host_pages - plan.host_staging_pages
        disk = self.disk_tier.capacity - self.disk_tier.num_used if self.disk_tier is not None else plan.disk_pages
        return max(0, host) + max(0, disk)

    # -- pages a sliding window left ---------------------------------------------------------------------------
    def release(self, layer: int, upto: int) -> None:
        """Frees pages first..upto-1 of `layer` in every tier and clears their entries (none may be busy)."""
        t = self.table
        a, b = t.first[layer], min(upto, t.max_pages)
        for name, tier in self.tiers():
            slots = t.slot[name][layer, a:b]
            held = slots[slots >= 0]
            if held.numel():
                tier.release(held.tolist())
        t.release(layer, b)

    def resident_pages(self) -> dict[str, int]:
        return {name: tier.num_used if tier is not None else 0 for name, tier in self.tiers()}

    def close(self) -> None:
        for _, tier in reversed(self.tiers()):
            if tier is not None:
                tier.close()


def _sync(t: Transfer) -> float:
    t0 = time.perf_counter()
    t.event.synchronize()  # the source is a temporary that must outlive the copy
    return time.perf_counter() - t0
