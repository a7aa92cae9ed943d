"""The byte-level BPE tokenizer shared by the Bible translation models.

The prompt format lives in :mod:`speccascade.data.prompt` (evaluation and serving need it without
the training code); it is re-exported here for existing imports.
"""

from __future__ import annotations

from pathlib import Path

from ..data.prompt import BOS, EOS, PAD, SEP, SPECIALS, decode, encode_prompt, encode_target

__all__ = ["BOS", "EOS", "PAD", "SEP", "SPECIALS", "decode", "encode_prompt", "encode_target", "load_tokenizer",
           "train_tokenizer"]


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
