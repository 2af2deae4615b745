"""What a traced run did: in numbers, `summarize(stats, tracer)` and `summary_markdown(summary)`; as a picture,
`plot_timeline(tracer, path, stats)`.

The summary (a JSON-ready dict):
- "transfers": per tier pair ("host->device", "device->host", "host->disk", "disk->host"): "bytes" (from
  stats, so equal to `stats()["bytes_moved"]`), "spans", "traced_bytes" (the sum of the spans' bytes args),
  "busy_seconds" (length of the union of the track's spans), "bandwidth_gbps" = traced_bytes / busy_seconds / 1e9.
- "time": "wall_seconds" (first to last recorded event), "compute_seconds" (compute spans minus stalls),
  "compute_span_seconds" (compute spans as recorded), "transfer_seconds" (union over all transfer tracks),
  "overlap_seconds" (time a transfer runs while compute is not stalled), "stall_seconds" (= stats when present),
  "stall_traced_seconds" (union of stall spans), "idle_seconds" (none of compute, transfer, stall).
- "stall_seconds", "stall_seconds_per_layer", "loads" {"needed","predicted","promoted"},
  "prefetch" {"issued","hits","accuracy","prefetched_share"}
  (see `prefetch_ratios`),
  "occupancy" {tier: {"peak_bytes","mean_bytes","final_bytes","budget_bytes"}}, "tokens", "kv_bytes",
  "attended_fraction", and the raw "stats".

NOTE: every number the summary shares with `stats()` is copied from it, never recomputed from the trace,
so the two always agree for the same run; the trace only adds what stats cannot know (timing, overlap).
Bandwidth divides the bytes the timed spans carried, not stats' bytes: stats also count legs that have no copy
of their own to time (on a CPU device a disk read lands straight in the workspace and counts as disk->host and
host->device), and dividing those by the busy time of other copies would overstate the bandwidth.
Times are lengths of unions of intervals (exact interval arithmetic), not sampled.

NOTE: the runtime's "attention" span covers the whole attention call, waits for copies included, and the
waits are also stall spans inside it. Compute is therefore taken as compute minus stall, or a copy that compute
waits on would count as overlapped with compute; where stalls lie outside compute spans this changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from offload.sizes import format_size
from offload.trace import TRANSFER_TRACKS, Tracer

PAIRS = ("host->device", "device->host", "host->disk", "disk->host")
TIERS = ("device", "host", "disk")
TRACK_OF_PAIR = {pair: track for track, pair in TRANSFER_TRACKS.items()}

Interval = tuple[float, float]


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering the same points as `intervals` (empty ones dropped)."""
    merged: list[list[float]] = []
    for s, e in sorted((s, e) for s, e in intervals if e > s):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def union_length(intervals: Iterable[Interval]) -> float:
    return sum(e - s for s, e in union(intervals))


def difference(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
    """(union of a) minus (union of b), as sorted disjoint intervals."""
    out: list[Interval] = []
    ub = union(b)
    j = 0
    for s, e in union(a):
        while j < len(ub) and ub[j][1] <= s:
            j += 1
        k = j
        while k < len(ub) and ub[k][0] < e:
            if ub[k][0] > s:
                out.append((s, ub[k][0]))
            s = max(s, ub[k][1])
            k += 1
        if s < e:
            out.append((s, e))
    return out


def intersection_length(a: Iterable[Interval], b: Iterable[Interval]) -> float:
    """Length of (union of a) ∩ (union of b), by a merge of the two sorted unions."""
    ua, ub = union(a), union(b)
    i = j = 0
    total = 0.0
    while i < len(ua) and j < len(ub):
        lo, hi = max(ua[i][0], ub[j][0]), min(ua[i][1], ub[j][1])
        total += max(0.0, hi - lo)
        if ua[i][1] < ub[j][1]:
            i += 1
        else:
            j += 1
    return total


def _intervals(tracer: Tracer | None, tracks: Iterable[str]) -> list[Interval]:
    if tracer is None:
        return []
    wanted = set(tracks)
    return [(e.start, e.end) for e in tracer.spans() if e.track in wanted and e.end is not None]


def _mean_occupancy(tracer: Tracer | None, end: float | None) -> dict[str, float]:
    """Time-weighted mean of each series of the "occupancy" counter: a sample holds until the next one, the
    last until `end` (the end of the trace)."""
    samples = tracer.samples("occupancy") if tracer is not None else []
    if not samples:
        return {}
    last_t = samples[-1].t if end is None else max(end, samples[-1].t)
    span = last_t - samples[0].t
    out: dict[str, float] = {}
    for tier in dict.fromkeys(k for s in samples for k in s.values):
        values = [float(s.values.get(tier, 0.0)) for s in samples]
        if span <= 0:
            out[tier] = sum(values) / len(values)
            continue
        times = [s.t for s in samples] + [last_t]
        out[tier] = sum(v * (times[i + 1] - times[i]) for i, v in enumerate(values)) / span
    return out


def summarize(stats: Mapping[str, Any], tracer: Tracer | None) -> dict[str, Any]:
    """The summary of one run from its `rt.stats()` and its tracer (None: stats only, no timing)."""
    if tracer is not None:
        tracer.resolve()
    stats = _plain(dict(stats))
    rng = tracer.time_range() if tracer is not None else None
    moved = stats.get("bytes_moved", {})

    transfers: dict[str, Any] = {}
    for pair in PAIRS:
        track = TRACK_OF_PAIR[pair]
        spans = tracer.spans(track) if tracer is not None else []
        traced = sum(int(e.args.get("bytes", 0)) for e in spans)
        busy = union_length((e.start, e.end) for e in spans if e.end is not None)
        nbytes = moved.get(pair, traced)
        transfers[pair] = {
            "track": track,
            "bytes": nbytes,
            "spans": len(spans),
            "traced_bytes": traced,
            "busy_seconds": busy,
            "bandwidth_gbps": traced / busy / 1e9 if busy > 0 else None,
        }

    compute_spans = _intervals(tracer, ["compute"])
    transfer = _intervals(tracer, TRANSFER_TRACKS)
    stall = _intervals(tracer, ["stall"])
    compute = difference(compute_spans, stall)
    wall = rng[1] - rng[0] if rng is not None else 0.0
    stall_traced = union_length(stall)
    time = {
        "wall_seconds": wall,
        "compute_seconds": union_length(compute),
        "compute_span_seconds": union_length(compute_spans),
        "transfer_seconds": union_length(transfer),
        "overlap_seconds": intersection_length(compute, transfer),
        "stall_seconds": stats.get("stall_seconds", stall_traced),
        "stall_traced_seconds": stall_traced,
        "idle_seconds": max(0.0, wall - union_length(compute_spans + transfer + stall)),
    }

    per_layer = stats.get("stall_seconds_per_layer")
    if per_layer is None:
        by_layer: dict[int, float] = {}
        for e in tracer.spans("stall") if tracer is not None else []:
            layer = int(e.args.get("layer", -1))
            by_layer[layer] = by_layer.get(layer, 0.0) + (e.end or e.start) - e.start
        per_layer = [by_layer.get(i, 0.0) for i in range(max(by_layer, default=-1) + 1)]

    pf = dict(stats.get("prefetch") or {})
    pf.update(prefetch_ratios(pf, stats.get("loads")))

    means = _mean_occupancy(tracer, rng[1] if rng is not None else None)
    budgets = stats.get("budgets") or {}
    occupancy = {
        tier: {
            "peak_bytes": stats.get("peak_resident_bytes", {}).get(tier),
            "mean_bytes": means.get(tier),
            "final_bytes": stats.get("resident_bytes", {}).get(tier),
            "budget_bytes": budgets.get(tier),
        }
        for tier in TIERS
    }
    return {
        "transfers": transfers,
        "time": time,
        "stall_seconds": time["stall_seconds"],
        "stall_seconds_per_layer": per_layer,
        "loads": dict(stats.get("loads") or {}),
        "prefetch": pf,
        "occupancy": occupancy,
        "tokens": stats.get("tokens"),
        "kv_bytes": stats.get("kv_bytes"),
        "attended_fraction": stats.get("attended_fraction"),
        "events": len(tracer.events) if tracer is not None else 0,
        "stats": stats,
    }


def prefetch_ratios(prefetch: Mapping[str, Any] | None, loads: Mapping[str, Any] | None = None
                    ) -> dict[str, float | None]:
    """The two ratios of `stats()["prefetch"]`, each None where no prediction was made (exact mode, or no pages
    issued) or its denominator is 0.

    - "accuracy" = hits / issued: of the pages loaded ahead on a prediction, the share attention then used. This
      is how good the prediction was.
    - "prefetched_share" = hits / (hits + loads needed): of the pages attention had to load, the share that arrived
      by prefetch rather than on demand.
    """
    issued, hits = (int((prefetch or {}).get(k, 0) or 0) for k in ("issued", "hits"))
    needed = int((loads or {}).get("needed", 0) or 0)
    return {
        "accuracy": hits / issued if issued > 0 else None,
        "prefetched_share": hits / (hits + needed) if issued > 0 and hits + needed > 0 else None,
    }


TIME_ROWS = (
    ("wall_seconds", "wall (first to last event)"),
    ("compute_seconds", "compute (not stalled)"),
    ("transfer_seconds", "transfer (any tier pair)"),
    ("overlap_seconds", "transfer overlapped with compute"),
    ("stall_seconds", "stall (compute waiting for a copy)"),
    ("idle_seconds", "none of these"),
)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines; the first column left-aligned, the others right-aligned (numbers)."""
    return [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown tables (also what `offload profile` prints)."""
    lines = ["# offload run summary", ""]
    tokens = summary.get("tokens") or {}
    if tokens:
        lines += [f"Tokens: {tokens.get('prefill', 0)} prefill, {tokens.get('decode', 0)} decode. "
                  f"KV cache: {_size(summary.get('kv_bytes'))}. Trace events: {summary.get('events', 0)}.", ""]
    lines += ["## Transfers", ""]
    lines += markdown_table(
        ["tier pair", "bytes", "spans", "busy (s)", "bandwidth (GB/s)"],
        [[pair, _size(x["bytes"]), str(x["spans"]), f"{x['busy_seconds']:.4f}", _num(x["bandwidth_gbps"])]
         for pair, x in summary["transfers"].items()],
    )
    t = summary["time"]
    wall = t["wall_seconds"]
    lines += ["", "## Time", ""]
    lines += markdown_table(
        ["what", "seconds", "share of wall"],
        [[label, f"{t[key]:.4f}", f"{100 * t[key] / wall:.1f}%" if wall > 0 else "-"] for key, label in TIME_ROWS],
    )
    lines += ["", "## Occupancy", ""]
    lines += markdown_table(
        ["tier", "peak", "mean", "at end", "budget"],
        [[tier, *(_size(o[k]) for k in ("peak_bytes", "mean_bytes", "final_bytes", "budget_bytes"))]
         for tier, o in summary["occupancy"].items()],
    )
    pf, loads = summary["prefetch"], summary.get("loads") or {}
    lines += ["", "## Loads and prefetch", ""]
    rows = [["loads needed: pages the step attends to, brought to the device", str(loads.get("needed", 0))],
            ["loads predicted: pages loaded ahead on a prediction", str(loads.get("predicted", 0))],
            ["loads promoted: loaded pages kept on the device", str(loads.get("promoted", 0))]]
    if pf.get("accuracy") is not None:  # only where a prediction was made
        rows += [["prefetch hits: predicted pages that attention used", str(pf.get("hits", 0))],
                 ["accuracy: hits / predicted", _pct(pf.get("accuracy"))],
                 ["prefetched share of loads: hits / (hits + needed)", _pct(pf.get("prefetched_share"))]]
    lines += markdown_table(["pages", "count"], rows)
    if summary.get("attended_fraction") is not None:
        lines += ["", f"Attended fraction of the context: {summary['attended_fraction']:.3f}."]
    per_layer = summary.get("stall_seconds_per_layer") or []
    if per_layer:
        lines += ["", "## Stall per layer", ""]
        lines += markdown_table(["layer", "seconds"], [[str(i), f"{x:.4f}"] for i, x in enumerate(per_layer)])
    return "\n".join(lines) + "\n"


def _size(n: float | None) -> str:
    return "-" if n is None else format_size(n)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _plain(x: Any) -> Any:
    """A JSON-ready copy: tuples to lists, tensor/numpy scalars to Python numbers, NaN/inf to None."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# --- the timeline picture -------------------------------------------------------------------------------------

MIB = 1024**2
COLORS = {
    "device": "tab:green", "host": "tab:blue", "disk": "tab:brown",
    "compute": "tab:gray", "host->device": "tab:green", "device->host": "tab:olive",
    "disk read": "tab:purple", "disk write": "tab:brown", "stall": "tab:red",
}
LANES = ("compute", "host->device", "device->host", "disk read", "disk write", "stall")
LANE_BINS = 500  # time slices of the lane chart, about 2 pixels each
# Legends right of the plots: the data fills the panels edge to edge, so any inside spot hides some of it.
LEGEND: dict[str, Any] = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8, "borderaxespad": 0.0}


def plot_timeline(tracer: Tracer, path: str, stats: Mapping[str, Any] | None = None, bins: int = 200) -> None:
    """Writes a PNG of the run: tier occupancy, transfer bandwidth, what ran when, and (when sampled) the
    process's memory and I/O as the OS saw them. All panels share one time axis, seconds from the first event.
    `stats` adds the tier budgets (stats["budgets"]) and token counts to the picture."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tracer.resolve()
    stats = stats or {}
    rng = tracer.time_range() or (0.0, 1.0)
    t0, total = rng[0], max(rng[1] - rng[0], 1e-9)
    sampled = [n for n in ("host rss", "gpu memory", "pcie", "disk io") if tracer.samples(n)]
    rows = 4 if sampled else 3
    # Figure, not pyplot: no global backend switch and no figure registry inside a library.
    fig = Figure(figsize=(13, 3.0 * rows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, height_ratios=[1.0, 1.0, 0.9] + [0.9] * (rows - 3))
    tokens = stats.get("tokens") or {}
    title = "offload run timeline: where the KV cache lived and what moved it"
    if tokens:
        title += f"  ({tokens.get('prefill', 0)} prefill + {tokens.get('decode', 0)} decode tokens)"
    fig.suptitle(title, fontsize=13)

    # (1) occupancy: a step function, each sample holds until the next.
    ax = axes[0]
    occ = tracer.samples("occupancy")
    budgets = stats.get("budgets") or {}
    top = 0.0
    for tier in TIERS:
        if not occ:
            break
        ts = [c.t - t0 for c in occ] + [total]
        vs = [c.values.get(tier, 0.0) / MIB for c in occ]
        top = max(top, *vs)
        ax.step(ts, vs + vs[-1:], where="post", color=COLORS[tier], lw=1.8,
                label=f"{tier} (peak {format_size(max(vs) * MIB)})")
    top = top or 1.0
    for tier in TIERS:
        b = budgets.get(tier)
        if b is None:
            continue
        off = b / MIB > 3 * top  # a huge budget would flatten the usage lines; name it instead of drawing it
        ax.axhline(b / MIB, color=COLORS[tier], ls="--", lw=1.2,
                   label=f"{tier} budget {format_size(b)}" + (" (above the plot)" if off else ""))
    visible = [b / MIB for b in budgets.values() if b is not None and b / MIB <= 3 * top]
    ax.set_ylim(0, 1.12 * max([top, *visible]))
    ax.set_ylabel("KV cache resident (MiB)")
    ax.set_title("Occupancy per tier (dashed: budget)", loc="left", fontsize=10)
    if not occ:
        ax.text(0.5, 0.5, "no occupancy samples recorded", transform=ax.transAxes, ha="center", color="gray")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**LEGEND)

    # (2) bandwidth: each span's bytes spread evenly over its duration, then summed per time bin.
    ax = axes[1]
    edges = np.linspace(0.0, total, bins + 1)
    width = edges[1] - edges[0]
    curves = {track: _bytes_per_bin(tracer.spans(track), t0, edges) for track in TRANSFER_TRACKS if tracer.spans(track)}
    peak = max((c.max() / width for c in curves.values()), default=0.0)
    unit, scale = ("GB/s", 1e9) if peak >= 1e9 else ("MB/s", 1e6)
    for track, per_bin in curves.items():
        rate = per_bin / width / scale
        ax.step(edges, np.append(rate, rate[-1]), where="post", color=COLORS[track], lw=1.4, label=_lane_label(track))
    ax.set_ylabel(f"transfer rate ({unit})")
    ax.set_title(f"Transfer bandwidth per tier pair, averaged over {width * 1e3:.3g} ms bins", loc="left", fontsize=10)
    if curves:
        ax.legend(**LEGEND)
    else:
        ax.text(0.5, 0.5, "no transfers recorded", transform=ax.transAxes, ha="center", color="gray")
    ax.set_ylim(bottom=0)

    # (3) lanes: what ran when, as the busy share of each time slice. Drawing every span instead would need a
    # minimum width to show the short ones, and thousands of 1 ms copies would then paint a 60 s run solid.
    ax = axes[2]
    lanes = [lane for lane in LANES if tracer.spans(lane)] or ["compute"]
    lanes += [t for t in tracer.tracks() if t not in LANES and t not in ("policy", "samples") and tracer.spans(t)]
    lane_edges = np.linspace(0.0, total, LANE_BINS + 1)
    stalls = [(e.start - t0, e.end - t0) for e in tracer.spans("stall") if e.end is not None]
    for i, lane in enumerate(lanes):
        y = len(lanes) - 1 - i
        spans = [(e.start - t0, e.end - t0) for e in tracer.spans(lane) if e.end is not None]
        if lane == "compute":  # the attention span includes its waits; show those once, as stall
            spans = difference(spans, stalls)
        busy = _busy_per_bin(union(spans), lane_edges)
        # A slice with any activity gets at least a sliver, so a lone short copy stays visible.
        heights = np.where(busy > 0, np.maximum(busy, 0.06), 0.0) * 0.8
        # One filled step outline per lane: a bar per slice would be thousands of artists to draw.
        ax.fill_between(lane_edges, y - 0.4, y - 0.4 + np.append(heights, heights[-1]), step="post", lw=0,
                        color=COLORS.get(lane, "tab:cyan"))
        ax.axhline(y - 0.4, color="lightgray", lw=0.6, zorder=0)
    policy = [e for e in tracer.events if e.track == "policy" and e.end is None]
    marks = {"evict": ("black", "x"), "prefetch hit": ("tab:green", "|"), "load needed": ("tab:orange", "|")}
    labels = [_lane_label(lane) for lane in lanes]
    if policy:  # decisions are instants: a row of marks above the lanes
        y = len(lanes)
        for k, (name, (color, marker)) in enumerate(marks.items()):
            xs = [e.start - t0 for e in policy if e.name == name]
            if xs:
                ax.scatter(xs, [y + 0.25 * (k - 1)] * len(xs), s=16, color=color, marker=marker, label=name, zorder=3)
        labels.insert(0, "policy")
    ax.set_yticks(range(len(labels)), labels=list(reversed(labels)))
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_title(f"What ran when: bar height = busy share of each {total / LANE_BINS * 1e3:.3g} ms slice "
                 "(red: compute waiting for a copy; marks: policy decisions)", loc="left", fontsize=10)
    if policy:
        ax.legend(**LEGEND)

    # (4) what the OS and the driver saw: memory on the left axis, I/O rates on the right.
    if sampled:
        ax = axes[3]
        for name, key, label, color in (("host rss", "rss", "host RSS", "tab:blue"),
                                        ("gpu memory", "used", "GPU memory used", "tab:green")):
            sm = tracer.samples(name)
            if sm:
                ax.plot([c.t - t0 for c in sm], [c.values.get(key, 0.0) / MIB for c in sm], color=color, lw=1.6,
                        label=label)
        ax.set_ylabel("memory (MiB)")
        rates = ax.twinx()
        for name, key, label, color in (("pcie", "tx", "PCIe TX", "tab:olive"),
                                        ("pcie", "rx", "PCIe RX", "tab:green"),
                                        ("disk io", "read", "disk read", "tab:purple"),
                                        ("disk io", "write", "disk write", "tab:brown")):
            sm = tracer.samples(name)
            if sm:
                rates.plot([c.t - t0 for c in sm], [c.values.get(key, 0.0) / 1e6 for c in sm], color=color,
                           lw=1.0, ls=":", label=label + " (MB/s)")
        rates.set_ylabel("I/O rate (MB/s, dotted)")
        rates.set_ylim(bottom=0)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = rates.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, **{**LEGEND, "bbox_to_anchor": (1.07, 1.0)})  # clear of the right axis
        times = [c.t for c in tracer.samples(sampled[0])]
        every = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
        ax.set_title(f"Sampled by the OS and the GPU driver every ~{every * 1e3:.0f} ms "
                     "(whole process, not just the KV cache)", loc="left", fontsize=10)
    axes[-1].set_xlabel("time since the first recorded event (s)")
    axes[-1].set_xlim(0, total)
    for ax in axes:
        ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)


def _lane_label(track: str) -> str:
    """"disk read (disk->host)": a disk track named with its tier pair; the others already are one."""
    pair = TRANSFER_TRACKS.get(track, track)
    return track if pair == track else f"{track} ({pair})"


def _busy_per_bin(intervals: list[Interval], edges: Any) -> Any:
    """Share of each bin [edges[i], edges[i+1]) covered by sorted disjoint `intervals`."""
    import numpy as np

    if not intervals:
        return np.zeros(len(edges) - 1)
    starts, ends = np.array(intervals).T
    before = np.concatenate([[0.0], np.cumsum(ends - starts)])  # busy time of the first k intervals
    k = np.searchsorted(starts, edges, side="right")  # intervals starting at or before each edge
    last_end = np.where(k > 0, ends[np.maximum(k - 1, 0)], 0.0)
    covered = before[k] - np.maximum(last_end - edges, 0.0) * (k > 0)  # minus the part of interval k-1 after t
    return np.diff(covered) / np.diff(edges)


def _bytes_per_bin(spans: list[Any], t0: float, edges: Any, chunk: int = 4096) -> Any:
    """Bytes each bin carried, every span's bytes spread evenly over its duration (all at its start if zero)."""
    import numpy as np

    cum = np.zeros(len(edges))
    for i in range(0, len(spans), chunk):  # bounded memory: chunk x bins at a time
        part = spans[i:i + chunk]
        s = np.array([e.start - t0 for e in part])[:, None]
        d = np.array([(e.end or e.start) - e.start for e in part])[:, None]
        nbytes = np.array([float(e.args.get("bytes", 0)) for e in part])[:, None]
        frac = np.where(d > 0, np.clip((edges[None, :] - s) / np.where(d > 0, d, 1.0), 0.0, 1.0), edges[None, :] >= s)
        cum += (nbytes * frac).sum(axis=0)
    return np.diff(cum)
