"""The load ring: pages on their way to the device for attention, pipelined across chunks and layers.

The workspace's load area is a ring of R buffers of C pages each. Requests are chunks of (layer, pages) kept in
the order attention will consume them: the current layer's pages first, then the pages predicted for the next
layer. Whenever a buffer is free the next request is issued into it, so copies for chunk j+1, j+2, ... run while
chunk j is being attended, and the link stays busy across layer boundaries. A buffer is freed once its chunk has
been attended (on CUDA the next copy into it waits for the compute stream, so it can't overwrite unread data).

A batch's step loads the pages of several rows (its sequences' rows of one layer) as one request: its chunks hold
pages of any of those rows (`Job.rows`), under a key of the caller's (`Job.key`) that no row uses.

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


@dataclass(eq=False)  # (a job is equal to itself alone: the queues remove it by identity)
class Job:
    layer: int  # the page table row of the pages (over several rows: the first of the batch's layer, for messages)
    pages: torch.Tensor  # page ids in buffer order
    predicted: bool  # a prefetch (counts towards prefetch hits) or an on-demand load
    buf: int = -1
    transfers: list[Transfer] = field(default_factory=list)
    rows: torch.Tensor | None = None  # over several rows: the row of each page (int64, CPU)
    key: int | tuple = -1  # what the job is asked for and consumed by: its row, or the request's key over rows

    def __post_init__(self) -> None:
        if self.rows is None:
            self.key = self.layer

    def where(self) -> tuple[int | torch.Tensor, torch.Tensor]:
        """(rows, pages) of the job's pages, to index the page table's [rows, max_pages] tensors with."""
        return (self.layer if self.rows is None else self.rows), self.pages


class LoadRing:
    """`load(job, k_out, v_out)` starts the copies of a chunk, puts its pages (and rows) in buffer order and keeps
    its transfers in the job; `unbusy(rows, pages)` ends their busy mark; `stall(layer, seconds)` reports a wait;
    `count(pages, predicted)` counts pages issued."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, table: PageTable,
                 load: Callable[[Job, torch.Tensor, torch.Tensor], None],
                 unbusy: Callable[[int | torch.Tensor, torch.Tensor], None], stall: Callable[[int, float], None],
                 count: Callable[[int, bool], None], traced: bool):
        self.table, self.load, self.unbusy, self.stall, self.count, self.traced = (table, load, unbusy, stall,
                                                                                    count, traced)
        self.k, self.v = k, v  # [R, C, H, P, D]
        self.chunk = k.shape[1]
        self.free: deque[int] = deque(range(k.shape[0]))
        self.pending: deque[Job] = deque()
        self.inflight: deque[Job] = deque()

    def request(self, layer: int, pages: torch.Tensor, predicted: bool, front: bool = False,
                rows: torch.Tensor | None = None, key: tuple | None = None) -> None:
        """Queues `pages` of row `layer` for loading, in chunks; `front` puts them before everything queued. Over
        several rows: `rows` gives the row of each page and `key` names the request (`layer` is for messages)."""
        c = self.chunk
        jobs = [Job(layer, pages[i:i + c], predicted, rows=None if rows is None else rows[i:i + c], key=key)
                for i in range(0, pages.numel(), c)]
        if front:
            self.pending.extendleft(reversed(jobs))
        else:
            self.pending.extend(jobs)

    def covered(self, key: int | tuple) -> torch.Tensor:
        """Pages of row `key` (or of the request keyed `key`) already being copied."""
        pages = [j.pages for j in self.inflight if j.key == key]
        return torch.cat(pages) if pages else torch.empty(0, dtype=torch.long)

    def covered_rows(self, key: tuple) -> torch.Tensor:
        """The rows of `covered(key)`'s pages, a request over several rows."""
        rows = [j.rows for j in self.inflight if j.key == key]
        return torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)

    def discard_pending(self, key: int | tuple) -> None:
        self.pending = deque(j for j in self.pending if j.key != key)

    def pump(self) -> None:
        """Issues queued chunks into free buffers."""
        while self.free and self.pending:
            job = self.pending.popleft()
            if job.predicted:
                # A prediction may be stale by now: skip pages that reached the device or are busy.
                t = self.table
                rows, pages = job.where()
                first = t.first[rows] if job.rows is None else torch.tensor(t.first)[rows]
                # Pages a sliding window released since live nowhere and must not be read.
                keep = (t.slot["device"][rows, pages] < 0) & (t.busy[rows, pages] == 0) & (pages >= first)
                job.pages = job.pages[keep]
                if job.rows is not None:
                    job.rows = job.rows[keep]
                if job.pages.numel() == 0:
                    continue
                self.count(job.pages.numel(), True)
            job.buf = self.free.popleft()
            with phase("offload.load", self.traced):
                self.load(job, self.k[job.buf], self.v[job.buf])
            self.inflight.append(job)

    def consume(self, key: int | tuple) -> Iterator[tuple[Job, torch.Tensor, torch.Tensor]]:
        """Yields the chunks of `key` (a row, or a request's key), in order, each once its copy is done: (job, k,
        v) with k and v [n, H, P, D]. The buffer is freed when the caller asks for the next one. Chunks of others
        issued before them (loads ahead for a row that a batch's step served, or the reverse) are passed over, and
        when every buffer holds one of those while `key` still has chunks queued, the oldest gives its buffer up,
        unread: its pages are asked for again when needed."""
        while True:
            job = next((j for j in self.inflight if j.key == key), None)
            if job is None:
                if not any(j.key == key for j in self.pending):
                    return
                if not self.free:
                    self._retire(self.inflight.popleft())
                self.pump()
                continue
            self.inflight.remove(job)
            with phase("offload.wait", self.traced):
                for t in job.transfers:
                    self.stall(job.layer, t.wait())
            self.unbusy(*job.where())
            n = job.pages.numel()
            yield job, self.k[job.buf, :n], self.v[job.buf, :n]
            self.free.append(job.buf)
            self.pump()

    def forget(self, key: int | tuple) -> None:
        """Drops every request of row `key` (or the request keyed `key`), waiting for those in flight: it was served
        another way. Nothing to do (the common case, every decode step of a layer served on the device) costs no
        copy of the queues."""
        if not self.pending and not self.inflight:
            return
        self.discard_pending(key)
        if not any(j.key == key for j in self.inflight):
            return
        keep: deque[Job] = deque()
        for job in self.inflight:
            if job.key != key:
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
        self.unbusy(*job.where())
        self.free.append(job.buf)
