"""Host work of a decode step, held to fixed targets: aten ops beyond DynamicCache's, host reads of tensor values,
and no growth with the context. Counts (offload.opcount), not timings, so these hold on any machine under any load.

Setup as in benchmarks/count_ops.py: a tiny random Llama (4 layers), 15% of the KV on the device and the rest in
host RAM, pages of 64 tokens; the step counted appends token `context - 1`, which opens no page. Each
configuration is measured once per module (`_measured`).

Bug: the decode step issued chunk copies, scores, gathers and merges through ~20-40 torch calls per chunk and read
page ids back on the host: 1,134-1,814 aten ops per layer and 148-238 host reads per step beyond DynamicCache in
exact mode, 385-722 ops and 64-108 reads in sparse mode, growing with the context in sparse mode.
"""

from __future__ import annotations

import pytest
import torch

from offload.opcount import measure

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PAGE = 64
LAYERS = 4
MODES = ["exact", "sparse"]
CONTEXTS = [2048, 8192]  # multiples of PAGE: the step after the counted one opens a page
MAX_EXTRA_OPS_PER_LAYER = 40
STEPS = 4  # the counted step, the one that opens a page, and two after it

_cache: dict[tuple[str, int], dict] = {}


def _measured(mode: str, context: int) -> dict:
    """The row of `measure` for (mode, context), with `STEPS` steps counted; measured once per module."""
    key = (mode, context)
    if key not in _cache:
        _cache[key] = measure(context, mode, PAGE, LAYERS, steps=STEPS)
    return _cache[key]


@pytest.fixture(scope="module", autouse=True)
def _fresh_measurements():
    _cache.clear()
    yield
    _cache.clear()


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("mode", MODES)
def test_a_decode_step_adds_at_most_40_aten_ops_per_layer(mode, context):
    row = _measured(mode, context)
    assert row["extra_ops_per_layer"] <= MAX_EXTRA_OPS_PER_LAYER, row
    # The setup is the one meant: KV on both tiers, and a step that opens no page.
    assert row["resident_bytes"]["device"] > 0 and row["resident_bytes"]["host"] > 0, row
    assert not row["per_step"][0]["opens_page"]


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("mode", MODES)
def test_a_decode_step_that_opens_no_page_reads_nothing_on_the_host(mode, context):
    row = _measured(mode, context)
    assert row["host_reads"] == 0, row
    assert row["dynamic_host_reads"] == 0, row
    assert row["host_writes"] == 0, row  # nor makes a tensor from host values (a copy to a GPU)


@pytest.mark.parametrize("mode", MODES)
def test_the_ops_of_a_decode_step_do_not_grow_with_the_context(mode):
    short, long = _measured(mode, CONTEXTS[0]), _measured(mode, CONTEXTS[-1])
    assert long["dynamic_ops"] == short["dynamic_ops"]  # the reference does not grow either
    assert long["offload_ops"] == short["offload_ops"], (short, long)
    assert long["host_reads"] == short["host_reads"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_the_step_that_opens_a_page_is_the_one_expected(mode):
    """The boundary tests below rest on this: step 1 of `per_step` appends the first token of a page."""
    steps = _measured(mode, CONTEXTS[0])["per_step"]
    assert [s["opens_page"] for s in steps] == [False, True, False, False]
    assert steps[1]["token"] % PAGE == 0


@pytest.mark.parametrize("mode", MODES)
def test_host_reads_end_with_the_step_that_opens_a_page(mode):
    """Host reads are allowed in the step that opens a page (views are rebuilt, eviction may run, and a later
    layer's new tail may evict an earlier layer's page); that step also readies the next one, which reads nothing
    on the host and dispatches what a step that opens no page does."""
    steps = _measured(mode, CONTEXTS[0])["per_step"]
    assert steps[1]["host_reads"] > 0, steps  # the boundary step: the measurement really crosses one
    for after in steps[2:]:
        assert after["host_reads"] == 0, steps
        assert after["extra_ops_per_layer"] <= MAX_EXTRA_OPS_PER_LAYER, steps


@pytest.mark.parametrize("mode", MODES)
def test_a_sliding_window_model_decodes_within_the_same_targets(mode):
    """Mistral with a 200-token window (one that starts inside a page, so the position mask is in play)."""
    from transformers import MistralConfig, MistralForCausalLM

    context = CONTEXTS[0]
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context + PAGE,
                           sliding_window=200, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    row = measure(context, mode, PAGE, model=model)
    assert row["extra_ops_per_layer"] <= MAX_EXTRA_OPS_PER_LAYER, row
    assert row["host_reads"] == 0, row


# -- packed host pages (kv_quant) -----------------------------------------------------------------------------------
# The torch step unpacks the host's pages (exact) or every chosen block that may be the host's (sparse) with device
# ops: a fixed number more per layer, whatever the context, and still nothing read on the host.
MAX_EXTRA_OPS_PER_LAYER_QUANT = {"exact": 50, "sparse": 90}


@pytest.mark.parametrize("mode", MODES)
def test_a_decode_step_over_packed_host_pages_stays_flat_and_reads_nothing(mode):
    rows = [measure(context, mode, PAGE, LAYERS, steps=STEPS, kv_quant="k8v4") for context in CONTEXTS]
    for row in rows:
        assert row["resident_bytes"]["host"] > 0, row
        assert row["host_reads"] == 0, row
        assert [s["host_reads"] for s in row["per_step"]][2:] == [0, 0], row  # after the boundary, none again
        assert row["extra_ops_per_layer"] <= MAX_EXTRA_OPS_PER_LAYER_QUANT[mode], row
    assert rows[0]["offload_ops"] == rows[1]["offload_ops"]
    assert rows[0]["extra_ops_per_layer"] > _measured(mode, CONTEXTS[0])["extra_ops_per_layer"]  # it does unpack



# -- sparse mode's block cache -------------------------------------------------------------------------------------
# Copying the blocks a step read from the host pool into the cache is a fixed number of device ops per layer
# (offload/block_cache.py), whatever the context, and reads nothing on the host.
BLOCK_CACHE_FILL_OPS = 34


def test_a_sparse_step_with_the_block_cache_stays_flat_and_reads_nothing():
    rows = [measure(context, "sparse", PAGE, LAYERS, steps=STEPS, device_fraction=0.3, block_cache=0.5)
            for context in CONTEXTS]
    for row in rows:
        assert row["resident_bytes"]["host"] > 0, row
        assert row["host_reads"] == 0, row
        assert [s["host_reads"] for s in row["per_step"]][2:] == [0, 0], row
        assert row["extra_ops_per_layer"] <= MAX_EXTRA_OPS_PER_LAYER + BLOCK_CACHE_FILL_OPS, row
    assert rows[0]["offload_ops"] == rows[1]["offload_ops"]
    assert rows[0]["extra_ops_per_layer"] > _measured("sparse", CONTEXTS[0])["extra_ops_per_layer"]  # it does copy


# -- CUDA's decode step: the Triton kernels, here under Triton's interpreter ----------------------------------------
# The step a GPU runs (offload.decode.KernelDecode), counted as a GPU's host issues it: aten ops, plus one op per
# Triton launch. Tensors made from host values (`torch.tensor([...])`, `t[i] = n`) are counted as well: on a GPU
# each is a copy to the device that the host waits for. The budgets leave a layer's step within the kernels'
# workspace (exact: a layer's host pages; sparse: its largest choice of blocks), as the budget plan sizes it.
KERNEL_CASES = {
    "exact": dict(mode="exact", layers=8, device_fraction=0.5, contexts=(512, 1024)),
    "sparse": dict(mode="sparse", layers=LAYERS, device_fraction=0.15, contexts=(1024, 1536)),
    "sparse, block cache": dict(mode="sparse", layers=LAYERS, device_fraction=0.3, block_cache=0.5,
                                contexts=(1024, 1536)),
}


@pytest.mark.kernels
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_the_kernel_step_stays_within_the_targets_and_writes_nothing_from_the_host(case):
    """Bug: the sparse kernel step wrote its block count, fill and start into a device tensor with three
    assignments (three host-to-device copies a layer), and paged decode made that tensor from a list at every
    call in exact mode; a step that chose more blocks than the workspace held (8K tokens, 15% on the device)
    streamed instead, at thousands of ops a layer."""
    opts = dict(KERNEL_CASES[case])
    mode, layers, contexts = opts.pop("mode"), opts.pop("layers"), opts.pop("contexts")
    rows = [measure(c, mode, PAGE, layers, steps=3, kernels=True, **opts) for c in contexts]
    for row in rows:
        assert row["kernels"] and row["resident_bytes"]["host"] > 0, row
        assert row["extra_ops_per_layer"] <= MAX_EXTRA_OPS_PER_LAYER, row
        assert row["host_reads"] == 0 and row["host_writes"] == 0, row
        after = row["per_step"][2]  # the step after the one that opens a page
        assert after["host_reads"] == 0 and after["host_writes"] == 0, row
        assert after["extra_ops_per_layer"] <= MAX_EXTRA_OPS_PER_LAYER, row
    assert rows[0]["offload_ops"] == rows[1]["offload_ops"], rows
