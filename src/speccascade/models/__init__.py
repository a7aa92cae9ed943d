"""Model backends: next-token logits for blocks of tokens, with a KV cache per model.

``base.Backend`` is the interface the decoding loops use; ``hf.HFBackend`` wraps any
``transformers`` causal LM with a dynamic cache, ``hf.StaticHFBackend`` with a pre-allocated one
(optionally compiled: the GPU fast path); ``make_backend`` picks one by name. ``as_backend`` turns
a model (or a backend) into a backend.
"""

from .base import Backend, as_backend
from .hf import BACKENDS, GraphHFBackend, HFBackend, StaticHFBackend, make_backend

__all__ = ["BACKENDS", "Backend", "GraphHFBackend", "HFBackend", "StaticHFBackend", "as_backend", "make_backend"]
