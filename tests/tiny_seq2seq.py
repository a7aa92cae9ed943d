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


# -- shared by the seq2seq and fused T5 tests ------------------------------------------------------

N_ROWS, N_TOKENS, LEVEL, GAMMA = 20_000, 3, 1e-3, 2   # the law tests: rows, tokens, significance, gamma
SOURCES = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]

LAW_MODELS = {  # kind -> (vocab, model options, encoder input)
    "t5": (5, dict(hidden=16, heads=2, noise=0.3), [3, 4, 2]),
    "bart": (6, dict(hidden=16, heads=2, init_std=0.5, noise=0.3), [0, 3, 4, 5, 2]),
}


def decoder_logits(model, src):
    """Fresh next-token logits after a decoder prefix, the encoder input fixed (memoised)."""
    memo = {}

    def at(prefix):
        key = tuple(prefix)
        if key not in memo:
            with torch.no_grad():
                memo[key] = model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([list(prefix)])
                                  ).logits[0, -1].double().numpy()
        return memo[key]
    return at


def hf_greedy(model, src, n):
    out = model.generate(torch.tensor([src]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                         eos_token_id=None, num_beams=1)
    assert out[0, 0].item() == model.config.decoder_start_token_id
    return out[0, 1:].tolist()


def law_models(kind: str):
    """The law tests' pair of ``kind`` (LAW_MODELS), its encoder input and both decoders' memoised
    logits: ``(drafter, verifier, src, lq, lp)``."""
    vocab, options, src = LAW_MODELS[kind]
    d, v = tiny_seq2seq_pair(kind, seed=1, vocab=vocab, **options)
    if kind == "t5":  # make the decoder's relative positions matter (a misplaced token changes the law)
        with torch.no_grad():
            for m in (d, v):
                m.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(12.0)
    return d, v, src, decoder_logits(d, src), decoder_logits(v, src)
