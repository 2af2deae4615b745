"""Host work per decode step, counted: aten ops dispatched and host reads of tensor values, against the model with
its ordinary DynamicCache. Counts, not timings, so they are the same on every machine and under any load.

    python benchmarks/count_ops.py --context 2048,8192 --modes exact,sparse

A tiny random-weight Llama (4 layers) prefills `context - 1` tokens with 15% of the KV on the device and the rest
in host RAM, then decodes; the step counted is one whose new token crosses no page boundary. Reported per mode and
context: aten ops per layer beyond what DynamicCache dispatches for the same step, and host reads in the step.

A host read is a call that hands a tensor's value to Python (`.item()`, `int(t)`, `float(t)`, `bool(t)`,
`.tolist()`, `.numpy()`) or copies it to the CPU (`.cpu()`, `.to("cpu")` of a tensor elsewhere): on a GPU each one
waits for the stream. On the CPU a `.cpu()` of a CPU tensor moves nothing, but it stands for a read that would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from offload import offload  # noqa: E402
from offload.models import tiny_llama  # noqa: E402

READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "cpu"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


class ReadCounter(TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host (see the module note)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or (name == "to" and _to_cpu(args, kwargs or {})):
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _to_cpu(args: tuple, kwargs: dict) -> bool:
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return str(target) == "cpu" and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu"


def count_step(model, cache, token: torch.Tensor) -> tuple[int, int]:
    """(aten ops, host reads) of one decode forward."""
    ops, reads = OpCounter(), ReadCounter()
    with torch.no_grad(), reads, ops:
        model(input_ids=token, past_key_values=cache, use_cache=True)
    return ops.ops, reads.reads


def measure(context: int, mode: str, page_size: int, layers: int) -> dict:
    from transformers import DynamicCache

    model = tiny_llama(layers=layers, hidden=64, heads=4, kv_heads=2, vocab=128, max_positions=context + page_size)
    ids = torch.randint(0, 128, (1, context - 1), generator=torch.Generator().manual_seed(0))
    token = torch.tensor([[1]])
    # The step appends token `context - 1`: choose contexts so that it is not the first of a page.
    assert (context - 1) % page_size != 0, "the counted step would open a new page"
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        base_ops, base_reads = count_step(model, cache, token)
    mc = model.config
    kv = 2 * mc.num_key_value_heads * (mc.hidden_size // mc.num_attention_heads) * 4 * layers * context
    with offload(model, device_budget=max(int(0.15 * kv), 0), host_budget=kv, page_size=page_size,
                 attention=mode) as rt, torch.no_grad():
        cache = rt.cache()
        for chunk in ids.split(512, dim=1):
            model(input_ids=chunk, past_key_values=cache, use_cache=True)
        ops, reads = count_step(model, cache, token)
        placed = rt.stats()["resident_bytes"]
    return {
        "mode": mode, "context": context, "layers": layers,
        "dynamic_ops": base_ops, "offload_ops": ops, "extra_ops_per_layer": (ops - base_ops) / layers,
        "dynamic_host_reads": base_reads, "host_reads": reads, "resident_bytes": placed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", default="2048,8192", help="comma-separated contexts (default: 2048,8192)")
    parser.add_argument("--modes", default="exact,sparse", help="comma-separated attention modes")
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(int(c), m, args.page_size, args.layers)
            for m in args.modes.split(",") for c in args.context.split(",")]
    print("| mode | context | aten ops per layer beyond DynamicCache | host reads per step (DynamicCache) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['context']} | {r['extra_ops_per_layer']:.0f} | {r['host_reads']} "
              f"({r['dynamic_host_reads']}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
