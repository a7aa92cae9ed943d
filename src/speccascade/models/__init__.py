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
fused      ``fused_t5.FusedT5Backend`` T5 (``T5ForConditionalGeneration``): transformers'
                                       encoder once per request, cross-attention K/V
                                       precomputed, our decoder step on the same per-row
                                       position-indexed cache, so the whole block is one
                                       CUDA graph (compiled on CUDA, eager on a CPU)
fused_     the fused backends without torch.compile: on CUDA the loops are still captured as
eager      CUDA graphs, but nothing is compiled (no compile time, more kernels a step), for
           large batches or short jobs (``speccascade distill``'s batches of 1,024 rows)
seq2seq    ``seq2seq.Seq2SeqBackend``  transformers encoder-decoders (T5, mT5, BART, mBART,
                                       Marian, Pegasus): the encoder once, the decoder on a
                                       dynamic cache, eager
auto       causal LMs: fused where the model is Llama-family, else graphs on CUDA / dynamic on a
           CPU (dynamic for a model transformers sharded); encoder-decoders: fused for T5 on
           CUDA, else seq2seq (so a CPU run is unchanged)
=========  ==========================  =====================================================

An encoder-decoder model (``config.is_encoder_decoder``) gets the seq2seq backend from
``dynamic``, ``auto`` (but T5 on CUDA) or ``seq2seq``, and the fused T5 backend from ``fused`` or
``fused_eager`` (a T5; other encoder-decoders are refused, naming ``--backend seq2seq``); the other GPU fast paths
(``static``, ``compiled``, ``graphs``) are for decoder-only models and refuse it.

``base.Backend`` states the contract the decoding loops rely on; ``as_backend`` turns a model (or
a backend) into a backend.
"""

from __future__ import annotations

import warnings

import torch

from ..errors import SpecCascadeError
from .base import Backend, as_backend, is_encoder_decoder
from .dynamic import HFBackend
from .features import FeatureHFBackend, LlamaFeatureDrafter, is_feature_drafter
from .fused import FusedFeatureBackend, FusedLlamaBackend, UnsupportedModel
from .fused_t5 import FusedT5Backend
from .graphs import GraphHFBackend
from .seq2seq import Seq2SeqBackend
from .static import StaticHFBackend, bucket


def _fused(model, name, max_cache_len, compile: bool = True):
    """:class:`FusedLlamaBackend`, compiled on CUDA unless ``compile`` is False."""
    # a verifier marked by speccascade.distributed.mark_tp (--tp N): this rank's shard of it, on the
    # rank's device (the whole model may stay on the host)
    device = torch.device(getattr(model, "speccascade_device", None) or next(model.parameters()).device)
    return FusedLlamaBackend(model, name, compile=compile and device.type == "cuda" and torch.cuda.is_available(),
                             tp=getattr(model, "speccascade_tp", 1), device=device)


def _on_cuda(model) -> bool:
    return next(model.parameters()).device.type == "cuda" and torch.cuda.is_available()


def _fused_t5(model, name, max_cache_len, compile: bool = True):
    """``fused`` for an encoder-decoder: :class:`FusedT5Backend` for a T5 (compiled on CUDA unless
    ``compile`` is False), else an error naming the model type and ``--backend seq2seq``."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind != "t5":
        raise SpecCascadeError(f"the fused backend implements T5 among encoder-decoders; the {name} is "
                               f"{kind or 'unknown'} ({type(model).__name__}): use --backend seq2seq (or auto)")
    return FusedT5Backend(model, name, compile=compile and _on_cuda(model))


def _auto_seq2seq(model, name, max_cache_len):
    """``auto`` for an encoder-decoder: the fused T5 backend for a T5 on CUDA, else seq2seq (so a
    CPU run is what it always was)."""
    if getattr(model.config, "model_type", None) == "t5" and _on_cuda(model):
        return _fused_t5(model, name, max_cache_len)
    return Seq2SeqBackend(model, name)


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
    "fused_eager": lambda model, name, max_cache_len: _fused(model, name, max_cache_len, compile=False),
    "auto": _auto,
    "seq2seq": lambda model, name, max_cache_len: Seq2SeqBackend(model, name),
}

#: the backends an encoder-decoder model can take, and what each gives it
SEQ2SEQ_FACTORIES = {
    "dynamic": BACKENDS["seq2seq"],
    "auto": _auto_seq2seq,
    "seq2seq": BACKENDS["seq2seq"],
    "fused": _fused_t5,
    "fused_eager": lambda model, name, max_cache_len: _fused_t5(model, name, max_cache_len, compile=False),
}
SEQ2SEQ_KINDS = tuple(SEQ2SEQ_FACTORIES)
#: the backends that run a drafter reading the verifier's states (models.features), and give a verifier's
FEATURE_KINDS = ("dynamic", "fused", "fused_eager", "auto")


def make_backend(model, name: str, kind: str = "dynamic", max_cache_len: int = 2048) -> Backend:
    """A backend by name (see the table above). ``max_cache_len``: the static backends' slots
    (the fused backend sizes its cache per request instead)."""
    if kind not in BACKENDS:
        raise SpecCascadeError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    if is_encoder_decoder(model) and not isinstance(model, (Seq2SeqBackend, FusedT5Backend)):
        if kind not in SEQ2SEQ_KINDS:
            raise SpecCascadeError(
                f"the {kind} backend is for decoder-only (causal) models; the {name} "
                f"({type(model).__name__}) is an encoder-decoder model, which runs on the seq2seq backend "
                f"(dynamic cache, eager): use backend 'dynamic', 'auto' or 'seq2seq', or 'fused' for a T5 (the "
                f"GPU fast paths static / compiled / graphs do not apply to encoder-decoders)")
        return SEQ2SEQ_FACTORIES[kind](model, name, max_cache_len)
    elif is_feature_drafter(model) and isinstance(model, torch.nn.Module):
        if kind not in FEATURE_KINDS:
            raise SpecCascadeError(f"the {name} reads the verifier's states (a feature drafter), which the "
                                   f"{', '.join(FEATURE_KINDS)} backends implement: use one of them, for both models")
        if kind == "dynamic":
            return FeatureHFBackend(model, name)
        return FusedFeatureBackend(model, name, compile=kind != "fused_eager" and _on_cuda(model))
    elif kind == "seq2seq":
        raise SpecCascadeError(f"the seq2seq backend is for encoder-decoder models (config.is_encoder_decoder); "
                               f"the {name} ({type(model).__name__}) is not one: use backend 'dynamic' or 'auto'")
    return BACKENDS[kind](model, name, max_cache_len)


__all__ = ["BACKENDS", "Backend", "FEATURE_KINDS", "FeatureHFBackend", "FusedFeatureBackend", "FusedLlamaBackend",
           "FusedT5Backend", "GraphHFBackend", "HFBackend", "LlamaFeatureDrafter", "SEQ2SEQ_KINDS", "Seq2SeqBackend",
           "StaticHFBackend", "UnsupportedModel", "as_backend", "bucket", "is_encoder_decoder", "make_backend"]
