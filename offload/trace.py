"""Timeline recording. The runtime calls these methods only when `OffloadConfig.trace` is on; with tracing off it
holds `tracer = None` and records nothing.

Lifecycle: construct -> `span` / `cuda_span` / `instant` / `counter` while the run goes (from any thread) ->
`resolve()` (turns pending CUDA spans into host-clock events) -> `to_chrome()` / `save(path)`, or
`offload.report.summarize` and `offload.report.plot_timeline`.

Times are host `time.perf_counter()` seconds. Conventions the runtime follows (the report relies on them):

- transfers: track = the tier pair ("host->device", "device->host", "disk read" for disk->host,
  "disk write" for host->disk); name "load", "store" or "prefetch"; args
  {"bytes": int, "pages": int, "layer": int, "src": tier, "dst": tier, "thread": thread or stream name}.
- compute: track "compute", name "attention", args {"layer": int, "pages": int, "tokens": int}.
- stall (compute waiting for a copy): track "stall", name "wait", args {"layer": int, "on": transfer track}.
- policy decisions: instants on track "policy": "evict" (args tier, pages, layer), "prefetch hit" (predicted
  pages attention used) and "load needed" (pages loaded on demand), both with args layer, pages.
- counters: "occupancy" with values {"device": bytes, "host": bytes, "disk": bytes}, recorded whenever
  residency changes; the sampler (`offload/sampler.py`) adds "host rss", "disk io", "gpu memory", "pcie".

Chrome trace-event format (load the saved file in chrome://tracing or https://ui.perfetto.dev): one process for
the run, one thread per track, ordered as in `TRACK_ORDER`, counters on the "samples" thread; timestamps and
durations in microseconds from the first recorded event.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

# Display order of the tracks; tracks not listed here follow, in order of first appearance.
TRACK_ORDER = ("compute", "host->device", "device->host", "disk read", "disk write", "stall", "policy", "samples")
# Transfer tracks and the tier pair each one carries (the keys of `stats()["bytes_moved"]`).
TRANSFER_TRACKS = {
    "host->device": "host->device",
    "device->host": "device->host",
    "disk read": "disk->host",
    "disk write": "host->disk",
}
COUNTER_TRACK = "samples"
PROCESS_NAME = "offload"


@dataclass
class Event:
    track: str
    name: str
    start: float  # seconds, time.perf_counter() clock
    end: float | None  # None for an instant
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class CounterSample:
    name: str
    t: float  # seconds, time.perf_counter() clock
    values: dict[str, float]


class Tracer:
    """Collects events. Host-timed spans are stored as they come; GPU spans are CUDA event pairs resolved later.

    NOTE: recording is a bare `list.append`, atomic under the GIL, so transfer threads and the sampler thread
    record without a lock.
    """

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.counters: list[CounterSample] = []
        self._cuda_spans: list[tuple[str, str, Any, Any, dict]] = []
        self._cuda_origin: tuple[Any, float] | None = None  # (cuda event, perf_counter at its record)

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def span(self, track: str, name: str, start: float, end: float, **args: Any) -> None:
        self.events.append(Event(track, name, start, end, args))

    def instant(self, track: str, name: str, t: float | None = None, **args: Any) -> None:
        self.events.append(Event(track, name, self.now() if t is None else t, None, args))

    def counter(self, name: str, t: float | None, values: dict[str, float]) -> None:
        """A sample of one or more series, e.g. counter("occupancy", t, {"device": 4096, "host": 0, "disk": 0})."""
        self.counters.append(CounterSample(name, self.now() if t is None else t, dict(values)))

    def cuda_span(self, track: str, name: str, start_event: Any, end_event: Any, **args: Any) -> None:
        """A span timed on the GPU by two recorded torch.cuda.Event(enable_timing=True)."""
        if self._cuda_origin is None:
            import torch

            origin = torch.cuda.Event(enable_timing=True)
            origin.record()
            origin.synchronize()
            self._cuda_origin = (origin, self.now())
        self._cuda_spans.append((track, name, start_event, end_event, args))

    def resolve(self) -> None:
        """Turns pending CUDA spans into events on the host clock (waits for them to complete)."""
        if not self._cuda_spans:
            return
        origin, t0 = self._cuda_origin  # type: ignore[misc]
        for track, name, s, e, args in self._cuda_spans:
            e.synchronize()
            start = t0 + origin.elapsed_time(s) / 1e3
            end = t0 + origin.elapsed_time(e) / 1e3
            self.events.append(Event(track, name, start, end, args))
        self._cuda_spans.clear()

    # --- reading back -------------------------------------------------------------------------------------

    def spans(self, track: str | None = None) -> list[Event]:
        """Spans (events with an end), of one track or of all, sorted by start."""
        out = [e for e in self.events if e.end is not None and (track is None or e.track == track)]
        return sorted(out, key=lambda e: e.start)

    def samples(self, name: str) -> list[CounterSample]:
        """Samples of counter `name`, sorted by time."""
        return sorted((c for c in self.counters if c.name == name), key=lambda c: c.t)

    def time_range(self) -> tuple[float, float] | None:
        """(first, last) time over all events and counters; None when nothing was recorded."""
        times = [e.start for e in self.events] + [e.end for e in self.events if e.end is not None]
        times += [c.t for c in self.counters]
        if not times:
            return None
        return min(times), max(times)

    def tracks(self) -> list[str]:
        """Track names in display order: `TRACK_ORDER` first, then the others by first appearance."""
        seen = list(dict.fromkeys(e.track for e in self.events))
        if self.counters:
            seen.append(COUNTER_TRACK)
        known = [t for t in TRACK_ORDER if t in seen]
        return known + [t for t in seen if t not in TRACK_ORDER]

    # --- export -------------------------------------------------------------------------------------------

    def to_chrome(self) -> dict:
        """The trace as a Chrome trace-event JSON object: {"traceEvents": [...], "displayTimeUnit": "ms"}."""
        self.resolve()
        pid = os.getpid()
        rng = self.time_range()
        origin = rng[0] if rng is not None else 0.0
        # Known tracks keep fixed tids, so two traces of different runs line up track by track.
        tids = {name: i + 1 for i, name in enumerate(TRACK_ORDER)}
        for name in self.tracks():
            tids.setdefault(name, len(tids) + 1)

        def us(t: float) -> float:
            return round((t - origin) * 1e6, 3)

        out: list[dict] = [
            {"ph": "M", "name": "process_name", "ts": 0, "pid": pid, "tid": 0, "args": {"name": PROCESS_NAME}},
            {"ph": "M", "name": "process_sort_index", "ts": 0, "pid": pid, "tid": 0, "args": {"sort_index": 0}},
        ]
        for name in self.tracks():
            tid = tids[name]
            out.append({"ph": "M", "name": "thread_name", "ts": 0, "pid": pid, "tid": tid, "args": {"name": name}})
            out.append(
                {"ph": "M", "name": "thread_sort_index", "ts": 0, "pid": pid, "tid": tid, "args": {"sort_index": tid}}
            )
        for e in sorted(self.events, key=lambda e: e.start):
            ev: dict[str, Any] = {"name": e.name, "cat": e.track, "ts": us(e.start), "pid": pid, "tid": tids[e.track]}
            if e.end is None:
                ev.update(ph="i", s="t")
            else:
                ev.update(ph="X", dur=round(max(0.0, e.end - e.start) * 1e6, 3))
            if e.args:
                ev["args"] = {k: _json_value(v) for k, v in e.args.items()}
            out.append(ev)
        for c in sorted(self.counters, key=lambda c: c.t):
            values = {k: _json_value(v) for k, v in c.values.items()}
            tid = tids[COUNTER_TRACK]
            out.append({"ph": "C", "name": c.name, "ts": us(c.t), "pid": pid, "tid": tid, "args": values})
        return {"traceEvents": out, "displayTimeUnit": "ms"}

    def save(self, path: str | os.PathLike) -> None:
        """Writes the Chrome trace JSON to `path` (resolving pending CUDA spans first)."""
        self.resolve()
        with open(path, "w") as f:
            json.dump(self.to_chrome(), f)


def _json_value(v: Any) -> Any:
    """Event args as JSON: numbers, strings, booleans and lists stay; NaN/inf become null; anything else a string
    (a torch.device, a tensor scalar)."""
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return _json_value(v.item())
    return str(v)


@contextmanager
def _named_range(name: str):
    import torch

    with torch.profiler.record_function(name):
        if torch.cuda.is_available():
            torch.cuda.nvtx.range_push(name)
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()
        else:
            yield


def phase(name: str, tracing: bool):
    """A `torch.profiler.record_function` scope, and an NVTX range on CUDA, named `name`, so the runtime's phases
    show in torch.profiler traces and Nsight Systems. Free (a null context) unless tracing is on or a
    torch.profiler session is recording."""
    import torch

    if tracing or torch.autograd.profiler._is_profiler_enabled:
        return _named_range(name)
    return nullcontext()
