"""Batches: several sequences of one runtime, in one page table.

The page table has a row per layer and sequence, ordered as transformers attends them: row l * B + b holds layer l
of sequence b (B: the batch size). Tiers, budgets and eviction are shared, so eviction ranks every sequence's pages
together. A row can run the decode step of a single sequence (its own pages, tail page, sparse choice and
sliding window) with nothing else to know of the batch; the sequences that take the plain step in a decode step
are served by one step for all of them (`Runtime._decode_batch`: `DeviceDecode.exact_batch` for equal lengths,
`exact_ragged` for any, `sparse_batch` for sparse steps; on CUDA `KernelDecode.exact_ragged`, one launch), and the
others then run alone.

Prompts of different lengths come left-padded, as transformers' tokenizers and `generate` pad them: sequence b's
first `pads[b]` positions are padding (zeros in the 2-D attention mask). Padding takes no pages: a row stores only
its sequence's real tokens, and the queries at padded positions attend to nothing (their output is zeros; no real
position ever sees them). transformers counts positions with the padding (`Runtime.length`), rows count tokens
without it.
"""

from __future__ import annotations

import torch


def left_padding(mask: torch.Tensor, positions: int) -> list[int]:
    """The padding each row of a 2-D attention mask [B, >= positions] starts with (one host read). Raises unless
    every row is left-padded: zeros, then ones up to `positions`."""
    if mask.dim() != 2 or mask.shape[-1] < positions:
        raise ValueError(f"attention_mask: expected a 2-D mask over {positions} positions, got shape "
                         f"{tuple(mask.shape)}")
    mask = mask[:, :positions].bool()
    pads = positions - mask.sum(-1)
    expected = torch.arange(positions, device=mask.device)[None, :] >= pads[:, None]
    *pads, ok = torch.cat([pads, (mask == expected).all()[None]]).tolist()  # one read for both
    if not ok:
        raise ValueError("attention_mask: a batch must be left-padded (each row zeros, then ones); pad on the left, "
                         "as tokenizer(padding_side='left') does")
    return pads


def row(layer: int, sequence: int, batch: int) -> int:
    """The page table row of `layer` of `sequence`."""
    return layer * batch + sequence
