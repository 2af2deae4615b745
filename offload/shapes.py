"""Named Llama-family model shapes and random-weight models built from them, for benchmarks.

Decode speed depends on the shapes (layers, KV heads, head size, context), never on the weights, so a
benchmark of an 8B model needs no checkpoint: `build_model("llama3-8b", "cuda", torch.bfloat16)` builds one with
random weights in a couple of seconds.

NOTE: the model is first built on the meta device (no memory, no init), then `to_empty` allocates every tensor
directly on the target device in the target dtype, and the weights are initialised there. An 8B model on a GPU
therefore never materialises in host RAM and is never initialised twice (torch's default `nn.Linear` init on the
CPU would take minutes).
"""

from __future__ import annotations

import torch
from torch import nn

# transformers config kwargs (LlamaConfig field names). The shapes match the published configs; only what changes
# the cost of a decode step matters here (layers, hidden, heads, KV heads, head size, MLP size, vocab).
MODEL_SHAPES: dict[str, dict] = {
    "llama3-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # For reference (KV-size arithmetic); 140 GB of bf16 weights fit on no single GPU.
    "llama3-70b": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "mistral-7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32768,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # Qwen2 has biases on q/k/v; as a Llama shape that is `attention_bias=True` (o_proj gets one too, negligible).
    "qwen2-7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        attention_bias=True,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # For tests: grouped-query attention (4 heads, 2 KV heads, head size 16), a few milliseconds per step on a CPU.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}

INIT_STD = 0.02


def shape_config(shape: str, layers: int | None = None):
    """The `LlamaConfig` of a named shape; `layers` overrides the number of decoder layers."""
    from transformers import LlamaConfig

    if shape not in MODEL_SHAPES:
        raise ValueError(f"model_shape: unknown shape {shape!r}; known: {', '.join(MODEL_SHAPES)}")
    kwargs = dict(MODEL_SHAPES[shape])
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers: expected an int >= 1, got {layers!r}")
        kwargs["num_hidden_layers"] = layers
    # rope_theta moved into `rope_parameters` in transformers 5; LlamaConfig still accepts the flat kwarg there.
    return LlamaConfig(initializer_range=INIT_STD, **kwargs)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys plus values one token adds to the cache, over all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize


@torch.no_grad()
def build_model(
    shape: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    layers: int | None = None,
    seed: int = 0,
):
    """A random-weight `LlamaForCausalLM` of the named shape, in eval mode, allocated on `device` in `dtype`.

    Linear and embedding weights are N(0, 0.02), norms are ones, rotary frequencies are computed as transformers
    does (kept in float32): activations stay small, so there are no NaNs in bf16 at any depth.
    """
    from transformers import LlamaForCausalLM

    config = shape_config(shape, layers)
    device = torch.device(device)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to(dtype=dtype)  # free on meta; rotary buffers are rebuilt in float32 below
    model.to_empty(device=device)

    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, INIT_STD, generator=generator)
    _rebuild_rotary(model, device)
    # to_empty gives each module its own tensor, which unties shared weights (SmolLM2 ties lm_head to the
    # embeddings); tie them again so memory matches the real model.
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config.dtype = dtype  # what from_pretrained would record; the runtime reads the parameters' dtype
    model.eval()
    return model


def _rebuild_rotary(model: nn.Module, device: torch.device) -> None:
    """Replaces every rotary-embedding module (its buffers were left uninitialised by `to_empty`) with a new one."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if "RotaryEmbedding" in type(child).__name__:
                # Built under the device context: the constructor's `torch.arange` lands there (the signature
                # varies across transformers versions; `config` is the one argument they all take).
                with torch.device(device):
                    fresh = type(child)(config=child.config)
                setattr(parent, child_name, fresh.to(device))
