"""`OffloadedCache`: the transformers `Cache` whose layers hand new keys and values to the runtime.

`update` only stashes the new states; the attention function registered by `offload()` (offload/attention.py)
then asks the runtime to attend over the pages and to store the new tokens. So the cache never materializes a
layer's whole KV, and transformers code that only calls `update`, `get_seq_length` and `get_mask_sizes` works as is.

A runtime holds one sequence (or one batch of them) at a time, so a cache is bound to the runtime and to the
sequence it was taken for.
Every entry checks, with a few integer and string comparisons, that the sequence is still the runtime's current
one, that the `offload()` block is still open and that the model still runs this runtime's attention; otherwise the
cache would read another sequence's pages, or pages already freed, without any error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

# The keyword that carries the cache into generate and forward: `cache` from transformers 5.25 (where
# `past_key_values` is its deprecated alias, which generate turns into `cache` before calling forward),
# `past_key_values` before.
try:
    from transformers.generation.utils import ALL_CACHE_NAMES as _CACHE_NAMES
except ImportError:  # older versions
    _CACHE_NAMES = ["past_key_values"]
CACHE_KWARG = "cache" if "cache" in _CACHE_NAMES else "past_key_values"


def given_cache(kwargs: dict) -> object:
    """The cache a generate or forward call was given, under either name."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")

if TYPE_CHECKING:
    from offload.runtime import Runtime


class Handoff:
    """The new keys and values of each layer, from the cache's `update` to the runtime's attention function that
    transformers calls right after it. A layer's entry is taken once."""

    def __init__(self) -> None:
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def put(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self._kv[layer] = (key, value)

    def take(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._kv.pop(layer, None)

    def clear(self) -> None:
        self._kv.clear()

    def __bool__(self) -> bool:
        return bool(self._kv)


def unusable(runtime: Runtime, sequence: int) -> str | None:
    """Why a cache taken for `sequence` of `runtime` can't be used now, or None when it can."""
    if runtime.closed:
        return ("cache: the offload() block this cache was taken in has ended; a cache works only inside its block, "
                "take a new one with rt.cache() inside a new block")
    if sequence != runtime.sequence_id:
        return ("cache: this cache's sequence was replaced by a later rt.cache() or generate() on the same runtime "
                "(it holds one sequence or batch at a time); take a new cache with rt.cache(), or pass this one to "
                "every turn")
    impl = runtime.model.config._attn_implementation
    if impl != runtime.attention_name:
        return (f"cache: the model runs attention {impl!r}, not this cache's runtime; use the cache inside its own "
                "offload() block, not after set_attn_implementation() or inside a nested offload()")
    return None


def check_whole(runtime: Runtime) -> None:
    """Between forwards every layer holds the same tokens; a forward that stopped part-way through the layers (an
    error or an interrupt) leaves the first layers one step ahead, and the sequence can't go on."""
    tokens = runtime.table.tokens if runtime.batch == 1 else runtime.length
    if tokens.count(tokens[0]) != len(tokens):
        raise ValueError(f"cache: an earlier forward stopped part-way through the layers (they hold {min(tokens)} to "
                         f"{max(tokens)} tokens), so this sequence can't go on; take a new cache with rt.cache()")


class OffloadedLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, runtime: Runtime, layer: int, sequence: int, name: str):
        super().__init__()
        self.runtime = runtime
        self.layer = layer
        self.sequence = sequence
        self.name = name

    def check(self) -> None:
        """Raises unless this cache's sequence is the runtime's current one, in an open block, with the model on
        the runtime's attention. Python ints and strings only: it runs at every entry."""
        rt = self.runtime
        if rt.closed or self.sequence != rt.sequence_id or rt.model.config._attn_implementation != self.name:
            raise ValueError(unusable(rt, self.sequence))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.check()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        handoff = self.runtime.handoff
        if self.layer == 0:
            self.runtime.take_batch(key_states.shape[0])
            check_whole(self.runtime)
            # The masks of this forward are built; what is left is from a forward that raised half-way.
            self.runtime.mask_for_cache = False
            handoff.clear()
        elif handoff:
            # The attention of an earlier layer never took its keys: the model calling this cache does not run the
            # runtime's attention (another model, or one switched to another implementation).
            raise ValueError("cache: the model using this cache does not run its offload() block's attention; "
                             "use the cache only with the model that offload() wraps, inside the block")
        handoff.put(self.layer, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        self.check()
        return self.runtime.held(self.layer)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # transformers asks only while building a forward's attention mask: the mask function it calls next then
        # knows the forward runs on the offloaded path. Set after the checks, so a refused cache marks nothing.
        tokens = self.get_seq_length()
        self.runtime.mask_for_cache = True
        return tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise ValueError("cache: an offloaded cache can't be reset in place; take a new one with rt.cache()")

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("cache: an offloaded cache can't be cropped (pages already left for lower tiers)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # Beam search reorders the whole cache at once (`OffloadedCache.reorder_cache`), not layer by layer.
        raise ValueError("cache: reorder the offloaded cache as a whole (cache.reorder_cache), not one layer")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise ValueError("batch: an offloaded cache's sequences can't be repeated in place; pass the repeated "
                             "prompts instead")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.numel() != 1 or self.runtime.batch != 1:
            raise ValueError("batch: sequences can't be taken out of an offloaded cache in place")


class OffloadedCache(Cache):
    """A Cache over the runtime's paged KV store, bound to one of its sequences; get one from `rt.cache()`."""

    def __init__(self, runtime: Runtime):
        name = runtime.attention_name
        sequence = runtime.sequence_id
        super().__init__(layers=[OffloadedLayer(runtime, i, sequence, name) for i in range(runtime.layers)])
        self.runtime = runtime
        self.sequence = sequence

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence b goes on from sequence beam_idx[b], sharing its pages (`Runtime.reorder`). One
        host read of the indices per step."""
        self.check()
        self.runtime.reorder([int(i) for i in beam_idx.tolist()])

    def check(self) -> None:
        """Raises a one-line ValueError unless the cache can be used now (see `unusable`, `check_whole`); between
        forwards only."""
        self.layers[0].check()
        check_whole(self.runtime)
