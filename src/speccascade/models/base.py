"""The backend interface between the decoding loops and a model.

A backend holds one model and, between ``reset`` and the end of a generation, one KV cache for a
batch of rows. Tokens are first fed *tentatively* (``extend``) and then kept or dropped
(``commit``), so a rejected suffix costs nothing to undo: no recomputation, no copy.

Contract (B rows, each with its own length):

* ``reset(input_ids, attention_mask)``: start a generation from left-padded prompts. Every prompt
  token but the last of each row is cached; the last is *pending* and is fed by the first
  ``extend``.
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
  passed validation never runs out of cache.
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


def as_backend(model, name: str) -> Backend:
    """A backend for ``model``: a backend is returned as is, a ``transformers`` model is wrapped."""
    if isinstance(model, Backend) and not isinstance(model, torch.nn.Module):
        return model
    from .dynamic import HFBackend

    return HFBackend(model, name=name)
