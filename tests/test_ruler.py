"""The generators of benchmarks/ruler.py, without a model: a word-level tokenizer (one token per word, digit,
mark or newline run, digits one by one as SmolLM2's) stands in for the real one. Checks that prompts have about
the asked number of tokens, that needles sit at the asked depth and hold the expected answers where the case says,
and that scoring counts the expected strings found."""

from __future__ import annotations

import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import ruler  # noqa: E402

NEEDLE_TASKS = [t for t, spec in ruler.TASKS.items() if spec.needles]


class WordTokenizer:
    eos_token_id = 0
    _pieces = re.compile(r" ?[A-Za-z]+| ?\d|\s+|[^\sA-Za-z\d]")

    def tokens(self, text: str) -> list[str]:
        return self._pieces.findall(text)

    def __call__(self, text, add_special_tokens: bool = False) -> dict:
        if isinstance(text, list):
            return {"input_ids": [self.tokens(t) for t in text]}
        return {"input_ids": self.tokens(text)}

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@pytest.fixture(scope="module")
def tok() -> WordTokenizer:
    return WordTokenizer()


def tokens(tok, text: str) -> int:
    return len(tok(text)["input_ids"])


@pytest.mark.parametrize(("fmt", "ask_first"), [("chat", True), ("plain", False)])
@pytest.mark.parametrize("task", list(ruler.TASKS))
@pytest.mark.parametrize("context", [2048, 8192])
def test_prompt_has_about_the_asked_tokens(tok, task, context, fmt, ask_first):
    case = ruler.make_case(tok, task, context, 0.5, fmt=fmt, ask_first=ask_first)
    n = tokens(tok, case.prompt)
    limit = min(context, ruler.MAX_POSITIONS - case.max_new_tokens)
    assert 0.97 * limit <= n <= limit
    assert case.prompt.endswith((" is", " are", ":"))  # the answer is begun


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_the_question_can_come_first(tok, task):
    first = ruler.make_case(tok, task, 2048, 0.5, ask_first=True)
    end = ruler.make_case(tok, task, 2048, 0.5, ask_first=False)
    assert first.expected == end.expected
    lead, plain_lead = first.prompt[:first.span[0]], end.prompt[:end.span[0]]
    assert lead.startswith(plain_lead.rstrip()) and len(lead) > len(plain_lead)
    asked = {"variable_tracking": r"value (\d+)", "common_words": r"the (\d+) most"}.get(task, r"for (.+) mentioned")
    assert re.search(asked, lead).group(1) == re.search(asked, first.prompt[first.span[1]:]).group(1)


@pytest.mark.parametrize("task", NEEDLE_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_sits_at_the_asked_depth(tok, task, depth):
    case = ruler.make_case(tok, task, 4096, depth)
    start, end = case.span
    first = case.needles[0]
    assert abs(first["depth"] - depth) < 0.02
    # Measured on the prompt: tokens of the haystack before the needle over the haystack's tokens.
    before = tokens(tok, case.prompt[start:first["char"]])
    assert abs(before / tokens(tok, case.prompt[start:end]) - depth) < 0.03


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_expected_answers_are_where_the_case_says(tok, task):
    case = ruler.make_case(tok, task, 2048, 0.1, index=3, seed=7)
    start, end = case.span
    for needle in case.needles:
        assert case.prompt[needle["char"]:needle["char"] + len(needle["text"])] == needle["text"]
        assert start <= needle["char"] < end
    texts = " ".join(n["text"] for n in case.needles)
    for answer in case.expected:
        assert ruler.found(texts if case.needles else case.prompt[start:end], answer)
    if task.startswith("niah"):
        values = re.findall(r"\d{7}", texts)
        assert len(values) == len(set(values)) == len(case.needles) == (1 if task == "niah_single" else 4)
        # Each value occurs once in the whole prompt, in its needle.
        assert all(case.prompt.count(v) == 1 for v in values)
        wanted = {"niah_single": 1, "niah_multikey": 1, "niah_multivalue": 4, "niah_multiquery": 4}[task]
        assert len(case.expected) == wanted and set(case.expected) <= set(values)
        key = re.search(r"numbers? for (\S+?)[ ,]", case.prompt[end:]).group(1)
        assert f"for {key} is: {case.expected[0]}." in case.prompt[start:end]
    if task == "niah_multikey":
        keys = {re.search(r"for (\S+) is", n["text"]).group(1) for n in case.needles}
        assert len(keys) == 4
    if task == "variable_tracking":
        value = re.search(r"= (\d+)\.", texts).group(1)
        assert case.needles[0]["text"] == f"VAR {case.expected[0]} = {value}."
        for a, b, needle in zip(case.expected, case.expected[1:], case.needles[1:]):
            assert needle["text"] == f"VAR {b} = VAR {a}."
        assert f"assigned the value {value}" in case.prompt[end:]
    if task == "common_words":
        words = re.findall(r"^\d+\. (\w+)$", case.prompt[start:end], re.M)
        counts = {w: words.count(w) for w in set(words)}
        assert len(case.expected) == ruler.COMMON_WORDS
        assert min(counts[w] for w in case.expected) > max(c for w, c in counts.items() if w not in case.expected)


def test_cases_are_seeded_and_each_has_its_own_haystack(tok):
    a = ruler.make_case(tok, "niah_single", 2048, 0.5, index=0)
    assert ruler.make_case(tok, "niah_single", 2048, 0.5, index=0).prompt == a.prompt
    b = ruler.make_case(tok, "niah_single", 2048, 0.5, index=1)
    assert a.expected != b.expected
    assert a.prompt[a.span[0]:a.span[0] + 200] != b.prompt[b.span[0]:b.span[0] + 200]
    cases = ruler.make_cases(tok, list(ruler.TASKS), [2048], [0.1, 0.9], 2)
    assert len(cases) == len(ruler.TASKS) * 2 * 2
    assert len({c.prompt for c in cases}) == len(cases)


def test_score_counts_the_expected_strings_found():
    assert ruler.score(" 8297592.", ["8297592"]) == 1.0
    assert ruler.score("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert ruler.score("82975921", ["8297592"]) == 0.0  # a longer number is not the value
    assert ruler.score("they are: abcde, FGHIJ", ["ABCDE", "FGHIJ"]) == 1.0
    assert ruler.score("sugary", ["sugar"]) == 0.0


def test_configs_parse_to_offload_options():
    assert ruler.parse_config("default:") == ("default", {})
    assert ruler.parse_config("mix:dense_layers=2,select_block=16,head_selection=kv,token_budget=0.2") == (
        "mix", {"dense_layers": 2, "select_block": 16, "head_selection": "kv", "token_budget": 0.2})
    assert ruler.parse_config("r:measure_recall=true") == ("r", {"measure_recall": True})
    for bad in ("nocolon", ":a=1", "x:a"):
        with pytest.raises(ValueError, match="--config"):
            ruler.parse_config(bad)
