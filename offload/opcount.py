"""Host work per decode step, counted: the aten ops a forward dispatches and the host reads of tensor values it
makes, for the offloaded cache against the model with its ordinary DynamicCache.

Counts, not timings: they are the same on every machine and under any load, so tests can hold them to fixed
targets (tests/test_counts.py) and `benchmarks/count_ops.py` reports them.

A host read is a call that hands a tensor's value to Python (`.item()`, `int(t)`, `float(t)`, `bool(t)`,
`.tolist()`, `.numpy()`, using a tensor as an index) or copies it to the CPU (`.cpu()`, `.to("cpu")` of a tensor
elsewhere). On a GPU kernels run asynchronously, queued by the host ahead of the device; a host read must wait
until the device has computed the value, so it drains that queue: the host stops issuing work and the device then
idles while the host catches up. One per layer and step is enough to make decode bound by host latency rather
than by the device or the bus, and it also rules out capturing the step in a CUDA graph. On the CPU a `.cpu()` of a
CPU tensor moves nothing, but it is counted all the same, because it stands for a read that would synchronize on a
GPU.

Every aten op dispatched is host work too (argument checks, dispatch, a kernel launch on a GPU: a few microseconds
each), so the op count beyond DynamicCache's is what the runtime adds to every decode step. A Triton launch of the
runtime's kernels (`offload.kernels.launch`) counts as one op, as on a GPU, where it dispatches no aten op; on the
CPU, Triton's interpreter runs the kernel through torch calls of its own, which are not counted.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from offload.cache import CACHE_KWARG
from offload.kernels import launch

# Names of the torch functions and Tensor methods that read a value on the host; `to` counts when its target is
# the CPU and its tensor is not (`_to_cpu`).
READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "cpu"}


# aten ops that make a tensor of values from Python (`torch.tensor([...])`, `t[i] = 3`): on a GPU the values then
# cross to the device in a copy that the host waits for (from pageable memory), as a read does the other way.
MADE = {"lift_fresh", "lift_fresh_copy"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, and among them those that make a tensor from host values."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.writes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func.overloadpacket.__name__ in MADE:
            self.writes += 1
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
    """Whether a `Tensor.to(...)` call copies a tensor that is not on the CPU to the CPU."""
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return str(target) == "cpu" and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu"


class LaunchCounter:
    """Counts the Triton launches made through `offload.kernels.launch` while installed as its hook, and runs each
    with the counting modes off (the interpreter's own torch calls are not the host work of a GPU launch)."""

    def __init__(self) -> None:
        self.launches = 0

    def __call__(self, go) -> None:
        self.launches += 1
        with _disable_current_modes(), torch._C.DisableTorchFunction():
            go()

    def __enter__(self) -> "LaunchCounter":
        self.previous, launch.hook = launch.hook, self
        return self

    def __exit__(self, *exc) -> None:
        launch.hook = self.previous


class StepCounts(NamedTuple):
    ops: int  # aten ops plus Triton launches
    reads: int  # host reads of tensor values
    writes: int  # tensors made from host values (`MADE`)


def count_step(model, cache, token: torch.Tensor, **inputs) -> StepCounts:
    """The counts of one decode forward of `token` [B, 1] over `cache` (with `inputs`, such as a batch's
    attention_mask)."""
    ops, reads = OpCounter(), ReadCounter()
    with torch.no_grad(), LaunchCounter() as launches, reads, ops:
        model(input_ids=token, **{CACHE_KWARG: cache}, use_cache=True, **inputs)
    return StepCounts(ops.ops + launches.launches, reads.reads, ops.writes)


def kv_bytes(model, tokens: int) -> int:
    """Bytes of the KV of `tokens` tokens over every layer of `model` (keys and values, the model's dtype)."""
    mc = model.config
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * mc.num_key_value_heads * head_dim * itemsize * mc.num_hidden_layers * tokens


@contextmanager
def _kernel_step(on: bool) -> Iterator[None]:
    """With `on`, runtimes built inside choose CUDA's decode step (the Triton kernels) on any device."""
    import offload.runtime as runtime_module

    chosen = runtime_module.use_kernels
    if on:
        runtime_module.use_kernels = lambda device, config: True
    try:
        yield
    finally:
        runtime_module.use_kernels = chosen


def measure(context: int, mode: str, page_size: int = 64, layers: int = 4, *, steps: int = 1,
            device_fraction: float = 0.15, model=None, prefill_chunk: int = 512, kernels: bool = False,
            **options) -> dict:
    """Prefills `context - 1` tokens, then counts decode steps of the offloaded cache and of DynamicCache.

    The model is a tiny random-weight Llama with `layers` layers (4 query heads over 2 KV heads, head_dim 16,
    float32) unless `model` is given. The offloaded cache holds `device_fraction` of the KV bytes of `context`
    tokens on the device and the rest in host RAM, in pages of `page_size` tokens, with attention `mode`
    ("exact" or "sparse"; in sparse mode every layer runs the sparse step, `dense_layers=0`, unless `options`,
    further runtime options, say otherwise). With `kernels` the runtime runs CUDA's decode step, the Triton
    kernels (`offload.decode.KernelDecode`), on the CPU under Triton's interpreter (`TRITON_INTERPRET=1` must be set
    before triton is first imported), each launch counted as one op. The first step counted appends token
    `context - 1`, which must not open a page; with `steps` > 1 the next steps are counted too (choose `context` a
    multiple of `page_size` to have the second step open a page).

    Returns a row: `kernels`, then `dynamic_ops`, `offload_ops`, `extra_ops_per_layer`, `dynamic_host_reads`,
    `host_reads`, `dynamic_host_writes`, `host_writes` of the first step, `resident_bytes` per tier after it, and
    with `steps` > 1 `per_step`: one dict per step with `token` (its position), `opens_page` and the same counts.
    """
    from transformers import DynamicCache

    from offload import offload
    from offload.models import tiny_llama

    if steps < 1:
        raise ValueError(f"steps: must be at least 1, got {steps}")
    # The first step appends token `context - 1`: choose contexts so that it is not the first of a page.
    if (context - 1) % page_size == 0:
        raise ValueError(f"context: the step appending token {context - 1} would open a page of {page_size}")
    if model is None:
        model = tiny_llama(layers=layers, hidden=64, heads=4, kv_heads=2, vocab=128,
                           max_positions=context + max(page_size, steps))
    layers = model.config.num_hidden_layers
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, context - 1), generator=torch.Generator().manual_seed(0))
    token = torch.tensor([[1]])

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True)
        base = [count_step(model, cache, token) for _ in range(steps)]
    kv = kv_bytes(model, context)
    if mode == "sparse":
        options.setdefault("dense_layers", 0)
    with _kernel_step(kernels), offload(model, device_budget=max(int(device_fraction * kv), 0), host_budget=kv,
                                        page_size=page_size, attention=mode, **options) as rt, torch.no_grad():
        cache = rt.cache()
        for chunk in ids.split(prefill_chunk, dim=1):
            model(input_ids=chunk, **{CACHE_KWARG: cache}, use_cache=True)
        counted = []
        placed = None
        for _ in range(steps):
            counted.append(count_step(model, cache, token))
            if placed is None:
                placed = rt.stats()["resident_bytes"]

    def fields(b: StepCounts, o: StepCounts) -> dict:
        return {"dynamic_ops": b.ops, "offload_ops": o.ops, "extra_ops_per_layer": (o.ops - b.ops) / layers,
                "dynamic_host_reads": b.reads, "host_reads": o.reads, "dynamic_host_writes": b.writes,
                "host_writes": o.writes}

    row = {"mode": mode, "context": context, "layers": layers, "kernels": kernels, **fields(base[0], counted[0]),
           "resident_bytes": placed}
    if steps > 1:
        row["per_step"] = [{"token": context - 1 + i, "opens_page": (context - 1 + i) % page_size == 0, **fields(b, o)}
                           for i, (b, o) in enumerate(zip(base, counted))]
    return row
