"""Robustness of the I/O paths: inference mode on worker threads, a disk file that grows with the sequence,
and signals that stop the command line mid-run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from offload import offload
from offload.models import tiny_llama


def _page_bytes(model, page_size: int) -> int:
    c = model.config
    return 2 * c.num_key_value_heads * page_size * (c.hidden_size // c.num_attention_heads) * model.dtype.itemsize


def _spilling_options(model, disk_dir: Path, page_size: int = 8) -> dict:
    """A device that holds a few pages per layer and a host that holds 4: most of 200 tokens go to disk."""
    pb = _page_bytes(model, page_size)
    layers = model.config.num_hidden_layers
    return dict(page_size=page_size, device_budget=(2 * layers + 8) * pb, host_budget=4 * pb, disk_dir=str(disk_dir))


def _reference(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False)


@pytest.mark.parametrize("where,attention", [("around-generate", "exact"), ("around-offload", "exact"),
                                             ("around-offload", "sparse")])
def test_inference_mode_with_pages_on_host_and_disk(tiny_gqa3_model, tmp_path: Path, where: str,
                                                    attention: str) -> None:
    """Bug: under torch.inference_mode() generation crashed with "Inplace update to inference tensor outside
    InferenceMode" as soon as pages left the device: the copies run on I/O threads, where inference mode (a
    per-thread setting) is off, into pools that had been allocated as inference tensors."""
    model = tiny_gqa3_model
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(3))
    ref = _reference(model, ids, 12)
    options = {**_spilling_options(model, tmp_path / "kv"), "attention": attention, "token_budget": 1.0}
    if where == "around-generate":
        with offload(model, **options) as rt:
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            stats = rt.stats()
            # The same runtime, its pools allocated inside inference mode, keeps working outside it.
            with torch.no_grad():
                again = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    else:
        with torch.inference_mode():
            with offload(model, **options) as rt:
                out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
                stats = rt.stats()
        with offload(model, **options) as rt, torch.no_grad():
            again = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert stats["bytes_moved"]["host->disk"] > 0 and stats["bytes_moved"]["disk->host"] > 0
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert os.listdir(tmp_path / "kv") == []
