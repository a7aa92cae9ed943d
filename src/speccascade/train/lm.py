"""Train a small Llama language model on a token stream (a drafter for a pretrained verifier).

Used for the SmolLM2-135M drafter: the drafter shares SmolLM2's tokenizer and is trained with
next-token loss on English text tokenised by it (no hub: the verifier's weights are not needed for
this step). Sequences are packed windows of ``seq_len`` tokens from the stream.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .trainer import Shape, optimizer_step


def train_lm(tokens: np.ndarray, vocab_size: int, shape: Shape, out: Path, device: str = "cuda", seq_len: int = 256,
             batch_size: int = 64, lr: float = 2e-3, max_minutes: float = 5.0, epochs: float = 4.0,
             val_fraction: float = 0.02, seed: int = 0, bos_token_id=None, eos_token_id=None) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    dev = torch.device(device)
    data = torch.from_numpy(tokens.astype(np.int64))
    n_val = int(len(data) * val_fraction)
    train, val = data[:-n_val], data[-n_val:]
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=bos_token_id,
                      eos_token_id=eos_token_id)
    model = LlamaForCausalLM(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98), fused=True)
    windows = (len(train) - 1) // seq_len
    total = max(1, int(epochs * windows / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    gen = torch.Generator().manual_seed(seed)
    log = {"params": sum(p.numel() for p in model.parameters()), "train_tokens": len(train), "val_tokens": len(val),
           "shape": shape.__dict__, "evals": []}
    start, step = time.perf_counter(), 0

    def batch_from(stream, starts):
        x = torch.stack([stream[s:s + seq_len + 1] for s in starts]).to(dev)
        return x[:, :-1], x[:, 1:]

    @torch.no_grad()
    def val_loss():
        model.eval()
        starts = list(range(0, len(val) - seq_len - 1, seq_len))[:64]
        x, y = batch_from(val, starts)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(input_ids=x).logits.float()
        model.train()
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))

    model.train()
    while step < total and time.perf_counter() - start < max_minutes * 60:
        starts = torch.randint(0, len(train) - seq_len - 1, (batch_size,), generator=gen).tolist()
        x, y = batch_from(train, starts)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer_step(loss, model, opt, sched)
        step += 1
        if step % 250 == 0 or step == total:
            log["evals"].append({"step": step, "train_loss": loss.item(), "val_loss": val_loss(),
                                 "seconds": time.perf_counter() - start})
    log["steps"], log["train_seconds"] = step, time.perf_counter() - start
    log["final_val_loss"] = val_loss()
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu", torch.float16).save_pretrained(str(out), safe_serialization=True)
    (out / "training.json").write_text(json.dumps(log, indent=2))
    return log
