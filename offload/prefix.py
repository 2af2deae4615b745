"""The prefix cache: the KV of full pages kept beyond the process, in a directory or a Valkey/Redis server, so that
a prompt which starts like an earlier one loads those pages instead of computing them.

Keys. Page i's key hashes page i-1's key and page i's token ids; the chain starts from a root that fingerprints the
model (its class, architecture fields, dtype and a sample of every weight), the page size, `kv_quant` and the entry
format. So a key fixes the page's whole prefix and what computed it: two prompts share the keys of the pages they
share, and a different model (or the same one at another dtype) finds nothing.

Entries. One entry holds one page over every layer: a header (magic, format, key, fingerprint, shapes, dtype and
the CRC32 of the payload) and the payload, keys and values as [layers, 2, heads, page, dim] at the model's dtype.
An entry is decoded only when every header field matches what this runtime expects and the checksum holds;
anything else (a truncated, corrupted or foreign entry) is counted as corrupt, deleted and treated as a miss. One
entry per page across layers rather than per page and layer: a lookup is then one request per page instead of one
per page and layer, and `benchmarks/prefix_cache.py` measures both (README, "Prefix cache").

Entries hold the model-dtype KV whatever `kv_quant` is: a loaded page goes through the same placement as a
computed one (`Runtime._store_prefill`), which packs what goes below the device, so a loaded prefix leaves the
tiers exactly as a prefill of it would.

Lookup (`load`): the longest run of stored pages from the first, in whole pages, leaving at least the prompt's last
token to compute (its logits start the generation). Pages are fetched and placed a chunk at a time, each layer's
pages as one prefill of that layer.

Publishing (`capture`, `forward_done`): while a forward stores pages, the full ones are copied off (to the host
during a prefill; a device copy of the finished page during decode with `prefix_cache_publish="all"`), and after
the last layer they go to a background thread that writes those the store lacks. Decode never waits for the store.

Failure is a miss: an unreachable server, a timeout or an I/O error gives one warning line and the pages are
computed instead; a publish that fails is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from tiers.prefix import PrefixStore, StoreError, open_store

log = logging.getLogger(__name__)

FORMAT = 1
MAGIC = b"OFKVPAGE"
_HEAD = struct.Struct("<8sI")  # magic, header length
# Model configuration fields that change the KV a model computes for the same tokens.
ARCH_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
               "rope_scaling", "rope_parameters", "partial_rotary_factor", "sliding_window", "layer_types",
               "rms_norm_eps", "attn_logit_softcapping", "query_pre_attn_scalar", "attention_bias")
SAMPLES_PER_WEIGHT = 64
PAGES_PER_FETCH = 16  # pages fetched and placed at a time by a lookup
PAGES_PER_PUT = 16  # pages written per store request by the publisher
RETRY_AFTER = 10.0  # seconds a store that failed is left alone before it is tried again


class CorruptEntry(ValueError):
    """An entry that can't be used: truncated, corrupted, or written for another key, model or shape."""


def model_fingerprint(model: torch.nn.Module, dtype: torch.dtype, page_size: int, kv_quant: str) -> str:
    """Hex digest of what decides the KV of a page: the model's class and architecture fields, the dtype, a strided
    sample of every weight (cheap at any model size, and different for any two trained or random models), the
    page size, `kv_quant` and the entry format."""
    h = hashlib.blake2b(digest_size=32)
    cfg = model.config
    arch = {name: repr(getattr(cfg, name, None)) for name in ARCH_FIELDS}
    h.update(json.dumps({"format": FORMAT, "class": type(model).__name__, "arch": arch, "dtype": str(dtype),
                         "page_size": page_size, "kv_quant": kv_quant}, sort_keys=True).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLES_PER_WEIGHT)
            sample = flat[::step][:SAMPLES_PER_WEIGHT].to("cpu", torch.float32)
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def chain_keys(root: str, ids: Sequence[int], page_size: int, keys: list[str] | None = None,
               pages: int | None = None) -> list[str]:
    """The keys of the first `pages` full pages of `ids` (default: all of them), extending `keys` (those of the
    first pages, already computed)."""
    keys = list(keys or [])
    pages = len(ids) // page_size if pages is None else pages
    prev = bytes.fromhex(keys[-1] if keys else root)
    for i in range(len(keys), pages):
        h = hashlib.blake2b(prev, digest_size=32)
        h.update(np.asarray(ids[i * page_size:(i + 1) * page_size], dtype="<i8").tobytes())
        prev = h.digest()
        keys.append(prev.hex())
    return keys


class EntryFormat:
    """Encodes and checks entries for one runtime: its fingerprint and page shape [layers, 2, heads, page, dim]."""

    def __init__(self, fingerprint: str, layers: int, heads: int, page_size: int, head_dim: int, dtype: torch.dtype):
        self.fingerprint = fingerprint
        self.shape = (layers, 2, heads, page_size, head_dim)
        self.dtype = dtype
        self.payload_bytes = int(np.prod(self.shape)) * torch.empty((), dtype=dtype).element_size()
        self.header = {"format": FORMAT, "fingerprint": fingerprint, "shape": list(self.shape),
                       "dtype": str(dtype).removeprefix("torch.")}

    def encode(self, key: str, page: torch.Tensor) -> bytes:
        """page: [layers, 2, heads, page, dim] on the host, contiguous, at the model's dtype."""
        payload = page.contiguous().view(torch.uint8).numpy().tobytes()
        head = json.dumps({**self.header, "key": key, "crc32": zlib.crc32(payload)}).encode()
        return _HEAD.pack(MAGIC, len(head)) + head + payload

    def decode(self, data: bytes, key: str) -> torch.Tensor:
        """The page [layers, 2, heads, page, dim] (a view of `data`: copy it before `data` goes), or CorruptEntry."""
        if len(data) < _HEAD.size:
            raise CorruptEntry(f"{len(data)} bytes, shorter than a header")
        magic, n = _HEAD.unpack_from(data)
        if magic != MAGIC:
            raise CorruptEntry("not a prefix cache entry (bad magic)")
        try:
            head = json.loads(bytes(data[_HEAD.size:_HEAD.size + n]))
        except (ValueError, UnicodeDecodeError):
            raise CorruptEntry("unreadable header") from None
        if not isinstance(head, dict):
            raise CorruptEntry("unreadable header")
        for field, want in (*self.header.items(), ("key", key)):
            if head.get(field) != want:
                raise CorruptEntry(f"header {field} is {head.get(field)!r}, expected {want!r}")
        start = _HEAD.size + n
        if len(data) - start != self.payload_bytes:
            raise CorruptEntry(f"payload of {len(data) - start} bytes, expected {self.payload_bytes}")
        if zlib.crc32(memoryview(data)[start:]) != head.get("crc32"):
            raise CorruptEntry("checksum mismatch")
        with warnings.catch_warnings():  # the buffer is read-only, and is only read
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(data, dtype=torch.uint8, count=self.payload_bytes, offset=start)
        return raw.view(self.dtype).view(self.shape)


class TokenLog:
    """The token ids of the runtime's sequence, as its forwards feed them. Ids are kept as given (device tensors
    are not read: that would wait for the device) and turned into a list only when a lookup or a publish needs
    them. Unknown once a forward runs on embeddings instead of ids."""

    def __init__(self) -> None:
        self.pieces: list[torch.Tensor] = []
        self.count = 0
        self.known = True
        self._list: list[int] | None = []

    def feed(self, ids: torch.Tensor | None, held: int) -> None:
        """The ids of a forward that starts with `held` tokens stored."""
        if not self.known:
            return
        if ids is None or ids.dim() != 2 or ids.shape[0] != 1:
            self.known, self.pieces, self._list = False, [], None
            return
        if self.count != held:  # an earlier forward stopped before storing its tokens
            values = self.list()
            if values is None or len(values) < held:
                self.known, self.pieces, self._list = False, [], None
                return
            self.set(values[:held])
        self.pieces.append(ids.reshape(-1))
        self.count += ids.shape[1]
        self._list = None
        if len(self.pieces) > 256:  # one device tensor instead of many: no read
            dev = self.pieces[-1].device
            self.pieces = [torch.cat([p.to(dev) for p in self.pieces])]

    def set(self, values: list[int]) -> None:
        self.pieces = [torch.tensor(values, dtype=torch.long)] if values else []
        self.count = len(values)
        self._list = list(values)

    def list(self) -> list[int] | None:
        if not self.known:
            return None
        if self._list is None:
            self._list = torch.cat([p.to("cpu") for p in self.pieces]).tolist() if self.pieces else []
        return self._list


class PrefixCache:
    """One runtime's view of a prefix store: lookups, the pages of the sequence captured for publishing, the
    background publisher and the counters of `stats()["prefix_cache"]`."""

    def __init__(self, config, model: torch.nn.Module, layers: int, heads: int, page_size: int, head_dim: int,
                 dtype: torch.dtype):
        self.spec = config.prefix_cache
        self.publish_all = config.prefix_cache_publish == "all"
        self.page_size = page_size
        self.layers = layers
        self.store: PrefixStore = open_store(config.prefix_cache, config.prefix_cache_budget_bytes,
                                             float(config.prefix_cache_timeout))
        self.root = model_fingerprint(model, dtype, page_size, config.kv_quant)
        self.format = EntryFormat(self.root, layers, heads, page_size, head_dim, dtype)
        self.counters = {"lookups": 0, "hits": 0, "misses": 0, "pages_loaded": 0, "tokens_loaded": 0,
                         "bytes_read": 0, "pages_written": 0, "bytes_written": 0, "corrupt": 0, "errors": 0,
                         "load_seconds": 0.0}
        self._lock = threading.Lock()
        self._failed_at: float | None = None
        self._warned = False
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.new_sequence()

    def new_sequence(self) -> None:
        self.keys: list[str] = []  # chain keys of the sequence's full pages, as far as computed
        self.published = 0  # pages 0..published-1 are in the store or on their way there
        self._captured: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    # -- failures ------------------------------------------------------------------------------------------
    def _available(self) -> bool:
        return self._failed_at is None or time.monotonic() - self._failed_at > RETRY_AFTER

    def _failed(self, exc: Exception, doing: str) -> None:
        with self._lock:
            self.counters["errors"] += 1
            self._failed_at = time.monotonic()
            warn, self._warned = not self._warned, True
        if warn:
            log.warning("offload: prefix cache %s failed while %s (%s); computing instead",
                        self.store.where, doing, " ".join(str(exc).split()))

    # -- lookup --------------------------------------------------------------------------------------------
    def load(self, ids: Sequence[int], place: Callable[[list[torch.Tensor]], None]) -> int:
        """Finds the longest stored prefix of `ids` in whole pages (leaving the last token to compute) and hands
        it to `place` a chunk at a time (pages [layers, 2, heads, page, dim] on the host, views of the fetched
        entries). The next chunk is fetched and checked on a thread while `place` runs. Returns its tokens."""
        P = self.page_size
        usable = (len(ids) - 1) // P
        if usable <= 0:
            return 0
        t0 = time.perf_counter()
        keys = chain_keys(self.root, ids, P, pages=usable)
        chunks = [keys[a:a + PAGES_PER_FETCH] for a in range(0, usable, PAGES_PER_FETCH)]
        loaded = read = 0
        if self._available():
            with ThreadPoolExecutor(1, thread_name_prefix="offload-prefix-fetch") as pool:
                ahead = pool.submit(self._fetch, chunks[0])
                for i, chunk in enumerate(chunks):
                    try:
                        pages, size = ahead.result()
                    except StoreError as exc:
                        self._failed(exc, "looking up a prompt")
                        break
                    whole = len(pages) == len(chunk)
                    if whole and i + 1 < len(chunks):
                        ahead = pool.submit(self._fetch, chunks[i + 1])
                    if pages:
                        place(pages)
                        loaded += len(pages)
                        read += size
                    if not whole:
                        break
        self.keys = keys[:loaded]
        self.published = loaded
        with self._lock:
            c = self.counters
            c["lookups"] += 1
            c["hits" if loaded else "misses"] += 1
            c["pages_loaded"] += loaded
            c["tokens_loaded"] += loaded * P
            c["bytes_read"] += read
            c["load_seconds"] += time.perf_counter() - t0
        return loaded * P

    def pages_of(self, ids: Sequence[int], pages: list[int]) -> dict[int, torch.Tensor]:
        """The stored pages `pages` of the sequence `ids` that the store holds intact, each [layers, 2, heads, page,
        dim] on the host (for rebuilding damaged disk pages). A store that fails finds none."""
        P = self.page_size
        if not pages or len(ids) < (max(pages) + 1) * P or not self._available():
            return {}
        keys = chain_keys(self.root, ids, P, pages=max(pages) + 1)
        want = [keys[p] for p in pages]
        try:
            values = self.store.get(want)
        except StoreError as exc:
            self._failed(exc, "rebuilding pages")
            return {}
        found = {}
        for page, key, value in zip(pages, want, values):
            if value is None:
                continue
            try:
                found[page] = self.format.decode(value, key)
            except CorruptEntry as exc:
                self._corrupt(key, exc)
        return found

    def _fetch(self, keys: list[str]) -> tuple[list[torch.Tensor], int]:
        """The pages of `keys` up to the first one missing or unusable, and their bytes. Raises StoreError."""
        pages, size = [], 0
        for key, value in zip(keys, self.store.get(keys)):
            if value is None:
                break
            try:
                pages.append(self.format.decode(value, key))
            except CorruptEntry as exc:
                self._corrupt(key, exc)
                break
            size += len(value)
        return pages, size

    def _corrupt(self, key: str, exc: CorruptEntry) -> None:
        with self._lock:
            self.counters["corrupt"] += 1
        log.warning("offload: prefix cache entry %s… is unusable (%s); computing its pages", key[:16], exc)
        try:
            self.store.delete([key])
        except StoreError:
            pass

    # -- publishing ----------------------------------------------------------------------------------------
    def wants(self, end_page: int) -> bool:
        """Whether a forward that finishes the pages before `end_page` has any to publish."""
        return end_page > self.published

    @property
    def captured(self) -> bool:
        return bool(self._captured)

    def capture(self, layer: int, first_page: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Full pages first_page.. of `layer` finished by the current forward: k, v [heads, pages * page, dim],
        copies the caller no longer writes."""
        self._captured[layer] = (first_page, k, v)

    def forward_done(self, ids: list[int] | None) -> None:
        """After a forward's last layer: the pages it finished in every layer go to the publisher."""
        captured, self._captured = self._captured, {}
        if not captured or ids is None or len(captured) != self.layers:
            return
        firsts = {first for first, _, _ in captured.values()}
        counts = {k.shape[1] for _, k, _ in captured.values()}
        if len(firsts) != 1 or len(counts) != 1:
            return
        first, count = firsts.pop(), counts.pop() // self.page_size
        if first > self.published or first + count > len(ids) // self.page_size:
            return  # a page before it was never captured (or the ids don't cover it): the chain has a gap
        self.keys = chain_keys(self.root, ids, self.page_size, self.keys, first + count)
        skip = self.published - first  # pages already published (a prefix loaded or written before)
        if skip >= count:
            return
        self.published = first + count
        layers = [captured[layer] for layer in range(self.layers)]
        self._submit((self.keys[first + skip:first + count], skip, layers))

    def _submit(self, job) -> None:
        if self._thread is not None and not self._thread.is_alive():
            self._publisher_died()
        if self._thread is None:
            self._thread = threading.Thread(target=self._publisher, name="offload-prefix-publish", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _publisher_died(self) -> None:
        """The publisher thread has exited without being asked: what it had queued is dropped (those pages are
        simply not published) and the next publish starts a new one."""
        dropped = 0
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
            self._jobs.task_done()
            dropped += 1
        log.warning("offload: the prefix cache publisher thread died; %d batch%s of pages not published", dropped,
                    "es" if dropped != 1 else "")
        with self._lock:
            self.counters["errors"] += 1
        self._thread = None

    def _publisher(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                self._publish(*job)
            except Exception as exc:  # a publish that fails is dropped; decode goes on
                self._failed(exc, "publishing pages")
            finally:
                self._jobs.task_done()

    def _publish(self, keys: list[str], skip: int, layers: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        if not self._available():
            return
        P = self.page_size
        try:
            present = self.store.contains(keys)
        except StoreError as exc:
            self._failed(exc, "publishing pages")
            return
        todo = [i for i, have in enumerate(present) if not have]
        for a in range(0, len(todo), PAGES_PER_PUT):
            items = []
            for i in todo[a:a + PAGES_PER_PUT]:
                lo = (skip + i) * P
                page = torch.stack([torch.stack((k[:, lo:lo + P], v[:, lo:lo + P])) for _, k, v in layers])
                items.append((keys[i], self.format.encode(keys[i], page.to("cpu"))))
            try:
                written = self.store.put(items)
            except StoreError as exc:
                self._failed(exc, "publishing pages")
                return
            with self._lock:
                self.counters["pages_written"] += written
                self.counters["bytes_written"] += written * len(items[0][1])  # entries are all of one size

    def flush(self) -> None:
        """Waits until every page handed to the publisher is written (or dropped, also when the thread died)."""
        with self._jobs.all_tasks_done:
            while self._jobs.unfinished_tasks and self._thread is not None and self._thread.is_alive():
                self._jobs.all_tasks_done.wait(0.1)
        if self._thread is not None and not self._thread.is_alive():
            self._publisher_died()

    def close(self) -> None:
        try:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                if self._jobs.unfinished_tasks:  # it died before taking them
                    self._publisher_died()
                self._thread = None
        finally:
            self.store.close()

    def stats(self, prefill_seconds_per_token: float | None) -> dict:
        with self._lock:
            c = dict(self.counters)
        saved = None
        if prefill_seconds_per_token is not None:
            saved = c["tokens_loaded"] * prefill_seconds_per_token - c["load_seconds"]
        return {"store": self.store.kind, "where": self.store.where, **c, "time_saved_seconds": saved}
