"""Robustness of the I/O paths: inference mode on worker threads, a disk file that grows with the sequence,
and signals that stop the command line mid-run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from offload import offload


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


# ---- the disk file grows with the sequence ---------------------------------------------------------------------


def _kv_file(directory: Path) -> Path:
    files = [p for p in directory.iterdir() if p.suffix == ".kv"]
    assert len(files) == 1, files
    return files[0]


def test_disk_file_is_sized_to_the_expected_sequence_not_the_models_context(tiny_gqa3_model, tmp_path: Path) -> None:
    """Bug: with the default disk budget the disk file was fallocated for the KV of the model's whole context
    (max_position_embeddings), e.g. 1 GiB reserved for a 4.7 MiB sequence."""
    model = tiny_gqa3_model
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(4))
    ref = _reference(model, ids, 12)
    kv = tmp_path / "kv"
    options = _spilling_options(model, kv)  # no disk_budget: the default, from free space
    with offload(model, **options) as rt, torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        disk = rt.disk_tier
        size = _kv_file(kv).stat().st_size
        used = disk.num_used
        whole_context = rt.plan.disk_pages * disk.slot_bytes
    assert torch.equal(out, ref)
    assert used > 0 and size == disk.file_bytes
    # What the 212 tokens need on disk, not what 2048 positions would.
    pages = model.config.num_hidden_layers * -(-212 // 8)
    assert used * disk.slot_bytes <= size <= pages * disk.slot_bytes < whole_context / 4
    assert os.listdir(kv) == []


def test_disk_file_grows_in_steps_during_a_longer_run(tiny_gqa3_model, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug (the other side of sizing the file to the sequence): a run longer than announced must grow the file
    rather than fail, keep the pages already written, and stay exact."""
    import tiers.disk

    monkeypatch.setattr(tiers.disk, "GROW_STEP_BYTES", 0)  # steps of a quarter of the file: several on this run
    model = tiny_gqa3_model
    ids = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(5))
    new = 40
    ref = _reference(model, ids, new)
    kv = tmp_path / "kv"
    sizes: list[int] = []
    with offload(model, **_spilling_options(model, kv), disk_budget="1MiB") as rt, torch.no_grad():
        rt.expect_tokens(64)  # announces far fewer tokens than the run will have
        cache = rt.cache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        sizes.append(_kv_file(kv).stat().st_size)
        for _ in range(new - 1):
            out = model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=cache, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
            sizes.append(_kv_file(kv).stat().st_size)
        disk = rt.disk_tier
        assert sizes[-1] == disk.file_bytes <= rt.plan.disk_pages * disk.slot_bytes
    assert tokens == ref[0, ids.shape[1]:].tolist()
    assert len(set(sizes)) >= 2 and sizes == sorted(sizes)  # grew, never shrank
    assert os.listdir(kv) == []


def test_full_disk_while_growing_is_one_error_naming_disk_dir(tiny_gqa3_model, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug (growth's failure mode): no room to grow the file must be the one-line disk_dir error, and leave no
    file behind."""
    import errno

    model = tiny_gqa3_model
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(6))
    kv = tmp_path / "kv"
    real = os.posix_fallocate
    calls = []

    def full_after_the_first(fd: int, offset: int, length: int) -> None:
        calls.append(offset)
        if offset > 0:  # the reserve at creation fits; growing does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", full_after_the_first)
    with pytest.raises(ValueError, match=r"^disk_dir: .* free, the disk tier needs .* more; lower disk_budget"):
        with offload(model, **_spilling_options(model, kv)) as rt, torch.no_grad():
            rt.expect_tokens(20)
            cache = rt.cache()
            model(input_ids=ids, past_key_values=cache, use_cache=True)
    assert len(calls) >= 2
    assert os.listdir(kv) == []
