"""A tiny random-weight Llama saved to disk with a small byte-level BPE tokenizer trained here (no hub access):
what the command-line tests load by path (the `tiny_model_dir` fixture in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from offload.models import tiny_llama

MAX_POSITIONS = 256
CORPUS = (
    "The pump station on the north bank moves water from the river to the reservoir. Each pump has a motor, "
    "a valve and a meter. When the level in the reservoir falls, the controller starts another pump; when it "
    "rises, the controller stops one. The operators read the meters every morning and write the numbers in a "
    "log, so that the engineers can see how much water moved and how much power it took."
)


def train_tokenizer(directory: Path):
    """A byte-level BPE tokenizer with a chat template; ids 0-2 are <unk>, <s>, </s> like LlamaConfig's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS] * 8, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<s>user: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(directory)
    return fast



def save_tiny_model(directory: Path) -> Path:
    """The tokenizer and a 2-layer Llama of MAX_POSITIONS positions, saved in `directory`."""
    tokenizer = train_tokenizer(directory)
    tiny_llama(vocab=len(tokenizer), max_positions=MAX_POSITIONS, seed=1).save_pretrained(directory)
    return directory
