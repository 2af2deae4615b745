"""Passkey retrieval prompts: a number hidden at a chosen depth in filler text, asked for at the end."""

from __future__ import annotations

import random

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there. ")
QUESTION = " What is the pass key? The pass key is"


def passkey_ids(tokenizer, tokens: int, depth: float, seed: int = 0) -> tuple[list[int], str]:
    """Token ids of a prompt of about `tokens` tokens with the key at relative `depth`, and the key."""
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenizer(PREFIX + needle + QUESTION)["input_ids"])
    per = len(tokenizer(FILLER)["input_ids"])
    reps = max(1, (tokens - fixed) // per)
    before = int(reps * depth)
    text = PREFIX + FILLER * before + needle + FILLER * (reps - before) + QUESTION
    return tokenizer(text)["input_ids"], key
