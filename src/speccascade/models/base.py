"""The backend interface between the decoding loops and a model.

A backend holds one model and, between ``reset`` and the end of a generation, one KV cache for a
batch of rows. Tokens are first fed *tentatively* (``extend``) and then kept or dropped
(``commit``), so a rejected suffix costs nothing to undo: no recomputation, no copy.

Contract (B rows, each with its own length):

* ``reset(input_ids, attention_mask)``: start a generation from left-padded prompts. Every prompt
  token but the last of each row is cached; the last is *pending* and is fed by the first
  ``extend``.
* ``first_pending(input_ids) -> [B]`` (optional): each row's first pending token. Default
  (:func:`first_pending`): the prompt's last token. An encoder-decoder backend
  (``encoder_decoder = True``, :mod:`.seq2seq`) takes ``input_ids`` as the encoder's input and
  starts the decoder from its ``decoder_start_token_id``; its ``max_positions`` bounds the
  decoder's tokens (start token + new tokens + one block), ``max_source_positions`` the encoder's.
* ``extend(tokens, lengths=None) -> logits``: feed ``tokens  # [B, k]`` after each row's
  tentative tokens; row b uses only its first ``lengths[b]`` tokens (the rest are padding and
  are never attended to). Returns ``logits  # [B, k, V]``: position i gives the next-token
  logits after token i.
* ``commit(n_keep)``: of the tokens fed since the last commit, row b keeps its first
  ``n_keep[b]`` real ones and forgets the rest.

* ``reset`` and ``commit`` return nothing; ``extend``'s logits live on ``device`` (the same device
  for both models of a pair), float32.
* Capacity: ``max_positions`` bounds prompt + new tokens + one block (``generate`` checks it before
  decoding). A backend with a fixed-size cache also has ``reserve(batch, length)``, which
  ``generate`` calls first with the longest sequence the request can reach, so a decode that
  passed validation never runs out of cache. An encoder-decoder's ``reserve(batch, length,
  source_length=...)`` (:mod:`.fused_t5`) counts decoder tokens in ``length`` (start token + new
  tokens + one block) and sizes its cross-attention buffers for ``source_length`` encoder tokens.
* ``capturable = True`` (optional) promises that ``extend`` and ``commit`` make no host read and
  keep no host-side state: the loop around them can then be captured as one CUDA graph
  (:mod:`speccascade.runner`). Such a backend also carries ``generation``, bumped whenever its
  cache tensors are reallocated (captured graphs hold the old ones).

Backends (one per file, picked by name): :mod:`speccascade.models`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Backend(Protocol):
    name: str
    vocab_size: int            # the width of the logits
    max_positions: int | None  # the longest sequence the model accepts (None: unbounded)
    device: torch.device

    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None: ...

    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor: ...

    def commit(self, n_keep: torch.Tensor) -> None: ...


def first_pending(backend, input_ids: torch.Tensor) -> torch.Tensor:
    """Each row's first pending token  # [B]: ``backend.first_pending(input_ids)`` where the
    backend defines it (encoder-decoders: the decoder start token), else the prompt's last token."""
    fn = getattr(backend, "first_pending", None)
    return fn(input_ids) if fn is not None else input_ids[:, -1]


def is_encoder_decoder(model) -> bool:
    """True for a ``transformers`` encoder-decoder model or a backend holding one."""
    if getattr(model, "encoder_decoder", False):
        return True
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def reserve_request(backend, batch: int, input_len: int, max_new_tokens: int, gamma: int) -> None:
    """Size ``backend``'s per-request cache, where it has one (``reserve``), for the longest
    sequence a request can reach: ``input_len`` prompt tokens + new tokens + one block; for an
    encoder-decoder, the decoder's start token + new tokens + one block, and ``input_len`` encoder
    tokens for its cross-attention buffers."""
    if not hasattr(backend, "reserve"):
        return
    if getattr(backend, "encoder_decoder", False):
        backend.reserve(batch, 1 + max_new_tokens + gamma + 1, source_length=input_len)
    else:
        backend.reserve(batch, input_len + max_new_tokens + gamma + 1)


def prefill_calls(backend, input_ids: torch.Tensor) -> int:
    """Pre-fill passes ``reset`` makes: the encoder's (always) or the prompt's (if longer than one token)."""
    return 1 if getattr(backend, "encoder_decoder", False) or input_ids.shape[1] > 1 else 0


def as_backend(model, name: str) -> Backend:
    """A backend for ``model``: a backend is returned as is, a ``transformers`` model is wrapped
    (an encoder-decoder in :class:`.seq2seq.Seq2SeqBackend`, a feature drafter in
    :class:`.features.FeatureHFBackend`, another causal LM in :class:`.dynamic.HFBackend`)."""
    if isinstance(model, Backend) and not isinstance(model, torch.nn.Module):
        return model
    if is_encoder_decoder(model):
        from .seq2seq import Seq2SeqBackend

        return Seq2SeqBackend(model, name=name)
    from .features import FeatureHFBackend, is_feature_drafter

    if is_feature_drafter(model):
        return FeatureHFBackend(model, name=name)
    from .dynamic import HFBackend

    return HFBackend(model, name=name)
