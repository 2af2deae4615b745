"""The attention function registered with transformers' AttentionInterface while `offload()` is active.

Each runtime registers it under its own name, `offload-<id>`, and sets the model's attention implementation to that
name, so transformers' attention modules call `paged_attention` with the new query, key and value of a layer.

Masks go through the mask function registered under the same name (AttentionMaskInterface). transformers calls it
once per forward and mask kind (causal, sliding window) before the layers run, right after asking the cache for the
mask sizes. When the offloaded cache was asked, the forward runs on the offloaded path: there the runtime attends
causally over each sequence's own tokens, so the mask function builds no mask. With one sequence it only checks
that the 2-D padding mask is all ones and refuses it otherwise; with a batch it learns each sequence's left padding
(offload/batch.py). That check is the one read of the mask that transformers' SDPA mask builder would do anyway, and
a forward without a mask reads nothing. Any other forward (no
cache, or another Cache object) gets SDPA's mask, padding included, and falls back to SDPA.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

if TYPE_CHECKING:
    from offload.runtime import Runtime

_RUNTIMES: dict[str, weakref.ReferenceType] = {}

OUTPUT_ATTENTIONS = ("output_attentions: attention weights are not returned inside offload() (the runtime attends "
                     "over pages without materializing them); use output_attentions=False, or call the model "
                     "outside the block with attn_implementation='eager'")


def register(name: str, runtime: Runtime) -> None:
    ref = weakref.ref(runtime)
    _RUNTIMES[name] = ref

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return paged_attention(name, module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    def mask(*args, **kwargs) -> torch.Tensor | None:
        rt = ref()
        if rt is None or not rt.mask_for_cache:
            return sdpa_mask(*args, **kwargs)
        rt.mask_for_cache = False
        padding = kwargs.get("attention_mask")
        positions = kwargs.get("kv_offset", 0) + kwargs["kv_length"]
        batch = padding.shape[0] if padding is not None else kwargs.get("batch_size", args[0] if args else 1)
        rt.take_batch(batch)
        if batch > 1:
            rt.note_padding(padding, positions)  # left padding: each sequence's real tokens only take pages
        elif padding is not None:
            check_unpadded(padding, positions)
        return None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)


def unregister(name: str) -> None:
    _RUNTIMES.pop(name, None)
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def check_unpadded(attention_mask: torch.Tensor, tokens: int) -> None:
    """Raises unless the 2-D `attention_mask` keeps all of the sequence's first `tokens` positions (one host read)."""
    if attention_mask.shape[-1] < tokens:
        raise ValueError(
            f"attention_mask: covers {attention_mask.shape[-1]} positions but the cached and new tokens are "
            f"{tokens}; pass a mask of ones over all of them, or no mask"
        )
    if not bool(attention_mask[..., :tokens].all()):
        raise ValueError("attention_mask: padding (a zero in the mask) is not supported with one sequence; "
                         "pass unpadded ids with a mask of ones, or no mask")


def paged_attention(name: str, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
                    dropout: float, **kwargs) -> tuple[torch.Tensor, None]:
    ref = _RUNTIMES.get(name)
    runtime = ref() if ref is not None else None
    layer = module.layer_idx
    pending = None
    if runtime is not None:
        runtime.mask_for_cache = False  # the masks of this forward are built
        pending = runtime.handoff.take(layer)
    if kwargs.get("output_attentions", getattr(module.config, "output_attentions", False)):
        raise ValueError(OUTPUT_ATTENTIONS)
    if pending is None or pending[0] is not key:
        # A forward without the offloaded cache (no cache, or another Cache object): plain attention.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None:
        # The mask function builds none on this path: this one was prepared by the caller (a 4-D mask).
        raise ValueError(f"attention_mask: a prepared {attention_mask.dim()}-D mask is not supported with the "
                         "offloaded cache; pass a 2-D mask of ones, or no mask")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return runtime.attend_layer(layer, query, key, value, scaling, window=kwargs.get("sliding_window"),
                                softcap=kwargs.get("softcap")), None
