"""Tiny randomly initialised transformers models for tests (no download, a few ms per call)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int, vocab: int = 48, hidden: int = 32, layers: int = 2, max_positions: int = 128):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_pair(seed: int = 0, noise: float = 0.02, **kw):
    """A verifier and a drafter that is the verifier's weights plus noise: they agree often, not always."""
    verifier = tiny_llama(seed, **kw)
    drafter = tiny_llama(seed, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for prm in drafter.parameters():
            prm.add_(torch.randn(prm.shape, generator=g) * noise * (prm.std() if prm.numel() > 1 else 1.0))
    return drafter, verifier


def tiny_qwen2(seed: int):
    """A tiny Qwen2 (q/k/v projections with biases, set random so that a dropped bias would show)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model
