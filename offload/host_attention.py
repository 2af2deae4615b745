"""Attention on the host over host-resident pages, and the cost model that decides which pages it takes.

Exact offloading must move every non-resident page over the host-to-device link at every step. The host holds
those pages in its own RAM, which it reads at its own bandwidth, so it can attend over some of them itself and send
back only the partial result: per layer, an output row per query head and one log-sum-exp per row
(`attention_math.merge` combines the partials of disjoint page sets exactly, up to rounding).

`HostAttention` owns a thread pool sized to the host's cores. A job splits its pages into one chunk per thread;
each chunk gathers its pages head-major into a thread-local buffer (unpacking them when `kv_quant` packs the host
pool) and runs torch's fused CPU attention, which returns the chunk's output and log-sum-exp. Soft-capped scores
and masked keys (sparse mode's per-head blocks) take `attention_math.pages_partial` instead. On CUDA the query
crosses to the host once per layer (a copy into pinned memory, which the workers wait on through its event), and
the partials cross back once per job.

`split` is the cost model: given the rates measured when the runtime first needs them (`measure_rates`: the link,
the host's attention throughput, the device's, and a job's fixed cost), it picks how many of a layer's host pages
the host attends, so that the link's side (moving the others, then attending them with the device's own pages) and
the host's side finish together. On a GPU the two sides run at once; on a CPU-only machine they share the cores,
and the model adds them instead.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from offload import attention_math as am

MODES = ("auto", "off", "all")

# Pages per chunk below which a job is not split further: each chunk costs a dispatch and a merge.
MIN_CHUNK_PAGES = 4
# The modeled gain below which `split` keeps every page on the link.
MIN_GAIN = 0.1


def default_threads() -> int:
    """The host cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Rates:
    """What the cost model knows of the machine, in bytes of KV per second and seconds."""

    link: float  # host -> device copies, of pages as the host stores them
    host: float  # host attention, of pages as the host stores them, with the pool's threads
    device: float  # device attention, of full-precision pages (inf: negligible next to the link)
    overhead: float  # fixed cost of one host job: the query out, the dispatch, the partials back
    concurrent: bool  # the host's and the device's work overlap (a GPU); False: they share the CPU's cores


def step_seconds(moved: int, on_host: int, resident: int, page_bytes: float, full_bytes: float,
                 rates: Rates) -> float:
    """The modeled time of one layer's step: `moved` host pages cross the link and are attended on the device with
    its `resident` pages; `on_host` pages are attended on the host."""
    dev = moved * page_bytes / rates.link + (resident + moved) * full_bytes / rates.device
    host = rates.overhead + on_host * page_bytes / rates.host if on_host else 0.0
    return max(dev, host) if rates.concurrent else dev + host


def split(mode: str, pages: int, resident: int, page_bytes: float, full_bytes: float, rates: Rates | None) -> int:
    """How many of a layer's `pages` below the device (in host RAM, or read from disk into it) the host attends;
    the others cross the link. `resident` pages are on the device already.

    "off": none; "all": every one; "auto": the count that minimizes `step_seconds`, kept only when it beats moving
    them all by `MIN_GAIN` (the rates are measured, and a near tie is not worth a second path)."""
    if mode == "off" or pages <= 0:
        return 0
    if mode == "all":
        return pages
    if rates is None:
        raise ValueError("rates: the cost model needs measured rates in auto mode")

    def cost(k: int) -> float:
        return step_seconds(pages - k, k, resident, page_bytes, full_bytes, rates)

    # cost(k) is piecewise linear in k, so its minimum is at an end or next to where the two sides cross.
    per_link = page_bytes / rates.link + full_bytes / rates.device
    per_host = page_bytes / rates.host
    cross = (pages * per_link + resident * full_bytes / rates.device - rates.overhead) / (per_link + per_host)
    candidates = {0, pages}
    if math.isfinite(cross):
        candidates.update(min(pages, max(0, c)) for c in (math.floor(cross), math.ceil(cross)))
    best = min(sorted(candidates), key=cost)
    return best if cost(best) < (1 - MIN_GAIN) * cost(0) else 0


def pages_partial_host(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                       softcap: float | None = None, hidden: torch.Tensor | None = None) -> am.Partial:
    """Attention of q [H, M, D] over head-major keys and values k, v [H, S, D] (on the CPU) -> (o, lse) float32.
    `hidden` (a mask broadcastable to the scores [1, H, M, S] reshaped per page, see `pages_partial`) and
    soft-capping take the reference path; otherwise torch's fused CPU attention, which returns the log-sum-exp."""
    if softcap is None and hidden is None:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.to(k.dtype).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale=scaling)[:2]
        return o[0].float(), lse[0]
    return am.dense_partial(q, k, v, scaling, softcap=softcap)


class HostJob:
    """The partials of one job, one per chunk; `result` waits for them and puts them on the device."""

    def __init__(self, futures: list[Future], device: torch.device):
        self.futures = futures
        self.device = device

    def result(self, timeout: float | None = None) -> list[am.Partial]:
        parts = [f.result(timeout=timeout) for f in self.futures]
        if not parts or self.device.type == "cpu":
            return parts
        o = torch.stack([p[0] for p in parts]).to(self.device, non_blocking=True)
        lse = torch.stack([p[1] for p in parts]).to(self.device, non_blocking=True)
        return list(zip(o.unbind(0), lse.unbind(0)))


class HostAttention:
    """The host's attention pool (see the module note). `k`, `v`: the host pool (page-major; packed rows with a
    `codec`), attached when the host tier exists."""

    def __init__(self, kv_heads: int, page_size: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 codec=None, threads: int | None = None, tracer=None):
        self.kv_heads, self.page_size, self.head_dim = kv_heads, page_size, head_dim
        self.dtype = dtype
        self.device = device
        self.codec = codec
        self.threads = threads or default_threads()
        # One intra-op thread per worker (a per-thread setting): the pool spreads the work over the cores.
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="offload-host-attention",
                                       initializer=torch.set_num_threads, initargs=(1,))
        self.tracer = tracer
        self.k = self.v = None
        self.local = threading.local()
        self.full_page_bytes = 2 * kv_heads * page_size * head_dim * torch.empty((), dtype=dtype).element_size()
        self.page_bytes = codec.page_bytes if codec is not None else self.full_page_bytes
        self.counts = {"jobs": 0, "pages": 0, "bytes": 0}
        self.rates: Rates | None = None
        self._query: tuple[torch.Tensor, object] | None = None  # CUDA: pinned query buffer of the current job

    def attach(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    # -- the kernel ----------------------------------------------------------------------------------------
    def _buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This thread's head-major buffers [H, n, P, D], grown as needed."""
        have = getattr(self.local, "k", None)
        if have is None or have.shape[1] < n:
            shape = (self.kv_heads, max(n, MIN_CHUNK_PAGES), self.page_size, self.head_dim)
            self.local.k = torch.empty(shape, dtype=self.dtype)
            self.local.v = torch.empty(shape, dtype=self.dtype)
        return self.local.k[:, :n], self.local.v[:, :n]

    def chunk(self, q: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor, rows: torch.Tensor, scaling: float,
              softcap: float | None, hidden: torch.Tensor | None = None, packed: bool = False) -> am.Partial:
        """The partial of q [H, M, D] over pages `rows` (int64, CPU) of k_src, v_src (page-major, on the CPU;
        packed rows when `packed`). `hidden`: bool [n, T, P] or [n, H, M, P] as in `pages_partial`."""
        with torch.inference_mode():
            if hidden is not None:  # masked keys: the reference path, page-major
                if packed:
                    k, v = self.codec.decode(k_src.index_select(0, rows), v_src.index_select(0, rows), self.dtype)
                else:
                    k, v = k_src.index_select(0, rows), v_src.index_select(0, rows)
                return am.pages_partial(q, k, v, scaling, softcap, hidden)
            n = rows.numel()
            hk, hv = self._buffers(n)
            if packed:
                k, v = self.codec.decode(k_src.index_select(0, rows), v_src.index_select(0, rows), self.dtype)
                hk.copy_(k.transpose(0, 1))
                hv.copy_(v.transpose(0, 1))
            else:  # one pass each: page-major rows straight into the head-major buffer
                torch.index_select(k_src, 0, rows, out=hk.transpose(0, 1))
                torch.index_select(v_src, 0, rows, out=hv.transpose(0, 1))
            S = n * self.page_size
            return pages_partial_host(q, hk.reshape(self.kv_heads, S, self.head_dim),
                                      hv.reshape(self.kv_heads, S, self.head_dim), scaling, softcap)

    # -- jobs ----------------------------------------------------------------------------------------------
    def query_to_host(self, q: torch.Tensor) -> tuple[torch.Tensor, object]:
        """q on the host, and an event the workers wait on before reading it (None on the CPU)."""
        if q.device.type == "cpu":
            return q, None
        buf = torch.empty(q.shape, dtype=q.dtype, pin_memory=True)
        buf.copy_(q, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return buf, event

    def submit(self, q: torch.Tensor, rows: torch.Tensor, scaling: float, softcap: float | None = None,
               hidden: torch.Tensor | None = None, source: tuple[torch.Tensor, torch.Tensor] | None = None,
               layer: int = -1, query: tuple[torch.Tensor, object] | None = None,
               packed: bool | None = None) -> HostJob:
        """Starts attending q [H, M, D] (on the compute device) over `rows` (int64, CPU) of the host pool, or of
        `source` (pages on the CPU, such as pages just read from disk: full precision unless `packed`). `hidden`
        (CPU) as in `chunk`. `query`: the query already on the host (`query_to_host`), shared by a layer's jobs."""
        qh, event = query if query is not None else self.query_to_host(q)
        k_src, v_src = source if source is not None else (self.k, self.v)
        if packed is None:
            packed = source is None and self.codec is not None
        n = rows.numel()
        chunks = max(1, min(self.threads, n // MIN_CHUNK_PAGES))
        bounds = [n * i // chunks for i in range(chunks + 1)]
        futures = []
        for a, b in zip(bounds, bounds[1:]):
            hid = hidden[a:b] if hidden is not None and hidden.shape[0] == n else hidden
            futures.append(self.pool.submit(self._run, qh, event, k_src, v_src, rows[a:b], scaling, softcap, hid,
                                            packed, layer))
        self.counts["jobs"] += 1
        self.counts["pages"] += n
        self.counts["bytes"] += n * (self.page_bytes if packed else self.full_page_bytes)
        return HostJob(futures, self.device)

    def _run(self, q, event, k_src, v_src, rows, scaling, softcap, hidden, packed, layer) -> am.Partial:
        t0 = time.perf_counter()
        if event is not None:
            event.synchronize()
        out = self.chunk(q, k_src, v_src, rows, scaling, softcap, hidden, packed)
        if self.tracer is not None:
            self.tracer.span("host attention", "attend", t0, time.perf_counter(), layer=layer, pages=rows.numel(),
                             thread=threading.current_thread().name)
        return out

    # -- calibration -----------------------------------------------------------------------------------------
    def measure(self, pages: int = 256, repeats: int = 5) -> tuple[float, float]:
        """(bytes/s of KV the pool attends over `pages` pages, seconds of a one-page job), medians of `repeats`
        timed jobs over synthetic pages stored as the host pool stores them."""
        q = torch.randn(self.kv_heads, 8, self.head_dim)
        k = torch.randn(pages, self.kv_heads, self.page_size, self.head_dim).to(self.dtype)
        v = torch.randn_like(k)
        if self.codec is not None:
            k, v = self.codec.encode(k, v)
        rows = torch.randperm(pages)
        packed = self.codec is not None
        saved = self.counts.copy()

        def timed(r: torch.Tensor) -> float:
            t0 = time.perf_counter()
            self.submit(q, r, 0.1, source=(k, v), query=(q, None), packed=packed).result()
            return time.perf_counter() - t0

        timed(rows)  # warm-up: buffers, threads
        big = statistics.median(timed(rows) for _ in range(repeats))
        one = statistics.median(timed(rows[:1]) for _ in range(repeats))
        self.counts = saved
        return pages * self.page_bytes / max(big - one, 1e-9), one


def measure_rates(host: HostAttention, device: torch.device) -> Rates:
    """The cost model's inputs, measured on this machine: the link (`offload.bandwidth`), the host pool's attention
    throughput and fixed cost, and the device's attention throughput (the CPU: the same kernel on the calling
    thread; a GPU: taken as unbounded, its HBM reads pages far faster than the link brings them)."""
    from offload.bandwidth import measure_h2d_bandwidth

    link = measure_h2d_bandwidth(device, nbytes=32 * 1024**2, repeats=3)
    host_rate, overhead = host.measure()
    if device.type == "cuda":
        return Rates(link=link, host=host_rate, device=float("inf"), overhead=overhead, concurrent=True)
    pages = 64
    q = torch.randn(host.kv_heads, 8, host.head_dim)
    k = torch.randn(host.kv_heads, pages * host.page_size, host.head_dim).to(host.dtype)
    v = torch.randn_like(k)
    pages_partial_host(q, k, v, 0.1)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        pages_partial_host(q, k, v, 0.1)
        times.append(time.perf_counter() - t0)
    dev_rate = pages * host.full_page_bytes / statistics.median(times)
    return Rates(link=link, host=host_rate, device=dev_rate, overhead=overhead, concurrent=False)
