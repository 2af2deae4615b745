"""The attention function registered with transformers' AttentionInterface while `offload()` is active.

Each runtime registers it under its own name, `offload-<id>`, and sets the model's attention implementation to that
name, so transformers' attention modules call `paged_attention` with the new query, key and value of a layer.
Masks are built as for SDPA: a forward without the offloaded cache falls back to SDPA and needs them; the offloaded
path ignores them (batch size 1, causal) and, without padding, SDPA's mask builder returns None for prefill from
an empty cache and for decode, so nothing large is built.
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


def register(name: str, runtime: Runtime) -> None:
    _RUNTIMES[name] = weakref.ref(runtime)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return paged_attention(name, module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)


def unregister(name: str) -> None:
    _RUNTIMES.pop(name, None)
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def paged_attention(name: str, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
                    dropout: float, **kwargs) -> tuple[torch.Tensor, None]:
    ref = _RUNTIMES.get(name)
    runtime = ref() if ref is not None else None
    layer = module.layer_idx
    pending = runtime.pending.pop(layer, None) if runtime is not None else None
    if pending is None or pending[0] is not key:
        # A forward without the offloaded cache (no cache, or another Cache object): plain attention.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return runtime.attend(layer, query, key, value, scaling, window=kwargs.get("sliding_window"),
                          softcap=kwargs.get("softcap")), None
