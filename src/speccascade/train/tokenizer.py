"""The byte-level BPE tokenizer shared by the Bible translation models, and the prompt format.

Prompt format (documented in the README): ``<s>{english}<2es>``; the model continues with
``{spanish}</s>``. Token ids: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<2es>`` = 3.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<2es>"]
PAD, BOS, EOS, SEP = 0, 1, 2, 3


def train_tokenizer(texts, vocab_size: int = 8000):
    """Train a byte-level BPE on ``texts``; returns a ``transformers`` fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<2es>"])


def load_tokenizer(path: str | Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def encode_prompt(tokenizer, english: str) -> list[int]:
    return [BOS] + tokenizer.encode(english, add_special_tokens=False) + [SEP]


def encode_target(tokenizer, spanish: str) -> list[int]:
    return tokenizer.encode(spanish, add_special_tokens=False) + [EOS]


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([i for i in ids if i > SEP], skip_special_tokens=True).strip()
