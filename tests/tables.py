"""Tiny "models" whose next-token logits are a known function of the whole prefix.

``TableBackend`` implements the :class:`speccascade.models.Backend` contract exactly (tentative
feeds, commit of the first n_keep real tokens per row) over a table of logits indexed by a hash of
the prefix, so the exact law of any decoding method can be enumerated in the tests.
"""

from __future__ import annotations

import numpy as np
import torch

MODULUS = 101
BASE = 7


def make_table(seed: int, vocab: int, sharp=(0.3, 1.0, 3.0)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(MODULUS, vocab, generator=g, dtype=torch.float64)
    scale = torch.tensor(sharp, dtype=torch.float64)[torch.randint(len(sharp), (MODULUS, 1), generator=g)]
    return logits * scale


def prefix_hash(tokens) -> int:
    h = 0
    for i, t in enumerate(tokens):
        h = (h + (int(t) + 1) * pow(BASE, i, MODULUS)) % MODULUS
    return h


class TableBackend:
    def __init__(self, table: torch.Tensor, name: str = "table", max_len: int = 64):
        self.table = table
        self.name = name
        self.vocab_size = table.shape[1]
        self.max_positions = None
        self.device = torch.device("cpu")
        self.max_len = max_len
        self.powers = torch.tensor([pow(BASE, i, MODULUS) for i in range(max_len)], dtype=torch.long)

    def logits_for(self, prefix) -> torch.Tensor:
        return self.table[prefix_hash(prefix)]

    def reset(self, input_ids, attention_mask):
        B, L = input_ids.shape
        self.hist = torch.zeros(B, self.max_len, dtype=torch.long)
        n = attention_mask.sum(1)
        for b in range(B):
            self.hist[b, : int(n[b])] = input_ids[b, L - int(n[b]):]
        self.n_committed = n - 1          # the last prompt token is pending
        self.n_tentative = torch.zeros(B, dtype=torch.long)

    def extend(self, tokens, lengths=None):
        B, k = tokens.shape
        lengths = torch.full((B,), k) if lengths is None else lengths
        rows = torch.arange(B)
        out = torch.zeros(B, k, self.vocab_size, dtype=self.table.dtype)
        for i in range(k):
            live = i < lengths
            at = self.n_committed + self.n_tentative
            self.hist[rows[live], at[live]] = tokens[live, i]
            self.n_tentative += live.long()
            n = self.n_committed + self.n_tentative
            mask = torch.arange(self.max_len).unsqueeze(0) < n.unsqueeze(1)
            h = (((self.hist + 1) * self.powers) * mask).sum(1) % MODULUS
            out[:, i] = self.table[h]
        return out

    def commit(self, n_keep):
        self.n_committed = self.n_committed + torch.minimum(n_keep, self.n_tentative)
        self.n_tentative = torch.zeros_like(self.n_tentative)


def dist_fn(table: torch.Tensor, transform):
    """prefix -> transform(logits as numpy)."""
    return lambda prefix: transform(table[prefix_hash(prefix)].numpy())


def as_np(x):
    return np.asarray(x, dtype=np.float64)
