"""Turning byte budgets into page slots, with defaults from free memory, and the errors for budgets too small.

Device slots split into the page cache (pages that live on the device, one tail page per layer among them) and the
workspace of (R + 2) x `half` pages: the load ring of R buffers (R x half, R = `load_buffers`) through which pages
of this layer and the next are loaded for attention, a buffer (half) into which resident pages are gathered, and
its head-major copy (half) that lets a layer whose pages are all resident run in one SDPA call. All of it counts
against `device_budget`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import psutil
import torch

from offload.config import OffloadConfig
from offload.sizes import format_size

# Default budgets leave this share of free memory (or disk space) to everything else.
FREE_SHARE = 0.5


@dataclass(frozen=True)
class Plan:
    page_bytes: int  # of a page on the device (full precision)
    device_cache_pages: int
    workspace_pages: int  # load_buffers + 2 parts of `half` pages: the load ring, a gather buffer, its head-major copy
    host_pages: int
    host_staging_pages: int  # host slots set aside for disk -> GPU reads
    disk_pages: int
    device_budget: int
    host_budget: int
    disk_budget: int
    lower_page_bytes: int = 0  # of a page in the host and disk tiers (smaller when kv_quant packs it); 0: page_bytes
    block_cache_pages: int = 0  # device pages' worth of sparse mode's block cache, out of the device budget
    load_buffers: int = 2  # buffers of the load ring
    # The Triton kernels with a disk tier: the streaming path's own workspace, of the same parts (0: the streaming
    # path shares the workspace's rows)
    stream_pages: int = 0

    @property
    def lower_bytes(self) -> int:
        return self.lower_page_bytes or self.page_bytes

    @property
    def half(self) -> int:
        """Pages of each part of the streaming path's workspace."""
        return (self.stream_pages or self.workspace_pages) // (self.load_buffers + 2)

    @property
    def reserved_pages(self) -> int:
        """Device pages that hold no page of the cache: the workspaces."""
        return self.workspace_pages + self.stream_pages

    def capacity_pages(self) -> int:
        return self.device_cache_pages + self.host_pages - self.host_staging_pages + self.disk_pages


def _free_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def kernel_block_pages(config: OffloadConfig, max_pages: int) -> int:
    """Sparse mode's kernel step gathers each head's chosen blocks into the workspace, as many pages' worth as the
    largest choice: the budget's blocks at the longest context (or the sink and recent ones, if more), and the
    tail page's."""
    P, B = config.page_size, config.block_size()
    budget = -(-config.token_budget_for(max_pages * P) // B)
    fixed = -(-config.sink_tokens // B) + -(-config.recent_tokens // B) + 1
    return -(-(max(budget, fixed) + P // B) // (P // B))


def plan_budgets(config: OffloadConfig, page_bytes: int, layers: int, max_pages: int, device: torch.device,
                 lower_page_bytes: int | None = None, device_step: bool = True, kernels: bool = False) -> Plan:
    """Slots per tier: device pages of `page_bytes`, host and disk pages of `lower_page_bytes` (default the same;
    less when `kv_quant` packs them). `device_step`: decode steps run over the pools on the device, so sparse
    mode's block cache has a reader (without one its share stays with the device tier). `kernels`: they run the
    Triton kernels, whose sparse step gathers the chosen blocks into the workspace, which then holds the largest
    choice where the budget allows (`kernel_block_pages`). Raises ValueError naming the budget when one is too
    small to work at all."""
    lower = lower_page_bytes or page_bytes
    kv_max = page_bytes * max_pages * layers  # the KV at the model's maximum positions
    kv_lower = lower * max_pages * layers  # the same, as the tiers below the device store it
    most_workspace = 4 * max_pages
    dev = config.device_budget_bytes
    if dev is None:
        dev = min(kv_max + most_workspace * page_bytes, int(FREE_SHARE * _free_device_bytes(device)))
    total = dev // page_bytes
    ring = config.load_buffers
    if ring is None:
        # Disk reads take longer than attending a chunk: more of them in flight keep the compute from waiting.
        ring = 4 if config.disk_dir is not None else 2
    parts = ring + 2
    # The fewest workspace pages: a page per part (by default, a ring of two buffers).
    fewest = parts if config.load_buffers is not None else 4
    least = layers + fewest
    if total < least:
        given = f", load_buffers={ring}" if config.load_buffers is not None else ""
        raise ValueError(
            f"device_budget: {format_size(dev)} holds {total} pages of {format_size(page_bytes)}; at least {least} "
            f"are needed (one per layer plus {fewest} for streaming{given}), i.e. {format_size(least * page_bytes)} "
            f"with page_size {config.page_size}"
        )
    # Exact attention streams every page that is not resident through the workspace, and each chunk costs host
    # time whatever its size, so it gets 40% of what is left after the tail pages; sparse attention moves few
    # pages and keeps more of them resident, so it gets 1/8. At most four layers' worth either way.
    # The ring's buffers divide that share; they don't add to it. By default a ring too small to divide keeps two
    # buffers.
    share = 10 if config.attention == "exact" else 32
    size = 4 * max(1, min(max_pages, (total - layers) // share))
    if config.load_buffers is None and size < parts:
        ring, parts = 2, 4
    workspace = parts * max(1, size // parts)
    stream = 0
    if kernels and config.disk_dir is not None:
        # Disk pages stream through the load ring while the kernels' steps read (and, on CUDA, gather ahead into)
        # the workspace rows: the ring gets rows of its own.
        stream, total = workspace, total - workspace
    if kernels:
        # Larger, as far as the device tier keeps a page per layer and one more: a layer whose step needs more
        # rows than the workspace has streams instead. Sparse: the largest choice of blocks. Exact: half the rows
        # (a layer's parity) hold a layer's host pages, with the device's pages spread evenly over the layers.
        if config.attention == "sparse":
            need = kernel_block_pages(config, max_pages)
        elif layers > 2:
            need = min(2 * max_pages, -(-2 * (layers * max_pages - total) // (layers - 2)) + 4)
        else:
            need = 2 * max_pages
        room = (total - layers - 1) // parts * parts
        workspace = max(workspace, min(-(-need // parts) * parts, room))
    cache = total - workspace
    if stream and cache < layers + 1:
        least = layers + 1 + workspace + stream
        raise ValueError(
            f"device_budget: {format_size(dev)} holds {cache + workspace + stream} pages of {format_size(page_bytes)}; "
            f"with a disk tier the kernels' workspace and the load ring's take {workspace + stream}, so at least "
            f"{least} are needed (one per layer plus one more), i.e. {format_size(least * page_bytes)}")
    # Sparse mode's block cache takes its share of what the workspace leaves; the device tier keeps a page per
    # layer (the open tails) and one more.
    blocks = int(config.block_cache * cache) if config.attention == "sparse" and device_step else 0
    if blocks and cache - blocks < layers + 1:
        raise ValueError(
            f"block_cache: {config.block_cache:g} of the device budget's {cache} cache pages leaves {cache - blocks} "
            f"for the device tier; at least {layers + 1} are needed (one per layer plus one): lower block_cache or "
            f"raise device_budget")
    cache -= blocks

    host = config.host_budget_bytes
    if host is None:
        host = min(kv_lower, int(FREE_SHARE * psutil.virtual_memory().available))
    host_pages = host // lower

    disk_pages = staging = 0
    disk = config.disk_budget_bytes or 0
    if config.disk_dir is not None:
        check_disk_dir(config.disk_dir)
        if config.disk_budget_bytes is None:
            disk = min(kv_lower, int(FREE_SHARE * shutil.disk_usage(config.disk_dir).free))
        disk_pages = disk // lower
        if device.type == "cuda":
            # Disk pages reach the GPU through pinned host staging as large as the load ring.
            staging = ring * ((stream or workspace) // parts)
            if host_pages < staging:
                raise ValueError(
                    f"host_budget: with a disk tier on CUDA it must hold at least {staging} pages "
                    f"({format_size(staging * lower)}) for staging disk reads"
                )
    return Plan(page_bytes, cache, workspace, host_pages, staging, disk_pages, dev, host, disk, lower, blocks, ring,
                stream)


def disk_reserve_pages(plan: Plan, tokens: int | None, page_size: int, windows: list[int | None]) -> int:
    """Disk slots to preallocate for a sequence of `tokens` (None: not known yet): the pages the device and host
    can't hold, a sliding layer counting only its window (`windows`, one per layer). The disk file grows from
    there when more are needed, up to `plan.disk_pages`."""
    if tokens is None:
        return 0
    need = sum(layer_pages(tokens, page_size, w) for w in windows)
    above = plan.device_cache_pages + plan.host_pages - plan.host_staging_pages
    return max(0, min(plan.disk_pages, need - above))


def check_disk_dir(path: str) -> None:
    """Raises ValueError unless `path` is (or can be made) a writable directory."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"disk_dir: {path} can't be created ({e.strerror or e})") from None
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"disk_dir: {path} is not a writable directory")


def layer_pages(tokens: int, page_size: int, window: int | None) -> int:
    """The most pages one layer holds at once over a sequence of `tokens`: all of them with full attention; with a
    sliding window W, the pages that the last W tokens (the window of the query being attended) span."""
    pages = -(-tokens // page_size)
    if window is None:
        return pages
    # W tokens ending anywhere in a page span at most ceil((W - 1) / P) + 1 pages.
    return min(pages, -(-(window - 1) // page_size) + 1)


def check_capacity(plan: Plan, config: OffloadConfig, tokens: int, layers: int, page_size: int,
                   windows: list[int | None] | None = None, batch: list[int] | None = None) -> None:
    """Raises ValueError, before anything runs, when `tokens` of KV can't fit all the budgets together.
    `windows`: each layer's sliding window (None: full attention, the default for every layer). `batch`: the
    tokens of each sequence of a batch, whose KV must fit together (`tokens` is then their sum)."""
    windows = windows if windows is not None else [None] * layers
    lengths = batch if batch is not None else [tokens]
    if len(lengths) > 1 and plan.device_cache_pages < layers * len(lengths) + 1:
        least = layers * len(lengths) + 1 + plan.reserved_pages
        raise ValueError(
            f"device_budget: a batch of {len(lengths)} sequences needs an open page per layer and sequence on the "
            f"device, {least} pages with the workspace ({format_size(least * plan.page_bytes)}); it holds "
            f"{plan.device_cache_pages + plan.reserved_pages} ({format_size(plan.device_budget)})")
    need = sum(layer_pages(n, page_size, w) for n in lengths for w in windows)
    have = plan.capacity_pages()
    if need <= have:
        return
    short = format_size((need - have) * plan.lower_bytes)  # what the host or disk tier lacks, as they store it
    if config.disk_dir is None:
        advice = f"raise host_budget by {short} or more, or pass disk_dir"
    else:
        advice = f"raise disk_budget by {short} or more"
    held = " (sliding-window layers hold only their window)" if any(w is not None for w in windows) else ""
    if plan.lower_bytes == plan.page_bytes:
        sizes = f"needs {format_size(need * plan.page_bytes)} but device, host and disk budgets hold " \
                f"{format_size(have * plan.page_bytes)} of pages"
    else:
        sizes = f"needs {need} pages but device, host and disk budgets hold {have} (kv_quant packs host and disk " \
                f"pages into {format_size(plan.lower_bytes)})"
    what = f"{tokens} tokens" if batch is None else f"{len(lengths)} sequences of {sum(lengths)} tokens in all"
    raise ValueError(f"budgets: the KV of {what}{held} {sizes}; {advice}")
