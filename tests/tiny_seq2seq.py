"""Tiny randomly initialised encoder-decoder models for tests (no download): T5, BART, Marian."""

import torch


def tiny_seq2seq(kind: str, seed: int = 0, vocab: int = 48, hidden: int = 32, layers: int = 2, heads: int = 4,
                 max_positions: int = 64, **extra):
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        MarianConfig,
        MarianMTModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(seed)
    if kind == "t5":
        cfg = T5Config(vocab_size=vocab, d_model=hidden, d_kv=hidden // heads, d_ff=2 * hidden, num_layers=layers,
                       num_decoder_layers=layers, num_heads=heads, relative_attention_num_buckets=8,
                       relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                       dropout_rate=0.0, **extra)
        return T5ForConditionalGeneration(cfg).eval()
    common = dict(vocab_size=vocab, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
                  encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * hidden,
                  decoder_ffn_dim=2 * hidden, max_position_embeddings=max_positions, dropout=0.0,
                  attention_dropout=0.0, activation_dropout=0.0, forced_eos_token_id=None, forced_bos_token_id=None,
                  **extra)
    if kind == "bart":
        cfg = BartConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, **common)
        return BartForConditionalGeneration(cfg).eval()
    if kind == "marian":
        cfg = MarianConfig(pad_token_id=vocab - 1, eos_token_id=0, decoder_start_token_id=vocab - 1,
                           decoder_vocab_size=vocab, **common)
        return MarianMTModel(cfg).eval()
    raise KeyError(kind)


def tiny_seq2seq_pair(kind: str, seed: int = 0, noise: float = 0.02, **kw):
    """A verifier and a drafter that is the verifier's weights plus noise: they agree often, not always."""
    verifier = tiny_seq2seq(kind, seed, **kw)
    drafter = tiny_seq2seq(kind, seed, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for prm in drafter.parameters():
            if prm.requires_grad:
                prm.add_(torch.randn(prm.shape, generator=g) * noise * (prm.std() if prm.numel() > 1 else 1.0))
    return drafter, verifier
