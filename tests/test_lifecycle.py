"""Caches, masks and generate arguments inside `offload()`: nothing may run silently on the wrong KV or ignore what the
caller asked for. Each case is either exact against the model with its ordinary DynamicCache, or a one-line
ValueError that starts with the name of the parameter at fault and comes before any work (a forward pre-hook counts
the forwards that ran)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from transformers import DynamicCache, GenerationConfig

from offload import OffloadConfig, offload
from offload.budgets import plan_budgets
from offload.models import tiny_llama

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def left_padded(ids: torch.Tensor, pad: int) -> torch.Tensor:
    """An attention mask over `ids` whose first `pad` positions are padding."""
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return mask


@contextmanager
def forwards(model: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the model's forward calls while the block runs."""
    count = [0]
    handle = model.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


@torch.no_grad()
def run(model, chunks: list[torch.Tensor], cache, **kwargs) -> torch.Tensor:
    """Feeds `chunks` one forward each; the last-position logits of every forward."""
    return torch.stack([model(c, past_key_values=cache, use_cache=True, **kwargs).logits[0, -1] for c in chunks])


def tight_options(model, tokens: int, page_size: int = 4) -> dict:
    """The smallest device budget plus a host budget that together hold exactly `tokens` tokens of KV."""
    mc = model.config
    layers = mc.num_hidden_layers
    pb = 2 * mc.num_key_value_heads * page_size * (mc.hidden_size // mc.num_attention_heads) * 4
    max_pages = -(-mc.max_position_embeddings // page_size)
    for pages in range(layers + 1, layers + 33):
        try:
            plan = plan_budgets(OffloadConfig(page_size=page_size, device_budget=pages * pb, host_budget=0), pb,
                                layers, max_pages, torch.device("cpu"))
        except ValueError:
            continue
        host = layers * -(-tokens // page_size) - plan.device_cache_pages
        assert host > 0
        return {"page_size": page_size, "device_budget": pages * pb, "host_budget": host * pb}
    raise AssertionError("no device budget accepted")


# -- 1. one sequence per runtime -----------------------------------------------------------------------------------
def test_an_older_cache_refuses_to_run_on_a_newer_sequence(tiny_llama_model):
    """Bug: every rt.cache() and every generate() without past_key_values starts a new sequence in the runtime, but a
    cache handed out earlier stayed usable and read the new sequence's pages: chat A continued on chat B's KV."""
    model = tiny_llama_model
    a_ids, b_ids = ids_of(20, seed=1), ids_of(30, seed=2)
    token = torch.tensor([[5]])
    expected_b = run(model, [b_ids, token], DynamicCache(config=model.config))
    with offload(model, page_size=8) as rt:
        a = rt.cache()
        run(model, [a_ids], a)
        b = rt.cache()
        got_b = [run(model, [b_ids], b)[0]]
        before = rt.stats()["tokens"]
        with pytest.raises(ValueError, match=r"^cache: .*replaced by a later rt\.cache\(\)"):
            run(model, [token], a)
        with pytest.raises(ValueError, match="^cache:"):
            model.generate(torch.cat([a_ids, token], 1), past_key_values=a, max_new_tokens=2)
        assert rt.stats()["tokens"] == before  # the refused calls stored nothing
        got_b.append(run(model, [token], b)[0])  # the current sequence is untouched
        torch.testing.assert_close(torch.stack(got_b), expected_b, atol=1e-4, rtol=1e-4)
        # generate() without a cache takes a fresh one each call, which replaces the previous sequence too
        with torch.no_grad():
            first = model.generate(a_ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            second = model.generate(a_ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        assert first.past_key_values is not second.past_key_values
        assert torch.equal(first.sequences, second.sequences)
        for old in (b, first.past_key_values):
            with pytest.raises(ValueError, match="^cache: .*replaced"):
                run(model, [token], old)
        assert len(run(model, [token], second.past_key_values)) == 1


def test_a_cache_after_its_block_ended_is_refused(tiny_llama_model):
    """Bug: a cache used after its offload() block ended computed without error (on pages already freed) or crashed
    deep inside transformers ("The size of tensor a (21) must match ..."), and rt.cache() after the block raised
    IndexError."""
    model = tiny_llama_model
    ids = ids_of(20, seed=3)
    with offload(model, page_size=8) as rt:
        cache = rt.cache()
        run(model, [ids], cache)
    for call in (lambda: run(model, [torch.tensor([[5]])], cache),
                 lambda: model.generate(torch.cat([ids, ids], 1), past_key_values=cache, max_new_tokens=2),
                 lambda: cache.get_seq_length(),
                 lambda: cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 0)):
        with pytest.raises(ValueError, match=r"^cache: the offload\(\) block this cache was taken in has ended"):
            call()
    with pytest.raises(ValueError, match=r"^cache: this runtime's offload\(\) block has ended"):
        rt.cache()
    assert rt.stats()["tokens"] == {"prefill": 20, "decode": 0, "reused": 0, "loaded": 0}  # statistics stay readable


def test_a_cache_with_a_model_not_running_its_runtime_is_refused(tiny_llama_model):
    """Bug: the cache of an outer offload() block used inside a nested one, or with another model, stashed its keys
    for an attention function that never ran: the layers attended to the new tokens alone, silently."""
    model = tiny_llama_model
    ids = ids_of(20, seed=4)
    padded = left_padded(ids, 2)
    with torch.no_grad():
        expected_padded = model(ids, attention_mask=padded, use_cache=False).logits[0, 2:]
    with offload(model, page_size=8) as outer:
        cache = outer.cache()
        run(model, [ids], cache)
        with offload(model, page_size=4):
            with pytest.raises(ValueError, match="^cache: the model runs attention"):
                run(model, [ids[:, :1]], cache)
            with pytest.raises(ValueError, match="^cache:"):
                model.generate(torch.cat([ids, ids], 1), past_key_values=cache, max_new_tokens=2)
        other = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seed=7)
        with pytest.raises(ValueError, match="^cache: the model using this cache does not run"):
            run(other, [ids[:, :1]], cache)
        # what the refused forward began leaves no trace: a padded forward without the offloaded cache is plain
        with torch.no_grad():
            got = model(ids, attention_mask=padded, use_cache=False).logits[0, 2:]
        torch.testing.assert_close(got, expected_padded, atol=1e-5, rtol=1e-5)
        assert outer.stats()["tokens"] == {"prefill": 20, "decode": 0, "reused": 0, "loaded": 0}
        expected = run(model, [ids, ids[:, :1]], DynamicCache(config=model.config))[1]
        torch.testing.assert_close(run(model, [ids[:, :1]], cache)[0], expected, atol=1e-4, rtol=1e-4)


def test_a_sequence_interrupted_part_way_through_the_layers_is_refused(tiny_gqa3_model):
    """Bug: an interrupt (Ctrl-C while streaming) or an error in a layer leaves the first layers one token ahead;
    going on with that cache attended over layers of different lengths without any error."""
    model = tiny_gqa3_model
    ids = ids_of(20, seed=18)

    def interrupt(*_):
        raise KeyboardInterrupt

    with offload(model, page_size=8) as rt, torch.no_grad():
        cache = rt.cache()
        run(model, [ids], cache)
        handle = model.model.layers[2].register_forward_pre_hook(interrupt)
        try:
            with pytest.raises(KeyboardInterrupt):
                run(model, [ids[:, :1]], cache)
        finally:
            handle.remove()
        with pytest.raises(ValueError, match="^cache: an earlier forward stopped part-way"):
            run(model, [ids[:, :1]], cache)
        with forwards(model) as n, pytest.raises(ValueError, match="^cache: an earlier forward stopped part-way"):
            model.generate(torch.cat([ids, ids[:, :2]], 1), past_key_values=cache, max_new_tokens=2)
        assert n[0] == 0
        assert rt.table.tokens == [21, 21, 20]
        model.generate(ids, max_new_tokens=2)  # a new sequence is fine


# -- 3. padding ----------------------------------------------------------------------------------------------------
def test_padding_with_the_offloaded_cache_is_refused_on_every_path(tiny_llama_model):
    """Bug: the padding check lived only in the generate wrapper for generate() without a cache: a padded
    attention_mask passed with an explicit offloaded cache (a forward, or generate(past_key_values=rt.cache())) was
    ignored, and the padded positions were attended."""
    model = tiny_llama_model
    ids = ids_of(24, seed=5)
    padded = left_padded(ids, 4)
    with offload(model, page_size=8) as rt, torch.no_grad():
        with forwards(model) as n:
            with pytest.raises(ValueError, match="^attention_mask: padding"):
                model.generate(ids, attention_mask=padded, past_key_values=rt.cache(), max_new_tokens=3)
            assert n[0] == 0
        cache = rt.cache()
        with pytest.raises(ValueError, match="^attention_mask: padding"):
            model(ids, attention_mask=padded, past_key_values=cache, use_cache=True)
        assert rt.stats()["kv_bytes"] == 0  # refused before any layer stored its keys
        model(ids[:, :16], attention_mask=torch.ones(1, 16, dtype=torch.long), past_key_values=cache, use_cache=True)
        # a later chunk whose mask pads an earlier position, or that doesn't cover the cached tokens
        late = torch.ones(1, 24, dtype=torch.long)
        late[0, 3] = 0
        with pytest.raises(ValueError, match="^attention_mask: padding"):
            model(ids[:, 16:], attention_mask=late, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="^attention_mask: covers 8 positions but the cached and new tokens"):
            model(ids[:, 16:], attention_mask=torch.ones(1, 8, dtype=torch.long), past_key_values=cache,
                  use_cache=True)
        with pytest.raises(ValueError, match="^attention_mask: a prepared 4-D mask"):
            model(ids[:, 16:], attention_mask=torch.ones(1, 1, 8, 24, dtype=torch.bool), past_key_values=cache,
                  use_cache=True)
        assert rt.stats()["tokens"]["prefill"] == 16


def test_masks_of_ones_stay_exact_and_padding_without_the_offloaded_cache_still_works(tiny_llama_model):
    model = tiny_llama_model
    ids = ids_of(40, seed=6)
    chunks = [ids[:, :17], ids[:, 17:29], ids[:, 29:]]

    def masked(cache) -> torch.Tensor:
        out, end = [], 0
        for c in chunks:
            end += c.shape[1]
            out.append(model(c, attention_mask=torch.ones(1, end, dtype=torch.long), past_key_values=cache,
                             use_cache=True).logits[0, -1])
        return torch.stack(out)

    padded = left_padded(ids, 6)
    with torch.no_grad():
        expected = masked(DynamicCache(config=model.config))
        expected_padded = model(ids, attention_mask=padded, past_key_values=DynamicCache(config=model.config),
                                use_cache=True).logits[0, 6:]
        with offload(model, page_size=8) as rt:
            got = masked(rt.cache())
            got_padded = model(ids, attention_mask=padded, past_key_values=DynamicCache(config=model.config),
                               use_cache=True).logits[0, 6:]
            assert rt.stats()["tokens"]["prefill"] == 40
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_padded, expected_padded, atol=1e-5, rtol=1e-5)


def test_padding_is_refused_for_a_sliding_window_model():
    """Bug (as above) for models whose mask is built by create_sliding_window_causal_mask."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                             max_position_embeddings=256)).eval()
    ids = ids_of(20, seed=7)
    padded = left_padded(ids, 3)
    with torch.no_grad():
        expected = model(ids, attention_mask=padded, use_cache=False).logits[0, 3:]
        with offload(model, page_size=8) as rt:
            with pytest.raises(ValueError, match="^attention_mask: padding"):
                model(ids, attention_mask=padded, past_key_values=rt.cache(), use_cache=True)
            assert rt.stats()["kv_bytes"] == 0
            got = model(ids, attention_mask=padded, use_cache=False).logits[0, 3:]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_offloaded_path_builds_no_mask(tiny_llama_model, monkeypatch):
    """The offloaded attention ignores masks, so none is built for it (a chunk after earlier tokens would otherwise
    materialize a chunk x context mask); forwards without the offloaded cache still get SDPA's."""
    from offload import attention

    built = []
    sdpa_mask = attention.sdpa_mask
    monkeypatch.setattr(attention, "sdpa_mask", lambda *a, **k: built.append(1) or sdpa_mask(*a, **k))
    model = tiny_llama_model
    ids = ids_of(30, seed=17)
    with offload(model, page_size=8) as rt, torch.no_grad():
        run(model, [ids[:, :12], ids[:, 12:], ids[:, :1]], rt.cache())
        model.generate(ids, max_new_tokens=3, do_sample=False)
        assert built == []
        run(model, [ids[:, :12], ids[:, 12:]], DynamicCache(config=model.config))
        assert len(built) == 2


# -- 4. lengths are checked before any forward, however they reach generate --------------------------------------
PROMPT, ROOM = 16, 24  # the budgets hold 24 tokens: the prompt fits, 40 new tokens don't


def _embeds(model, ids):
    return model.get_input_embeddings()(ids).detach()


LENGTHS = {
    "max_new_tokens": lambda m, ids: m.generate(ids, max_new_tokens=40),
    "max_length": lambda m, ids: m.generate(ids, max_length=PROMPT + 40),
    "input_ids=,max_length": lambda m, ids: m.generate(input_ids=ids, max_length=PROMPT + 40),
    "inputs=,max_length": lambda m, ids: m.generate(inputs=ids, max_length=PROMPT + 40),
    "default max_length": lambda m, ids: m.generate(ids),  # transformers' default: 20 new tokens
    "config max_new_tokens": lambda m, ids: m.generate(ids, generation_config=GenerationConfig(max_new_tokens=40)),
    "config max_length": lambda m, ids: m.generate(ids, generation_config=GenerationConfig(max_length=PROMPT + 40)),
    "inputs_embeds": lambda m, ids: m.generate(inputs_embeds=_embeds(m, ids), max_new_tokens=40),
    "inputs_embeds,max_length": lambda m, ids: m.generate(inputs_embeds=_embeds(m, ids), max_length=PROMPT + 40),
}


@pytest.mark.parametrize("how", [*LENGTHS, "model max_new_tokens", "model max_length", "later turn"])
def test_lengths_beyond_the_budgets_are_refused_before_any_forward(tiny_llama_model, how):
    """Bug: only max_new_tokens (from the call or the generation config) with ids reached the up-front capacity and
    position check; max_length, inputs_embeds and later turns of a conversation (a passed cache, whose generate ids
    hold the whole conversation) failed only after the prefill and many decode steps, without the "raise by" advice."""
    model = tiny_llama_model
    ids = ids_of(PROMPT, seed=8)
    with offload(model, **tight_options(model, ROOM)) as rt, torch.no_grad():
        if how == "later turn":
            first = model.generate(ids[:, :10], max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            conversation = torch.cat([first.sequences, ids[:, :3]], 1)
            call = lambda: model.generate(conversation, past_key_values=first.past_key_values, max_new_tokens=20)
        elif how.startswith("model "):
            setattr(model.generation_config, how.split()[1], 40 if how.endswith("new_tokens") else PROMPT + 40)
            call = lambda: model.generate(ids)
        else:
            call = lambda: LENGTHS[how](model, ids)
        before = rt.stats()["tokens"]
        with forwards(model) as n, pytest.raises(ValueError) as e:
            call()
        assert n[0] == 0, f"{n[0]} forwards ran before the error: {e.value}"
        assert str(e.value).startswith("budgets:") and "raise host_budget by" in str(e.value), str(e.value)
        assert rt.stats()["tokens"] == before
        if how == "later turn":  # the refused turn left the conversation's cache usable
            out = model.generate(conversation, past_key_values=first.past_key_values, max_new_tokens=2,
                                 do_sample=False)
            assert out.shape[1] == conversation.shape[1] + 2


def test_max_length_beyond_the_positions_is_refused_naming_max_length():
    model = tiny_llama(max_positions=64)
    ids = ids_of(PROMPT, seed=9)
    with offload(model, page_size=8), torch.no_grad(), forwards(model) as n:
        with pytest.raises(ValueError, match="^max_length: 100 tokens .* maximum of 64 positions"):
            model.generate(ids, max_length=100)
        with pytest.raises(ValueError, match="^max_length: 100 tokens"):
            model.generate(ids, generation_config=GenerationConfig(max_length=100))
        with pytest.raises(ValueError, match="^prompt: 66 tokens"):
            model.generate(ids, max_new_tokens=50)
    assert n[0] == 0


def test_a_later_turn_needs_the_whole_conversation(tiny_llama_model):
    """Bug: a later turn given only its new ids (a cache already holding the earlier ones) failed deep inside
    transformers; generate's ids must hold the whole conversation, as with a DynamicCache."""
    model = tiny_llama_model
    ids = ids_of(PROMPT, seed=10)
    with offload(model, page_size=8), torch.no_grad():
        first = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        with forwards(model) as n, pytest.raises(ValueError, match="^input_ids: the cache already holds 18 tokens"):
            model.generate(ids_of(5, seed=11), past_key_values=first.past_key_values, max_new_tokens=3)
        assert n[0] == 0


# -- 5. to 7. generate settings the offloaded cache can't honour --------------------------------------------------
REFUSED = {
    "output_attentions": ("output_attentions", {"output_attentions": True, "return_dict_in_generate": True,
                                                "max_new_tokens": 3}),
    "output_attentions config": ("output_attentions", {
        "generation_config": GenerationConfig(output_attentions=True, return_dict_in_generate=True,
                                              max_new_tokens=3)}),
    "cache_implementation": ("cache_implementation", {"cache_implementation": "static", "max_new_tokens": 3}),
    "prompt_lookup_num_tokens": ("prompt_lookup_num_tokens", {"prompt_lookup_num_tokens": 3, "max_new_tokens": 3}),
    "cache_implementation config": ("cache_implementation", {
        "generation_config": GenerationConfig(cache_implementation="static", max_new_tokens=3)}),
}


@pytest.mark.parametrize("with_cache", [False, True], ids=["fresh", "passed-cache"])
@pytest.mark.parametrize("case", [*REFUSED, "cache_implementation model config"])
def test_generate_settings_the_cache_cant_honour_are_refused_first(tiny_llama_model, case, with_cache):
    """Bug: output_attentions=True returned empty tuples silently.
    Bug: cache_implementation="static" got transformers' complaint about a past_key_values the caller never
    passed."""
    model = tiny_llama_model
    ids = ids_of(PROMPT, seed=12)
    with offload(model, page_size=8) as rt, torch.no_grad():
        if case.endswith("model config"):  # set inside the block, which restores the config on exit
            name = case.split()[0]
            setattr(model.generation_config, name, "static")
            kwargs = {"max_new_tokens": 3}
        else:
            name, kwargs = REFUSED[case]
        if with_cache:
            kwargs = {**kwargs, "past_key_values": rt.cache()}
        with forwards(model) as n, pytest.raises(ValueError) as e:
            model.generate(ids, **kwargs)
        assert str(e.value).startswith(f"{name}:") and "\n" not in str(e.value), str(e.value)
        assert n[0] == 0


def test_assisted_decoding_is_refused_by_name(tiny_llama_model):
    """Bug: assisted decoding with the wrapped model as its own assistant failed with "this cache's sequence was
    replaced", and prompt-lookup decoding with "an offloaded cache can't be cropped": neither named the feature."""
    model = tiny_llama_model
    ids = ids_of(PROMPT, seed=14)
    with offload(model, page_size=8), torch.no_grad():
        with forwards(model) as n, pytest.raises(ValueError, match="^assistant_model: speculative"):
            model.generate(ids, assistant_model=model, max_new_tokens=3, do_sample=False)
        assert n[0] == 0


def test_output_attentions_in_a_forward_is_refused_like_generate(tiny_llama_model):
    """Bug: a forward with output_attentions=True inside the block returned empty tuples (transformers only warns
    for SDPA); it is refused as in generate, with the offloaded cache or without."""
    model = tiny_llama_model
    ids = ids_of(PROMPT, seed=13)
    with offload(model, page_size=8) as rt, torch.no_grad():
        with pytest.raises(ValueError, match="^output_attentions:"):
            model(ids, past_key_values=rt.cache(), use_cache=True, output_attentions=True)
        with pytest.raises(ValueError, match="^output_attentions:"):
            model(ids, use_cache=False, output_attentions=True)
        assert rt.stats()["kv_bytes"] == 0
        assert model(ids, use_cache=False, output_attentions=False).logits.shape[1] == PROMPT


@pytest.mark.parametrize("own", ["static", "hybrid"])
def test_a_model_whose_generation_config_sets_a_cache_implementation_just_works(tiny_llama_model, own):
    """Bug ("static"): transformers refused the offloaded cache that the block passes to generate, because the
    model's own generation config names a cache of its own; Gemma 2 ships "hybrid", which transformers drops."""
    model = tiny_llama_model
    ids = ids_of(PROMPT, seed=14)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.generation_config.cache_implementation = own
    try:
        with offload(model, page_size=8) as rt, torch.no_grad():
            got = model.generate(ids, max_new_tokens=6, do_sample=False)
            # a copy of the model's config, as callers pass it, is the model's own choice too
            config = GenerationConfig(max_new_tokens=6, do_sample=False, cache_implementation=own)
            again = model.generate(ids, generation_config=config)
            assert rt.stats()["tokens"]["prefill"] == 2 * PROMPT
        assert model.generation_config.cache_implementation == own
    finally:
        model.generation_config.cache_implementation = None
    assert torch.equal(got, expected) and torch.equal(again, expected)


# -- multi-turn ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["returned", "rt.cache"])
def test_multi_turn_with_the_cache_passed_back_is_exact(tiny_gqa3_model, how):
    model = tiny_gqa3_model
    turn1, user2 = ids_of(21, seed=15), ids_of(9, seed=16)
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)

    def conversation(first_cache):
        first = model.generate(turn1, past_key_values=first_cache, **kwargs)
        ids2 = torch.cat([first.sequences, user2], 1)
        second = model.generate(ids2, past_key_values=first.past_key_values, **kwargs)
        return first, second

    with torch.no_grad():
        exp1, exp2 = conversation(DynamicCache(config=model.config))
        with offload(model, page_size=8) as rt:
            got1, got2 = conversation(rt.cache() if how == "rt.cache" else None)
            # turn 2 prefills the last generated token and the user's 9: the rest is in the cache
            assert rt.stats()["tokens"] == {"prefill": 21 + 1 + 9, "decode": 2 * 5, "reused": 0,
                                            "loaded": 0}
    assert torch.equal(got1.sequences, exp1.sequences) and torch.equal(got2.sequences, exp2.sequences)
    for got, exp in ((got1, exp1), (got2, exp2)):
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(exp.logits), atol=1e-4, rtol=1e-4)
