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
from typing import Any

import torch
from transformers import GenerationConfig

from offload import attention
from offload.batch import left_padding
from offload.cache import CACHE_KWARG, OffloadedCache, given_cache
from offload.config import OffloadConfig
from offload.runtime import Runtime

# transformers' values for generation settings that neither the call nor a generation config sets (its own table
# where this version has one).
_DEFAULTS: dict[str, Any] = {"max_length": 20, "num_beams": 1, "num_return_sequences": 1, "use_cache": True}
if hasattr(GenerationConfig, "_get_default_generation_params"):
    _DEFAULTS.update(GenerationConfig._get_default_generation_params())


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
    name = runtime.attention_name
    saved_impl = model.config._attn_implementation
    saved_generation = copy.deepcopy(getattr(model, "generation_config", None))
    had_generate = "generate" in model.__dict__
    saved_generate = model.__dict__.get("generate")
    hooks = []
    try:
        hooks = _watch_forwards(model, runtime)
        attention.register(name, runtime)
        model.set_attn_implementation(name)
        if hasattr(model, "generate"):
            # The model's own cache choice (Gemma 2's "hybrid", a "static" default) would make transformers refuse
            # the offloaded cache passed to it; the generation config is restored on exit.
            own_cache = model.generation_config.cache_implementation
            model.generation_config.cache_implementation = None
            model.generate = _wrap_generate(model, runtime, own_cache)
        yield runtime
    finally:
        try:
            for hook in hooks:
                hook.remove()
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


def _watch_forwards(model: torch.nn.Module, runtime: Runtime) -> list:
    """Hooks that tell the runtime the input ids of each forward on its current sequence, and when it ends."""

    def ours(kwargs: dict) -> bool:
        cache = given_cache(kwargs)
        return (isinstance(cache, OffloadedCache) and cache.runtime is runtime
                and cache.sequence == runtime.sequence_id)

    def before(module, args, kwargs):
        if ours(kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            runtime.note_forward(ids if isinstance(ids, torch.Tensor) else None)

    def after(module, args, kwargs, output):
        if ours(kwargs):
            runtime.forward_done()

    return [model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True)]


def _wrap_generate(model: torch.nn.Module, runtime: Runtime, own_cache: str | None):
    # Inside a nested block, call what the outer wrapper wraps: the outer checks would refuse the inner cache.
    original = getattr(model.generate, "offload_wrapped", model.generate)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        given = kwargs.get("generation_config", args[1] if len(args) > 1 else None)

        def setting(key: str) -> Any:
            """The value generate will use: the call's, else the given config's, the model's, transformers'."""
            if key in kwargs:
                return kwargs[key]
            for gc in (given, model.generation_config):
                if gc is not None and getattr(gc, key, None) is not None:
                    return getattr(gc, key)
            return _DEFAULTS.get(key)

        if setting("use_cache") is False:
            return original(*args, **kwargs)  # no cache at all: nothing to offload
        cache = given_cache(kwargs)
        if cache is not None and not isinstance(cache, OffloadedCache):
            return original(*args, **kwargs)  # the caller's own Cache object: transformers' cache, plain attention
        _check_settings(model, setting, given, kwargs, own_cache)
        model.generation_config.cache_implementation = None  # the model's own, set again inside the block
        if given is not None and given.cache_implementation is not None:
            # The model's own choice, carried by a copy of its generation config: the offloaded cache replaces it.
            given = copy.copy(given)
            given.cache_implementation = None
            if "generation_config" in kwargs:
                kwargs["generation_config"] = given
            else:
                args = (args[0], given, *args[2:])
        tokens, name, lengths = _planned_tokens(model, runtime, setting, given, args, kwargs, cache)
        runtime.expect_tokens(tokens, name, lengths)
        if cache is None:
            # With the ids, a turn that extends the sequence goes on with it, and a prefix cache can fill it.
            ids = args[0] if args and args[0] is not None else kwargs.get("inputs", kwargs.get("input_ids"))
            # A batch (or one prompt repeated into one) starts a new sequence, its size taken at the first forward.
            known = (isinstance(ids, torch.Tensor) and ids.dim() == 2 and kwargs.get("inputs_embeds") is None
                     and lengths is None)
            kwargs[CACHE_KWARG] = runtime.cache(ids if known else None)
        # In a batch, a sequence fed an end-of-sequence token has finished, and its pages are released.
        eos = setting("eos_token_id") if (setting("num_beams") or 1) == 1 else None  # beams end in generate's lists
        runtime.stop_ids = (torch.tensor(eos if isinstance(eos, list) else [eos], dtype=torch.long)
                            if eos is not None else None)
        try:
            return original(*args, **kwargs)
        finally:
            runtime.stop_ids = None

    generate.offload_wrapped = original
    return generate


def _check_settings(model: torch.nn.Module, setting, given: GenerationConfig | None, kwargs: dict,
                    own_cache: str | None) -> None:
    """Refuses, before any work, what the offloaded cache can't run: one line naming the setting."""
    # The model's own cache_implementation (from before the block) gives way to the offloaded cache; one the caller
    # chose is refused.
    explicit = kwargs.get("cache_implementation")
    for gc in (given, model.generation_config):
        if explicit is None and gc is not None and gc.cache_implementation not in (None, own_cache):
            explicit = gc.cache_implementation
    if explicit is not None:
        raise ValueError(f"cache_implementation: inside offload() generate uses the offloaded cache; leave "
                         f"cache_implementation unset (got {explicit!r})")
    if setting("output_attentions"):
        raise ValueError(attention.OUTPUT_ATTENTIONS)
    # Assisted and prompt-lookup decoding roll back the tokens the model rejects, which pages can't undo.
    for name in ("assistant_model", "prompt_lookup_num_tokens"):
        if setting(name) is not None:
            raise ValueError(f"{name}: speculative (assisted or prompt-lookup) decoding is not available with the "
                             f"offloaded cache, whose pages can't be rolled back; leave {name} unset")


def _planned_tokens(model: torch.nn.Module, runtime: Runtime, setting, given: GenerationConfig | None, args: tuple,
                    kwargs: dict, cache: OffloadedCache | None) -> tuple[int, str, list[int] | None]:
    """The length the sequence will reach, as transformers' generate computes it, the parameter that set it, and
    for a batch the tokens each sequence will hold (padding left out, each prompt repeated once per beam, or once per
    returned sequence). Also checks the padding mask and, for a cache from earlier turns, that the ids hold the whole
    conversation."""
    ids = args[0] if args and args[0] is not None else kwargs.get("inputs")
    if ids is None:
        ids = kwargs.get("input_ids")
    embeds = kwargs.get("inputs_embeds")
    ids_len = ids.shape[-1] if ids is not None else 0
    prompt = embeds.shape[1] if embeds is not None else ids_len
    rows = next((t.shape[0] for t in (ids, embeds) if t is not None and t.dim() >= 2), 1)
    mask = kwargs.get("attention_mask")
    pads = [0] * rows
    if rows > 1:
        if mask is not None:
            pads = left_padding(mask, prompt)
        if cache is not None and cache.get_seq_length():
            raise ValueError("cache: a batch can't continue an earlier cache; pass no cache, or a new one")
    elif mask is not None:
        attention.check_unpadded(mask, prompt)
    if cache is not None:
        if cache.runtime is not runtime:
            raise ValueError("cache: this cache belongs to another offload() runtime; pass a cache from this "
                             "model's block (rt.cache()), or none")
        cache.check()
        past = cache.get_seq_length()
        if prompt <= past:
            what = "inputs_embeds" if embeds is not None else "input_ids"
            raise ValueError(f"{what}: the cache already holds {past} tokens; pass the whole conversation (those "
                             f"{past} tokens and the new ones), as with a DynamicCache")
    total, name = _total_tokens(model, setting, given, kwargs, ids_len, prompt, embeds)
    beams = setting("num_beams") or 1  # generate repeats each prompt once per beam, or per returned sequence
    repeat = beams if beams > 1 else setting("num_return_sequences") or 1
    lengths = [total - p for p in pads for _ in range(repeat)] if rows * repeat > 1 else None
    return total, name, lengths


def _total_tokens(model: torch.nn.Module, setting, given: GenerationConfig | None, kwargs: dict, ids_len: int,
                  prompt: int, embeds: torch.Tensor | None) -> tuple[int, str]:
    """The length generate takes the sequence to (padding included), and the parameter that set it."""
    new = setting("max_new_tokens")
    if new is not None:
        return prompt + new, "prompt"
    explicit_max = kwargs.get("max_length") is not None or (given is not None and given.max_length is not None) \
        or model.generation_config.max_length is not None
    if explicit_max:
        # generate stops when the output reaches max_length; with embeddings unlike the ids it counts them too.
        stop = setting("max_length") - (prompt if embeds is not None and ids_len != prompt else 0)
        name = "max_length" if prompt < model.config.max_position_embeddings else "prompt"
    else:
        stop = min(setting("max_length") + ids_len, model.config.max_position_embeddings)
        name = "prompt"
    return prompt + max(stop - ids_len, 0), name
