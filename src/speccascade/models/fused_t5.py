"""The fused T5 backend: T5's decoder step of our own over a position-indexed KV cache.

Speculative cascades (Narasimhan et al., "Faster Cascades via Speculative Decoding", ICLR 2025,
arXiv 2405.19261) were evaluated on T5 pairs (WMT, CNN/DM, XSum): a small T5 drafts ``gamma``
tokens, a large T5 scores them in one call and a deferral rule decides per token. What pays there
is the same as for the decoder-only pairs of :mod:`.fused`: at small batches a decoder call of a
small model is a few hundred tiny kernels, so the whole speculative block (drafter steps, verifier
call, acceptance) must run as one captured CUDA graph, with no host work per token. The seq2seq
backend (:mod:`.seq2seq`: transformers' eager decoder on a dynamic cache, host-side compaction)
cannot be captured; this backend can (``capturable = True``). It

* runs transformers' **encoder** once per request (``reset``: eager, a ragged batch packed as
  :func:`.seq2seq.pack_source` does) and computes every decoder layer's **cross-attention K and
  V** once from its output, into device buffers of a power-of-two source capacity with an additive
  mask for the encoder's padding; the buffers (and so a captured graph) are kept across requests of
  one batch size whose sources fit, and reallocated (``generation`` bumped) when they must grow;
* runs the **decoder** step itself over transformers' weights (q/k/v fused into one matrix, the
  gated feed-forward's two input matrices into one), on the per-row position-indexed
  self-attention cache of :class:`.fused.PositionIndexedCache`, shared with the Llama backend:
  row b's decoder token at position i lives in slot i, a rollback only lowers the row's count, the
  padding of a ragged feed is written to a trash slot, every count lives on the device, so
  ``extend`` / ``commit`` make no host read and keep no host-side state;
* computes T5's **relative position bias** on the device every step: for a query at position i
  and cache slot j, the bias of bucket(j - i) (causal buckets, ``bidirectional=False``) from the
  first decoder layer's ``relative_attention_bias`` table, shared by every decoder layer, plus
  -inf where the query does not see the slot (``[B, w, C]`` bucket indices: cheap).

The arithmetic follows transformers' ``modeling_t5``: ``T5LayerNorm`` (RMS, no mean, variance in
float32, cast to the weight's dtype where that is half precision), no 1/sqrt(d) attention scaling,
no position bias in cross-attention, ReLU or gated-GELU feed-forwards (``feed_forward_proj``;
the activation module is the model's own), the fp16 clamp of the hidden state after each
sub-layer, and the decoder output scaled by ``d_model ** -0.5`` before the LM head where the
config says so (``scale_decoder_outputs``: T5 with tied embeddings). Softmax runs in float32.
The decoder start token (``decoder_start_token_id``) is every row's first pending token, fed by
the first ``extend``. Logits equal transformers' to float rounding (``tests/test_fused_t5.py``:
ragged batches, both paddings, ragged feeds, rollbacks, ReLU and gated-GELU, scaled and unscaled
heads).

**Compiled per region** (``compile=True``, on a GPU), as :mod:`.fused`: the prologue (embeddings,
slots, the position bias), *one* decoder layer (called for every layer with that layer's weights,
self-attention cache and cross-attention buffers as inputs) and the head, ``dynamic=False,
fullgraph=True``, the recompile limit raised. The encoder and the cross K/V run eagerly, once per
request. On a CPU the step runs uncompiled.

Only ``T5ForConditionalGeneration`` (``model_type`` ``t5``): mT5, UMT5 (a position bias per
layer), LongT5 and other encoder-decoders raise :class:`.fused.UnsupportedModel` naming
``--backend seq2seq``.

Contract (beyond :mod:`.base`): ``encoder_decoder = True``, ``capturable = True``,
``max_positions = max_source_positions = None`` (relative positions: no limit, as
:class:`.seq2seq.Seq2SeqBackend` says for T5); ``reserve(batch, length, source_length=None)``
sizes the decoder cache for ``length`` decoder tokens (start token + new tokens + one block) and,
given ``source_length``, the cross-attention buffers, before ``reset`` (``generate`` calls it, so
a captured graph never meets buffers reallocated under it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import SpecCascadeError
from .fused import PositionIndexedCache, UnsupportedModel, _capacity, rms_norm
from .seq2seq import decoder_start_token_id, pack_source

SUPPORTED = ("t5",)
#: the smallest source capacity of the cross-attention buffers (a power of two above it otherwise)
MIN_SOURCE_SLOTS = 16


def unsupported_reason(model, name: str = "model") -> str | None:
    """Why the fused T5 backend cannot run ``model`` (None: it can)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED or not hasattr(model, "decoder") or not hasattr(model.decoder, "block"):
        return (f"the fused backend implements T5 (T5ForConditionalGeneration) among encoder-decoders; the {name} "
                f"is {kind or type(model).__name__} ({type(model).__name__})")
    return None


def relative_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal relative-position bucket of ``rel`` = key position - query position (only
    ``rel <= 0`` is ever attended to): distances below ``num_buckets // 2`` get a bucket each, larger
    ones logarithmic bins up to ``max_distance``, beyond it the last bucket. Same float arithmetic
    as transformers' ``T5Attention._relative_position_bucket(bidirectional=False)``."""
    n = (-rel).clamp_min(0)
    exact = num_buckets // 2
    large = exact + (torch.log(n.clamp_min(1).float() / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).to(torch.long)
    large = large.clamp_max(num_buckets - 1)
    return torch.where(n < exact, n, large)


class FusedT5Backend(PositionIndexedCache):
    """A T5 encoder-decoder: the encoder once per request, the decoder fused, on a per-row
    position-indexed cache with cross-attention K/V precomputed (see the module's docstring)."""

    encoder_decoder = True
    min_slots = 16   # decoder outputs (translations, summaries) are short: 16, 32, 64, ... slots

    def __init__(self, model: torch.nn.Module, name: str = "model", compile: bool = False,
                 compile_options: dict | None = None):
        cfg = getattr(model, "config", None)
        if cfg is None or not getattr(cfg, "is_encoder_decoder", False):
            raise SpecCascadeError(f"the fused T5 backend is for T5 encoder-decoders; the {name} "
                                   f"({type(model).__name__}) is not an encoder-decoder model")
        reason = unsupported_reason(model, name)
        if reason:
            raise UnsupportedModel(f"{reason}: use --backend seq2seq")
        self.model = model.eval()   # the encoder runs from it; api reads its generation config
        self.name = name
        self.device = next(model.parameters()).device
        self.output_device = self.device
        dec = model.decoder
        first = dec.block[0].layer[0].SelfAttention
        self.dtype = first.q.weight.dtype
        self.n_heads = self.n_kv = int(cfg.num_heads)
        self.head_dim = int(cfg.d_kv)
        self.eps = float(cfg.layer_norm_epsilon)
        self.num_buckets = int(cfg.relative_attention_num_buckets)
        self.max_distance = int(cfg.relative_attention_max_distance)
        self.max_positions = None          # relative position biases: no limit (as Seq2SeqBackend)
        self.max_source_positions = None
        self.decoder_start_token_id = decoder_start_token_id(model, name)
        scale = getattr(cfg, "scale_decoder_outputs", None)
        scale = getattr(cfg, "tie_word_embeddings", True) if scale is None else scale
        self.out_scale = float(cfg.d_model) ** -0.5 if scale else None
        with torch.no_grad():
            self.embed = dec.embed_tokens.weight.detach()
            self.pos_table = first.relative_attention_bias.weight.detach()        # [buckets, H]
            self.final_norm = dec.final_layer_norm.weight.detach()
            self.lm_head = model.get_output_embeddings().weight.detach()
            self.layers = [self._fuse(block) for block in dec.block]
            # every layer's cross-attention K and V projections as one matrix: one product per request
            self.w_cross = torch.cat([torch.cat([b.layer[1].EncDecAttention.k.weight,
                                                 b.layer[1].EncDecAttention.v.weight]) for b in dec.block]).detach()
        self.act = dec.block[0].layer[-1].DenseReluDense.act
        self.gated = bool(getattr(cfg, "is_gated_act", False))
        self.vocab_size = int(self.lm_head.shape[0])
        self.source_vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.n_layers = len(self.layers)
        self.source_batch = 0
        self.source_slots = 0
        self._compile_regions(compile, compile_options)

    def _fuse(self, block) -> dict:
        sa, ca, ff = block.layer[0].SelfAttention, block.layer[1].EncDecAttention, block.layer[-1].DenseReluDense
        w_in = torch.cat([ff.wi_0.weight, ff.wi_1.weight]) if hasattr(ff, "wi_0") else ff.wi.weight
        return {
            "sa_norm": block.layer[0].layer_norm.weight.detach(),
            "wqkv": torch.cat([sa.q.weight, sa.k.weight, sa.v.weight]).detach(),
            "wo": sa.o.weight.detach(),
            "ca_norm": block.layer[1].layer_norm.weight.detach(),
            "cq": ca.q.weight.detach(),
            "co": ca.o.weight.detach(),
            "ff_norm": block.layer[-1].layer_norm.weight.detach(),
            "wi": w_in.detach(),
            "wff": ff.wo.weight.detach(),
        }

    # -- the Backend interface (extend, commit: PositionIndexedCache) ---------------------------

    def first_pending(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each row's first pending token: the decoder start token.  # [B]"""
        return torch.full((input_ids.shape[0],), self.decoder_start_token_id, dtype=torch.long, device=self.device)

    def reserve(self, batch: int, length: int, source_length: int | None = None) -> None:
        """Room for ``batch`` rows of up to ``length`` decoder tokens (start token, new tokens and a
        block's tentative ones) and, given ``source_length``, encoder inputs of up to that many
        tokens. Keeps the buffers (and so captured graphs) when they already fit."""
        super().reserve(batch, length)
        self._reserve_source(batch, source_length or 1)

    def _reserve_source(self, batch: int, length: int) -> None:
        slots = _capacity(length, MIN_SOURCE_SLOTS)
        if self.source_batch == batch and self.source_slots >= slots:
            return
        shape = (self.n_layers, batch, self.n_heads, slots, self.head_dim)
        self.cross_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cross_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cross_bias = torch.zeros(batch, 1, 1, slots, dtype=torch.float32, device=self.device)
        self.source_batch, self.source_slots = batch, slots
        self.generation = getattr(self, "generation", 0) + 1   # captured graphs hold the old tensors
        self._allocated()

    @torch.no_grad()
    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Encode the source rows (any padding), fill the cross-attention buffers in place, empty
        the decoder cache (every row's count 0: the start token is pending)."""
        ids, mask = pack_source(input_ids.to(self.device), attention_mask.to(self.device), self.name)
        B, L = ids.shape
        if self.batch != B:   # a new batch size (seq_cascade re-decoding some rows) keeps the capacity
            self.reserve(B, max(self.slots, 1))
        self._reserve_source(B, L)
        enc = self.model.get_encoder()(input_ids=ids, attention_mask=mask.long(), return_dict=True).last_hidden_state
        H, D, S = self.n_heads, self.head_dim, self.source_slots
        kv = F.linear(enc.to(self.dtype), self.w_cross).view(B, L, self.n_layers, 2, H, D)
        kv = kv.permute(3, 2, 0, 4, 1, 5)                                  # [2, layers, B, H, L, D]
        self.cross_k[:, :, :, :L].copy_(kv[0])
        self.cross_v[:, :, :, :L].copy_(kv[1])
        self.cross_k[:, :, :, L:].zero_()
        self.cross_v[:, :, :, L:].zero_()
        bias = torch.full((B, S), float("-inf"), device=self.device)
        bias[:, :L].masked_fill_(mask, 0.0)
        self.cross_bias.copy_(bias.view(B, 1, 1, S))
        self.n_pos.zero_()
        self.n_committed.zero_()

    # -- the step ------------------------------------------------------------------------------

    def _step(self, tokens, positions, valid, k_cache, v_cache) -> torch.Tensor:
        """Logits of decoder ``tokens  # [B, w]`` at ``positions  # [B, w]`` (or ``[B, 1]``: :meth:`_feed`);
        writes their K/V into slot = position (the trash slot where not ``valid``).  # -> [B, w, V] float32"""
        h, bias, rows, slots = self._prologue_fn(tokens, positions, valid)
        for i, L in enumerate(self.layers):
            h = self._layer_fn(h, L, bias, rows, slots, k_cache[i], v_cache[i], self.cross_k[i], self.cross_v[i],
                               self.cross_bias)
        return self._head_fn(h)

    def _prologue(self, tokens, positions, valid):
        """The embeddings, where the new K/V go, and the self-attention bias every layer shares:
        T5's relative position bias of (slot - position), -inf where the query does not see the slot."""
        positions, valid = self._feed(positions, valid, tokens.shape[1])
        rows, slots, seen = self._cache_slots(positions, valid)
        rel = self.ar.view(1, 1, -1) - positions.unsqueeze(-1)                             # [B, w, C]
        pos = F.embedding(relative_bucket(rel, self.num_buckets, self.max_distance), self.pos_table)
        bias = torch.where(seen.unsqueeze(1), pos.permute(0, 3, 1, 2).float(), float("-inf"))  # [B, H, w, C]
        return F.embedding(tokens, self.embed), bias, rows, slots

    def _norm(self, x, w):
        return rms_norm(x, w, self.eps, w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float32)

    def _layer(self, h, L: dict, bias, rows, slots, k_cache, v_cache, cross_k, cross_v, cross_bias):
        """One decoder block: self-attention over the cache (written at ``slots`` in place),
        cross-attention over the precomputed encoder K/V, the feed-forward; each a residual branch."""
        B, w = h.shape[:2]
        H, D = self.n_heads, self.head_dim
        x = self._norm(h, L["sa_norm"])
        q, k, v = F.linear(x, L["wqkv"]).view(B, w, 3, H, D).unbind(2)
        k_cache[rows, :, slots] = k                                                         # [B, w, H, D] in
        v_cache[rows, :, slots] = v
        scores = torch.matmul(q.transpose(1, 2), k_cache.transpose(-1, -2)).float()        # [B, H, w, C]
        att = torch.softmax(scores + bias, -1).to(v_cache.dtype)
        o = torch.matmul(att, v_cache).transpose(1, 2).reshape(B, w, H * D)
        h = _clamp(h + F.linear(o, L["wo"]))
        x = self._norm(h, L["ca_norm"])
        q = F.linear(x, L["cq"]).view(B, w, H, D).transpose(1, 2)                        # [B, H, w, D]
        scores = torch.matmul(q, cross_k.transpose(2, 3)).float()                         # [B, H, w, Ssrc]
        att = torch.softmax(scores + cross_bias, -1).to(cross_v.dtype)
        o = torch.matmul(att, cross_v).transpose(1, 2).reshape(B, w, H * D)
        h = _clamp(h + F.linear(o, L["co"]))
        x = self._norm(h, L["ff_norm"])
        if self.gated:
            gate, up = F.linear(x, L["wi"]).chunk(2, -1)
            y = self.act(gate) * up
        else:
            y = self.act(F.linear(x, L["wi"]))
        return _clamp(h + F.linear(y.to(L["wff"].dtype), L["wff"]))

    def _head(self, h) -> torch.Tensor:
        x = self._norm(h, self.final_norm)
        if self.out_scale is not None:
            x = x * self.out_scale
        return F.linear(x, self.lm_head).float()


def _clamp(h: torch.Tensor) -> torch.Tensor:
    """transformers' T5 fp16 guard: clamp the hidden state to the fp16 range (1000 less where it
    holds an inf). A device-side select: no host read."""
    if h.dtype != torch.float16:
        return h
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(h).any(), top - 1000, top)
    return torch.clamp(h, min=-limit, max=limit)
