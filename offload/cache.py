"""`OffloadedCache`: the transformers `Cache` whose layers hand new keys and values to the runtime.

`update` only stashes the new states; the attention function registered by `offload()` (offload/attention.py)
then asks the runtime to attend over the pages and to store the new tokens. So the cache never materializes a
layer's whole KV, and transformers code that only calls `update`, `get_seq_length` and `get_mask_sizes` works as is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

if TYPE_CHECKING:
    from offload.runtime import Runtime


class OffloadedLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, runtime: Runtime, layer: int):
        super().__init__()
        self.runtime = runtime
        self.layer = layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != 1:
            raise ValueError(
                f"batch: offloaded generation runs one sequence at a time; got batch size {key_states.shape[0]}"
            )
        self.runtime.pending[self.layer] = (key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.runtime.table.tokens[self.layer]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise ValueError("cache: an offloaded cache can't be reset in place; take a new one with rt.cache()")

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("cache: an offloaded cache can't be cropped (pages already left for lower tiers)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("num_beams: offloaded generation runs one sequence at a time; use num_beams=1")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise ValueError("batch: offloaded generation runs one sequence at a time (num_return_sequences=1)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.numel() != 1:
            raise ValueError("batch: offloaded generation runs one sequence at a time")


class OffloadedCache(Cache):
    """A Cache over the runtime's paged KV store; get one from `rt.cache()`."""

    def __init__(self, runtime: Runtime):
        super().__init__(layers=[OffloadedLayer(runtime, i) for i in range(runtime.layers)])
        self.runtime = runtime
