"""The static backend: a pre-allocated, position-indexed KV cache (transformers' ``StaticCache``),
every model call at one of a few fixed shapes, optionally under ``torch.compile`` with CUDA graphs.

Works for any transformers causal LM whose cache is a ``StaticCache``. Its slot pointer is host
state (one slot range per call), so its calls can be compiled or captured one by one but the loop
around them cannot: the fused backend (:mod:`.fused`) is the one whose whole block is captured.
"""

from __future__ import annotations

import torch

from ..errors import SpecCascadeError
from .dynamic import HFBackend


def bucket(k: int) -> int:
    """The width a compiled call is padded to: 1, then powers of two up to 64, then multiples of
    128 (so a ragged feed or a prompt of any length meets one of a few captured shapes)."""
    if k <= 1:
        return 1
    if k <= 64:
        return 1 << (k - 1).bit_length()
    return -(-k // 128) * 128


def _raise_recompile_limit(n: int = 64) -> None:
    # each (backend, width) pair is one specialisation of the same step function
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name) and getattr(torch._dynamo.config, name) < n:
            setattr(torch._dynamo.config, name, n)


class StaticHFBackend(HFBackend):
    """The same contract over a pre-allocated, position-indexed KV cache (transformers'
    ``StaticCache``) of ``max_cache_len`` slots, with every model call at a fixed shape.

    * Slots are used in order and never cropped or copied: a rejected suffix, left padding and the
      padding of a ragged feed stay in their slots, masked out of attention (holes). Rollback is a
      change of the mask and of each row's position count, on the device: no host sync.
    * All bookkeeping (write the new tokens' mask bits at the next slots, each row's positions,
      advance the counters) lives in device tensors at fixed addresses and runs inside one step
      function with the model call, so under ``compile=True`` (``torch.compile``, mode
      ``reduce-overhead``: CUDA graphs on a GPU) a whole model call is one graph replay. A commit
      is a few small eager kernels (compiling it would add a graph per tentative width).
    * Feeds are padded to a few widths (:func:`bucket`: 1, 2, 4, 8, ..., 64, then multiples of
      128; prompts to at least 64), so ragged feeds and prompts of any length reuse a handful of
      captured graphs.

    The cache (and the captured graphs) are kept across generations of the same batch size.
    """

    gives_states = False   # (its own model call keeps no hidden states)

    def __init__(self, model: torch.nn.Module, name: str = "model", max_cache_len: int = 1024, compile: bool = False):
        super().__init__(model, name)
        self.max_cache_len = max_cache_len
        self.max_positions = min(self.max_positions, max_cache_len) if self.max_positions else max_cache_len
        self.compiled = compile
        self._static = None
        self._static_batch = None
        if compile:
            _raise_recompile_limit()
            self._step_fn = torch.compile(self._step, mode="reduce-overhead", dynamic=False)
        else:
            self._step_fn = self._step

    # -- the Backend interface -----------------------------------------------------------------

    @torch.no_grad()
    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        input_ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device).long()
        B, L = input_ids.shape
        if self._prepare(B):
            # a new cache allocates its tensors on the first call: make that call eagerly (one
            # masked dummy token), outside any compiled graph, then start clean
            dummy = torch.zeros(B, 1, dtype=torch.long, device=self.device)
            self._step(dummy, dummy)
            self._prepare(B)
            self._on_new_cache(B)
        self.slots, self.n_tentative_slots = 0, 0
        if L > 1:  # cache all prompt tokens but the last, left-padded to a bucket width
            pad = bucket(max(L - 1, 64)) - (L - 1)  # prompts: 64, 128, 256, ... slots
            tokens = torch.nn.functional.pad(input_ids[:, :-1], (pad, 0))
            valid = torch.nn.functional.pad(mask[:, :-1], (pad, 0))
            self._call(tokens, valid)
            self.n_tentative_slots = 0
            self._n_committed.copy_(self._n_pos)

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        tokens = tokens.to(self.device)
        B, k = tokens.shape
        width = bucket(k)
        if lengths is None:  # every row feeds k real tokens: a constant mask, no kernel
            valid = self._full_valid.get((B, k, width))
            if valid is None:
                valid = self._full_valid[(B, k, width)] = (self._ar[:width] < k).long().expand(B, width).contiguous()
        else:
            valid = (self._ar[:width].unsqueeze(0) < lengths.to(self.device).unsqueeze(1)).long()  # [B, width]
        if width > k:
            tokens = torch.nn.functional.pad(tokens, (0, width - k))
        elif self.compiled:
            tokens = self._canonical(tokens)
        logits = self._call(tokens, valid)[:, :k]
        # a CUDA graph's output is overwritten by its next replay: the caller gets its own copy
        return logits.to(torch.float32, copy=self.compiled)                                    # [B, k, V]

    @torch.no_grad()
    def commit(self, n_keep: torch.Tensor) -> None:
        if self.n_tentative_slots:
            self._commit_step(n_keep.to(self.device).long(), self.n_tentative_slots)
        self._n_committed.copy_(self._n_pos)
        self.n_tentative_slots = 0

    def check_capacity(self, prompt_len: int, max_new_tokens: int, gamma: int | None) -> None:
        """Refuse, before decoding, a request that could run out of slots (slots are used
        append-only, so the need depends on how many drafts get rejected): the prompt's bucket,
        plus, per block (at most ``max_new_tokens`` of them, and one more computed past the end
        on a GPU), the widest call this model makes in it. ``gamma=None``: one token per call."""
        prompt = bucket(max(prompt_len - 1, 64)) if prompt_len > 1 else 0
        per_block = 1 if gamma is None else (bucket(gamma + 1) if self.name == "verifier" else gamma + 1)
        need = prompt + (max_new_tokens + 1) * per_block
        if need > self.max_cache_len:
            raise SpecCascadeError(
                f"the {self.name}'s static cache of {self.max_cache_len} slots can run out on this request: it "
                f"needs up to {need} ({prompt} for the prompt + {max_new_tokens + 1} blocks x {per_block}, since "
                f"rolled-back slots are not reused); raise max_cache_len to {need}, or use the fused backend, "
                "whose position-indexed cache is sized per request")

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def _canonical(tokens: torch.Tensor) -> torch.Tensor:
        """Canonical strides for a compiled step: a [B, 1] view of a longer tensor would recompile it."""
        return tokens.clone(memory_format=torch.contiguous_format)

    def _on_new_cache(self, batch: int) -> None:
        """Called once a new cache exists (its tensors allocated, its state zero); subclasses
        capture graphs here."""

    def _prepare(self, batch: int) -> bool:
        """Reset (or first build) the cache and the device state; True if newly built."""
        from transformers import StaticCache

        if self._static is not None and self._static_batch == batch:
            self._static.reset()
            self._mask.zero_()
            self._n_pos.zero_()
            self._n_committed.zero_()
            self._slot.zero_()
            return False
        self.cache = self._static = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
        self._static_batch = batch
        dev = self.device
        self._mask = torch.zeros(batch, self.max_cache_len, dtype=torch.long, device=dev)  # which slots a row uses
        self._n_pos = torch.zeros(batch, dtype=torch.long, device=dev)          # real tokens cached per row
        self._n_committed = torch.zeros(batch, dtype=torch.long, device=dev)
        self._slot = torch.zeros((), dtype=torch.long, device=dev)              # next free slot
        self._ar = torch.arange(self.max_cache_len, device=dev)
        self._full_valid = {}
        for t in (self._mask, self._n_pos, self._n_committed, self._slot, self._ar):
            torch._dynamo.mark_static_address(t)
        return True

    def _call(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        width = tokens.shape[1]
        if self.slots + width > self.max_cache_len:
            raise SpecCascadeError(f"the {self.name}'s static cache is full ({self.max_cache_len} slots); "
                                   "raise max_cache_len")
        self.slots += width
        self.n_tentative_slots += width
        return self._step_fn(tokens, valid)

    def _step(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One model call on ``tokens  # [B, w]`` (``valid``: which are real) at the next w slots."""
        w = tokens.shape[1]
        self._mask.index_copy_(1, self._slot + self._ar[:w], valid)
        positions = (self._n_pos.unsqueeze(1) + valid.cumsum(1) - 1).clamp(0, self.max_positions - 1)
        logits = self.model(input_ids=tokens, attention_mask=self._mask, position_ids=positions, use_cache=True,
                            **{self._cache_kw: self._static}).logits
        self._n_pos.add_(valid.sum(1))
        self._slot.add_(w)
        return logits

    def _commit_step(self, n_keep: torch.Tensor, t: int) -> None:
        """Of the last ``t`` (tentative) slots, each row keeps the mask bits of its first ``n_keep``
        real tokens. The host knows where those slots are (``self.slots`` counts every slot fed), so
        they are a view of the mask: a few small kernels, no host sync."""
        tentative = self._mask[:, self.slots - t:self.slots]                                  # [B, t] view
        tentative.mul_(tentative.cumsum(1) <= n_keep.unsqueeze(1))
        torch.add(self._n_committed, tentative.sum(1), out=self._n_pos)
