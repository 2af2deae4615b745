"""The load ring: pages on their way to the device for attention, pipelined across chunks and layers.

The workspace's load area is a ring of R buffers of C pages each. Requests are chunks of (layer, pages) kept in
the order attention will consume them: the current layer's pages first, then the pages predicted for the next
layer. Whenever a buffer is free the next request is issued into it, so copies for chunk j+1, j+2, ... run while
chunk j is being attended, and the link stays busy across layer boundaries. A buffer is freed once its chunk has
been attended (on CUDA the next copy into it waits for the compute stream, so it can't overwrite unread data).

Pages being copied are marked busy in the page table (two-phase transfers: eviction never takes them).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from offload.engine import Transfer
from offload.trace import phase

if TYPE_CHECKING:
    from offload.pagetable import PageTable


@dataclass
class Job:
    layer: int
    pages: torch.Tensor  # page ids in buffer order
    predicted: bool  # a prefetch (counts towards prefetch hits) or an on-demand load
    buf: int = -1
    transfers: list[Transfer] = field(default_factory=list)


class LoadRing:
    """`load(layer, pages, k_out, v_out)` starts the copies of a chunk and returns (pages in buffer order,
    transfers); `unbusy(layer, pages)` ends their busy mark; `stall(layer, seconds)` reports a wait;
    `count(pages, predicted)` counts pages issued."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, table: PageTable,
                 load: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, list[Transfer]]],
                 unbusy: Callable[[int, torch.Tensor], None], stall: Callable[[int, float], None],
                 count: Callable[[int, bool], None], traced: bool):
        self.table, self.load, self.unbusy, self.stall, self.count, self.traced = (table, load, unbusy, stall,
                                                                                    count, traced)
        self.k, self.v = k, v  # [R, C, H, P, D]
        self.chunk = k.shape[1]
        self.free: deque[int] = deque(range(k.shape[0]))
        self.pending: deque[Job] = deque()
        self.inflight: deque[Job] = deque()

    def request(self, layer: int, pages: torch.Tensor, predicted: bool, front: bool = False) -> None:
        """Queues `pages` of `layer` for loading, in chunks; `front` puts them before everything queued."""
        jobs = [Job(layer, pages[i:i + self.chunk], predicted) for i in range(0, pages.numel(), self.chunk)]
        if front:
            self.pending.extendleft(reversed(jobs))
        else:
            self.pending.extend(jobs)

    def covered(self, layer: int) -> torch.Tensor:
        """Pages of `layer` already being copied."""
        pages = [j.pages for j in self.inflight if j.layer == layer]
        return torch.cat(pages) if pages else torch.empty(0, dtype=torch.long)

    def discard_pending(self, layer: int) -> None:
        self.pending = deque(j for j in self.pending if j.layer != layer)

    def pump(self) -> None:
        """Issues queued chunks into free buffers."""
        while self.free and self.pending:
            job = self.pending.popleft()
            if job.predicted:
                # A prediction may be stale by now: skip pages that reached the device or are busy.
                t = self.table
                # Pages a sliding window released since live nowhere and must not be read.
                keep = ((t.slot["device"][job.layer, job.pages] < 0) & (t.busy[job.layer, job.pages] == 0)
                        & (job.pages >= t.first[job.layer]))
                job.pages = job.pages[keep]
                if job.pages.numel() == 0:
                    continue
                self.count(job.pages.numel(), True)
            job.buf = self.free.popleft()
            with phase("offload.load", self.traced):
                job.pages, job.transfers = self.load(job.layer, job.pages, self.k[job.buf], self.v[job.buf])
            self.inflight.append(job)

    def consume(self, layer: int) -> Iterator[tuple[Job, torch.Tensor, torch.Tensor]]:
        """Yields the in-flight chunks of `layer` in order, each once its copy is done: (job, k, v) with k and v
        [n, H, P, D]. The buffer is freed when the caller asks for the next one."""
        while self.inflight and self.inflight[0].layer == layer:
            job = self.inflight.popleft()
            with phase("offload.wait", self.traced):
                for t in job.transfers:
                    self.stall(layer, t.wait())
            self.unbusy(layer, job.pages)
            n = job.pages.numel()
            yield job, self.k[job.buf, :n], self.v[job.buf, :n]
            self.free.append(job.buf)
            self.pump()

    def forget(self, layer: int) -> None:
        """Drops every request of `layer`, waiting for those in flight: the layer was served another way. Nothing
        to do (the common case, every decode step of a layer served on the device) costs no copy of the queues."""
        if not self.pending and not self.inflight:
            return
        self.discard_pending(layer)
        if not any(j.layer == layer for j in self.inflight):
            return
        keep: deque[Job] = deque()
        for job in self.inflight:
            if job.layer != layer:
                keep.append(job)
            else:
                self._retire(job)
        self.inflight = keep
        self.pump()

    def drain(self, quiet: bool = False) -> None:
        """Waits for every copy in flight and forgets every request; `quiet`: a copy that fails does not raise."""
        self.pending.clear()
        while self.inflight:
            try:
                self._retire(self.inflight.popleft(), quiet)
            except TimeoutError:
                if not quiet:
                    raise
                self.inflight.clear()  # a stuck copy: the others are not waited for either

    def _retire(self, job: Job, quiet: bool = False) -> None:
        """Waits for a job's copies, ends its pages' busy mark and frees its buffer, unread."""
        for t in job.transfers:
            try:
                t.wait()
            except TimeoutError:
                raise
            except Exception:
                if not quiet:
                    raise
        self.unbusy(job.layer, job.pages)
        self.free.append(job.buf)
