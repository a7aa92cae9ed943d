"""Model backends: next-token logits for blocks of tokens, with a KV cache per model.

One backend per file, picked by name with :func:`make_backend` (``BACKENDS``):

=========  ==========================  =====================================================
name       class                       what it is
=========  ==========================  =====================================================
dynamic    ``dynamic.HFBackend``       any transformers causal LM, dynamic cache, eager
static     ``static.StaticHFBackend``  pre-allocated ``StaticCache``, fixed call shapes
compiled   ``static.StaticHFBackend``  the same under torch.compile (CUDA graphs per call)
graphs     ``graphs.GraphHFBackend``   the same, hand-captured CUDA graphs per call (CUDA)
fused      ``fused.FusedLlamaBackend`` Llama-family models: fused projections, per-row
                                       position-indexed cache, every piece of state on the
                                       device, so the *whole block* is one CUDA graph;
                                       tensor-parallel (``tp=N``: this rank's shard, two
                                       all-reduces a layer) for a model marked by
                                       ``speccascade.distributed.mark_tp``
seq2seq    ``seq2seq.Seq2SeqBackend``  transformers encoder-decoders (T5, mT5, BART, mBART,
                                       Marian, Pegasus): the encoder once, the decoder on a
                                       dynamic cache, eager
auto       fused where the model is Llama-family, else graphs on CUDA / dynamic on a CPU
           (dynamic for a model transformers sharded)
=========  ==========================  =====================================================

An encoder-decoder model (``config.is_encoder_decoder``) always gets the seq2seq backend from
``dynamic``, ``auto`` or ``seq2seq``; the GPU fast paths (``static``, ``compiled``, ``graphs``,
``fused``) are for decoder-only models and refuse it.

``base.Backend`` states the contract the decoding loops rely on; ``as_backend`` turns a model (or
a backend) into a backend.
"""

from __future__ import annotations

import warnings

from ..errors import SpecCascadeError
from .base import Backend, as_backend, is_encoder_decoder
from .dynamic import HFBackend
from .fused import FusedLlamaBackend, UnsupportedModel
from .graphs import GraphHFBackend
from .seq2seq import Seq2SeqBackend
from .static import StaticHFBackend, bucket


def _fused(model, name, max_cache_len):
    import torch

    device = next(model.parameters()).device
    # a verifier marked by speccascade.distributed.mark_tp (--tp N): this rank's shard of it
    return FusedLlamaBackend(model, name, compile=device.type == "cuda" and torch.cuda.is_available(),
                             tp=getattr(model, "speccascade_tp", 1))


def _auto(model, name, max_cache_len):
    if (getattr(model, "tp_size", None) or 1) > 1:   # sharded by transformers (--tp, dynamic): only dynamic takes it
        return HFBackend(model, name)
    try:
        return _fused(model, name, max_cache_len)
    except UnsupportedModel as e:
        device = next(model.parameters()).device
        warnings.warn(f"{e}; falling back to the {'graphs' if device.type == 'cuda' else 'dynamic'} backend",
                      stacklevel=2)
        return BACKENDS["graphs" if device.type == "cuda" else "dynamic"](model, name, max_cache_len)


#: name -> factory(model, name, max_cache_len)
BACKENDS = {
    "dynamic": lambda model, name, max_cache_len: HFBackend(model, name),
    "static": lambda model, name, max_cache_len: StaticHFBackend(model, name, max_cache_len, compile=False),
    "compiled": lambda model, name, max_cache_len: StaticHFBackend(model, name, max_cache_len, compile=True),
    "graphs": lambda model, name, max_cache_len: GraphHFBackend(model, name, max_cache_len),
    "fused": _fused,
    "auto": _auto,
    "seq2seq": lambda model, name, max_cache_len: Seq2SeqBackend(model, name),
}

#: the backends an encoder-decoder model can take (each gives the seq2seq backend)
SEQ2SEQ_KINDS = ("dynamic", "auto", "seq2seq")


def make_backend(model, name: str, kind: str = "dynamic", max_cache_len: int = 2048) -> Backend:
    """A backend by name (see the table above). ``max_cache_len``: the static backends' slots
    (the fused backend sizes its cache per request instead)."""
    if kind not in BACKENDS:
        raise SpecCascadeError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    if is_encoder_decoder(model) and not isinstance(model, Seq2SeqBackend):
        if kind not in SEQ2SEQ_KINDS:
            raise SpecCascadeError(
                f"the {kind} backend is for decoder-only (causal) models; the {name} "
                f"({type(model).__name__}) is an encoder-decoder model, which runs on the seq2seq backend "
                f"(dynamic cache, eager): use backend 'dynamic', 'auto' or 'seq2seq' (the GPU fast paths "
                f"static / compiled / graphs / fused do not apply to encoder-decoders)")
        kind = "seq2seq"
    elif kind == "seq2seq":
        raise SpecCascadeError(f"the seq2seq backend is for encoder-decoder models (config.is_encoder_decoder); "
                               f"the {name} ({type(model).__name__}) is not one: use backend 'dynamic' or 'auto'")
    return BACKENDS[kind](model, name, max_cache_len)


__all__ = ["BACKENDS", "Backend", "FusedLlamaBackend", "GraphHFBackend", "HFBackend", "SEQ2SEQ_KINDS",
           "Seq2SeqBackend", "StaticHFBackend", "UnsupportedModel", "as_backend", "bucket", "is_encoder_decoder",
           "make_backend"]
