"""`OffloadConfig`: every option of the runtime, validated at construction.

The same field names are the keyword arguments of `offload(model, ...)` and, with dashes, the flags of the
`offload` command line.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from offload.sizes import parse_size

ATTENTION_MODES = ("exact", "sparse")
HEAD_SELECTIONS = ("shared", "kv", "query")
PREFIX_PUBLISH = ("prompt", "all")
HOST_ATTENTION = ("auto", "off", "all")
# Kept equal to tiers.disk.IO_ENGINES (tiers must not import this package; tests/test_bookkeeping.py checks).
IO_ENGINES = ("threads", "aio")


@dataclass
class OffloadConfig:
    # Byte budgets per tier: int bytes or strings such as "512MiB". None picks a default from free memory.
    device_budget: int | str | None = None
    host_budget: int | str | None = None
    disk_budget: int | str | None = None
    # Directory for the disk tier; no disk tier when None.
    disk_dir: str | None = None
    # Tokens per page. 64 measured best on CPU and GPU, see README ("Choosing the page size").
    page_size: int = 64
    # "exact": attention over every page; "sparse": over the sinks, the recent window and the top pages by score.
    attention: str = "exact"
    # Sparse mode only: tokens attended per layer per decode step, an int, or a float fraction of the context.
    token_budget: int | float = 0.1
    # Names in the policy registries (policies/).
    prefetch: str = "speculative"
    eviction: str = "lru"
    selection: str = "sketch"
    # Sparse mode: tokens always attended at the start (attention sinks) and at the end (recent window).
    sink_tokens: int = 16
    recent_tokens: int = 32
    # Sparse mode: the first layers attend to every page (their attention is diffuse). Chosen by measurement, see
    # README ("Choosing the selection").
    dense_layers: int = 2
    # Sparse mode: tokens per selection block, a divisor of page_size. Pages stay the unit of transfer and
    # placement; blocks are the unit of choice. None: 8 where it divides page_size, else page_size.
    select_block: int | None = None
    # Sparse mode: who chooses the blocks. "kv": each KV head, from its query heads' combined scores; "query": each
    # query head; "shared": one set for every head.
    head_selection: str = "kv"
    # Sparse mode: weight in [0, 1) of each block's decayed history of predicted attention, blended with the
    # current estimate (0: the current estimate alone).
    history: float = 0.0
    # Sparse mode: share in [0, 1) of the device budget (after the workspace) set aside as a cache of the blocks
    # steps read from the host pool, so that the next steps choosing them read them on the device
    # (offload/block_cache.py). 0: none; every chosen block on a host page crosses at every step.
    block_cache: float = 0.0
    # Pages below the device (host and disk) stored quantized: "none" (full precision), "k8v8", "k8v4" (8-bit keys,
    # 4-bit values) or "k4v2"; see offload/quant.py. With a setting, attention is no longer bit-exact.
    kv_quant: str = "none"
    # Sparse mode: also compute dense attention and report the attention mass the selected pages covered.
    measure_recall: bool = False
    # Record a timeline of transfers, compute and stalls (see `Runtime.save_trace`).
    trace: bool = False
    # Threads for disk I/O (and for host copies when the device is the CPU).
    io_threads: int = 4
    # Seconds one page transfer (a batch of pages read or written) may take before the run stops with an error
    # instead of hanging (a stuck disk or an I/O thread that died).
    io_timeout: float = 5.0
    # How the disk tier moves pages: "threads" (a pool of io_threads threads, a call each at a time) or "aio" (Linux
    # native AIO: a request's calls all in flight at once; needs O_DIRECT). See tiers/disk.py for the measurements.
    io_engine: str = "threads"
    # Buffers of the load ring, through which pages below the device reach attention: while one is attended, the
    # others are being filled, so this many minus one chunks are on their way ahead of use (offload/loader.py).
    # None: 4 with a disk tier (its reads take longer than a chunk's attention), else 2 (and 2 where the workspace
    # is too small to divide further). The workspace, out of device_budget, is load_buffers + 2 parts of equal size;
    # its share of device_budget does not change with load_buffers (offload/budgets.py).
    load_buffers: int | None = None
    # Attention over pages in host RAM (and pages read from disk) computed on the host, whose partial results are
    # merged with the device's (offload/host_attention.py): "auto" (a cost model from measured rates picks how many
    # of each layer's host pages the host attends), "all" (every one) or "off" (every page crosses to the device).
    host_attention: str = "auto"
    # Compute device; default: the model's.
    device: str | None = None
    # Prefix cache (offload/prefix.py): the KV of full prompt pages kept beyond the process, in a directory or a
    # Valkey/Redis server (redis://host:port/db), so a prompt starting like an earlier one loads those pages.
    prefix_cache: str | None = None
    # Bytes the prefix store may hold (least recently used entries go first). None: 4GiB for a directory; a server
    # keeps its own maxmemory setting.
    prefix_cache_budget: int | str | None = None
    # What is published: "prompt" (the full pages of prefills) or "all" (generated tokens' pages too).
    prefix_cache_publish: str = "prompt"
    # Seconds a server may take to connect or answer one operation before it counts as unreachable.
    prefix_cache_timeout: float = 2.0

    # Filled by __post_init__: budgets in bytes (None: chosen from free memory when the runtime starts).
    device_budget_bytes: int | None = field(init=False, default=None, repr=False)
    host_budget_bytes: int | None = field(init=False, default=None, repr=False)
    disk_budget_bytes: int | None = field(init=False, default=None, repr=False)
    prefix_cache_budget_bytes: int | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        from offload.quant import SETTINGS as KV_QUANT
        from policies import EVICTION, PREFETCH, SELECTION

        for name in ("device_budget", "host_budget", "disk_budget"):
            value = getattr(self, name)
            setattr(self, name + "_bytes", None if value is None else parse_size(value, name))
        if self.disk_dir is not None:
            self.disk_dir = _check_path("disk_dir", self.disk_dir, "expected a directory path")
        elif self.disk_budget is not None and self.disk_budget_bytes:
            raise ValueError("disk_budget: given without disk_dir; pass disk_dir to enable the disk tier")
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or not 1 <= self.page_size <= 4096:
            raise ValueError(f"page_size: expected an int number of tokens from 1 to 4096, got {self.page_size!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention: expected one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        tb = self.token_budget
        if isinstance(tb, bool) or not isinstance(tb, (int, float)):
            raise ValueError(f"token_budget: expected an int number of tokens or a float fraction in (0, 1], got {tb!r}")
        if isinstance(tb, float) and not 0.0 < tb <= 1.0:
            raise ValueError(f"token_budget: a fraction must be in (0, 1], got {tb!r}")
        if isinstance(tb, int) and tb < 1:
            raise ValueError(f"token_budget: a number of tokens must be >= 1, got {tb!r}")
        PREFETCH.check(self.prefetch)
        EVICTION.check(self.eviction)
        SELECTION.check(self.selection)
        for name in ("sink_tokens", "recent_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        if isinstance(self.dense_layers, bool) or not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ValueError(f"dense_layers: expected an int >= 0, got {self.dense_layers!r}")
        sb = self.select_block
        if sb is not None and (isinstance(sb, bool) or not isinstance(sb, int) or sb < 1
                               or self.page_size % sb != 0):
            raise ValueError(f"select_block: expected an int that divides page_size ({self.page_size}), got {sb!r}")
        if self.head_selection not in HEAD_SELECTIONS:
            raise ValueError(f"head_selection: expected one of {', '.join(HEAD_SELECTIONS)}, "
                             f"got {self.head_selection!r}")
        h = self.history
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0.0 <= h < 1.0:
            raise ValueError(f"history: expected a number in [0, 1), got {h!r}")
        bc = self.block_cache
        if isinstance(bc, bool) or not isinstance(bc, (int, float)) or not 0.0 <= bc < 1.0:
            raise ValueError(f"block_cache: expected a number in [0, 1), got {bc!r}")
        if not isinstance(self.kv_quant, str) or self.kv_quant not in KV_QUANT:  # a list would be unhashable
            raise ValueError(f"kv_quant: expected one of {', '.join(KV_QUANT)}, got {self.kv_quant!r}")
        for name in ("measure_recall", "trace"):
            if not isinstance(getattr(self, name), bool):  # "no" or None would read as on or off
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if isinstance(self.io_threads, bool) or not isinstance(self.io_threads, int) or not 1 <= self.io_threads <= 64:
            raise ValueError(f"io_threads: expected an int from 1 to 64, got {self.io_threads!r}")
        lb = self.load_buffers
        if lb is not None and (isinstance(lb, bool) or not isinstance(lb, int) or not 2 <= lb <= 16):
            raise ValueError(f"load_buffers: expected an int from 2 to 16 (or None: picked from the tiers), "
                             f"got {lb!r}")
        t = self.io_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 3600:  # nan compares false
            raise ValueError(f"io_timeout: expected a number of seconds in (0, 3600], got {t!r}")
        if not isinstance(self.io_engine, str) or self.io_engine not in IO_ENGINES:
            raise ValueError(f"io_engine: expected one of {', '.join(IO_ENGINES)}, got {self.io_engine!r}")
        if not isinstance(self.host_attention, str) or self.host_attention not in HOST_ATTENTION:
            raise ValueError(f"host_attention: expected one of {', '.join(HOST_ATTENTION)}, "
                             f"got {self.host_attention!r}")
        if self.device is not None:
            check_device(self.device)
        self._check_prefix_cache()

    def _check_prefix_cache(self) -> None:
        from tiers.prefix import check_timeout

        if self.prefix_cache is not None:
            self.prefix_cache = check_prefix_cache(self.prefix_cache)
        if self.prefix_cache_budget is not None:
            self.prefix_cache_budget_bytes = parse_size(self.prefix_cache_budget, "prefix_cache_budget")
            if self.prefix_cache_budget_bytes < 1:
                raise ValueError(f"prefix_cache_budget: expected a size > 0 bytes, got {self.prefix_cache_budget!r}")
            if self.prefix_cache is None:
                raise ValueError("prefix_cache_budget: given without prefix_cache; pass prefix_cache to enable the "
                                 "prefix cache")
        if self.prefix_cache_publish not in PREFIX_PUBLISH:
            raise ValueError(f"prefix_cache_publish: expected one of {', '.join(PREFIX_PUBLISH)}, "
                             f"got {self.prefix_cache_publish!r}")
        check_timeout(self.prefix_cache_timeout)

    @classmethod
    def option_names(cls) -> list[str]:
        """The user-facing options, in declaration order (also the CLI flags)."""
        return [f.name for f in dataclasses.fields(cls) if f.init]

    def block_size(self) -> int:
        """Tokens per selection block (`select_block`, or its default)."""
        if self.select_block is not None:
            return self.select_block
        return 8 if self.page_size % 8 == 0 else self.page_size

    def token_budget_for(self, context: int) -> int:
        """The sparse token budget for a context of `context` tokens."""
        if isinstance(self.token_budget, float):
            return max(1, int(round(self.token_budget * context)))
        return int(self.token_budget)


def _check_path(name: str, value: object, expected: str) -> str:
    """`value` as a str path. Raises ValueError naming `name` unless it is a str or os.PathLike that a file name
    can be: not blank, no NUL byte, and encodable in the file system's encoding."""
    try:
        path = os.fspath(value) if isinstance(value, os.PathLike) else value
    except TypeError:  # an __fspath__ that returns neither str nor bytes
        path = None
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{name}: {expected}, got {value!r}")
    if "\x00" in path:
        raise ValueError(f"{name}: a path can't hold a NUL byte, got {value!r}")
    try:
        os.fsencode(path)
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: {value!r} can't be a file name in the file system's encoding ({e.reason})") from None
    return path


def check_prefix_cache(spec: object) -> str:
    """`spec` as a str: a directory path, or a server URL that parses (it is not contacted). Raises
    ValueError("prefix_cache: ..."). The stores' own checks (tiers/prefix.py), run here so that a bad value fails
    before the model loads."""
    from tiers.prefix import SPEC_HELP, is_server_spec

    path = _check_path("prefix_cache", spec, SPEC_HELP)
    if is_server_spec(path):
        from tiers.prefix_valkey import parse_url

        parse_url(path)
    return path


def check_device(device: object) -> None:
    """Raises ValueError naming `device` unless it is "cpu", or a CUDA device that exists on this machine."""
    import torch

    allowed = "expected cpu, cuda or cuda:N"
    if not isinstance(device, (str, torch.device)):  # torch.device also takes bytes, and an int as a CUDA index
        raise ValueError(f"device: {allowed}, got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device: {allowed}, got {device!r}") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise ValueError(f"device: {allowed}, got {str(device)!r} (the runtime runs on the CPU or a CUDA GPU)")
    if not torch.cuda.is_available():
        why = (f"no CUDA device found (torch {torch.__version__}, CUDA {torch.version.cuda})" if torch.version.cuda
               else f"torch {torch.__version__} is a CPU-only build")
        raise ValueError(f"device: {str(device)!r} is not available: {why}; use cpu")
    count = torch.cuda.device_count()
    if dev.index is not None and not 0 <= dev.index < count:
        raise ValueError(
            f"device: {str(device)!r} does not exist; this machine has {count} CUDA device"
            f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})"
        )
