"""Model backends: next-token logits for blocks of tokens, with a KV cache per model.

``base.Backend`` is the interface the decoding loops use; ``hf.HFBackend`` wraps any
``transformers`` causal LM. ``as_backend`` turns a model (or a backend) into a backend.
"""

from .base import Backend, as_backend
from .hf import HFBackend, StaticHFBackend

__all__ = ["Backend", "HFBackend", "StaticHFBackend", "as_backend"]
