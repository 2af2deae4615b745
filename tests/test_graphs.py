"""`paged_decode_static` captured once in a CUDA graph and replayed for growing page counts: the inputs (q, slots,
meta) change in place between replays, and each replay matches the eager torch reference. Skipped without CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from offload.kernels import paged_decode_reference
from offload.kernels.paged_decode import paged_decode_static, paged_decode_workspace

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# (n, valid_last, start) per replayed step: more pages each step, a partial last page, a window start.
STEPS = [(1, 3, 0), (2, 16, 5), (4, 1, 0), (7, 9, 2), (11, 16, 0), (12, 4, 15)]


@pytest.mark.parametrize("dtype,tol,softcap,splits", [
    (torch.float32, 1e-5, None, None),   # default splits: one page each, most of them empty early on
    (torch.bfloat16, 2e-2, 30.0, 3),     # 3 splits of 4 pages
    (torch.float32, 1e-5, 20.0, 1),      # one split: no merge launch
])
def test_replayed_graph_matches_eager_reference(dtype, tol, softcap, splits):
    pytest.importorskip("triton")
    dev = torch.device("cuda")
    kv_heads, g, d, p, capacity = 2, 3, 64, 16, 12
    gen = torch.Generator().manual_seed(0)
    pool_slots = 2 * capacity + 3
    k_pool = torch.randn(pool_slots, kv_heads, p, d, generator=gen).to(dev, dtype)
    v_pool = torch.randn(pool_slots, kv_heads, p, d, generator=gen).to(dev, dtype)
    perm = torch.randperm(pool_slots, generator=gen)[:capacity].to(dev, torch.int32)
    scaling = 1 / math.sqrt(d)

    # Static inputs and outputs: allocated once, updated in place, never reallocated.
    q = torch.randn(kv_heads, g, d, generator=gen).to(dev, dtype)
    slots = torch.full((capacity,), -1, dtype=torch.int32, device=dev)
    slots[:1] = perm[:1]
    meta = torch.tensor([1, p, 0], dtype=torch.int32, device=dev)
    ws = paged_decode_workspace(q, capacity, splits)

    def step():
        return paged_decode_static(q, k_pool, v_pool, slots, meta, scaling, softcap, out=ws)

    side = torch.cuda.Stream()  # warm-up (triton compiles) off the capturing stream, as torch recommends
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, lse = step()
    assert o is ws.o and lse is ws.lse

    for n, valid_last, start in STEPS:
        q.copy_(torch.randn(kv_heads, g, d, generator=gen).to(dev, dtype))
        slots.fill_(-1)
        slots[:n] = perm[:n]
        meta.copy_(torch.tensor([n, valid_last, start], dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        want = paged_decode_reference(q, k_pool, v_pool, perm[:n], valid_last, scaling, softcap, start)
        assert torch.isfinite(o).all() and torch.isfinite(lse).all()
        torch.testing.assert_close(o, want[0], atol=tol, rtol=tol)
        torch.testing.assert_close(lse, want[1], atol=tol, rtol=tol)
