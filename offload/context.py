"""`offload(model, ...)`: the context manager that puts a model's KV cache into the runtime and takes it out again.

On entry: build the runtime (budgets are checked here), register the attention function and switch the model to it,
and make `model.generate` use a fresh offloaded cache when no cache is passed. On exit, also after an exception:
restore the attention implementation and the generation config, remove the `generate` wrapper, release all tier
memory and remove disk files.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from offload import attention
from offload.config import OffloadConfig
from offload.runtime import Runtime


@contextmanager
def offload(model: torch.nn.Module, config: OffloadConfig | None = None, **options) -> Iterator[Runtime]:
    """Runs `model` with its KV cache paged over device, host and disk. Options are `OffloadConfig` fields."""
    if config is not None and options:
        raise ValueError(f"config: pass either config= or options, not both (got {', '.join(options)})")
    if config is None:
        unknown = sorted(set(options) - set(OffloadConfig.option_names()))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown option; known: {', '.join(OffloadConfig.option_names())}")
        config = OffloadConfig(**options)
    runtime = Runtime(model, config)
    name = f"offload-{id(runtime):x}"
    saved_impl = model.config._attn_implementation
    saved_generation = copy.deepcopy(getattr(model, "generation_config", None))
    had_generate = "generate" in model.__dict__
    saved_generate = model.__dict__.get("generate")
    try:
        attention.register(name, runtime)
        model.set_attn_implementation(name)
        if hasattr(model, "generate"):
            model.generate = _wrap_generate(model, runtime)
        yield runtime
    finally:
        try:
            if had_generate:
                model.generate = saved_generate
            else:
                model.__dict__.pop("generate", None)
            model.set_attn_implementation(saved_impl)
            if saved_generation is not None:
                model.generation_config = saved_generation
        finally:
            attention.unregister(name)
            runtime.close()


def _wrap_generate(model: torch.nn.Module, runtime: Runtime):
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        gc = kwargs.get("generation_config") or model.generation_config
        if kwargs.get("use_cache", gc.use_cache) is False:
            return original(*args, **kwargs)  # no cache at all: nothing to offload
        if kwargs.get("past_key_values") is None:
            ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            if ids is not None:
                if ids.dim() == 2 and ids.shape[0] != 1:
                    raise ValueError(f"batch: offloaded generation runs one sequence at a time; got {ids.shape[0]}")
                mask = kwargs.get("attention_mask")
                if mask is not None and not bool(mask.all()):
                    raise ValueError("attention_mask: padding is not allowed with one sequence; pass unpadded ids")
                new = kwargs.get("max_new_tokens") or gc.max_new_tokens
                total = ids.shape[-1] + new if new is not None else ids.shape[-1]
                runtime.expect_tokens(total)
            if kwargs.get("num_beams", 1) != 1:
                raise ValueError("num_beams: offloaded generation runs one sequence at a time; use num_beams=1")
            kwargs["past_key_values"] = runtime.cache()
        return original(*args, **kwargs)

    return generate
