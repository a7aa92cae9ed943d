"""The prompt format of the shipped Bible translation models (no training code needed to use it).

Format: ``<s>{english}<2es>``; the model continues with ``{spanish}</s>``. Token ids of the shared
tokenizer's special tokens: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<2es>`` = 3.
"""

from __future__ import annotations

SPECIALS = ["<pad>", "<s>", "</s>", "<2es>"]
PAD, BOS, EOS, SEP = 0, 1, 2, 3


def encode_prompt(tokenizer, english: str) -> list[int]:
    """``<s>{english}<2es>`` as token ids."""
    return [BOS] + tokenizer.encode(english, add_special_tokens=False) + [SEP]


def encode_target(tokenizer, spanish: str) -> list[int]:
    """``{spanish}</s>`` as token ids (the training target)."""
    return tokenizer.encode(spanish, add_special_tokens=False) + [EOS]


def decode(tokenizer, ids: list[int]) -> str:
    """The text of generated ids, special tokens dropped."""
    return tokenizer.decode([i for i in ids if i > SEP], skip_special_tokens=True).strip()
