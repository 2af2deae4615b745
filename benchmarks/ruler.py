"""A RULER-style long-context suite, generated locally: needle retrieval, variable tracking and common-words
extraction over haystacks of public-domain prose (benchmarks/data), scored with exact attention and with sparse
configurations of the runtime; plus teacher-forced NLL, top-1 agreement, recall, prefetch hit rate and
host->device traffic on natural text.

    python benchmarks/ruler.py --out ruler.json                       # 2K, 4K and 8K, every task
    python benchmarks/ruler.py --quick                                # 2K, one depth, budget 0.1
    python benchmarks/ruler.py --exact-only --contexts 2048,4096      # what exact attention solves
    python benchmarks/ruler.py --config default: --config temporal:prefetch=temporal --budgets 0.1

Tasks (RULER, Hsieh et al. 2024, rebuilt on real text; values are random numbers drawn from a seed per case):

- `niah_single`: one "special magic number" for a key, at the asked depth; return it.
- `niah_multikey`: the asked needle among distractor needles with other keys; return the asked value.
- `niah_multivalue`: one key with several values (the first at the asked depth); return them all.
- `niah_multiquery`: several keys asked at once (the first at the asked depth); return every value.
- `variable_tracking`: a chain VAR A = 12345, VAR B = VAR A, ... scattered through the haystack; return every
  name bound to the value.
- `common_words`: a numbered list of words from the prose where a few words repeat often; return the most common.

The haystack is consecutive sentences of one of the books, from an offset drawn per case; needles go in between
sentences. A case scores the fraction of its expected strings found in the greedy output (whole words, any case).
Sparse configurations run only on the cases exact attention solves (score 1), so the tables say what each
configuration loses; the exact table says what the model itself cannot do. Each configuration runs as
`offload(model, attention="sparse", token_budget=b, device_budget=..., host_budget=..., **options)` with the device
holding `--device-fraction` of the KV and the host the rest (as benchmarks/sparse_accuracy.py).

Prompts (`--format`, `--question`): by default the tokenizer's chat template with the answer begun in the
assistant's turn ("The special magic number for X mentioned in the provided text is"), the question asked before the
haystack and again after it; on SmolLM2 that solved the most cases of the formats measured (BENCHMARKS.md). A
context of 8192 tokens gives prompts of 8192 less the task's new tokens, within SmolLM2's window.

Time on a 2-core CPU: a case takes 6-13 s at 2K and 13-25 s at 4K per generation (exact, then each budget and
configuration on the cases exact solves); an 8K prefill alone takes about 40 s. Exact outputs are kept per prompt
within a run; each finished case is written to the JSON at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import random
import re
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "benchmarks", "data")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MAX_POSITIONS = 8192  # SmolLM2's window: prompt and answer together stay within it
CONTEXTS = (2048, 4096, 8192)
DEPTHS = (0.1, 0.5, 0.9)
BUDGETS = (0.05, 0.1, 0.2)


@dataclasses.dataclass(frozen=True)
class Task:
    max_new_tokens: int
    needles: bool  # placed at the asked depths; otherwise each depth slot is one more case


TASKS = {
    "niah_single": Task(16, True),
    "niah_multikey": Task(16, True),
    "niah_multivalue": Task(64, True),
    "niah_multiquery": Task(64, True),
    "variable_tracking": Task(40, False),
    "common_words": Task(80, False),
}
# RULER's defaults: 4 needles in the multi-needle tasks, one chain of 4 hops, 10 common words repeated 30 times
# among words repeated 3 times.
NEEDLES = 4
HOPS = 4
COMMON_WORDS, COMMON_FREQ, RARE_FREQ = 10, 30, 3
VALUE_DIGITS = 7

NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                    "I will quiz you about the numbers afterwards.")
VT_INSTRUCTION = ("Memorize and track the chain(s) of variable assignment hidden in the following text.")
CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   "Memorize the ones that appear most often.")

ADJECTIVES = ("amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "crimson", "curious", "distant",
              "eager", "elegant", "fierce", "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively",
              "lonely", "lucky", "mellow", "misty", "noble", "quiet", "rapid", "rusty", "silent", "silver",
              "sleepy", "smooth", "stormy", "sturdy", "swift", "tender", "velvet", "wandering", "wild", "witty")
NOUNS = ("anchor", "badger", "basket", "beacon", "canyon", "castle", "compass", "falcon", "fountain", "garden",
         "glacier", "harbor", "helmet", "island", "kettle", "lantern", "meadow", "mirror", "orchard", "otter",
         "pebble", "pepper", "pillow", "planet", "quarry", "ribbon", "saddle", "sparrow", "spindle", "thimble",
         "thunder", "tractor", "tulip", "valley", "violin", "walrus", "willow", "window", "wizard", "zephyr")


# -- text ---------------------------------------------------------------------------------------------------------

_ABBREVIATIONS = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|St|Mme|Messrs)|\b[A-Z])\.$")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` in order, each with the separator before it ("\\n" at a paragraph's start, else " "),
    whitespace inside a paragraph collapsed. Joined, they give the text back with paragraphs one line each."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = re.sub(r"\s+", " ", para).strip()
        if not para:
            continue
        start = 0
        for m in re.finditer(r"[.!?][\'\")\]_]*(?= )", para):
            if _ABBREVIATIONS.search(para[start:m.end()]):
                continue
            out.append(("\n" if start == 0 else " ") + para[start:m.end()].strip())
            start = m.end() + 1
        if start < len(para):
            out.append(("\n" if start == 0 else " ") + para[start:].strip())
    return out


_BOOKS: list[list[str]] | None = None


def books() -> list[list[str]]:
    """The sentences of each book in benchmarks/data."""
    global _BOOKS
    if _BOOKS is None:
        _BOOKS = [split_sentences(open(f, encoding="utf-8").read())
                  for f in sorted(glob.glob(os.path.join(DATA, "*.txt")))]
    return _BOOKS


_COUNTS: dict[int, tuple[object, list[list[int]]]] = {}  # id -> (the tokenizer, kept so the id stays its own)


def sentence_tokens(tokenizer) -> list[list[int]]:
    """Tokens of each sentence (with its separator), per book; counted once per tokenizer."""
    key = id(tokenizer)
    if key not in _COUNTS:
        _COUNTS[key] = (tokenizer, [[len(ids) for ids in tokenizer(book, add_special_tokens=False)["input_ids"]]
                                    for book in books()])
    return _COUNTS[key][1]


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def haystack(tokenizer, tokens: int, rng: random.Random) -> tuple[list[str], list[int]]:
    """Consecutive sentences of one book, from an offset drawn by `rng`, about `tokens` tokens in all (never
    more), and each one's token count. A book read to its end goes on from its beginning."""
    which = rng.randrange(len(books()))
    sents, counts = books()[which], sentence_tokens(tokenizer)[which]
    i = rng.randrange(len(sents))
    out, sizes, total = [], [], 0
    while total + counts[i % len(sents)] <= tokens and len(out) < 4 * len(sents):
        out.append(sents[i % len(sents)])
        sizes.append(counts[i % len(sents)])
        total += sizes[-1]
        i += 1
    return out, sizes


def natural_ids(tokenizer, tokens: int, seed: int = 0) -> list[int]:
    """`tokens` token ids of consecutive prose (for teacher-forced continuation)."""
    sents, _ = haystack(tokenizer, tokens + 256, random.Random(seed))
    return tokenizer("".join(sents).lstrip(), add_special_tokens=False)["input_ids"][:tokens]


# -- cases --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    task: str
    context: int  # the asked prompt length in tokens
    depth: float | None  # where the (first) asked needle sits, as a fraction of the haystack; None: no depth
    index: int
    seed: int
    prompt: str  # the full prompt as fed to the tokenizer (chat template applied when `fmt` is "chat")
    expected: list[str]
    # Each inserted needle: its text, its character offset in `prompt`, and its depth in haystack tokens.
    needles: list[dict]
    span: tuple[int, int]  # the characters of `prompt` that the haystack (needles included) or word list takes
    max_new_tokens: int
    fmt: str
    ask_first: bool  # the question is also asked before the haystack

    @property
    def name(self) -> str:
        depth = "-" if self.depth is None else f"{self.depth:g}"
        return f"{self.task}/{self.context}/{depth}/{self.index}"


def render(tokenizer, user: str, answer_prefix: str, fmt: str) -> str:
    """The prompt for `user`'s text with the answer begun: as a chat turn (the tokenizer's template) followed by
    the assistant's first words, or plain text."""
    if fmt == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True) + answer_prefix
    if fmt == "plain":
        return user + "\n" + answer_prefix
    raise ValueError(f"--format: expected chat or plain, got {fmt!r}")


def case_seed(task: str, context: int, depth: float | None, index: int, seed: int) -> int:
    return zlib.crc32(f"{task}|{context}|{depth}|{index}|{seed}".encode())


def make_case(tokenizer, task: str, context: int, depth: float | None = 0.5, index: int = 0, seed: int = 0,
              fmt: str = "chat", ask_first: bool = True, max_positions: int = MAX_POSITIONS) -> Case:
    """One case of `task` whose prompt has about `context` tokens (at most `max_positions` less the answer).
    `ask_first`: the question comes before the haystack as well as after it (a small model then knows what to look
    for while it reads; with the question only at the end, SmolLM2 answers niah_multikey with a distractor)."""
    if task not in TASKS:
        raise ValueError(f"--tasks: unknown task {task!r}; known: {', '.join(TASKS)}")
    spec = TASKS[task]
    s = case_seed(task, context, depth if spec.needles else None, index, seed)
    rng = random.Random(s)
    target = min(context, max_positions - spec.max_new_tokens)
    if task == "common_words":
        prompt, expected, span = _common_words(tokenizer, target, rng, fmt, ask_first)
        needles: list[dict] = []
    else:
        build = _variable_tracking if task == "variable_tracking" else _niah
        prompt, expected, needles, span = build(tokenizer, task, target, depth, rng, fmt, ask_first)
    return Case(task, context, depth if spec.needles else None, index, s, prompt, expected, needles, span,
                spec.max_new_tokens, fmt, ask_first)


def _numbers(rng: random.Random, n: int, digits: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if v not in out:
            out.append(v)
    return out


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in ADJECTIVES for b in NOUNS], n)
    return [f"{a}-{b}" for a, b in pairs]


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _insert(tokenizer, user_before: str, user_after: str, answer_prefix: str, fmt: str, target: int,
            placed: list[tuple[float, str]], rng: random.Random) -> tuple[str, list[dict], tuple[int, int]]:
    """The prompt: `user_before`, a haystack with each (depth, text) of `placed` inserted between sentences at that
    depth, `user_after`, then the answer prefix; about `target` tokens and never more. Returns it, the needles'
    records (in the order of `placed`) and the haystack's span."""
    fixed = count(tokenizer, render(tokenizer, user_before + "\n\n" + user_after, answer_prefix, fmt))
    needle_tokens = sum(count(tokenizer, " " + text) for _, text in placed)
    sents, sizes = haystack(tokenizer, max(0, target - fixed - needle_tokens), rng)

    def build(kept: int) -> tuple[str, list[dict], tuple[int, int]]:
        total = sum(sizes[:kept])
        bounds = [0]
        for n in sizes[:kept]:
            bounds.append(bounds[-1] + n)  # tokens before each boundary; boundary i is before sentence i
        at: dict[int, list[int]] = {}
        for n, (depth, _) in enumerate(placed):
            i = min(range(len(bounds)), key=lambda j: abs(bounds[j] - depth * total))
            at.setdefault(i, []).append(n)
        parts, marks, length = [], {}, 0
        for i in range(kept + 1):
            for n in at.get(i, []):
                text = placed[n][1]
                part = (" " if parts else "") + text
                marks[n] = (length + len(part) - len(text), text, bounds[i] / max(1, total))
                parts.append(part)
                length += len(part)
            if i < kept:
                parts.append(sents[i] if parts else sents[i].lstrip())
                length += len(parts[-1])
        user = user_before + "\n\n" + "".join(parts) + "\n\n" + user_after
        prompt = render(tokenizer, user, answer_prefix, fmt)
        base = prompt.index(user) + len(user_before) + 2
        records = [{"text": text, "char": base + c, "depth": d}
                   for c, text, d in (marks[n] for n in range(len(placed)))]
        return prompt, records, (base, base + length)

    kept = len(sents)
    built = build(kept)
    while kept and count(tokenizer, built[0]) > target:  # the pieces counted apart can come out a token short
        kept -= 1
        built = build(kept)
    return built


def _niah(tokenizer, task: str, target: int, depth: float, rng: random.Random, fmt: str, ask_first: bool):
    many = 1 if task == "niah_single" else NEEDLES
    keys = _keys(rng, many)
    values = _numbers(rng, many, VALUE_DIGITS)
    # The other needles go at distinct depths on a grid over the haystack, away from the asked one.
    grid = [g / 20 for g in range(1, 20) if abs(g / 20 - depth) > 0.075]
    depths = [depth] + rng.sample(grid, many - 1)
    if task == "niah_multivalue":
        needles = [f"One of the special magic numbers for {keys[0]} is: {v}." for v in values]
        asked, expected = [keys[0]], values
    else:
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        asked = keys if task == "niah_multiquery" else [keys[0]]
        expected = values[:len(asked)]
    if task == "niah_single" or task == "niah_multikey":
        question = f"What is the special magic number for {asked[0]} mentioned in the provided text?"
        prefix = f"The special magic number for {asked[0]} mentioned in the provided text is"
    else:
        question = f"What are all the special magic numbers for {_and(asked)} mentioned in the provided text?"
        prefix = f"The special magic numbers for {_and(asked)} mentioned in the provided text are"
    lead = NIAH_INSTRUCTION + (" " + question if ask_first else "")
    prompt, marks, span = _insert(tokenizer, lead, question, prefix, fmt, target, list(zip(depths, needles)), rng)
    return prompt, expected, marks, span


def _variable_tracking(tokenizer, task: str, target: int, depth, rng: random.Random, fmt: str, ask_first: bool):
    names: list[str] = []
    while len(names) < HOPS + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = _numbers(rng, 1, 5)[0]
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted(rng.uniform(0.0, 1.0) for _ in chain)
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
              f"variables are assigned the value {value}, they are:")
    lead = VT_INSTRUCTION + (f" Find all variables that are assigned the value {value} in the text below."
                             if ask_first else "")
    prompt, marks, span = _insert(tokenizer, lead, question, prefix, fmt, target, list(zip(depths, chain)), rng)
    return prompt, names, marks, span


_VOCABULARY: list[str] | None = None


def vocabulary() -> list[str]:
    """Distinct lowercase words of 4 to 10 letters from the books, in order of first appearance."""
    global _VOCABULARY
    if _VOCABULARY is None:
        seen: dict[str, None] = {}
        for book in books():
            for sent in book:
                for w in re.findall(r"\b[a-z]{4,10}\b", sent):
                    seen.setdefault(w, None)
        _VOCABULARY = list(seen)
    return _VOCABULARY


def _common_words(tokenizer, target: int, rng: random.Random, fmt: str,
                  ask_first: bool) -> tuple[str, list[str], tuple[int, int]]:
    words = rng.sample(vocabulary(), len(vocabulary()))
    common, rare = words[:COMMON_WORDS], words[COMMON_WORDS:]
    question = f"Question: What are the {COMMON_WORDS} most common words in the above list?"
    prefix = f"Answer: The top {COMMON_WORDS} words that appear most often in the list are:"
    # RULER repeats each common word 30 times; a short list gets fewer, so that the common words fill about a
    # third of it and rare words the rest.
    per_line = count(tokenizer, "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words[:300]))) / 300
    freq = max(2 * RARE_FREQ, min(COMMON_FREQ, int(target / per_line) // (3 * COMMON_WORDS)))
    base = rng.random()
    lead = CWE_INSTRUCTION + (f" What are the {COMMON_WORDS} most common words in the list below?" if ask_first else "")

    def build(n_rare: int) -> tuple[str, tuple[int, int]]:
        items = common * freq + rare[:n_rare] * RARE_FREQ
        random.Random(f"{base}|{n_rare}").shuffle(items)
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        user = lead + "\n\n" + listing + "\n\n" + question
        prompt = render(tokenizer, user, prefix, fmt)
        start = prompt.index(user) + len(lead) + 2
        return prompt, (start, start + len(listing))

    lo, hi = 0, len(rare)  # the most rare words that keep the prompt within `target`
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(tokenizer, build(mid)[0]) <= target:
            lo = mid
        else:
            hi = mid - 1
    prompt, span = build(lo)
    return prompt, common, span


def make_cases(tokenizer, tasks: list[str], contexts: list[int], depths: list[float], per_task: int,
               seed: int = 0, fmt: str = "chat", ask_first: bool = True) -> list[Case]:
    """Every case of the suite, context by context. Tasks without needles get as many cases as those with, one per
    depth slot."""
    cases = []
    for context in contexts:
        for task in tasks:
            for d, depth in enumerate(depths):
                for i in range(per_task):
                    if TASKS[task].needles:
                        cases.append(make_case(tokenizer, task, context, depth, i, seed, fmt, ask_first))
                    else:
                        cases.append(make_case(tokenizer, task, context, None, d * per_task + i, seed, fmt,
                                               ask_first))
    return cases


def found(output: str, expected: str) -> bool:
    """Whether `expected` occurs in `output` as a whole word or number (any case)."""
    return re.search(r"(?<![0-9A-Za-z])" + re.escape(expected) + r"(?![0-9A-Za-z])", output, re.IGNORECASE) is not None


def score(output: str, expected: list[str]) -> float:
    """The fraction of the expected strings found in the output."""
    return sum(found(output, e) for e in expected) / len(expected)


# -- running ------------------------------------------------------------------------------------------------------

def parse_value(text: str):
    """An option's value from the command line: an int, a float, true/false, else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_config(text: str) -> tuple[str, dict]:
    """`NAME:key=value,key=value` (`NAME:` alone: no options) -> (NAME, options)."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise ValueError(f"--config: expected NAME:key=value,..., got {text!r}")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--config: expected key=value in {text!r}, got {item!r}")
        options[key.strip()] = parse_value(value.strip())
    return name, options


def sparse_options(model, tokens: int, token_budget: float, options: dict, device_fraction: float) -> dict:
    """The keyword arguments of offload() for one sparse run: the KV spread over device and host, then the
    configuration's own options (which win)."""
    from sparse_accuracy import budgets

    return {"attention": "sparse", "token_budget": token_budget, **budgets(model, tokens, device_fraction), **options}


def generate(model, tokenizer, ids: list[int], max_new_tokens: int) -> tuple[str, float]:
    """Greedy output text for prompt `ids` and the seconds it took."""
    import torch

    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True), time.perf_counter() - t0


def case_row(case: Case, prompt_tokens: int, method: str, output: str, seconds: float, **extra) -> dict:
    return {"case": case.name, "task": case.task, "context": case.context, "prompt_tokens": prompt_tokens,
            "depth": case.depth, "needle_depths": [n["depth"] for n in case.needles], "index": case.index,
            "seed": case.seed, "expected": case.expected,
            "method": method, "config": None, "options": None, "token_budget": None, **extra,
            "output": output, "score": score(output, case.expected), "seconds": seconds}


def natural_rows(model, tokenizer, context: int, budgets_: list[float], configs: list[tuple[str, dict]],
                 continuation: int, device_fraction: float, log, emit) -> None:
    """Teacher-forced continuation of prose, per budget and configuration, against exact attention: NLL, top-1
    agreement, recall (measure_recall=True, which reads other pages directly and moves nothing), host->device bytes
    per decoded token over the KV's bytes, the pages a step touches, and the hit rate: where pages come through the
    load ring (layers with pages on disk), the share of loaded pages that prefetch brought; on the pools, the share
    of attended blocks already on the device (read in place from the host pool otherwise). Each row goes to `emit`
    as soon as it is measured."""
    import torch
    from transformers import DynamicCache

    from offload import offload
    from sparse_accuracy import kv_bytes, teacher_forced

    ctx = min(context, MAX_POSITIONS - continuation)
    text = natural_ids(tokenizer, ctx + continuation, seed=context)
    ids, cont = torch.tensor([text[:ctx]]), torch.tensor(text[ctx:])
    t0 = time.perf_counter()
    ref = teacher_forced(model, ids, cont, DynamicCache(config=model.config))
    ref_nll = float(-ref.gather(1, cont[:, None]).mean())
    log(f"natural text {ctx} tokens: exact NLL {ref_nll:.3f} in {time.perf_counter() - t0:.1f} s")
    kv = kv_bytes(model, ctx + continuation)
    for tb in budgets_:
        for name, options in configs:
            opts = sparse_options(model, ctx + continuation, tb, options, device_fraction)
            opts.setdefault("measure_recall", True)
            t0 = time.perf_counter()
            with offload(model, **opts) as rt:
                lp = teacher_forced(model, ids[:, :-1], torch.cat([ids[0, -1:], cont]), rt.cache())[1:]
                s = rt.stats()
            seconds = time.perf_counter() - t0
            decode = s["tokens"]["decode"]
            p, b, r = s["prefetch"] or {"hits": 0}, s["blocks"] or {}, s["recall"] or {}
            ring = p["hits"] + s["loads"]["needed"] if not s["blocks"] or not b.get("attended") else 0
            row = {
                "context": context, "tokens": ctx, "config": name, "options": options, "token_budget": tb,
                "nll": float(-lp.gather(1, cont[:, None]).mean()), "nll_exact": ref_nll,
                "top1_agreement": float((lp.argmax(-1) == ref.argmax(-1)).float().mean()),
                "attended_fraction": s["attended_fraction"],
                "recall": r.get("mean"), "recall_oracle": r.get("oracle"), "recall_of_oracle": r.get("of_oracle"),
                "union_pages": r.get("union_pages"), "pages_per_head": r.get("pages_per_head"),
                # Through the ring: pages prefetch brought over pages loaded; on the pools: blocks found on the device.
                "hit_rate": (p["hits"] / ring if ring else
                             1 - b["from_host"] / b["attended"] if b.get("attended") else None),
                "h2d_bytes_per_token_over_kv": s["bytes_moved"]["host->device"] / max(1, decode) / kv,
                "decode_tokens": decode, "seconds": seconds,
            }
            emit(row)
            log(f"  {name}@{tb:g}: NLL {row['nll']:.3f} (exact {ref_nll:.3f}), top-1 {row['top1_agreement']:.3f}, "
                f"recall {_fmt(row['recall'], 3)} (oracle {_fmt(row['recall_oracle'], 3)}), "
                f"hit {_fmt(row['hit_rate'], 3)}, "
                f"h2d/token/KV {row['h2d_bytes_per_token_over_kv']:.4f} in {seconds:.1f} s")


# -- reporting ----------------------------------------------------------------------------------------------------

def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summary_markdown(result: dict) -> str:
    """The tables: exact accuracy per task and context; accuracy of each configuration and budget on the cases
    exact solves; the suite's mean and its gap to exact; natural-text metrics."""
    from offload.report import markdown_table

    rows = result["cases"]
    exact = {r["case"]: r for r in rows if r["method"] == "exact"}
    sparse = [r for r in rows if r["method"] == "sparse"]
    tasks = [t for t in TASKS if any(r["task"] == t for r in exact.values())]
    contexts = sorted({r["context"] for r in exact.values()})
    columns = list(dict.fromkeys((r["config"], r["token_budget"]) for r in sparse))
    lines = [f"# RULER-style suite ({result.get('date')}, {result.get('model')}, format {result.get('format')}, "
             f"question {result.get('question')})", ""]
    if not exact:
        return "\n".join(lines + ["No case ran."])

    lines += ["## Exact attention: mean score (cases solved / cases)", ""]
    table, unsolved = [], []
    for t in tasks:
        cells = []
        for c in contexts:
            rs = [r for r in exact.values() if r["task"] == t and r["context"] == c]
            solved = sum(r["score"] >= 1.0 for r in rs)
            cells.append(f"{_mean([r['score'] for r in rs]):.2f} ({solved}/{len(rs)})" if rs else "-")
            if rs and solved == 0:
                unsolved.append(f"{t} at {c} (mean {_mean([r['score'] for r in rs]):.2f})")
        table.append([t] + cells)
    lines += markdown_table(["task"] + [str(c) for c in contexts], table) + [""]
    lines += [("Exact attention fully solves no case of: " + ", ".join(unsolved) + ".") if unsolved
              else "Exact attention fully solves at least one case of every task and context.", ""]

    if columns:
        lines += ["## Accuracy on the cases exact solves (config@budget; exact scores 1.00 on them)", ""]
        table = []
        for t in tasks:
            for c in contexts:
                rs = [r for r in exact.values() if r["task"] == t and r["context"] == c]
                solved = {r["case"] for r in rs if r["score"] >= 1.0}
                cells = [f"{_mean([r['score'] for r in rs]):.2f} ({len(solved)}/{len(rs)})" if rs else "-"]
                for name, tb in columns:
                    cells.append(_fmt(_mean([r["score"] for r in sparse if r["case"] in solved
                                             and r["config"] == name and r["token_budget"] == tb])))
                table.append([f"{t} {c}", *cells])
        lines += markdown_table(["task context", "exact (solved)"] + [f"{n}@{tb:g}" for n, tb in columns], table)
        lines += [""]

        lines += ["## Suite: mean accuracy on the cases exact solves, and the gap to exact", ""]
        table = []
        for name, tb in columns:
            mine = [r for r in sparse if r["config"] == name and r["token_budget"] == tb]
            per = [_mean([r["score"] for r in mine if r["context"] == c]) for c in contexts]
            acc = _mean([r["score"] for r in mine])
            ref = _mean([exact[r["case"]]["score"] for r in mine])
            table.append([name, f"{tb:g}", *map(_fmt, per), _fmt(acc),
                          "-" if acc is None else f"{acc - ref:+.2f}", str(len(mine))])
        lines += markdown_table(["config", "budget"] + [str(c) for c in contexts] + ["all", "gap", "cases"], table)
        lines += [""]

    natural = result.get("natural") or []
    if natural:
        lines += ["## Natural text: teacher-forced continuation against exact attention", ""]
        lines += markdown_table(
            ["context", "config", "budget", "NLL (exact)", "top-1", "recall (oracle, ratio)", "hit rate",
             "pages touched", "h2d/token/KV"],
            [[str(r["tokens"]), r["config"], f"{r['token_budget']:g}", f"{r['nll']:.3f} ({r['nll_exact']:.3f})",
              f"{r['top1_agreement']:.3f}",
              f"{_fmt(r['recall'], 3)} ({_fmt(r.get('recall_oracle'), 3)}, {_fmt(r.get('recall_of_oracle'), 3)})",
              _fmt(r.get("hit_rate"), 3),
              _fmt(r.get("union_pages"), 1), f"{r['h2d_bytes_per_token_over_kv']:.4f}"] for r in natural])
        lines += ["", "Recall is measured in the same run (measure_recall=True reads the other pages directly and moves "
                  "nothing); the oracle keeps the same fixed blocks and as many others of the same size, those with "
                  "the most true mass, and the ratio is recall over the oracle's. Hit rate: through the load ring "
                  "(pages on disk), the share of loaded pages prefetch brought; on the pools, the share of attended blocks already on the device. Pages touched: the "
                  "union over heads per sparse step. h2d: host->device bytes per decoded token over the KV's bytes.",
                  ""]

    timing = {}
    for r in rows:
        key = (r["context"], "exact" if r["method"] == "exact" else "sparse")
        timing.setdefault(key, []).append(r["seconds"])
    if timing:
        lines += ["## Seconds per case generation (mean)", ""]
        lines += markdown_table(["context", "exact", "sparse"],
                                [[str(c), _fmt(_mean(timing.get((c, "exact"), [])), 1),
                                  _fmt(_mean(timing.get((c, "sparse"), [])), 1)] for c in contexts])
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------------------

def add_run_arguments(ap: argparse.ArgumentParser, out: str) -> None:
    """The options every suite of this kind takes: the device's share of the KV, seed, model, output and report."""
    ap.add_argument("--device-fraction", type=float, default=0.1, help="share of the KV the device budget holds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="a model directory or .gguf file (default: the embedded SmolLM2)")
    ap.add_argument("--out", default=out)
    ap.add_argument("--report", metavar="JSON", help="print the tables of an earlier run's JSON and exit")


def run_record(script: str, argv: list[str] | None, model: str | None) -> dict:
    """The head of a run's JSON: date, machine, command and model."""
    import torch

    return {"date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"torch {torch.__version__} with {torch.get_num_threads()} threads",
            "command": " ".join([script, *(sys.argv[1:] if argv is None else argv)]),
            "model": model or "SmolLM2-135M-Instruct"}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated (default: all)")
    ap.add_argument("--contexts", help=f"prompt lengths in tokens (default {','.join(map(str, CONTEXTS))})")
    ap.add_argument("--depths", help=f"needle depths (default {','.join(map(str, DEPTHS))})")
    ap.add_argument("--budgets", help=f"sparse token budgets (default {','.join(map(str, BUDGETS))})")
    ap.add_argument("--config", action="append", metavar="NAME:key=value,...",
                    help="a sparse configuration: options passed to offload() (repeatable; default 'default:')")
    ap.add_argument("--cases-per-task", type=int, default=1, help="cases per task, context and depth (default 1)")
    ap.add_argument("--quick", action="store_true", help="2K only, depth 0.5, budget 0.1 (flags given still win)")
    ap.add_argument("--exact-only", action="store_true", help="exact attention only: no sparse runs, no natural text")
    ap.add_argument("--no-natural", action="store_true", help="skip the natural-text metrics")
    ap.add_argument("--format", default="chat", choices=("chat", "plain"),
                    help="chat: the tokenizer's chat template, the answer begun in the assistant's turn (default)")
    ap.add_argument("--question", default="both", choices=("both", "end"),
                    help="ask the question before the haystack and after it (default), or only at the end")
    ap.add_argument("--continuation", type=int, default=32, help="natural text: teacher-forced tokens")
    add_run_arguments(ap, "ruler.json")
    a = ap.parse_args(argv)

    if a.report:
        print(summary_markdown(json.load(open(a.report))))
        return 0
    try:
        tasks = [t for t in a.tasks.split(",") if t]
        for t in tasks:
            if t not in TASKS:
                raise ValueError(f"--tasks: unknown task {t!r}; known: {', '.join(TASKS)}")
        contexts = _ints(a.contexts) if a.contexts else [2048] if a.quick else list(CONTEXTS)
        depths = _floats(a.depths) if a.depths else [0.5] if a.quick else list(DEPTHS)
        budgets_ = _floats(a.budgets) if a.budgets else [0.1] if a.quick else list(BUDGETS)
        configs = [parse_config(c) for c in (a.config or ["default:"])]
        if len({n for n, _ in configs}) != len(configs):
            raise ValueError("--config: each configuration needs a name of its own")
    except ValueError as e:
        ap.error(str(e))

    from offload import offload
    from offload.models import load_model

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    model, tok = load_model(a.model, progress=False)
    log(f"model loaded in {time.perf_counter() - t0:.1f} s")
    if not a.exact_only:
        # Every configuration must be one the runtime takes: a block opened and closed before any work fails here
        # with the runtime's own message.
        for name, options in configs:
            try:
                with offload(model, **sparse_options(model, min(contexts) + 64, budgets_[0], options,
                                                     a.device_fraction)):
                    pass
            except ValueError as e:
                log(f"ruler: error: --config {name}: {e}")
                return 2

    result = {**run_record("benchmarks/ruler.py", argv, a.model), "format": a.format, "question": a.question,
              "tasks": tasks, "contexts": contexts, "depths": depths, "budgets": [] if a.exact_only else budgets_,
              "configs": [] if a.exact_only else [{"name": n, "options": o} for n, o in configs],
              "device_fraction": a.device_fraction, "cases": [], "natural": [], "interrupted": False}

    def flush() -> None:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, a.out)

    def emit_natural(row: dict) -> None:
        result["natural"].append(row)
        flush()

    exact_cache: dict[str, tuple[str, float]] = {}  # the prompt -> exact output and seconds (greedy: deterministic)
    try:
        for context in contexts:
            cases = make_cases(tok, tasks, [context], depths, a.cases_per_task, a.seed, a.format,
                               a.question == "both")
            for i, case in enumerate(cases):
                ids = tok(case.prompt, add_special_tokens=False)["input_ids"]
                if case.prompt not in exact_cache:
                    exact_cache[case.prompt] = generate(model, tok, ids, case.max_new_tokens)
                out, seconds = exact_cache[case.prompt]
                row = case_row(case, len(ids), "exact", out, seconds)
                result["cases"].append(row)
                flush()
                log(f"[{context} {i + 1}/{len(cases)}] {case.name} ({len(ids)} tokens): exact {row['score']:.2f} "
                    f"in {seconds:.1f} s: {out.strip()!r}")
                if a.exact_only or row["score"] < 1.0:
                    continue
                for tb in budgets_:
                    for name, options in configs:
                        opts = sparse_options(model, len(ids) + case.max_new_tokens, tb, options, a.device_fraction)
                        with offload(model, **opts) as rt:
                            out, seconds = generate(model, tok, ids, case.max_new_tokens)
                            attended = rt.stats()["attended_fraction"]
                        row = case_row(case, len(ids), "sparse", out, seconds, config=name, options=options,
                                       token_budget=tb, attended_fraction=attended)
                        result["cases"].append(row)
                        flush()
                        log(f"    {name}@{tb:g}: {row['score']:.2f} in {seconds:.1f} s: {out.strip()!r}")
            if not (a.exact_only or a.no_natural):
                natural_rows(model, tok, context, budgets_, configs, a.continuation, a.device_fraction, log,
                             emit_natural)
    except KeyboardInterrupt:
        result["interrupted"] = True
        log("interrupted: reporting what ran")
    result["seconds"] = time.perf_counter() - t0
    flush()
    print(summary_markdown(result))
    log(f"wrote {a.out}")
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
