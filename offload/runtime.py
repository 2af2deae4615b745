"""The runtime: tiers, page table, policies and the transfer engine behind one model's offloaded KV cache.

Per layer and step, transformers calls `OffloadedCache.update` (which stashes the new keys and values) and then
the registered attention function, which calls `Runtime.attend`. `attend`:
  1. decode: appends the new token to the layer's tail page, then attends over the pages (all of them in exact
     mode; sinks, recent window and top-scored pages in sparse mode) in chunks of at most half the workspace,
     merged by log-sum-exp. Pages already on the device are gathered into the workspace; others are loaded from
     host or disk. The next layer's pages are prefetched into the other half while this layer computes.
  2. prefill: attends densely (causal) over the new tokens and the pages before them, then stores the new pages:
     on the device while its share lasts, then host, then disk.
On a layer with a sliding window W, each query sees only the last W tokens (itself included), and the pages that
no query to come can see are released from every tier, so the layer holds about W tokens however long the
sequence. Logit soft-capping, when the model asks for it, is applied to every score.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import time

import torch

from offload import attention_math as am
from offload.batch import left_padding
from offload.budgets import Plan, check_capacity, plan_budgets
from offload.config import OffloadConfig
from offload.decode import DeviceDecode, KernelDecode, attend_token
from offload.engine import TransferEngine
from offload.host_attention import HostAttention, HostJob, Rates, measure_rates, split
from offload.cache import Handoff
from offload.loader import LoadRing
from offload.models import check_model, layer_windows
from offload.pagetable import PageTable, window_start
from offload.placement import Placement, unpinned_pages
from offload.prefix import PrefixCache, TokenLog
from offload.recover import Recovery
from offload.quant import PageCodec
from offload.sparse import SparseSelection
from offload.trace import Tracer, phase
from policies import EVICTION, PREFETCH
from tiers import DeviceTier, HostTier, PageShape
from tiers.host import aligned_host_tensor

log = logging.getLogger(__name__)


def use_kernels(device: torch.device, config: OffloadConfig) -> bool:
    """Whether the decode step runs the Triton kernels (`offload.decode.KernelDecode`): on CUDA, with triton
    installed."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def decodes_on_device(device: torch.device, config: OffloadConfig) -> bool:
    """Whether decode steps run over the pools on the device (offload/decode.py): on the CPU, whose pools share
    memory, and on CUDA with the Triton kernels; elsewhere every step streams pages through the load ring."""
    return device.type == "cpu" or use_kernels(device, config)


class Runtime:
    # Pools and buffers outlive any inference_mode() the runtime is built in, and are updated in place outside it
    # (on I/O threads too): they must be normal tensors.
    @torch.inference_mode(False)
    def __init__(self, model: torch.nn.Module, config: OffloadConfig):
        check_model(model)
        self.model = model
        self.config = config
        mc = model.config
        # The model's layers. The page table has a row per layer and sequence (`layers` rows: the model's layers
        # times the batch), in the order the model attends them: row l * batch + b is layer l of sequence b.
        self.model_layers: int = mc.num_hidden_layers
        self.layers: int = self.model_layers
        self.batch = 1
        self.model_type: str = mc.model_type
        # Per layer of the model: the sliding window (a query sees the last `window` tokens), None for full
        # attention; `windows` has one per row.
        self.model_windows: list[int | None] = layer_windows(model)
        self.windows: list[int | None] = list(self.model_windows)
        self.q_heads: int = mc.num_attention_heads
        self.kv_heads: int = getattr(mc, "num_key_value_heads", None) or self.q_heads
        self.head_dim: int = getattr(mc, "head_dim", None) or mc.hidden_size // self.q_heads
        self.max_positions: int = mc.max_position_embeddings
        param = next(model.parameters())
        self.dtype = param.dtype
        self.device = torch.device(config.device) if config.device else param.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.page_size = config.page_size
        self.shape = PageShape(self.kv_heads, self.page_size, self.head_dim, self.dtype)
        # kv_quant: pages below the device are packed by this codec (offload/quant.py); None stores them as they are.
        self.codec = PageCodec.of(config.kv_quant, self.kv_heads, self.page_size, self.head_dim)
        self.max_pages = -(-self.max_positions // self.page_size)
        kernels, on_device = use_kernels(self.device, config), decodes_on_device(self.device, config)
        self.plan: Plan = plan_budgets(config, self.shape.page_bytes, self.layers, self.max_pages, self.device,
                                       self.codec.page_bytes if self.codec else None, device_step=on_device,
                                       kernels=kernels)
        # The prefix cache's store opens once the budgets are known to fit, before any memory is taken.
        self.prefix = (PrefixCache(config, model, self.layers, self.kv_heads, self.page_size, self.head_dim,
                                   self.dtype) if config.prefix_cache is not None else None)
        self.tracer = Tracer() if config.trace else None
        if self.tracer is not None:
            self.tracer.counter("occupancy", self.tracer.now(), {"device": 0, "host": 0, "disk": 0})
        self.engine = TransferEngine(self.device, config.io_threads, self.tracer, float(config.io_timeout))
        self.recovery = Recovery(self)
        dev_pages, host_storage = self.plan.device_cache_pages, None
        # Sparse mode's block cache (offload/block_cache.py): device slots after the device tier's, before the
        # host's (or the kernels' workspace), so its blocks count as the device's.
        cached = self.plan.block_cache_pages
        split = dev_pages + cached
        self.decoder: DeviceDecode | None = None
        h, ring, work_pages = self.plan.half, self.plan.load_buffers, self.plan.workspace_pages
        dims = self.shape.dims
        # Sparse mode: the decode step gathers blocks of `select_block` tokens, chosen per head.
        blocks = (config.block_size(), config.head_selection) if config.attention == "sparse" else ()
        if kernels:
            # The Triton kernels: the workspace rows follow the device tier's slots in one tensor, so paged
            # decode reads device pages and gathered host pages from one pool. The streaming path's buffers
            # (used by layers the workspace can't serve) share those rows, the two never running at once, unless
            # a disk tier streams pages while the kernels' steps run (`Plan.stream_pages`).
            # (zeros: rows never written, as a tail page's unfilled ones, must not hold NaN, which 0 * NaN spreads)
            pools = [torch.zeros((split + work_pages, *dims), dtype=self.dtype, device=self.device) for _ in range(2)]
            device_tier = DeviceTier(self.shape, dev_pages, self.device,
                                     storage=(pools[0][:dev_pages], pools[1][:dev_pages]))
            self.decoder = KernelDecode((pools[0], pools[1]), split, work_pages, self.layers, self.max_pages,
                                        self.q_heads, self.kv_heads, self.device, *blocks, codec=self.codec,
                                        cache_pages=cached)
            work = [pool[split:] for pool in pools]
        elif on_device and self.codec is not None:
            # Packed host pages: the decode step reads device pages in place and unpacks the host's.
            pools = [torch.zeros((split, *dims), dtype=self.dtype, device=self.device) for _ in range(2)]  # (as above)
            device_tier = DeviceTier(self.shape, dev_pages, self.device,
                                     storage=(pools[0][:dev_pages], pools[1][:dev_pages]))
            self.decoder = DeviceDecode((pools[0], pools[1]), split, self.layers, self.max_pages, self.q_heads,
                                        self.kv_heads, self.device, *blocks, codec=self.codec, cache_pages=cached)
        elif on_device:
            # Host and device memory are the same: one allocation holds both pools (device slots first), so a
            # decode step gathers a layer's pages from both with one index_select (offload/decode.py). The host
            # part is anonymous memory that the OS backs only once written.
            slots = split + self.plan.host_pages
            both = aligned_host_tensor(2 * slots * self.kv_heads * self.page_size * self.head_dim, self.dtype,
                                       pin=False).view(2, slots, *dims)
            device_tier = DeviceTier(self.shape, dev_pages, self.device,
                                     storage=(both[0, :dev_pages], both[1, :dev_pages]))
            host_storage = (both[0, split:], both[1, split:])
            self.decoder = DeviceDecode((both[0], both[1]), split, self.layers, self.max_pages, self.q_heads,
                                        self.kv_heads, self.device, *blocks, cache_pages=cached)
        else:
            device_tier = DeviceTier(self.shape, dev_pages, self.device)
        if not isinstance(self.decoder, KernelDecode) or self.plan.stream_pages:
            # (without a disk tier, the kernels' workspace rows serve the streaming path)
            work = [torch.empty((self.plan.stream_pages or work_pages, *dims), dtype=self.dtype, device=self.device)
                    for _ in range(2)]
        # Workspace of the streaming path: the load ring (`ring` buffers of h pages), a page-major gather buffer (h)
        # and its head-major copy (h). Few, large copies and attention calls: each chunk costs host time whatever
        # its size.
        self.ring_k, self.ring_v = (w[:ring * h].view(ring, h, *dims) for w in work)
        self.pm_k, self.pm_v = (w[ring * h:(ring + 1) * h] for w in work)
        # Head-major [H, h, P, D]: SDPA reads a slice of it without another copy.
        self.hm_k, self.hm_v = (w[(ring + 1) * h:].view(self.kv_heads, h, self.page_size, self.head_dim)
                                for w in work)
        if self.decoder is not None:
            self.decoder.keep_mass = config.eviction == "score"  # the only policy that reads it
        on_host = None
        if self.decoder is not None and host_storage is None:  # the decode step reads the host pool on its own
            on_host = lambda host: self.decoder.attach_host(host.k, host.v)  # noqa: E731
        self.placement = Placement(self.plan, self.shape, config, device_tier, self.engine,
                                   EVICTION.create(config.eviction, None), self.stall, self.tracer, self.windows,
                                   host_storage, on_host, self.codec)
        self.placement.repair_host = self.recovery.host_pages_damaged
        self.host_staging: tuple[torch.Tensor, torch.Tensor] | None = None
        # Attention over host pages on the host (offload/host_attention.py); the rates of its cost model are
        # measured when a layer first has pages below the device ("auto"), or set beforehand (tests, benchmarks).
        self.host_attention: HostAttention | None = None
        self.host_rates: Rates | None = None
        self.host_disk_buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        if config.host_attention != "off":
            self.host_attention = HostAttention(self.kv_heads, self.page_size, self.head_dim, self.dtype,
                                                self.device, self.codec, tracer=self.tracer)
            if self.decoder is not None:
                self.decoder.host_split = self._host_share
        self.prefetcher = PREFETCH.create(config.prefetch)
        self.sparse = config.attention == "sparse"
        self.selection = None
        if self.sparse:
            self.selection = SparseSelection(model, config, self.windows, self.page_size, self.max_pages,
                                             self.q_heads, self.kv_heads, self.head_dim, self.dtype, self.device,
                                             getattr(self.prefetcher, "needs_speculation", False))
            self.placement.leaving = self._leaving_device
        self._stats_init()
        self.closed = False
        self._new_sequence()

    # -- sequence lifecycle ----------------------------------------------------------------------------------
    def _set_batch(self, batch: int) -> None:
        """Shapes the per-row state for `batch` sequences: one page table row per layer and sequence."""
        if batch == self.batch:
            return
        self.batch, self.layers = batch, self.model_layers * batch
        self.windows = [w for w in self.model_windows for _ in range(batch)]
        self.placement.windows = self.windows
        if self.decoder is not None:
            self.decoder.resize(self.layers)
        if self.selection is not None:
            self.selection.resize(self.windows, batch)

    def _new_sequence(self, batch: int = 1) -> None:
        # Counts sequences: a cache remembers the one it was made for and refuses to run on another.
        self.sequence_id = getattr(self, "sequence_id", -1) + 1
        self._fresh_table(batch)

    def _fresh_table(self, batch: int) -> None:
        """An empty page table (and what hangs on it) for `batch` sequences."""
        self._set_batch(batch)
        self.table = PageTable(self.layers, self.max_pages)
        self.table.page_size = self.page_size
        self.table.batch = batch
        self.placement.new_sequence(self.table)
        self.handoff = Handoff()
        if self.decoder is not None:
            self.decoder.forget()
        # Per layer: (page, table version, device slot) of the open tail page, so that appending a token reads
        # no table entry.
        self.tail_slot: list[tuple] = [(-1, -1, -1, None, None)] * self.layers
        self.ring = LoadRing(self.ring_k, self.ring_v, self.table, self._load, self._unbusy, self.stall,
                             self.count_load, self.tracer is not None)
        self.disk_pages: dict[tuple, tuple] = {}  # `_on_disk`'s, per rows
        if self.selection is not None:
            self.selection.new_sequence()
        # The sequence's token ids, as forwards feed them (`note_forward`): a turn that extends them reuses the
        # sequence, and the prefix cache keys its pages by them.
        self.token_log = TokenLog()
        if self.prefix is not None:
            self.prefix.new_sequence()
        self.step = 0
        # A batch (offload/batch.py's rules): per sequence, the padding its prompt starts with and whether it has
        # finished (its pages released); per layer of the model, the positions held, padding included.
        self.pads = [0] * batch
        self.finished = [False] * batch
        self.length = [0] * self.model_layers
        self.opened = False  # a row opened a page in this step: the last row readies the next step

    # A measurement switch, not an option (benchmarks/checksum_cost.py --check-in-place): True makes exact steps on
    # the CPU check the host pages they read in place at every step, not only when pages are copied out of the
    # host pool. Measured: +12% a step with 90% of SmolLM2's KV on the host (BENCHMARKS.md), so it is off.
    check_in_place: bool = False

    # Set by an offloaded cache when transformers asks it for the mask sizes of a forward, taken by the mask
    # function that transformers calls right after: that forward runs on the offloaded path (offload/attention.py).
    mask_for_cache: bool = False

    # A measurement switch, not an option (benchmarks/batch.py): False runs every decode step of a batch row by row,
    # as the steps `_decode_batch` can't take run.
    batch_step: bool = True

    # The rows of the layer running that the batch's one step served (`_decode_batch`), before the others run
    # alone: none of those loads ahead for them.
    served: frozenset[int] = frozenset()

    # The end-of-sequence ids of the generate call running (a tensor), set by offload()'s generate: in a batch, a
    # sequence fed one has finished, and its pages are released (`finish`).
    stop_ids: torch.Tensor | None = None

    @property
    def attention_name(self) -> str:
        """The name of this runtime's attention function in transformers' AttentionInterface."""
        return f"offload-{id(self):x}"

    def cache(self, input_ids: torch.Tensor | list[int] | None = None):
        """A transformers Cache bound to this runtime and to a new sequence. The runtime holds one sequence (or one
        batch): the pages of the previous one are released and a cache taken for it refuses further use.

        The cache takes the batch size of its first forward: a batch of B sequences, left-padded as transformers
        pads them, with their 2-D attention mask (offload/batch.py). Ids [B, n] with B > 1 start a batch; it
        neither continues an earlier sequence nor uses the prefix cache.

        With `input_ids` (the whole prompt, [1, n] or [n]), what is known already is reused, and
        `get_seq_length()` of the cache returned says how many of those tokens are held, so that only the rest is
        run through the model (`model.generate` skips them by itself):
          - when the ids extend the current sequence (the next turn of a conversation), that sequence goes on: the
            cache is bound to it, and nothing before is computed again;
          - otherwise a new sequence starts, and with a prefix cache (`prefix_cache`) the longest stored prefix of
            the ids, in whole pages, is loaded into the tiers."""
        from offload.cache import OffloadedCache

        if self.closed:
            raise ValueError("cache: this runtime's offload() block has ended; take caches inside the with block")
        self._drain()
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] > 1:
            self._new_sequence(input_ids.shape[0])
            return OffloadedCache(self)
        ids = None if input_ids is None else _id_list(input_ids)
        if ids is not None and self._extends(ids):
            self.counters["tokens"]["reused"] += self.table.tokens[0]
            return OffloadedCache(self)
        self._new_sequence()
        cache = OffloadedCache(self)
        if ids is not None and self.prefix is not None:
            loaded = self.prefix.load(ids, self._place_loaded)
            if loaded:
                self.token_log.set(ids[:loaded])
                self.counters["tokens"]["loaded"] += loaded
                self._resident()
        return cache

    def _extends(self, ids: list[int]) -> bool:
        """Whether `ids` continue the current sequence: it holds tokens, all its layers hold the same ones, their
        ids are known and begin `ids`, and `ids` has at least one token more."""
        held = self.table.tokens[0]
        if held == 0 or len(ids) <= held or self.table.tokens.count(held) != self.layers:
            return False
        known = self.token_log.list()
        return known is not None and len(known) >= held and known[:held] == ids[:held]

    @torch.no_grad()
    def _place_loaded(self, pages: list[torch.Tensor]) -> None:
        """Pages from the prefix cache (each [layers, 2, heads, page, dim] on the host) placed after the sequence's
        tokens, layer by layer, as a prefill of those tokens would place them."""
        tokens = len(pages) * self.page_size
        self.ring.drain()
        for layer in range(self.layers):
            kp, vp = (torch.stack([page[layer, i] for page in pages]).to(self.device, self.dtype) for i in (0, 1))
            dead = self._dead_pages(layer, self.table.tokens[layer] + tokens)
            self._release(layer, dead)
            self._store_pages(layer, kp, vp, tokens, dead)

    def note_forward(self, input_ids: torch.Tensor | None) -> None:
        """Called before each forward of the model on this runtime's current sequence, with its input ids (None
        when it runs on embeddings)."""
        self.token_log.feed(input_ids, self.table.tokens[0])
        self._forward_start = (time.perf_counter(), self.table.tokens[0])
        stop = self.stop_ids
        if (stop is not None and self.batch > 1 and input_ids is not None and input_ids.dim() == 2
                and input_ids.shape[1] == 1 and self.length[0]):
            # A sequence fed an end-of-sequence token has finished: generate only pads it from now on.
            for b, done in enumerate(torch.isin(input_ids[:, 0], stop.to(input_ids.device)).tolist()):
                if done:
                    self.finish(b)

    def forward_done(self) -> None:
        """Called after each such forward: the time of prefills (more than one token), for the prefix cache's
        estimate of the time it saved."""
        start = getattr(self, "_forward_start", None)
        self._forward_start = None
        if start is not None and (tokens := self.table.tokens[0] - start[1]) > 1:
            self.prefill_time[0] += time.perf_counter() - start[0]
            self.prefill_time[1] += tokens

    def expect_tokens(self, tokens: int, name: str = "prompt", batch: list[int] | None = None) -> None:
        """Checks, before anything runs, that a sequence of `tokens` fits the positions and the budgets. `name`: the
        parameter that set the length, which the position error starts with. `batch`: the tokens each sequence of
        a batch will hold (padding left out), which must fit the budgets together."""
        if tokens > self.max_positions:
            detail = "prompt plus new tokens" if name == "prompt" else f"the length {name} asks for"
            raise ValueError(
                f"{name}: {tokens} tokens ({detail}) exceed the model's maximum of {self.max_positions} positions"
            )
        check_capacity(self.plan, self.config, sum(batch) if batch else tokens, self.model_layers, self.page_size,
                       self.model_windows, batch if batch and len(batch) > 1 else None)
        self.placement.expected_tokens = max(batch) if batch else tokens  # sizes the disk file at the first spill

    def save_trace(self, path: str) -> None:
        """Writes the timeline as Chrome trace-event JSON (Perfetto, chrome://tracing). Needs trace=True."""
        if self.tracer is None:
            raise ValueError("trace: the runtime was started with trace=False; pass trace=True to record a timeline")
        self.tracer.save(path)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._drain(quiet=True)
            if self.prefix is not None:
                self.prefix.close()  # the pages on their way to the store are written first
        finally:
            self.engine.close()
            if self.host_attention is not None:
                self.host_attention.close()
            if self.selection is not None:
                self.selection.close()
            self.placement.close()
            self.ring_k = self.ring_v = self.pm_k = self.pm_v = self.hm_k = self.hm_v = torch.empty(0)
            self.host_staging = None

    def _drain(self, quiet: bool = False) -> None:
        """Waits for every load in flight. `quiet`: at close, loads no one will read end without raising (a run
        that stopped on a fault reports that fault, not a later one)."""
        if hasattr(self, "ring"):
            self.ring.drain(quiet)
        self.engine.resolve_gpu_waits(self.stall)

    # The tiers, owned by the placement; read here for stats and by tests.
    @property
    def device_tier(self) -> DeviceTier:
        return self.placement.device

    @property
    def host_tier(self) -> HostTier | None:
        return self.placement.host_tier

    @property
    def disk_tier(self):
        return self.placement.disk_tier

    # -- the attention entry point ---------------------------------------------------------------------------
    @torch.no_grad()
    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """query [1, Hq, T, D], key/value [1, H, T, D] (new tokens) -> attention output [1, T, Hq, D].

        `window`: the layer's sliding window (a query attends to the last `window` tokens, itself included), None
        for full attention. `softcap`: attention logit soft-capping (`softcap * tanh(scores / softcap)`), None
        for none."""
        if query.shape[0] != 1:
            raise ValueError(f"batch: a row attends for one sequence; got a query of {query.shape[0]} "
                             "(attend_layer takes a batch)")
        self._check_window(layer, window)
        t0 = time.perf_counter()
        tokens = query.shape[2]
        if tokens == 1:
            with phase("offload.decode", self.tracer is not None):
                out = self._decode(layer, query, key, value, scaling, softcap)
        else:
            with phase("offload.prefill", self.tracer is not None):
                self.ring.drain()
                out = self._prefill(layer, query, key, value, scaling, softcap)
            if layer < self.batch:  # layer 0 of each sequence
                self.counters["tokens"]["prefill"] += tokens
        if layer == self.layers - 1 and self.batch == 1 and self.prefix is not None and self.prefix.captured:
            self.prefix.forward_done(self.token_log.list())
        self._resident()
        if self.tracer is not None:
            self.tracer.span("compute", "attention", t0, time.perf_counter(), layer=layer, tokens=tokens,
                             pages=self.table.pages(layer))
            if layer == self.layers - 1:
                self.tracer.counter("occupancy", time.perf_counter(), self._resident())
        return out

    def _check_window(self, row: int, window: int | None) -> None:
        """The windows also decide which pages are released and what the budgets must hold, so they must be the
        ones transformers masks with."""
        if window != self.windows[row]:
            raise ValueError(f"sliding_window: layer {row // self.batch} attends with a window of {window}, but "
                             f"its configuration gives {self.windows[row]}")

    # -- batches (offload/batch.py) --------------------------------------------------------------------------
    def attend_layer(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scaling: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """Layer `layer` of the model for every sequence of the batch: query [B, Hq, T, D], key/value [B, H, T, D]
        -> [B, T, Hq, D]. Each sequence attends through its own row (`attend`) over its real tokens; padded
        positions and finished sequences get zeros."""
        # The batch size is taken, or checked, by the cache's update of layer 0 (`OffloadedLayer.update`).
        if self.batch == 1:
            self.served = frozenset()
            return self.attend(layer, query, key, value, scaling, window, softcap)
        B, T = self.batch, query.shape[2]
        start = self.length[layer]
        self._check_window(layer * B, window)
        served, out = self._decode_batch(layer, query, key, value, scaling, window, softcap) if T == 1 else ([], None)
        self.served = frozenset(layer * B + b for b in served)
        if len(served) == B:
            self.length[layer] = start + 1
            if layer == self.model_layers - 1 and self.opened:
                self._ready_next_step()
            return out
        outs, last = [None] * B, False
        for i, b in enumerate(served):
            outs[b] = out[i:i + 1]
        for b in range(B):
            skip = min(T, max(0, self.pads[b] - start))  # padded positions among the new ones
            if outs[b] is not None:
                continue
            if self.finished[b] or skip == T:
                outs[b] = query.new_zeros((1, T, query.shape[1], query.shape[3]))
                continue
            r = layer * B + b
            out = self.attend(r, query[b:b + 1, :, skip:], key[b:b + 1, :, skip:], value[b:b + 1, :, skip:],
                              scaling, window, softcap)
            if skip:
                out = torch.cat([out.new_zeros((1, skip, *out.shape[2:])), out], dim=1)
            outs[b] = out
            last = r == self.layers - 1
        self.length[layer] = start + T
        if layer == self.model_layers - 1 and not last:
            # The last row did not run alone: what it does at the end of a step happens here.
            if T == 1 and B - 1 not in served:  # (a step the batch served counts itself)
                self.step += 1
            if T > 1 or self.opened:
                self._ready_next_step()
        return torch.cat(outs)

    def _decode_batch(self, layer: int, query, key, value, scaling: float, window: int | None,
                      softcap: float | None) -> tuple[list[int], torch.Tensor | None]:
        """A decode step of layer `layer` for the sequences of the batch that take the plain step, all at once: one
        append, one gather and one attention call. The plain step is attention over the pools (the CPU's unified
        pool, or the CUDA kernels' device and pinned host pools), with pages on disk read through the load ring; a
        sequence takes it unless it has finished or has pages the host attends. A sequence whose token opens a page
        gets it first, before any view is read; pages a window leaves are released after the attention. Exact
        steps: sequences of equal length with no window or soft-cap (equal
        prompts, returned sequences, beams) attend in one unmasked SDPA call (`DeviceDecode.exact_batch`); any
        others, ragged or windowed, over their own pages with the softmax reduced per sequence
        (`DeviceDecode.exact_ragged`); those with pages on disk read them in one request for the batch and merge
        them in (`_batch_lower`). With `kv_quant` on the kernels, the packed host pages of the sequences served are
        unpacked into the kernels' workspace rows, as many as they hold (the others run alone). Sparse steps choose
        each sequence's blocks and attend over them in one pass (`DeviceDecode.sparse_batch`), a policy's state per
        row taken for all at once; the chosen blocks of sequences with pages on disk that lie on disk are read in
        one request for the batch and merged in (`_batch_sparse_lower`). Returns the sequences served, in order,
        and their output [served, 1, Hq, D]; the others run alone after them (`attend_layer`)."""
        dec, B, P, t, sel = self.decoder, self.batch, self.page_size, self.table, self.selection
        if (not self.batch_step or dec is None or self.tracer is not None or self.check_in_place
                or self.config.measure_recall):
            return [], None
        # The kernels' exact steps over packed host pages unpack them into the workspace rows: as many as it holds.
        room = dec.workspace if dec.codec is not None and isinstance(dec, KernelDecode) else None
        live = [b for b in range(B) if not self.finished[b]]
        # Page boundaries first, before any view is read: the sequences whose token opens a page get their new
        # tail (the uses recorded since the last boundary reach the eviction policy once; making room may evict).
        opening = [b for b in live if t.tokens[layer * B + b] % P == 0]
        if opening:
            self._boundary(layer == 0 and opening[0] == 0)
            for b in opening:
                self._open_page(layer * B + b)
            self.opened = True
        exact, sparse, lower, sparse_lower = [], [], [], []  # (sequence, view, tokens, plan)
        for b in live:
            r, n = layer * B + b, t.tokens[layer * B + b]
            view = dec.view(r, t, n // P + 1)  # the pages holding the step's token too (a page opened above)
            if view.host_attend is not None or view.first != t.first[r]:
                continue
            plan = sel.budget(r, n + 1) if self.sparse else None
            if plan is not None and view.host and self._host_share(r, view.host, view.count - view.host):
                continue
            if plan is None and room is not None:
                if view.host > room:
                    continue
                room -= view.host
            if view.lower:
                if plan is not None:
                    sparse_lower.append((b, view, n, plan))
                elif self._streams_with_batch(r, view):
                    lower.append((b, view, n, None))
                continue
            (exact if plan is None else sparse).append((b, view, n, plan))
        if not lower:
            self.ring.forget(("batch", layer))  # its pages loaded ahead: no sequence reads them now
        groups = [(g, step) for g, step in ((exact, self._batch_exact), (sparse, self._batch_sparse),
                                            (lower, self._batch_lower), (sparse_lower, self._batch_sparse_lower))
                  if g]
        served = sorted(b for g, _ in groups for b, *_ in g)
        if not served:
            return [], None
        if len(served) < B:  # the others run alone
            pick = torch.tensor(served, device=self.device)
            query, key, value = query.index_select(0, pick), key.index_select(0, pick), value.index_select(0, pick)
        ns = {b: n for g, _ in groups for b, _, n, _ in g}
        dec.append_batch(layer, [self._tail(layer * B + b)[0] for b in served], [ns[b] % P for b in served], key,
                         value)
        for b in served:
            self.ring.forget(layer * B + b)  # loads an earlier step queued for this row
            t.tokens[layer * B + b] = ns[b] + 1
        if self.disk_tier is not None and not self.sparse:
            self._ask_lower_ahead(layer)  # (issued after this layer's own, which `_batch_lower` asks for first)
            if not lower:
                self.ring.pump()
        at = {b: i for i, b in enumerate(served)}
        outs = []
        for group, step in groups:
            # (in a layer with several groups, the rows of each)
            mine = query if len(groups) == 1 else query.index_select(
                0, torch.tensor([at[b] for b, *_ in group], device=self.device))
            outs.append(step(layer, group, mine, scaling, window, softcap))
        out = outs[0]
        if len(outs) > 1:  # back in the order of the sequences
            at = {b: i for i, (b, *_) in enumerate(g for group, _ in groups for g in group)}
            out = torch.cat(outs).index_select(0, torch.tensor([at[b] for b in served], device=self.device))
        if window is not None:  # pages the window left for good, now that this step's query has seen its own
            for b in served:
                r = layer * B + b
                self._release(r, self._dead_pages(r, t.tokens[r]))  # (nothing when no page left)
        self._resident()
        return served, out

    def _batch_exact(self, layer: int, group: list[tuple], query, scaling: float, window: int | None,
                     softcap: float | None) -> torch.Tensor:
        """`_decode_batch`'s exact steps: `group` holds (sequence, view, tokens before the step, None)."""
        B, dec = self.batch, self.decoder
        t0 = time.perf_counter()
        for b, view, _, _ in group:
            self._count_exact_step(layer * B + b, view, t0)
        rows, views, ns = [layer * B + b for b, *_ in group], [v for _, v, _, _ in group], [n for _, _, n, _ in group]
        if window is None and softcap is None and len(set(ns)) == 1 and not views[0].first and dec.codec is None:
            return dec.exact_batch(layer, rows, views, query, ns[0] + 1, scaling)
        return dec.exact_ragged(layer, rows, views, query, [n + 1 for n in ns], scaling, softcap, window)

    def _batch_sparse(self, layer: int, group: list[tuple], query, scaling: float, window: int | None,
                      softcap: float | None) -> torch.Tensor:
        """`_decode_batch`'s sparse steps: `group` holds (sequence, view, tokens before the step, plan)."""
        sel = self.selection
        plans = [p for *_, p in group]
        forced = [sel.fixed_ids(p) for p in plans]
        out = self.decoder.sparse_batch([layer * self.batch + b for b, *_ in group], [v for _, v, _, _ in group],
                                        query, plans, forced, sel, self.step, scaling, softcap)
        self._count_sparse_batch(layer, group, forced)
        return out

    def _count_sparse_batch(self, layer: int, group: list[tuple], forced: list[list[int]]) -> None:
        """The blocks a batch's sparse step attended, and each sequence's share of its window."""
        B, P, sel = self.batch, self.page_size, self.selection
        for (b, _, n, p), f in zip(group, forced):
            chosen = len(f) + max(p.k_blocks - len(f), 0)
            self.counters["blocks"]["attended"] += chosen * self.decoder.heads
            first, off = self._window_first(layer * B + b, n + 1)
            self._count_decode(layer * B + b, min(1.0, (chosen * sel.block + p.valid) / (n + 1 - first * P - off)))

    def _batch_sparse_lower(self, layer: int, group: list[tuple], query, scaling: float, window: int | None,
                            softcap: float | None) -> torch.Tensor:
        """`_decode_batch`'s sparse steps of sequences with pages on disk: the blocks are chosen and those in the
        pools attended as in `_batch_sparse` (a partial per sequence, each head's chosen blocks on disk hidden);
        the pages holding the chosen blocks on disk, of every sequence, are read in one request through the load
        ring (one read on the host learns which: the blocks on disk were chosen on the device), and each chunk is
        attended in one pass as it lands, each head over the blocks it chose alone. The partials are merged per
        sequence, and the pages loaded move to the device as a sequence's own streaming step moves them."""
        B, P, M, dec, sel, ring = self.batch, self.page_size, self.max_pages, self.decoder, self.selection, self.ring
        R, Bk, G, heads = sel.per_page, sel.block, len(group), dec.heads
        rows = [layer * B + b for b, *_ in group]
        plans = [p for *_, p in group]
        forced = [sel.fixed_ids(p) for p in plans]
        part, ids, blocks = dec.sparse_batch(rows, [v for _, v, _, _ in group], query, plans, forced, sel,
                                             self.step, scaling, softcap, partial=True)
        self._count_sparse_batch(layer, group, forced)
        parts = [part]
        # Each head's chosen blocks on disk: (sequence, entry, head), and the block its chooser chose there.
        g, e, h = (ids < 0).nonzero(as_tuple=True)
        if g.numel():
            key = ("sparse", layer)
            blk = blocks[g, e, h if dec.choosers == heads else torch.zeros_like(h)]
            want = torch.zeros((G, M * R, heads), dtype=torch.bool, device=self.device)
            want[g, blk, h] = True
            at = torch.unique(g.cpu() * M + (blk // R).cpu())  # (sequence, page), in row and page order
            on_rows, on_pages = torch.tensor(rows)[at // M], at % M
            ring.discard_pending(key)
            self.count_load(on_pages.numel(), predicted=False)
            ring.request(layer * B, on_pages, predicted=False, front=True, rows=on_rows, key=key)
            ring.pump()
            q = query.reshape(G, heads, -1, self.head_dim)
            seq = torch.full((B,), -1, dtype=torch.long)
            seq[[b for b, *_ in group]] = torch.arange(G)
            # A head sees a chunk page's blocks it chose, from the window's start on.
            start = torch.tensor([p.fb * Bk + p.cut for p in plans], device=self.device)
            block_of = torch.arange(P, device=self.device) // Bk
            for job, k, v in ring.consume(key):
                mine = seq[job.rows - layer * B].to(self.device)
                pages = job.pages.to(self.device)
                seen = want[mine[:, None], pages[:, None] * R + block_of]  # [n, P, heads]
                seen &= (pages[:, None] * P + torch.arange(P, device=self.device) >= start[mine][:, None])[..., None]
                kh, vh = (k, v) if heads == self.kv_heads else (k.index_select(1, dec.head_of),
                                                                v.index_select(1, dec.head_of))
                parts.append(am.segment_partial(q, kh, vh, mine, scaling, softcap, ~seen.permute(0, 2, 1)))
                for r in job.rows.unique().tolist():
                    of = (job.rows == r).nonzero().flatten()
                    self.placement.promote(r, job.pages[of], k[of.to(self.device)], v[of.to(self.device)], self.step)
        return am.merge(parts).to(query.dtype).view(G, 1, self.q_heads, self.head_dim)

    # -- a batch's pages on disk -------------------------------------------------------------------------------
    def _streams_with_batch(self, row: int, view) -> bool:
        """Whether row `row`, whose `view` has pages on disk, takes the batch's exact step (`_batch_lower`): the host
        attends none of its pages."""
        pooled = self.decoder.in_pools(view)
        below = view.count - pooled.count + view.host
        return self.host_attention is None or not self._host_share(row, below, pooled.count - view.host)

    def _batch_lower(self, layer: int, group: list[tuple], query, scaling: float, window: int | None,
                     softcap: float | None) -> torch.Tensor:
        """`_decode_batch`'s exact steps of sequences with pages on disk: the pages of every sequence that live only
        on disk are read in one request through the load ring, in chunks that hold pages of several sequences (those
        the layer before asked for ahead, `_ask_lower_ahead`, are on their way). While they land the pools' pages
        are attended in one pass (`exact_ragged`, a partial per sequence); each chunk is attended in one pass as it
        lands, and the partials are merged per sequence."""
        B, ring, dec, M = self.batch, self.ring, self.decoder, self.max_pages
        key, rows = ("batch", layer), [layer * B + b for b, *_ in group]
        t0 = time.perf_counter()
        for row, (_, view, _, _) in zip(rows, group):
            self._count_exact_step(row, view, t0)
        on_rows, on_pages = self._on_disk(rows)
        ring.discard_pending(key)
        todo = ~torch.isin(on_rows * M + on_pages, ring.covered_rows(key) * M + ring.covered(key))
        self.count_load(int(todo.sum()), predicted=False)
        ring.request(layer * B, on_pages[todo], predicted=False, front=True, rows=on_rows[todo], key=key)
        ring.pump()
        tokens = [n + 1 for _, _, n, _ in group]
        parts = [dec.exact_ragged(layer, rows, [dec.in_pools(v) for _, v, _, _ in group], query, tokens, scaling,
                                  softcap, window, partial=True)]
        # The chunks' pages of sequences that run alone now (asked for ahead) go to a spare query row, whose partial
        # is dropped: nothing is read on the host to leave them out.
        G = len(group)
        q = query.reshape(G, self.kv_heads, -1, self.head_dim)
        q = torch.cat([q, q[:1]])
        seq = torch.full((B,), G, dtype=torch.long)
        seq[[b for b, *_ in group]] = torch.arange(G)
        ends = torch.tensor([*tokens, 0])
        for job, k, v in ring.consume(key):
            mine = seq[job.rows - layer * B]
            hidden = None
            if window is not None:  # the keys before the window's start, on its first page
                rel = job.pages[:, None] * self.page_size + torch.arange(self.page_size) - ends[mine][:, None]
                hidden = (rel < -window).to(self.device)
            o, lse = am.segment_partial(q, k, v, mine.to(self.device), scaling, softcap, hidden)
            parts.append((o[:G], lse[:G]))
        return am.merge(parts).to(query.dtype).view(G, 1, self.q_heads, self.head_dim)

    def _on_disk(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The full pages of `rows` that live only on disk (the tail, on the device, left out), in row and page
        order: (the row of each, its page), int64 on the CPU. Kept while the rows' pages stay where they are (their
        table versions and page counts), so the layer before asking for them ahead and the layer's own step, and
        the steps up to the next page boundary, find them once."""
        t = self.table
        key = tuple((x, t.version[x], t.pages(x), t.first[x]) for x in rows)
        have = self.disk_pages.get(tuple(rows))
        if have is not None and have[0] == key:
            return have[1]
        r = torch.tensor(rows)
        bounds = torch.tensor([[t.first[x], t.pages(x) - 1] for x in rows])
        page = torch.arange(self.max_pages)
        below = ((t.slot["device"][r] < 0) & (t.slot["host"][r] < 0) & (page >= bounds[:, :1])
                 & (page < bounds[:, 1:]))
        at, pages = below.nonzero(as_tuple=True)
        self.disk_pages[tuple(rows)] = (key, (r[at], pages))
        return r[at], pages

    def _ask_lower_ahead(self, layer: int) -> None:
        """Asks the load ring for the disk pages that the next layer of the model (layer 0 of the next step after
        the last) will read in `_batch_lower`, for the sequences whose step there opens no page; they load while
        this layer computes (after its own pages)."""
        B, P, t = self.batch, self.page_size, self.table
        nxt = (layer + 1) % self.model_layers
        rows = [nxt * B + b for b in range(B) if not self.finished[b] and t.tokens[nxt * B + b] % P]
        if rows:
            on_rows, on_pages = self._on_disk(rows)
            keep = t.busy[on_rows, on_pages] == 0
            self.ring.discard_pending(("batch", nxt))
            self.ring.request(nxt * B, on_pages[keep], predicted=True, rows=on_rows[keep], key=("batch", nxt))

    def _count_exact_step(self, layer: int, view, t0: float) -> None:
        """An exact device step of row `layer` over `view`: its pages read from the host pool are loads of pages
        needed now (started at `t0`), and it attended every token."""
        if view.host:
            self.counters["loads"]["needed"] += view.host
            self.engine.account("host->device", view.host * self.placement.stored.page_bytes, t0, layer, "load")
        self._count_decode(layer, 1.0)

    def take_batch(self, batch: int) -> None:
        """Shapes an empty sequence for a forward of `batch` sequences; refuses another batch size once it holds
        tokens."""
        if batch == self.batch:
            return
        if any(self.length) or any(self.table.tokens):
            raise ValueError(f"batch: this cache holds a batch of {self.batch} sequences; a forward of {batch} can't "
                             "go on with it (take a new cache with rt.cache())")
        self._fresh_table(batch)

    def row_name(self, row: int) -> str:
        """A page table row in messages: "layer 3", or "layer 3 of sequence 1" in a batch."""
        layer, sequence = divmod(row, self.batch)
        return f"layer {layer}" if self.batch == 1 else f"layer {layer} of sequence {sequence}"

    def held(self, layer: int) -> int:
        """The positions layer `layer` of the model holds, as transformers counts them (padding included)."""
        return self.table.tokens[layer] if self.batch == 1 else self.length[layer]

    def note_padding(self, mask: torch.Tensor | None, positions: int) -> None:
        """The 2-D attention mask (or None) of a forward of the batch over `positions` positions (those held and
        the new ones): learns each sequence's left padding at its first forward, and checks that later ones
        agree."""
        pads = left_padding(mask, positions) if mask is not None else [0] * self.batch
        held = self.length[0]
        # A sequence all padding so far (a chunked prefill's first chunks) may learn more of it.
        if all(p == q or (q == held and p >= held) for p, q in zip(pads, self.pads)):
            self.pads = pads
        else:
            raise ValueError(f"attention_mask: the batch's padding changed between forwards (was {self.pads} "
                             f"positions per sequence, now {pads}); pass the mask of the whole conversation")

    def finish(self, sequence: int) -> None:
        """Releases every page of `sequence` of the batch: it has finished (generate feeds it padding from now
        on, and its attention is zeros)."""
        if self.finished[sequence]:
            return
        self.ring.drain()  # NOTE: a load in flight must land before its slot goes to another page
        for layer in range(sequence, self.layers, self.batch):
            self.placement.release(layer, self.table.pages(layer))
        self.finished[sequence] = True
        self._resident()

    @torch.no_grad()
    def reorder(self, source: list[int]) -> None:
        """Beam search: sequence b of the batch goes on from sequence source[b]. Each row takes its source row's
        pages by reference (the tiers count references, and a slot is freed by its last holder); an open tail page
        that several rows now continue is copied for all but the first of them, since each writes its own next
        token into it (copy on write). Host work only: integers and slot maps."""
        B = self.batch
        if len(source) != B or not all(0 <= q < B for q in source):
            raise ValueError(f"beam_idx: expected {B} indices of sequences 0..{B - 1}, got {source}")
        if source == list(range(B)) or not any(self.table.tokens):
            return
        self.ring.drain()  # NOTE: loads in flight target the rows being rewritten
        t, P = self.table, self.page_size
        pairs = [(layer * B + b, layer * B + q) for layer in range(self.model_layers) for b, q in enumerate(source)]
        # Open tail pages continued by more than one row: the first keeps the slot, the others get copies.
        taken: set[int] = set()
        tails: list[tuple[int, int, int]] = []  # (index in pairs, tail page, the source's slot) to copy
        for i, (row, src) in enumerate(pairs):
            if t.tokens[src] % P and not t.first[src] * P >= t.tokens[src]:
                if src in taken:
                    page = t.tokens[src] // P
                    tails.append((i, page, int(t.slot["device"][src, page])))
                taken.add(src)
        rows = torch.tensor([r for r, _ in pairs])
        srcs = torch.tensor([q for _, q in pairs])
        new = {name: t.slot[name][srcs].clone() for name in t.slot}
        for i, page, _ in tails:
            new["device"][i, page] = -1  # its own copy comes below
        # The new references first, then the old ones dropped: a slot both keep is never freed in between.
        for name, tier in self.placement.tiers():
            if tier is not None:
                gained, dropped = new[name], t.slot[name][rows]
                tier.share(gained[gained >= 0].tolist())
                tier.release(dropped[dropped >= 0].tolist())
                t.slot[name][rows] = new[name]
        t.last_use[rows] = t.last_use[srcs].clone()
        t.score[rows] = t.score[srcs].clone()
        tokens, first = list(t.tokens), list(t.first)
        for row, src in pairs:
            t.tokens[row], t.first[row] = tokens[src], first[src]
            t.version[row] += 1
        # Copies of the open tails, in slots the old rows' pages left (or that eviction frees; open tails stay).
        fresh = self.placement.device_slots(len(tails)) if tails else []
        for (i, page, s), slot in zip(tails, fresh):
            self.device_tier.k[slot].copy_(self.device_tier.k[s])
            self.device_tier.v[slot].copy_(self.device_tier.v[s])
            t.set("device", int(rows[i]), page, slot)
        if self.decoder is not None:
            at, of = rows.to(self.device), srcs.to(self.device)
            self.decoder.use_step[at] = self.decoder.use_step[of].clone()
            self.decoder.mass[at] = self.decoder.mass[of].clone()
            if self.decoder.cache is not None:  # copies of the rows that now go on from others' blocks
                self.decoder.cache.drop_rows(rows[rows != srcs])
        if self.selection is not None:
            self.selection.reorder(rows, srcs)
        self.pads = [self.pads[q] for q in source]
        self.finished = [self.finished[q] for q in source]

    # -- sliding windows -----------------------------------------------------------------------------------
    def _window_first(self, layer: int, n: int) -> tuple[int, int]:
        """(page, offset) of the first token that the query at position n-1 sees, with n tokens stored."""
        return window_start(self.windows[layer], n, self.page_size)

    def _dead_pages(self, layer: int, n: int) -> int:
        """With n tokens stored, the leading pages of `layer` that no query to come (positions >= n) can see."""
        window = self.windows[layer]
        return 0 if window is None else max(0, n + 1 - window) // self.page_size

    def _release(self, layer: int, upto: int) -> None:
        """Frees pages first..upto-1 of `layer` in every tier and clears their entries: they fell out of the
        layer's sliding window for good. Runs at page boundaries only, so reading the table on the host is fine."""
        t = self.table
        a, b = t.first[layer], min(upto, self.max_pages)
        if b <= a:
            return
        if bool(t.busy[layer, a:b].any()):
            self.ring.drain()  # NOTE: a copy in flight must land before its slot is given to another page
        self.placement.release(layer, b)

    # -- prefill ---------------------------------------------------------------------------------------------
    # Query tokens per piece of a prefill's attention over its own tokens on the manual path (and, with a sliding
    # window, at least a window's worth on the SDPA path): bounds the scores at [H_q, 256, T] floats.
    PREFILL_BLOCK = 256

    def _prefill(self, layer: int, query, key, value, scaling: float, softcap: float | None) -> torch.Tensor:
        tokens = query.shape[2]
        window = self.windows[layer]
        if self.table.tokens[layer] == 0 and softcap is None:
            gqa = self.q_heads != self.kv_heads
            if window is None or tokens <= window:
                out = torch.nn.functional.scaled_dot_product_attention(
                    query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa).transpose(1, 2)
            else:
                # Blocks of queries, each over the keys its window reaches: the mask stays [B, B + W - 1] however
                # long the prompt.
                block, outs = max(self.PREFILL_BLOCK, window), []
                for a in range(0, tokens, block):
                    b = min(tokens, a + block)
                    start = max(0, a - window + 1)
                    dev = query.device
                    mask = ~am.window_hidden(torch.arange(a, b, device=dev), torch.arange(start, b, device=dev),
                                             window, causal=True)  # [b - a, b - start], True: attend
                    outs.append(torch.nn.functional.scaled_dot_product_attention(
                        query[:, :, a:b], key[:, :, start:b], value[:, :, start:b], attn_mask=mask, scale=scaling,
                        enable_gqa=gqa))
                out = torch.cat(outs, dim=2).transpose(1, 2)
        elif softcap is None and (view := self._prefill_view(layer)) is not None:
            out = self._prefill_over_view(layer, view, query, key, value, scaling)
        else:
            # Soft-capping needs the scores (framework SDPA can't cap them), and earlier pages come as partials.
            q = am.group_queries(query, self.kv_heads)
            parts = list(self._old_pages_partials(layer, q, scaling, softcap, tokens))
            parts.append(self._new_tokens_partial(q, key[0], value[0], scaling, window, softcap))
            out = am.ungroup_output(am.merge(parts), self.q_heads, tokens).to(query.dtype)
        self._store_prefill(layer, key[0], value[0])
        if layer == self.layers - 1:
            self._ready_next_step()
        return out

    def _prefill_view(self, layer: int):
        """The layer's view, when a prefill chunk after earlier tokens can read them all through one gather: the
        torch decode step's unified pool (the CPU), every page in a pool."""
        if type(self.decoder) is not DeviceDecode:
            return None
        view = self.decoder.view(layer, self.table, self.table.pages(layer))
        return None if view.lower or view.host_attend is not None else view

    def _prefill_over_view(self, layer: int, view, query, key, value, scaling: float) -> torch.Tensor:
        """A prefill chunk of T tokens after n earlier ones: the earlier tokens' pages gathered in one pass, the new
        keys after them, and one SDPA call with the causal (and sliding-window) mask [T, earlier + T]."""
        P, n, tokens = self.page_size, self.table.tokens[layer], query.shape[2]
        held = n - view.first * P  # earlier tokens in the gathered pages
        k_old, v_old = self.decoder.gather(view)
        k = torch.cat([k_old.narrow(2, 0, held), key], dim=2)
        v = torch.cat([v_old.narrow(2, 0, held), value], dim=2)
        dev = query.device
        mask = ~am.window_hidden(torch.arange(n, n + tokens, device=dev),
                                 torch.arange(view.first * P, n + tokens, device=dev), self.windows[layer],
                                 causal=True)  # [T, held + T], True: attend
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling,
                                                               enable_gqa=self.q_heads != self.kv_heads)
        return out.transpose(1, 2)

    def _new_tokens_partial(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                            window: int | None, softcap: float | None) -> am.Partial:
        """Causal (and windowed) attention of the T new tokens over themselves, in blocks of query rows.
        q [H, G*T, D], k/v [H, T, D]."""
        tokens, block = k.shape[1], self.PREFILL_BLOCK
        if tokens <= block:
            return am.dense_partial(q, k, v, scaling, causal_tokens=tokens, window=window, softcap=softcap)
        h, d = q.shape[0], q.shape[-1]
        qg = q.view(h, -1, tokens, d)  # [H, G, T, D]
        outs, lses = [], []
        for a in range(0, tokens, block):
            b = min(tokens, a + block)
            start = 0 if window is None else max(0, a - window + 1)  # the first key query a sees
            o, lse = am.dense_partial(qg[:, :, a:b].reshape(h, -1, d), k[:, start:b], v[:, start:b], scaling,
                                      causal_tokens=b - a, window=window, softcap=softcap)
            outs.append(o.view(h, -1, b - a, d))
            lses.append(lse.view(h, -1, b - a))
        return torch.cat(outs, dim=2).view(h, -1, d), torch.cat(lses, dim=2).view(h, -1)

    def _old_pages_partials(self, layer: int, q: torch.Tensor, scaling: float, softcap: float | None, tokens: int):
        """Partials of a prefill chunk's T queries over the pages stored before it."""
        n = self.table.tokens[layer]
        if n == 0:
            return
        P = self.page_size
        last = self.table.pages(layer) - 1
        valid = n - last * P
        window = self.windows[layer]
        hide = None
        if window is not None:
            qpos = torch.arange(n, n + tokens, device=self.device)
            offsets = torch.arange(P, device=self.device)

            def hide(pages: torch.Tensor) -> torch.Tensor:
                """[n_pages, T, P]: keys each query's window leaves out."""
                kpos = pages.to(self.device)[:, None] * P + offsets
                return am.window_hidden(qpos, kpos, window, causal=False).permute(1, 0, 2)

        if valid == P:
            last += 1  # no open tail: every page is full
        else:
            yield self._tail_partial(layer, last, valid, q, scaling, softcap, hide=hide)
        first = self.table.first[layer]  # the pages before it are out of every query's window
        if last > first:
            yield from self._pages_partials(layer, torch.arange(first, last), q, scaling, softcap, hide=hide)

    def _store_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Appends T new tokens: fills the tail page, then places the new pages by tier. With a prefix cache, the
        pages they finish are captured for publishing."""
        P = self.page_size
        n = self.table.tokens[layer]
        if self.prefix is not None and self.batch == 1 and self.prefix.wants((n + k.shape[1]) // P):
            self._capture_prefill(layer, n, k, v)
        pos = self._fill_tail(layer, k, v, 0) if n % P else 0
        if pos and self.sparse and self.table.tokens[layer] % P == 0:
            self._summarize_filled(layer, self.table.tokens[layer] // P - 1)
        rest = k.shape[1] - pos
        # Pages the window has left for good go now, before the new pages take slots; new pages already out of
        # it are never stored.
        dead = self._dead_pages(layer, n + k.shape[1])
        self._release(layer, dead)
        if rest == 0:
            return
        count = -(-rest // P)
        pad = count * P - rest
        kk, vv = k[:, pos:], v[:, pos:]
        if pad:
            kk = torch.nn.functional.pad(kk, (0, 0, 0, pad))
            vv = torch.nn.functional.pad(vv, (0, 0, 0, pad))
        H, D = self.kv_heads, self.head_dim
        # [H, count*P, D] -> [count, H, P, D]: pages as the tiers store them.
        kp = kk.reshape(H, count, P, D).transpose(0, 1).contiguous()
        vp = vv.reshape(H, count, P, D).transpose(0, 1).contiguous()
        self._store_pages(layer, kp, vp, rest, dead)

    def _store_pages(self, layer: int, kp: torch.Tensor, vp: torch.Tensor, rest: int, dead: int) -> None:
        """Places new pages kp, vp [count, H, P, D] after the layer's tokens (which end on a page boundary): they
        hold `rest` tokens (the last page padded when fewer than count * P); pages before `dead` are out of the
        sliding window already and are not stored."""
        P = self.page_size
        first, count = self.table.tokens[layer] // P, kp.shape[0]
        pad = count * P - rest
        skip = max(0, dead - first)
        if skip >= count:  # only a window of one token can leave nothing to keep
            self.table.tokens[layer] += rest
            return
        first, count = first + skip, count - skip
        kp, vp = kp[skip:], vp[skip:]
        pages = list(range(first, first + count))
        # The last new page stays on the device (it is the tail); earlier ones while this layer's share lasts.
        dev_idx, low_idx = self.placement.split_new_pages(layer, first, count)
        self.placement.place_device(layer, [pages[i] for i in dev_idx], _rows(kp, dev_idx), _rows(vp, dev_idx))
        if low_idx:
            self.placement.place_lower(layer, [pages[i] for i in low_idx], _rows(kp, low_idx), _rows(vp, low_idx))
        self.table.tokens[layer] += rest
        if self.config.attention == "sparse":
            self.selection.summarize(layer, pages[:count - 1 if pad else count], kp[:count - 1 if pad else count])

    def _capture_prefill(self, layer: int, n: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copies to the host the pages that T new tokens after n finish: the open tail page (its first tokens
        from the device) and the full pages among the new ones."""
        P = self.page_size
        first, end = n // P, (n + k.shape[1]) // P
        if end <= first:
            return
        ks, vs = k[:, :end * P - n], v[:, :end * P - n]
        if n % P:
            s = self._tail(layer)[0]
            ks = torch.cat([self.device_tier.k[s, :, :n % P], ks], dim=1)
            vs = torch.cat([self.device_tier.v[s, :, :n % P], vs], dim=1)
        self.prefix.capture(layer, first, ks.to("cpu", copy=True), vs.to("cpu", copy=True))

    # -- decode ----------------------------------------------------------------------------------------------
    def _decode(self, layer: int, query, k, v, scaling: float, softcap: float | None) -> torch.Tensor:
        """One new token of one layer, top to bottom. A step that opens a page is a boundary: the uses recorded on
        the device reach the eviction policy, the new tail may evict, and the last layer readies the next step.
        Then the layer attends on the device over the pools (`_decode_on_device`), or, when some of its pages
        live only on disk, through the load ring (`_decode_streaming`). Last, pages its sliding window left are
        released."""
        opened = self.table.tokens[layer] % self.page_size == 0
        if opened:
            self._boundary(layer == 0)
        self._append_token(layer, k, v)  # into the tail page, on the device
        self.opened |= opened
        if self.opened and layer == self.layers - 1:
            self._ready_next_step()
        n = self.table.tokens[layer]
        first, off = self._window_first(layer, n)  # the window starts at token `off` of page `first`
        view = None
        if self.decoder is not None:
            view = self.decoder.view(layer, self.table, self.table.pages(layer))
            if view.lower or view.first > first:
                view = None
        if view is not None:
            self.ring.forget(layer)  # loads an earlier step queued for this layer
            out = self._decode_on_device(layer, view, query, n, first, off, scaling, softcap)
        else:
            out = self._decode_streaming(layer, query, n, first, off, scaling, softcap)
        self._release(layer, self._dead_pages(layer, n))
        return out

    def _boundary(self, first_row: bool) -> None:
        """A step that opens a page: the uses recorded on the device since the last one reach the eviction policy,
        and at the first row (layer 0 of sequence 0), in sparse mode, the host pages the device steps read since
        then move to the device (`_promote_used`)."""
        if self.decoder is not None:
            used = self.decoder.absorb(self.placement.policy)
            if self.sparse and first_row:
                self._promote_used(used)

    def _decode_streaming(self, layer: int, query, n: int, first: int, off: int, scaling: float,
                          softcap: float | None) -> torch.Tensor:
        """The decode step through the load ring: pages missing from the device are loaded in chunks (the next
        layer's ahead), attended chunk by chunk and merged by log-sum-exp."""
        P = self.page_size
        last = self.table.pages(layer) - 1
        valid = n - last * P
        visible = n - first * P - off
        if (not self.sparse and self.host_tier is None and self.disk_tier is None
                and last - first < self.plan.half):
            # Nothing ever left the device: every page is resident, nothing to load or predict.
            self.table.last_use[layer, first:last] = self.step
            out = self._resident_attention(layer, query, self.table.slot["device"][layer, first:last], last, valid,
                                           scaling, softcap, off)
            self._count_decode(layer, 1.0)
            return out
        q = am.group_queries(query, self.kv_heads).float()
        sel = self.selection
        chosen = plan = None
        if sel is not None:
            full, chosen, plan = sel.select(layer, q, n, scaling)
        else:
            full = torch.arange(first, last)
        # Marked before any loading: promotion must not give up a page this layer is about to read.
        mass = sel.mass[full.to(sel.mass.device)] if sel is not None and sel.mass is not None else None
        self.placement.policy.on_use(layer, full, self.step, mass)
        if sel is not None and sel.hooks:
            nxt = layer + self.batch  # the same sequence's next layer
            sel.speculate(layer, scaling, self.table.tokens[nxt] if nxt < self.layers else 0)
        dev_slots = self.table.slot["device"][layer, full]
        missing = full[dev_slots < 0]
        hide = sel.hide(plan, chosen, first, off) if chosen is not None else self._edge_hide(first, off)
        # Pages the host attends (offload/host_attention.py): not loaded, their partial merged with the others.
        on_host = self._host_pages(layer, missing, full.numel() - missing.numel())
        host_work = None
        if on_host.numel():
            on_host = on_host[~torch.isin(on_host, self.ring.covered(layer))]  # on their way already: attended here
            missing = missing[~torch.isin(missing, on_host)]
            host_work = self._start_host(layer, on_host, q, scaling, softcap, hide) if on_host.numel() else None
        self._queue_loads(layer, missing)
        if chosen is not None:  # each head sees its own blocks of the pages, and the tail
            parts = [self._tail_partial(layer, last, valid, q, scaling, softcap)]
            parts.extend(self._pages_partials(layer, full, q, scaling, softcap, missing, hide=hide))
            if host_work is not None:
                parts.extend(self._finish_host(layer, on_host, *host_work, q, scaling, softcap, hide))
            out = am.ungroup_output(am.merge(parts), self.q_heads, 1).to(query.dtype)
            attended = chosen.shape[0] * sel.block + valid
        else:
            # Tokens before `off` on the window's first page are not attended (the tail's when the window lies
            # within it).
            cut = off if off and (first == last or full.numel() > 0) else 0
            if (missing.numel() == 0 and host_work is None and full.numel() < self.plan.half
                    and not self.ring.covered(layer).numel()):
                out = self._resident_attention(layer, query, dev_slots, last, valid, scaling, softcap, cut)
            else:
                parts = [self._tail_partial(layer, last, valid, q, scaling, softcap, start=off if first == last else 0)]
                parts.extend(self._pages_partials(layer, full, q, scaling, softcap, missing, hide=hide))
                if host_work is not None:
                    parts.extend(self._finish_host(layer, on_host, *host_work, q, scaling, softcap, hide))
                out = am.ungroup_output(am.merge(parts), self.q_heads, 1).to(query.dtype)
            attended = full.numel() * P + valid - cut
        if sel is not None and self.config.measure_recall:
            keys = self._window_keys(layer, first, last) if plan is not None else None
            sel.record_recall(layer, q, keys, first, plan, chosen, scaling, softcap)
        self._count_decode(layer, min(1.0, attended / visible))
        return out

    def _window_keys(self, layer: int, first: int, last: int) -> torch.Tensor:
        """Keys of pages first..last of `layer` [count, H, P, D] on the device, read from whichever tier holds
        each (the recall diagnostic's dense attention; not counted as traffic)."""
        k = torch.empty((last + 1 - first, *self.shape.dims), dtype=self.dtype, device=self.device)
        for name, tier in self.placement.tiers():
            slots = self.table.slot[name][layer, first:last + 1]
            have = (slots >= 0).nonzero().flatten()
            if have.numel() and tier is not None:
                kk, vv = self.engine.scratch(tier.shape, have.numel())
                tier.read(slots[have].tolist(), kk, vv)
                k[have.to(self.device)] = (self.placement.unpack(kk, vv)[0] if tier is not self.device_tier
                                           else kk.to(self.device))
        return k

    def _served_on_device(self, layer: int) -> bool:
        """Whether the layer's next decode step will gather its pages in place (nothing to load ahead): its view is
        current and every page it holds is in a pool."""
        view = self.decoder.views[layer] if self.decoder is not None else None
        return (view is not None and view.version == self.table.version[layer]
                and (self.sparse or self.decoder.serves_exact(view)) and not view.lower
                and self.table.tokens[layer] % self.page_size != 0)

    def _promote_used(self, used: torch.Tensor) -> None:
        """Sparse mode, at a page boundary: pages the device step read from the host pool since the last boundary
        (`used` >= 0; the most recently used first) move to the device, as many as free slots and device pages
        unused since the last boundary make room for (those are evicted by the policy, written back if they have
        no copy below). Once per boundary, off the steps in between."""
        host, t = self.host_tier, self.table
        if host is None:
            return
        want = (used >= 0) & (t.slot["device"] < 0) & (t.slot["host"] >= 0) & (t.busy == 0)
        if not bool(want.any()):
            return
        free = max(0, self.device_tier.num_free - self.layers)  # room for every layer's next tail page stays
        stale = (t.slot["device"] >= 0) & (used < 0) & (t.busy == 0) & unpinned_pages(t, self.config)
        room = free + int(stale.sum())
        layers, pages = want.nonzero(as_tuple=True)
        order = torch.argsort(used[layers, pages], descending=True, stable=True)[:room]
        if order.numel() == 0:
            return
        layers, pages = layers[order], pages[order]
        if order.numel() > free:
            self.placement.evict_device(order.numel() - free)
            # Pages the eviction wrote back may have pushed some of these out of the host pool (to disk): those
            # stay where they went.
            still = (t.slot["host"][layers, pages] >= 0) & (t.slot["device"][layers, pages] < 0)
            layers, pages = layers[still], pages[still]
        for layer in layers.unique().tolist():
            mine = pages[layers == layer]
            slots = t.slot["host"][layer, mine].long()
            self.placement.verify_host(layer, mine.tolist(), slots.tolist())
            self.placement.promote(layer, mine, *self.placement.unpack(host.k[slots], host.v[slots]), self.step)

    def _ready_next_step(self) -> None:
        """After a step that moved pages (a prefill, a step that opened pages): rebuilds the views, tail slots and
        sparse selection's fixed part that the next step will use, so that it reads nothing on the host. Pages a
        later layer's new tail evicted from an earlier layer are seen here, not in the next step."""
        self.opened = False
        if self.decoder is None:
            return
        P = self.page_size
        for l in range(self.layers):
            n = self.table.tokens[l] + 1  # after the next step's token
            if (n % P == 1 and P > 1) or self.table.first[l] * P >= n:
                continue  # that step opens a page: it rebuilds at its boundary anyway (or a finished sequence)
            last = -(-n // P) - 1
            self.decoder.view(l, self.table, last + 1)
            self._tail(l)
            if self.sparse and (plan := self.selection.budget(l, n)) is not None:
                self.selection.fixed(plan)

    def _decode_on_device(self, layer: int, view, query, n: int, first: int, off: int, scaling: float,
                          softcap: float | None) -> torch.Tensor:
        """The decode step over the pools (offload/decode.py): no table read, no copy through the ring."""
        P = self.page_size
        last = view.pages - 1
        valid = n - last * P
        start = (first - view.first) * P + off  # the window's first token among the gathered ones
        visible = n - first * P - off
        plan = self.selection.budget(layer, n) if self.sparse else None
        if plan is None and not self.decoder.serves_exact(view):
            return self._decode_streaming(layer, query, n, first, off, scaling, softcap)  # too many host pages
        if plan is None:  # exact, or a budget that covers the window
            if view.host and self.check_in_place and self.device.type == "cpu":
                if view.host_pages is None:  # once per view: it is rebuilt when the layer's pages move
                    t = self.table
                    a, b = view.first, view.pages
                    pages = a + ((t.slot["device"][layer, a:b] < 0) & (t.slot["host"][layer, a:b] >= 0)).nonzero()[:, 0]
                    view.host_pages = (pages.tolist(), t.slot["host"][layer, pages].tolist())
                self.placement.verify_host(layer, *view.host_pages)
            t0 = time.perf_counter()
            if view.host_attend is not None:
                out = self._exact_with_host(layer, view, query, valid, scaling, softcap)
            else:
                out = self.decoder.exact(layer, view, query, valid, start, scaling, softcap)
            self._count_exact_step(layer, view, t0)
            if self.config.measure_recall:
                self.selection.record_exact(layer)
            if isinstance(self.decoder, KernelDecode) and not self.sparse:
                # The next layer's host pages, while this one computes. Not in sparse mode: its steps gather the
                # chosen blocks on the compute stream.
                nxt = (layer + 1) % self.layers
                self.decoder.prefetch(nxt, self.table, -(-(self.table.tokens[nxt] + 1) // P))
            return out
        forced, bias, free = self.selection.fixed(plan)
        R = self.selection.per_page
        if view.host and self._host_share(layer, view.host, view.count - view.host):
            # The host attends over host pages of this layer: the chosen ones among them are attended there.
            return self._decode_streaming(layer, query, n, first, off, scaling, softcap)
        if (isinstance(self.decoder, KernelDecode)
                and forced.shape[0] + max(free, 0) + R > self.decoder.workspace * R):
            # More blocks than the block workspace holds: stream them this step.
            return self._decode_streaming(layer, query, n, first, off, scaling, softcap)
        q = am.group_queries(query, self.kv_heads).float()
        scores = self.selection.scores(layer, q, plan, scaling)
        t0 = time.perf_counter()
        out = self.decoder.sparse(layer, view, query, plan, scores, forced, bias, free, self.step, scaling, softcap)
        chosen = forced.shape[0] + max(free, 0)
        self.counters["blocks"]["attended"] += chosen * self.decoder.heads
        if self.tracer is not None:  # a timeline wants each load as a span: read the count now
            self._account_host_reads(layer, t0)
        if self.config.measure_recall:
            self.selection.record_recall(layer, q, self._window_keys(layer, first, last), first, plan,
                                         self.decoder.last_blocks[:chosen], scaling, softcap)
        self._count_decode(layer, min(1.0, (chosen * self.selection.block + valid) / visible))
        return out

    # -- attention on the host ----------------------------------------------------------------------------------
    def _host_share(self, layer: int, pages: int, resident: int) -> int:
        """How many of `layer`'s `pages` below the device the host attends (`host_attention.split`). Layers with a
        sliding window keep few pages and attend on the device alone. On a CPU-only machine "auto" attends none
        on the host unless given rates: the host's pool would share the cores and the memory of the device's
        attention (README, "Attention on the host")."""
        ha = self.host_attention
        if ha is None or self.windows[layer] is not None or pages <= 0:
            return 0
        if self.config.host_attention == "auto" and self.host_rates is None:
            if self.device.type == "cpu":
                return 0
            self.host_rates = measure_rates(ha, self.device)
        return split(self.config.host_attention, pages, resident, ha.page_bytes, ha.full_page_bytes,
                     self.host_rates)

    def _exact_with_host(self, layer: int, view, query, valid: int, scaling: float,
                         softcap: float | None) -> torch.Tensor:
        """Exact step of a full-attention layer whose view leaves some host pages to the host: the host's partial
        over them, computed while the device attends over the rest, merged with the device's."""
        q = am.group_queries(query, self.kv_heads)
        ha = self.host_attention
        ha.attach(self.host_tier.k, self.host_tier.v)
        job = ha.submit(q, view.host_attend, scaling, softcap, layer=layer)
        part = self.decoder.exact_partial(layer, view, q, valid, scaling, softcap)
        return am.ungroup_output(am.merge([part, *job.result()]), self.q_heads, 1).to(query.dtype)

    def _host_pages(self, layer: int, missing: torch.Tensor, resident: int) -> torch.Tensor:
        """Of `missing` (pages of `layer` not on the device, CPU ids in page order), those the host attends: pages
        only on disk first, then the oldest host pages, as many as `_host_share` gives."""
        if self.host_attention is None or missing.numel() == 0:
            return missing[:0]
        take = self._host_share(layer, missing.numel(), resident)
        if take == 0:
            return missing[:0]
        on_disk = self.table.slot["host"][layer, missing] < 0
        return torch.cat([missing[on_disk], missing[~on_disk]])[:take].sort().values

    def _start_host(self, layer: int, pages: torch.Tensor, q, scaling: float, softcap: float | None,
                    hide) -> tuple[list[HostJob], tuple | None]:
        """Starts the host's work over `pages` of `layer` (marked busy until `_finish_host`): a job over those in
        the host pool, and a read of those only on disk into host memory. Returns the jobs and the read
        (its pages, transfer, buffers), attended once it lands."""
        ha = self.host_attention
        self.table.busy[layer, pages] += 1
        host_slot = self.table.slot["host"][layer, pages]
        in_host = host_slot >= 0
        query = ha.query_to_host(q)
        jobs = []
        if bool(in_host.any()):
            ha.attach(self.host_tier.k, self.host_tier.v)
            mine = pages[in_host]
            jobs.append(ha.submit(q, host_slot[in_host].long(), scaling, softcap, self._host_hidden(hide, mine),
                                  layer=layer, query=query))
        read = None
        on_disk = pages[~in_host]
        if on_disk.numel():
            k, v = self._host_disk_buffers(on_disk.numel())
            slots = self.table.slot["disk"][layer, on_disk].tolist()
            transfer = self.engine.disk_read(self.disk_tier, slots, k, v, layer, self.codec)
            transfer.recover = functools.partial(self.recovery.disk_load_failed, layer, on_disk, slots, k, v)
            read = (on_disk, transfer, k, v, query)
        return jobs, read

    def _finish_host(self, layer: int, pages: torch.Tensor, jobs: list[HostJob], read, q, scaling: float,
                     softcap: float | None, hide) -> list:
        """The host's partials of `_start_host`'s work, on the device; the pages are no longer busy after."""
        try:
            if read is not None:
                on_disk, transfer, k, v, query = read
                self.stall(layer, transfer.wait(), on="disk")
                rows = torch.arange(on_disk.numel())
                jobs.append(self.host_attention.submit(q, rows, scaling, softcap, self._host_hidden(hide, on_disk),
                                                       source=(k, v), layer=layer, query=query, packed=False))
            return [p for job in jobs for p in job.result()]
        finally:
            self.table.busy[layer, pages] -= 1

    def _host_hidden(self, hide, pages: torch.Tensor) -> torch.Tensor | None:
        """`hide(pages)` (the keys each query row must not see) on the host, or None."""
        if hide is None:
            return None
        hidden = hide(pages)
        return None if hidden is None else hidden.cpu()

    def _host_disk_buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host buffers [n, H, P, D] (full precision) for disk pages the host attends."""
        have = self.host_disk_buffers
        if have is None or have[0].shape[0] < n:
            with torch.inference_mode(False):
                pages = max(n, 2 * have[0].shape[0] if have is not None else 0)
                self.host_disk_buffers = tuple(
                    aligned_host_tensor(pages * self.kv_heads * self.page_size * self.head_dim, self.dtype,
                                        pin=False).view(pages, *self.shape.dims) for _ in range(2))
        return self.host_disk_buffers[0][:n], self.host_disk_buffers[1][:n]

    def _summarize_filled(self, layer: int, page: int) -> None:
        """The summary of a page that just filled, from its keys on the device."""
        s = int(self.table.slot["device"][layer, page])
        self.selection.summarize_page(layer, page, self.device_tier.k[s:s + 1])

    def _leaving_device(self, layer: int, page: int, slot: int) -> None:
        """Sparse mode, a page evicted from the device (`Placement.leaving`): a layer's last page that filled is
        summarized by the step that opens the next (`_append_token`), but steps of other layers, or of other
        sequences of a batch, may make room before then; it is summarized now, from its keys still in `slot`."""
        t = self.table
        if page == t.pages(layer) - 1 and t.tokens[layer] % self.page_size == 0:
            self.selection.summarize_page(layer, page, self.device_tier.k[slot:slot + 1])

    def _edge_hide(self, first: int, off: int):
        """For `_pages_partials`: hides tokens 0..off-1 of page `first` (before the sliding window's start) in a
        chunk that holds that page; None when nothing needs hiding."""
        if off == 0:
            return None
        P = self.page_size

        def hide(pages: torch.Tensor) -> torch.Tensor | None:
            at = (pages == first).nonzero()  # pages: CPU page ids, no device read
            if at.numel() == 0:
                return None
            hidden = torch.zeros((pages.numel(), 1, P), dtype=torch.bool, device=self.device)  # [n, T=1, P]
            hidden[int(at[0, 0]), :, :off] = True
            return hidden

        return hide

    def _count_decode(self, layer: int, attended: float) -> None:
        self.counters["attended"] += attended
        self.counters["attended_n"] += 1
        if layer < self.batch:  # layer 0 of each sequence
            self.counters["tokens"]["decode"] += 1
        if layer == self.layers - 1:
            self.step += 1

    def _resident_attention(self, layer: int, query, dev_slots: torch.Tensor, last: int, valid: int,
                            scaling: float, softcap: float | None = None, start: int = 0) -> torch.Tensor:
        """Fast path when every page attended is on the device and they fit one half of the workspace:
        gather them (tail last) into a head-major buffer and attend in one piece, from token `start` of the first
        page (the sliding window's start). NOTE: the pages in `dev_slots` are in page order, so the gathered
        tokens are in position order and the window's first page, when there, comes first."""
        tail = self.table.slot["device"][layer, last:last + 1]
        idx = torch.cat([dev_slots, tail]).to(self.device, torch.long)
        cnt = idx.numel()
        tokens = (cnt - 1) * self.page_size + valid
        kv = []
        for pool, hm in ((self.device_tier.k, self.hm_k), (self.device_tier.v, self.hm_v)):
            # One pass: gather page-major rows straight into the head-major buffer through a permuted view.
            torch.index_select(pool, 0, idx, out=hm[:, :cnt].permute(1, 0, 2, 3))
            kv.append(hm[:, :cnt].reshape(1, self.kv_heads, cnt * self.page_size, self.head_dim)[:, :, start:tokens])
        return attend_token(query, kv[0], kv[1], scaling, softcap)

    def _tail_partial(self, layer: int, last: int, valid: int, q, scaling: float, softcap: float | None = None,
                      start: int = 0, hide=None):
        """Partial over tokens start..valid-1 of the tail page (on the device); `hide` as in `_pages_partials`."""
        s = int(self.table.slot["device"][layer, last])
        hidden = hide(torch.tensor([last]))[..., start:valid] if hide is not None else None
        return am.pages_partial(q, self.device_tier.k[s:s + 1, :, start:valid],
                                self.device_tier.v[s:s + 1, :, start:valid], scaling, softcap, hidden)

    def _open_page(self, layer: int) -> None:
        """A page boundary: the page that token `tokens[layer]` goes to gets a device slot (making room may evict),
        after the page that filled is summarized (sparse mode)."""
        page = self.table.tokens[layer] // self.page_size
        if page >= self.max_pages:
            raise ValueError(f"prompt: the sequence exceeds the model's maximum of {self.max_positions} positions")
        if self.sparse and page > 0 and int(self.table.slot["device"][layer, page - 1]) >= 0:
            self._summarize_filled(layer, page - 1)  # before making room can evict it
        slot = self.placement.device_slots(1)[0]
        self.table.set("device", layer, page, slot)

    def _append_token(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = self.table.tokens[layer]
        # (a batch's step may have opened the page already, for a sequence it then left to run alone)
        page = n // self.page_size
        if n % self.page_size == 0 and (page >= self.max_pages or int(self.table.slot["device"][layer, page]) < 0):
            self._open_page(layer)
        # k, v: [1, H, 1, D]. The token goes into row n % P of the tail page: one launch with the kernels, else
        # through views of that page.
        slot, pk, pv = self._tail(layer)
        off = n % self.page_size
        if isinstance(self.decoder, KernelDecode):
            self.decoder.append(slot, off, k, v)
        else:
            pk.select(1, off).copy_(k.view(self.kv_heads, self.head_dim))
            pv.select(1, off).copy_(v.view(self.kv_heads, self.head_dim))
        self.table.tokens[layer] = n + 1
        if off == self.page_size - 1 and self.prefix is not None and self.prefix.publish_all and self.batch == 1:
            # The page is full: a copy on the device, read to the host by the publisher's thread.
            self.prefix.capture(layer, n // self.page_size, pk.clone(), pv.clone())

    def _tail(self, layer: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """The device slot of the page that token `tokens[layer]` goes to, and views of its K and V ([H, P, D]):
        read from the table only when the page or the layer's table version changed since the last call."""
        page, version, *tail = self.tail_slot[layer]
        now = (self.table.tokens[layer] // self.page_size, self.table.version[layer])
        if (page, version) != now:
            slot = int(self.table.slot["device"][layer, now[0]]) if now[0] < self.max_pages else -1
            views = (self.device_tier.k[slot], self.device_tier.v[slot]) if slot >= 0 else (None, None)
            tail = [slot, *views]
            self.tail_slot[layer] = (*now, *tail)
        return tail[0], tail[1], tail[2]

    def _fill_tail(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int) -> int:
        """Writes new tokens from k[:, pos:] into the open tail page; returns the new position in k."""
        n = self.table.tokens[layer]
        off = n % self.page_size
        take = min(self.page_size - off, k.shape[1] - pos)
        s = self._tail(layer)[0]
        self.device_tier.k[s, :, off:off + take] = k[:, pos:pos + take]
        self.device_tier.v[s, :, off:off + take] = v[:, pos:pos + take]
        self.table.tokens[layer] = n + take
        return pos + take

    # -- pages through the workspace -------------------------------------------------------------------------
    def _queue_loads(self, layer: int, missing: torch.Tensor) -> None:
        """Orders the loads: this layer's missing pages not yet in flight first, then the next layer's predicted
        pages (exact mode: all of its missing pages), and starts as many as the ring has room for."""
        ring = self.ring
        ring.discard_pending(layer)
        remaining = missing[~torch.isin(missing, ring.covered(layer))]
        self.count_load(remaining.numel(), predicted=False)
        if self.tracer is not None and remaining.numel():
            self.tracer.instant("policy", "load needed", layer=layer, pages=remaining.numel())
        ring.request(layer, remaining, predicted=False, front=True)
        nxt = (layer + 1) % self.layers
        while nxt in self.served:  # served by the batch step before this row ran: nothing to load for it now
            nxt = (nxt + 1) % self.layers
        want = self._predict(nxt)
        if want is not None and want.numel():
            ring.discard_pending(nxt)
            ring.request(nxt, want, predicted=True)
        ring.pump()

    def _predict(self, layer: int) -> torch.Tensor | None:
        """Pages of `layer` to prefetch: all its missing pages in exact mode, the policy's guess in sparse mode."""
        if self.table.tokens[layer] == 0 or self._served_on_device(layer):
            return None
        last = self.table.pages(layer) - 1
        first = self._window_first(layer, self.table.tokens[layer] + 1)[0]  # for the token it is about to add
        if not self.sparse:
            want = torch.arange(first, last)
        else:
            want = self.prefetcher.predict(layer, self.selection.context)
            if want is None:
                return None
            want = want[(want < last) & (want >= first)]
        want = want[(self.table.slot["device"][layer, want] < 0) & (self.table.busy[layer, want] == 0)]
        if self.host_attention is not None and want.numel():  # the host attends some: they stay where they are
            missing = torch.arange(first, last)
            dev = self.table.slot["device"][layer, first:last] >= 0
            missing = missing[~dev]
            want = want[~torch.isin(want, self._host_pages(layer, missing, int(dev.sum())))]
        return want[~torch.isin(want, self.ring.covered(layer))]

    def _pages_partials(self, layer: int, pages: torch.Tensor, q, scaling: float, softcap: float | None = None,
                        missing: torch.Tensor | None = None, hide=None):
        """Partials over full `pages` of `layer`: first the chunks arriving through the load ring, then the
        resident pages gathered from the device pool. `hide(page ids)`, when given, returns the bool mask
        [n, T, P] of keys of those pages that each query token must not see (sliding windows), or None."""
        dev_slot = self.table.slot["device"][layer, pages]
        resident = dev_slot >= 0
        if missing is None:  # prefill over old pages: load everything missing now
            missing = pages[~resident]
            self.ring.request(layer, missing, predicted=False, front=True)
            self.ring.pump()
        for job, kk, vv in self.ring.consume(layer):
            if self.sparse:
                use = torch.isin(job.pages, missing)
                n_use = int(use.sum())
            else:  # exact: every page loaded for this layer is attended
                use, n_use = None, job.pages.numel()
            if job.predicted and self.sparse:
                self.counters["prefetch"]["hits"] += n_use
                if self.tracer is not None and n_use:
                    self.tracer.instant("policy", "prefetch hit", layer=layer, pages=n_use)
            if n_use == 0:
                continue
            used = job.pages
            if n_use < job.pages.numel():
                used = job.pages[use]
                pos = use.nonzero().flatten().to(self.device)
                kk, vv = kk.index_select(0, pos), vv.index_select(0, pos)
            yield am.pages_partial(q, kk, vv, scaling, softcap, hide(used) if hide is not None else None)
            if self.sparse:
                self.placement.promote(layer, job.pages[use], kk, vv, self.step)
        cap = self.plan.half
        slots = dev_slot[resident].to(self.device, torch.long)
        on_device = pages[resident]
        for start in range(0, slots.numel(), cap):
            idx = slots[start:start + cap]
            kk, vv = self.pm_k[:idx.numel()], self.pm_v[:idx.numel()]
            torch.index_select(self.device_tier.k, 0, idx, out=kk)
            torch.index_select(self.device_tier.v, 0, idx, out=vv)
            hidden = hide(on_device[start:start + cap]) if hide is not None else None
            yield am.pages_partial(q, kk, vv, scaling, softcap, hidden)

    def _load(self, job, dst_k: torch.Tensor, dst_v: torch.Tensor) -> None:
        """Starts copying the pages of the ring's chunk `job` (none on the device) into the buffers dst_k, dst_v
        ([n, H, P, D]), host pages first, then disk pages; puts the job's pages (and rows) in buffer order and keeps
        its copies."""
        rows, pages = job.where()
        host_slot = self.table.slot["host"][rows, pages]
        on_host = host_slot >= 0
        order = torch.cat([on_host.nonzero()[:, 0], (~on_host).nonzero()[:, 0]])
        job.pages = pages = pages[order]
        if job.rows is not None:
            job.rows = rows = rows[order]
        host_slot = host_slot[order]
        self.table.busy[rows, pages] += 1
        transfers = job.transfers = []
        n_host = int(on_host.sum())
        if n_host:
            host = self.host_tier
            slots = host_slot[:n_host].tolist()
            for row, at in self._row_runs(rows, 0, n_host):
                self.placement.verify_host(row, pages[at].tolist(), slots[at])
            transfers.append(self.engine.copy("host->device", (host.k, host.v), slots,
                                              (dst_k, dst_v), list(range(n_host)), job.layer, codec=self.codec))
        n_disk = pages.numel() - n_host
        if n_disk:
            at = slice(n_host, n_host + n_disk)
            disk_rows = rows if job.rows is None else rows[at]
            disk_slots = self.table.slot["disk"][disk_rows, pages[at]].tolist()
            if self.device.type == "cuda":
                # Disk -> pinned staging (I/O thread), then staging -> workspace on the copy stream.
                staging = self._staging_for(dst_k)
                transfers.append(self.engine.disk_to_device(
                    self.disk_tier, disk_slots, (staging[0][:n_disk], staging[1][:n_disk]),
                    (dst_k[at], dst_v[at]), job.layer, self.codec))
            else:
                # The CPU is the device: disk pages are read straight into the workspace (disk->host only).
                transfers.append(self.engine.disk_read(self.disk_tier, disk_slots, dst_k[at], dst_v[at], job.layer,
                                                       self.codec))
            # A page that comes back damaged is rebuilt into the workspace (offload/recover.py), row by row.
            transfers[-1].recover = functools.partial(self._disk_load_failed, disk_rows, pages[at], disk_slots,
                                                      dst_k[at], dst_v[at])

    @staticmethod
    def _row_runs(rows: int | torch.Tensor, start: int, stop: int) -> list[tuple[int, slice]]:
        """(row, slice) of each run of equal rows among positions start..stop-1 of a chunk's pages; `rows` is one
        row for all, or the row of each page."""
        if isinstance(rows, int):
            return [(rows, slice(start, stop))]
        values, counts = torch.unique_consecutive(rows[start:stop], return_counts=True)
        ends = (counts.cumsum(0) + start).tolist()
        return [(int(r), slice(e - c, e)) for r, c, e in zip(values.tolist(), counts.tolist(), ends)]

    def _disk_load_failed(self, rows: int | torch.Tensor, pages: torch.Tensor, slots: list[int], k: torch.Tensor,
                          v: torch.Tensor, exc: BaseException) -> None:
        """A chunk's disk read failed: `Recovery.disk_load_failed` for the pages of each row."""
        for row, at in self._row_runs(rows, 0, pages.numel()):
            self.recovery.disk_load_failed(row, pages[at], slots[at], k[at], v[at], exc)

    def _staging_for(self, dst_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pinned host staging that belongs to the ring buffer `dst_k` (host slots 0..load_buffers*half-1)."""
        per = self.ring_k.shape[1]
        buf = (dst_k.data_ptr() - self.ring_k.data_ptr()) // (per * self.ring_k[0, 0].numel() * dst_k.element_size())
        host = self.host_tier
        return host.k[buf * per:(buf + 1) * per], host.v[buf * per:(buf + 1) * per]

    def _unbusy(self, rows: int | torch.Tensor, pages: torch.Tensor) -> None:
        self.table.busy[rows, pages] -= 1

    # -- statistics ------------------------------------------------------------------------------------------
    def _stats_init(self) -> None:
        self.counters = {
            # "reused": tokens a turn found in the sequence it continued; "loaded": from the prefix cache.
            "tokens": {"prefill": 0, "decode": 0, "reused": 0, "loaded": 0},
            # Pages brought to the device for attention, by reason: the step needed them now (exact mode's
            # loads ahead of the next layer included: every page is needed) or a prediction asked for them.
            # Pages sparse mode kept on the device after a load are counted by the placement ("promoted").
            "loads": {"needed": 0, "predicted": 0},
            # Where predictions were made (sparse mode): pages loaded on one, and those attention then used.
            "prefetch": {"issued": 0, "hits": 0},
            "attended": 0.0,
            "attended_n": 0,
            # Sparse steps on the device: blocks (of one gathered head each) chosen besides the tail's, and those
            # read from the host pool.
            "blocks": {"attended": 0, "from_host": 0},
        }
        self.stall_per_layer = [0.0] * self.model_layers  # per layer of the model, over the sequences of a batch
        self.prefill_time = [0.0, 0]  # seconds and tokens of prefill forwards
        self.peak = {"device": 0, "host": 0, "disk": 0}

    def _account_host_reads(self, layer: int, t0: float) -> None:
        """Counts the blocks (of one KV head each) that sparse steps on the device read from the host pool since
        the last call (a device read), and their bytes."""
        if self.decoder is None or not self.sparse:
            return
        blocks = int(self.decoder.host_reads)
        if blocks:
            self.decoder.host_reads.zero_()
            self.counters["blocks"]["from_host"] += blocks
            per_block = self.placement.stored.page_bytes // (self.kv_heads * self.selection.per_page)
            self.engine.account("host->device", blocks * per_block, t0, layer, "load")

    def count_load(self, pages: int, predicted: bool) -> None:
        """Counts pages starting their way to the device: on a prediction (sparse mode) or because they are
        needed (on demand, or ahead of the next layer in exact mode, where every page is needed)."""
        if predicted and self.sparse:
            self.counters["loads"]["predicted"] += pages
            self.counters["prefetch"]["issued"] += pages
        else:
            self.counters["loads"]["needed"] += pages

    def stall(self, layer: int, seconds: float, on: str = "transfer") -> None:
        self.stall_per_layer[layer // self.batch] += seconds
        if seconds > 0 and self.tracer is not None:
            now = time.perf_counter()
            self.tracer.span("stall", "wait", now - seconds, now, layer=layer, on=on)

    def _resident(self) -> dict[str, int]:
        res = {  # bytes as each tier stores its pages (packed below the device with kv_quant)
            "device": (self.device_tier.num_used + self.plan.reserved_pages) * self.shape.page_bytes,
            "host": self.host_tier.used_bytes if self.host_tier else 0,
            "disk": self.disk_tier.used_bytes if self.disk_tier else 0,
        }
        for k, v in res.items():
            self.peak[k] = max(self.peak[k], v)
        return res

    def stats(self) -> dict:
        """Counters since the runtime started; resident bytes now and at their peak."""
        self.engine.resolve_gpu_waits(self.stall)
        resident = self._resident()
        c = self.counters
        self._account_host_reads(-1, time.perf_counter())
        per_token = self.shape.page_bytes // self.page_size  # one layer's K and V of one token
        return {
            "bytes_moved": dict(self.engine.bytes_moved),
            "resident_bytes": resident,
            "peak_resident_bytes": dict(self.peak),
            "budgets": {"device": self.plan.device_budget, "host": self.plan.host_budget,
                        "disk": self.plan.disk_budget},
            "kv_bytes": sum(self.table.tokens) * per_token,
            "tokens": dict(c["tokens"]),
            "loads": {**c["loads"], "promoted": self.placement.promoted},
            "prefetch": dict(c["prefetch"]) if self.sparse else None,
            "blocks": dict(c["blocks"]) if self.sparse else None,
            "evictions": dict(self.placement.evictions),
            "stall_seconds": sum(self.stall_per_layer),
            "stall_seconds_per_layer": list(self.stall_per_layer),
            "attended_fraction": c["attended"] / c["attended_n"] if c["attended_n"] else 1.0,
            "recall": self.selection.recall() if self.selection is not None else None,
            "summary_bytes": self.selection.summary_bytes() if self.selection is not None else 0,
            "block_cache_bytes": self.plan.block_cache_pages * self.shape.page_bytes,
            "page_size": self.page_size,
            "page_bytes": self.shape.page_bytes,
            # kv_quant: pages below the device are packed, `compression` times smaller than at full precision, and
            # attention over them is no longer bit-exact, whatever the attention mode.
            "kv_quant": self.config.kv_quant,
            "compression": self.shape.page_bytes / self.placement.stored.page_bytes,
            "bit_exact": self.codec is None and not self.sparse,
            "prefix_cache": self._prefix_stats() if self.prefix is not None else None,
            # Disk pages found damaged, and where their right contents came from (offload/recover.py).
            "faults": dict(self.recovery.counts),
            "host_attention": self._host_attention_stats(),
        }

    def _host_attention_stats(self) -> dict:
        """Pages the host attended (once per layer and step) and their bytes as it read them; the cost model's
        rates, once measured or set."""
        ha, r = self.host_attention, self.host_rates
        out = {"mode": self.config.host_attention, "threads": ha.threads if ha else 0,
               **(ha.counts if ha else {"jobs": 0, "pages": 0, "bytes": 0}), "rates": None}
        if r is not None:
            out["rates"] = {"link_gbps": r.link / 1e9, "host_gbps": r.host / 1e9, "device_gbps": r.device / 1e9,
                            "overhead_us": r.overhead * 1e6, "concurrent": r.concurrent}
        return out

    def _prefix_stats(self) -> dict:
        """The prefix cache's counters, once the pages on their way to the store are written."""
        self.prefix.flush()
        rate = self.prefill_time[0] / self.prefill_time[1] if self.prefill_time[1] else None
        return self.prefix.stats(rate)


def _id_list(input_ids) -> list[int]:
    """[1, n] or [n] ids (a tensor or a list) as a list of ints."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2 and input_ids.shape[0] == 1:
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids: expected one sequence, shape [1, n] or [n], got {tuple(input_ids.shape)}")
        return input_ids.tolist()
    ids = list(input_ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError("input_ids: expected token ids (ints)")
    return ids


def _rows(t: torch.Tensor, index: list[int]) -> torch.Tensor:
    """t[index]: a view when the index is a run of consecutive rows (the usual split of new pages), else a copy."""
    if index and index[-1] - index[0] == len(index) - 1:
        return t[index[0]:index[-1] + 1]
    return t[index]
