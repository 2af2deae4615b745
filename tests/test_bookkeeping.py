"""Bookkeeping without a model: sizes, config validation, budget planning, the page table, eviction policies and the
engine's run coalescing. Tiny capacities, expected outputs written out."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from offload.budgets import check_capacity, check_disk_dir, plan_budgets
from offload.config import OffloadConfig
from offload.engine import runs
from offload.pagetable import PageTable
from offload.sizes import format_size, parse_size
from policies import EVICTION, PREFETCH, SELECTION

CPU = torch.device("cpu")


# -- sizes -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, expected",
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("512MiB", 512 * 2**20),
        ("512mib", 512 * 2**20),
        ("2GB", 2 * 10**9),
        ("1.5GB", 1_500_000_000),
        (" 3 KiB ", 3 * 1024),
        ("1k", 1000),
        ("7b", 7),
        ("1TiB", 2**40),
        (1024.0, 1024),
    ],
)
def test_parse_size_accepts(value, expected):
    assert parse_size(value, "host_budget") == expected


@pytest.mark.parametrize(
    "value", [-1, "-5MiB", "abc", "", "12 parsecs", "MiB", "1.2.3GB", 1.5, -2.0, True, None, [1], "0x10"]
)
def test_parse_size_rejects_naming_the_parameter(value):
    with pytest.raises(ValueError) as e:
        parse_size(value, "disk_budget")
    assert str(e.value).startswith("disk_budget:")
    assert repr(value) in str(e.value) or str(value) in str(e.value)


def test_format_size():
    assert format_size(0) == "0B"
    assert format_size(1536) == "1.5KiB"
    assert format_size(3 * 2**30) == "3.0GiB"


# -- config ----------------------------------------------------------------------------------------------------
def test_config_defaults_are_valid_and_budgets_are_parsed():
    c = OffloadConfig(device_budget="1MiB", host_budget=4096)
    assert (c.device_budget_bytes, c.host_budget_bytes, c.disk_budget_bytes) == (2**20, 4096, None)
    assert c.option_names()[:4] == ["device_budget", "host_budget", "disk_budget", "disk_dir"]
    assert "device_budget_bytes" not in c.option_names()
    assert OffloadConfig(disk_dir=Path("/tmp/kv")).disk_dir == "/tmp/kv"  # a PathLike becomes a str
    assert OffloadConfig(disk_budget=0).disk_budget_bytes == 0  # zero needs no disk_dir


@pytest.mark.parametrize(
    "options, name",
    [
        ({"device_budget": "lots"}, "device_budget"),
        ({"host_budget": -1}, "host_budget"),
        ({"disk_budget": "1XB", "disk_dir": "/tmp/x"}, "disk_budget"),
        ({"disk_budget": "1MiB"}, "disk_budget"),  # without disk_dir
        ({"disk_dir": ""}, "disk_dir"),
        ({"disk_dir": 5}, "disk_dir"),
        ({"page_size": 0}, "page_size"),
        ({"page_size": 4097}, "page_size"),
        ({"page_size": 1.5}, "page_size"),
        ({"page_size": True}, "page_size"),
        ({"page_size": "64"}, "page_size"),
        ({"attention": "fast"}, "attention"),
        ({"token_budget": 0}, "token_budget"),
        ({"token_budget": 1.5}, "token_budget"),
        ({"token_budget": -3}, "token_budget"),
        ({"token_budget": 0.0}, "token_budget"),
        ({"token_budget": True}, "token_budget"),
        ({"token_budget": "10%"}, "token_budget"),
        ({"sink_tokens": -1}, "sink_tokens"),
        ({"recent_tokens": 1.5}, "recent_tokens"),
        ({"io_threads": 0}, "io_threads"),
        ({"select_block": 24}, "select_block"),  # does not divide the default page of 64
        ({"select_block": 0}, "select_block"),
        ({"page_size": 8, "select_block": 16}, "select_block"),
        ({"head_selection": "each"}, "head_selection"),
        ({"dense_layers": -1}, "dense_layers"),
        ({"dense_layers": True}, "dense_layers"),
        ({"history": 1.0}, "history"),
        ({"history": -0.1}, "history"),
        ({"io_threads": 65}, "io_threads"),
        ({"io_threads": True}, "io_threads"),
        ({"io_engine": "uring"}, "io_engine"),
        ({"io_engine": None}, "io_engine"),
    ],
)
def test_config_rejects_each_bad_option_naming_it(options, name):
    with pytest.raises(ValueError) as e:
        OffloadConfig(**options)
    assert str(e.value).startswith(name + ":"), str(e.value)


def test_io_engines_are_the_disk_tiers():
    """The config lists the disk tier's engines itself (tiers must not import offload): the two lists agree."""
    import offload.config
    import tiers.disk

    assert offload.config.IO_ENGINES == tiers.disk.IO_ENGINES


@pytest.mark.parametrize(
    "field, registry, bad", [("prefetch", PREFETCH, "psychic"), ("eviction", EVICTION, "fifo"),
                             ("selection", SELECTION, "oracle")]
)
def test_unknown_policy_lists_the_registered_names(field, registry, bad):
    with pytest.raises(ValueError) as e:
        OffloadConfig(**{field: bad})
    msg = str(e.value)
    assert msg.startswith(field + ":") and repr(bad) in msg
    assert registry.names(), "a registry with no policy"
    for name in registry.names():
        assert name in msg
    assert {"lru", "score"} <= set(EVICTION.names())


@pytest.mark.parametrize("tb", [1, 4096, 1.0, 0.5, 1e-6])
def test_token_budget_accepts(tb):
    c = OffloadConfig(token_budget=tb)
    assert c.token_budget_for(1000) >= 1


def test_token_budget_for():
    assert OffloadConfig(token_budget=0.25).token_budget_for(1000) == 250
    assert OffloadConfig(token_budget=1e-6).token_budget_for(1000) == 1
    assert OffloadConfig(token_budget=300).token_budget_for(1000) == 300


# -- budgets ---------------------------------------------------------------------------------------------------
PB = 2048  # bytes of one page in these plans
LAYERS = 2
MAX_PAGES = 32
# The device workspace is PARTS parts of `half` pages each (offload/budgets.py: a load ring of two parts, a gather
# buffer and its head-major copy), so the smallest device budget is one tail page per layer plus PARTS pages.
PARTS = 4


def _plan(**options):
    config = OffloadConfig(page_size=8, **options)
    return config, plan_budgets(config, PB, LAYERS, MAX_PAGES, CPU)


def test_device_budget_below_the_minimum_names_it_and_the_minimum():
    least = LAYERS + PARTS
    with pytest.raises(ValueError) as e:
        _plan(device_budget=least * PB - 1, host_budget=0)
    msg = str(e.value)
    assert msg.startswith("device_budget:")
    assert f"at least {least}" in msg
    assert format_size(least * PB) in msg


def test_device_budget_at_the_minimum_is_one_tail_per_layer_plus_one_page_per_workspace_part():
    _, plan = _plan(device_budget=(LAYERS + PARTS) * PB, host_budget=0)
    assert plan.device_cache_pages == LAYERS
    assert plan.workspace_pages == PARTS
    assert plan.half == 1
    assert plan.host_pages == plan.disk_pages == plan.host_staging_pages == 0


@pytest.mark.parametrize("pages", [LAYERS + PARTS, LAYERS + 14, 40, 100, 1000])
def test_device_budget_splits_into_cache_and_workspace(pages):
    _, plan = _plan(device_budget=pages * PB + PB - 1, host_budget=0)  # a partial page is not a page
    assert plan.device_cache_pages + plan.workspace_pages == pages
    assert plan.workspace_pages % PARTS == 0 and plan.workspace_pages >= PARTS
    assert plan.half == plan.workspace_pages // PARTS
    assert plan.workspace_pages <= PARTS * MAX_PAGES  # never more than a layer's worth per part
    assert plan.device_cache_pages >= LAYERS  # a tail page per layer
    assert plan.device_budget == pages * PB + PB - 1


def test_a_disk_tier_gets_a_deeper_load_ring_where_the_workspace_divides_into_it(tmp_path: Path):
    disk = {"host_budget": 0, "disk_budget": 100 * PB, "disk_dir": str(tmp_path)}
    _, plan = _plan(device_budget=100 * PB, **disk)
    _, without = _plan(device_budget=100 * PB, host_budget=0)
    assert plan.load_buffers == 4
    assert plan.workspace_pages % 6 == 0 and plan.half == plan.workspace_pages // 6
    assert plan.device_cache_pages + plan.workspace_pages == 100
    # The buffers divide the workspace's share of the budget: the page cache keeps what it has without them.
    assert plan.workspace_pages <= without.workspace_pages and plan.device_cache_pages >= without.device_cache_pages
    # A workspace too small for six parts: the ring keeps two buffers.
    _, plan = _plan(device_budget=(LAYERS + 5) * PB, **disk)
    assert plan.load_buffers == 2 and plan.workspace_pages == PARTS
    # Without a disk tier, two.
    _, plan = _plan(device_budget=100 * PB, host_budget=0)
    assert plan.load_buffers == 2 and plan.half == plan.workspace_pages // PARTS


def test_load_buffers_sets_the_ring_and_the_smallest_device_budget():
    _, plan = _plan(device_budget=100 * PB, host_budget=0, load_buffers=3)
    assert plan.load_buffers == 3 and plan.workspace_pages % 5 == 0 and plan.half == plan.workspace_pages // 5
    with pytest.raises(ValueError, match=rf"^device_budget: .* at least {LAYERS + 7} .* plus 7 .*load_buffers=5"):
        _plan(device_budget=(LAYERS + 6) * PB, host_budget=0, load_buffers=5)


def test_cuda_staging_holds_the_whole_load_ring(tmp_path: Path):
    config = OffloadConfig(page_size=8, device_budget=100 * PB, host_budget=60 * PB, disk_budget=100 * PB,
                           disk_dir=str(tmp_path), load_buffers=3)
    plan = plan_budgets(config, PB, LAYERS, MAX_PAGES, torch.device("cuda"))
    assert plan.host_staging_pages == 3 * plan.half > 0


@pytest.mark.parametrize("attention", ["exact", "sparse"])
def test_the_kernels_with_a_disk_tier_give_the_load_ring_rows_of_its_own(attention: str, tmp_path: Path):
    """With the Triton kernels, disk pages stream through the load ring while the kernels' steps read (and gather
    ahead into) their workspace: the ring gets its own rows, the streaming path's usual share, out of the device
    budget; CUDA's staging holds that ring. Without a disk tier the two share the kernels' rows."""
    disk = {"host_budget": 60 * PB, "disk_budget": 100 * PB, "disk_dir": str(tmp_path)}
    for device in (CPU, torch.device("cuda")):
        config = OffloadConfig(page_size=8, device_budget=100 * PB, attention=attention, **disk)
        plan = plan_budgets(config, PB, LAYERS, MAX_PAGES, device, kernels=True)
        plain = plan_budgets(config, PB, LAYERS, MAX_PAGES, device, kernels=False)
        assert plan.stream_pages == plain.workspace_pages > 0
        assert plan.half == plain.half and plan.load_buffers == plain.load_buffers == 4
        assert plan.device_cache_pages + plan.workspace_pages + plan.stream_pages == 100
        assert plan.reserved_pages == plan.workspace_pages + plan.stream_pages
        assert plan.device_cache_pages >= LAYERS + 1
        assert plan.host_staging_pages == (4 * plan.half if device.type == "cuda" else 0)
        no_disk = OffloadConfig(page_size=8, device_budget=100 * PB, host_budget=60 * PB, attention=attention)
        assert plan_budgets(no_disk, PB, LAYERS, MAX_PAGES, device, kernels=True).stream_pages == 0
    # A budget that holds both workspaces but not a page per layer and one more names the device budget.
    config = OffloadConfig(page_size=8, device_budget=(LAYERS + 2 * PARTS) * PB, **disk)
    with pytest.raises(ValueError, match=r"^device_budget: .*the kernels' workspace and the load ring's take"):
        plan_budgets(config, PB, LAYERS, MAX_PAGES, CPU, kernels=True)


def test_host_and_disk_pages_follow_their_budgets(tmp_path: Path):
    _, plan = _plan(device_budget=10 * PB, host_budget=7 * PB + 5, disk_budget=20 * PB, disk_dir=str(tmp_path))
    assert plan.host_pages == 7
    assert plan.disk_pages == 20
    assert plan.host_staging_pages == 0  # no staging when the device is the CPU
    assert plan.capacity_pages() == plan.device_cache_pages + 7 + 20


def test_default_device_budget_is_at_most_the_whole_kv_plus_workspace():
    _, plan = _plan()
    assert plan.device_budget <= (LAYERS * MAX_PAGES + PARTS * MAX_PAGES) * PB
    assert plan.host_budget <= LAYERS * MAX_PAGES * PB


def test_check_capacity_without_disk_names_host_budget():
    config, plan = _plan(device_budget=(LAYERS + PARTS) * PB, host_budget=4 * PB)
    have = plan.capacity_pages()  # 2 tails + 4 host pages
    assert have == LAYERS + 4
    check_capacity(plan, config, tokens=3 * 8, layers=LAYERS, page_size=8)  # 3 pages per layer: fits exactly
    with pytest.raises(ValueError) as e:
        check_capacity(plan, config, tokens=3 * 8 + 1, layers=LAYERS, page_size=8)
    msg = str(e.value)
    assert "host_budget" in msg and "disk_dir" in msg and "disk_budget" not in msg
    assert format_size(2 * PB) in msg  # what is missing: one page per layer


def test_check_capacity_with_disk_names_disk_budget(tmp_path: Path):
    config, plan = _plan(device_budget=(LAYERS + PARTS) * PB, host_budget=2 * PB, disk_budget=2 * PB,
                         disk_dir=str(tmp_path))
    check_capacity(plan, config, tokens=3 * 8, layers=LAYERS, page_size=8)
    with pytest.raises(ValueError) as e:
        check_capacity(plan, config, tokens=4 * 8, layers=LAYERS, page_size=8)
    assert "disk_budget" in str(e.value)


def test_disk_dir_that_cannot_be_a_directory(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError) as e:
        check_disk_dir(str(blocker / "sub"))
    assert str(e.value).startswith("disk_dir:")
    with pytest.raises(ValueError) as e:
        _plan(device_budget=10 * PB, disk_dir=str(blocker))
    assert str(e.value).startswith("disk_dir:")


# -- page table ------------------------------------------------------------------------------------------------
def _table(layers: int = 2, max_pages: int = 4, page_size: int = 4) -> PageTable:
    t = PageTable(layers, max_pages)
    t.page_size = page_size
    return t


def test_page_table_counts_pages_and_checks_where_they_live():
    t = _table()
    assert [t.pages(0), t.pages(1)] == [0, 0]
    t.check_invariants()  # empty
    t.tokens = [6, 4]
    assert [t.pages(0), t.pages(1)] == [2, 1]
    t.slot["host"][0, 0] = 3
    t.slot["device"][0, 1] = 0  # the open tail
    t.slot["disk"][1, 0] = 7  # a full last page may live below the device
    t.check_invariants()
    assert t.resident("host").nonzero().tolist() == [[0, 0]]
    assert t.resident("disk").nonzero().tolist() == [[1, 0]]


def test_page_table_invariant_violations_are_named():
    t = _table()
    t.tokens = [6, 0]
    t.slot["device"][0, 1] = 0
    with pytest.raises(AssertionError, match=r"layer 0: pages \[0\] live in no tier"):
        t.check_invariants()
    t.slot["host"][0, 0] = 1
    t.slot["disk"][1, 2] = 0
    with pytest.raises(AssertionError, match="layer 1: pages beyond"):
        t.check_invariants()
    t.slot["disk"][1, 2] = -1
    t.slot["device"][0, 1] = -1
    t.slot["host"][0, 1] = 2
    with pytest.raises(AssertionError, match="tail page 1 is not on the device"):
        t.check_invariants()


# -- eviction policies -----------------------------------------------------------------------------------------
def _snapshot(t: PageTable) -> dict:
    return {"slot": {k: v.clone() for k, v in t.slot.items()}, "busy": t.busy.clone(),
            "last_use": t.last_use.clone(), "score": t.score.clone(), "tokens": list(t.tokens)}


def _assert_same(t: PageTable, snap: dict) -> None:
    for k, v in snap["slot"].items():
        assert torch.equal(t.slot[k], v)
    assert torch.equal(t.busy, snap["busy"])
    assert torch.equal(t.last_use, snap["last_use"])
    assert torch.equal(t.score, snap["score"])
    assert t.tokens == snap["tokens"]


def test_lru_evicts_least_recently_used_first_ties_by_page_index():
    t = _table(layers=2, max_pages=5)
    policy = EVICTION.create("lru", t)
    # Story: layer 0's pages 0..3 were last attended at steps 5, 2, 2, 9; layer 1's pages 0..1 at 7 and 1.
    t.last_use[0, :4] = torch.tensor([5, 2, 2, 9])
    t.last_use[1, :2] = torch.tensor([7, 1])
    eligible = torch.zeros(2, 5, dtype=torch.bool)
    eligible[0, :4] = True
    eligible[1, :2] = True
    assert policy.victims(eligible, 6) == [(1, 1), (0, 1), (0, 2), (0, 0), (1, 0), (0, 3)]
    assert policy.victims(eligible, 2) == [(1, 1), (0, 1)]
    # A page that is not eligible (busy, an open tail) is never chosen, however old.
    eligible[1, 1] = False
    assert policy.victims(eligible, 1) == [(0, 1)]
    # Using a page makes it the newest.
    policy.on_use(0, torch.tensor([1]), step=10)
    assert policy.victims(eligible, 2) == [(0, 2), (0, 0)]


def test_score_eviction_keeps_the_highest_decayed_mass():
    t = _table(layers=1, max_pages=4)
    policy = EVICTION.create("score", t)
    policy.on_use(0, torch.tensor([0, 1, 2]), step=0, mass=torch.tensor([1.0, 0.5, 0.2]))
    policy.on_use(0, torch.tensor([2]), step=1, mass=torch.tensor([1.0]))
    # score <- 0.9 * score + mass: page 0: 0.9, page 1: 0.45, page 2: 0.18 + 1.0
    torch.testing.assert_close(t.score[0, :3], torch.tensor([0.9, 0.45, 1.18]))
    eligible = torch.zeros(1, 4, dtype=torch.bool)
    eligible[0, :3] = True
    assert policy.victims(eligible, 2) == [(0, 1), (0, 0)]
    assert policy.victims(eligible, 3) == [(0, 1), (0, 0), (0, 2)]
    # Equal scores: the lower page index goes first.
    t2 = _table(layers=1, max_pages=4)
    tie = EVICTION.create("score", t2)
    assert tie.victims(torch.ones(1, 4, dtype=torch.bool), 4) == [(0, 0), (0, 1), (0, 2), (0, 3)]


@pytest.mark.parametrize("name", EVICTION.names())
def test_eviction_contract(name):
    """Every registered eviction policy: victims are eligible, distinct, min(n, eligible) of them, no side effects."""
    t = _table(layers=3, max_pages=6)
    g = torch.Generator().manual_seed(0)
    t.last_use.copy_(torch.randint(0, 20, (3, 6), generator=g))
    t.score.copy_(torch.rand(3, 6, generator=g))
    t.slot["device"].copy_(torch.randint(-1, 8, (3, 6), generator=g, dtype=torch.int32))
    policy = EVICTION.create(name, t)
    eligible = torch.rand(3, 6, generator=g) > 0.4
    before_eligible = eligible.clone()
    snap = _snapshot(t)
    count = int(eligible.sum())
    for n in (0, 1, 3, count, count + 5):
        v = policy.victims(eligible, n)
        assert len(v) == min(n, count)
        assert len(set(v)) == len(v)
        assert all(bool(eligible[l, p]) for l, p in v)
        assert policy.victims(eligible, n) == v  # deterministic
    _assert_same(t, snap)
    assert torch.equal(eligible, before_eligible)
    assert policy.victims(torch.zeros(3, 6, dtype=torch.bool), 4) == []


# -- engine.runs -----------------------------------------------------------------------------------------------
def test_runs_coalesces_where_both_sides_are_consecutive():
    assert runs([], []) == []
    assert runs([4], [0]) == [(4, 0, 1)]
    assert runs([0, 1, 2, 5, 6], [3, 4, 5, 0, 1]) == [(0, 3, 3), (5, 0, 2)]
    assert runs([0, 1, 2], [0, 2, 3]) == [(0, 0, 1), (1, 2, 2)]  # the destination breaks the run
    assert runs([3, 2, 1], [0, 1, 2]) == [(3, 0, 1), (2, 1, 1), (1, 2, 1)]  # descending never coalesces


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), max_size=40))
def test_runs_expand_back_to_the_pairs(pairs):
    src = [s for s, _ in pairs]
    dst = [d for _, d in pairs]
    out = runs(src, dst)
    expanded = [(s + i, d + i) for s, d, n in out for i in range(n)]
    assert expanded == list(zip(src, dst))
    for (s0, d0, n0), (s1, d1, _) in zip(out, out[1:]):
        assert not (s0 + n0 == s1 and d0 + n0 == d1)  # maximal: no two neighbours could merge
    assert copy.deepcopy(out) == runs(src, dst)
