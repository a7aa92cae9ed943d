"""A backend for any ``transformers`` causal LM, with a dynamic KV cache and masked rollback.

Rows of a batch advance by different numbers of tokens per block. All rows share one cache
length; a slot a row does not use (left padding, a rejected draft, padding of a ragged feed) is
masked out of attention by the 2-D ``attention_mask``, and each row's ``position_ids`` count only
its real tokens, so a row's logits are exactly those of its own sequence. Slots that no row uses
any more are cropped from the end of the cache after each commit; at batch size 1 this is an
exact rollback and the cache never holds a hole.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import SpecCascadeError


def cache_keyword(model) -> str:
    """The keyword ``model.forward`` takes its KV cache by: transformers renamed ``past_key_values``
    to ``cache`` (5.2x); whichever this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _new_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # older signature
        return DynamicCache()


class HFBackend:
    #: ``reset_hidden`` / ``extend_hidden`` give the model's last hidden states (this class's own
    #: ``_forward``; a subclass with another model call sets it False)
    gives_states = True

    def __init__(self, model: torch.nn.Module, name: str = "model"):
        if not hasattr(model, "config") or not callable(getattr(model, "forward", None)):
            raise SpecCascadeError(
                f"{name} must be a transformers causal LM (AutoModelForCausalLM), got {type(model).__name__}")
        if getattr(model.config, "is_encoder_decoder", False):
            raise SpecCascadeError(f"the {name} ({type(model).__name__}) is an encoder-decoder model; this backend "
                                   f"({type(self).__name__}) is for decoder-only causal LMs: use the seq2seq backend "
                                   f"(speccascade.models.Seq2SeqBackend, backend 'seq2seq' / 'dynamic' / 'auto')")
        self.model = model.eval()
        self.name = name
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab_size = int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self.cache = None
        self._cache_kw = cache_keyword(model)
        self._keep_hidden = False   # keep the last hidden states of each call (extend_hidden)
        self.hidden = None
        self.state_size = getattr(model.config, "hidden_size", None)   # their width

    # -- the Backend interface -----------------------------------------------------------------

    @torch.no_grad()
    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        input_ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device).bool()
        self.cache = _new_cache(self.model.config)
        self.valid = mask[:, :-1].clone()              # [B, slots] which cache slots each row uses
        self.n_pos = self.valid.sum(1)                  # [B] real tokens cached (committed + tentative)
        self.n_committed = self.n_pos.clone()           # [B]
        self.n_tentative_slots = 0
        if input_ids.shape[1] > 1:
            positions = (self.valid.long().cumsum(1) - 1).clamp_min(0)
            self._forward(input_ids[:, :-1], self.valid, positions)

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        logits = masked_feed(self, tokens, lengths)
        self.n_tentative_slots += tokens.shape[1]
        return logits

    # -- the verifier's states, for a drafter that reads them (models.features) ----------------

    @torch.no_grad()
    def reset_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """:meth:`reset`, returning the last hidden states (after the final norm) of the cached prompt
        tokens  # [B, L - 1, H]  (None for one-token prompts: nothing is cached)."""
        self._keep_hidden, self.hidden = True, None
        try:
            self.reset(input_ids, attention_mask)
        finally:
            self._keep_hidden = False
        return None if self.hidden is None else self.hidden.float()

    @torch.no_grad()
    def extend_hidden(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None):
        """:meth:`extend`, returning the logits  # [B, k, V]  and the last hidden states (after the
        final norm: what the head reads)  # [B, k, H]."""
        self._keep_hidden = True
        try:
            logits = self.extend(tokens, lengths)
        finally:
            self._keep_hidden = False
        return logits, self.hidden.float()

    @torch.no_grad()
    def commit(self, n_keep: torch.Tensor) -> None:
        t = self.n_tentative_slots
        if t:
            tentative = self.valid[:, -t:]
            kept = tentative & (tentative.long().cumsum(1) <= n_keep.to(self.device).unsqueeze(1))
            self.valid = torch.cat([self.valid[:, :-t], kept], dim=1)
            self.n_pos = self.n_committed + kept.sum(1)
        self.n_committed = self.n_pos.clone()
        self.n_tentative_slots = 0
        self._drop_unused_slots()

    def _drop_unused_slots(self) -> None:
        """Crop cache slots that no row uses any more from the end (a host sync)."""
        used = self.valid.any(0).nonzero()
        keep_slots = int(used.max()) + 1 if used.numel() else 0
        drop = self.valid.shape[1] - keep_slots
        if drop > 0:
            self.cache.crop(-drop)
            self.valid = self.valid[:, :keep_slots]

    # -- internals ----------------------------------------------------------------------------

    def _inputs(self, tokens: torch.Tensor) -> dict:
        """The model's inputs for ``tokens`` (a feature drafter's backend feeds embeddings instead)."""
        return {"input_ids": tokens}

    def _forward(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(**self._inputs(tokens), attention_mask=mask.long(), position_ids=positions, use_cache=True,
                         output_hidden_states=self._keep_hidden, **{self._cache_kw: self.cache})
        self.hidden = out.hidden_states[-1] if self._keep_hidden else None
        return out.logits


def masked_feed(backend, tokens: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Feed ``tokens  # [B, k]`` after each row's cached ones in new slots at the end of the cache,
    row b's first ``lengths[b]`` real (the rest masked out), positions counting real tokens only;
    updates ``backend.valid`` / ``backend.n_pos``. Shared by the dynamic and seq2seq backends
    (``backend._forward(tokens, mask, positions)`` is the model call).  # -> [B, k, V] float32"""
    tokens = tokens.to(backend.device)
    B, k = tokens.shape
    offsets = torch.arange(k, device=backend.device).unsqueeze(0)                  # [1, k]
    new_valid = (offsets < lengths.to(backend.device).unsqueeze(1)) if lengths is not None \
        else torch.ones(B, k, dtype=torch.bool, device=backend.device)            # [B, k]
    positions = backend.n_pos.unsqueeze(1) + offsets                               # [B, k]
    if backend.max_positions:
        positions = positions.clamp(max=backend.max_positions - 1)  # only padding can reach it
    mask = torch.cat([backend.valid, new_valid], dim=1)
    logits = backend._forward(tokens, mask, positions)
    backend.valid = mask
    backend.n_pos = backend.n_pos + new_valid.sum(1)
    return logits.float()
