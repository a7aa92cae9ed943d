"""A backend for ``transformers`` encoder-decoder models (T5, mT5, BART, mBART, Marian, Pegasus).

``reset`` runs the encoder once over the batch of source sequences (the "prompts") and keeps its
output and mask; the decoder of every row starts from the model's ``decoder_start_token_id``,
which is the first *pending* token (:meth:`Seq2SeqBackend.first_pending`). ``extend`` / ``commit``
work on the decoder's self-attention cache with the rollback semantics of
:class:`~speccascade.models.dynamic.HFBackend`; the cross-attention cache, computed by the first
decoder call, stays as it is.

Layout of the self-attention cache: all rows share one length, and each row's real tokens are
kept *contiguous and right-aligned* (the unused slots of a row are on its left and masked out).
Whenever a ragged feed or a rollback leaves a hole, the row's slots are gathered back into that
layout (one gather per cache tensor) and the slots no row uses are dropped from the left. So:

* relative position biases (T5: functions of slot differences only) see each row's true
  distances;
* absolute position embeddings (BART's learned, Marian's / Pegasus' sinusoidal) are given each
  row's own positions through a forward hook on the decoder's ``embed_positions`` (the decoders
  take no ``position_ids``), active only during this backend's own calls.

The encoder input may be left- or right-padded (any mask): each row's tokens are packed to the
left (right padding) before the encoder runs, which is exact for every encoder.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import SpecCascadeError
from .dynamic import masked_feed


class Seq2SeqBackend:
    encoder_decoder = True

    def __init__(self, model: torch.nn.Module, name: str = "model"):
        cfg = getattr(model, "config", None)
        if cfg is None or not getattr(cfg, "is_encoder_decoder", False) or not hasattr(model, "get_encoder"):
            raise SpecCascadeError(f"{name} must be a transformers encoder-decoder model (AutoModelForSeq2SeqLM), "
                                   f"got {type(model).__name__}")
        self.model = model.eval()
        self.name = name
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab_size = int(out.weight.shape[0]) if out is not None else int(cfg.vocab_size)
        self.device = next(model.parameters()).device
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.source_vocab_size = int(emb.num_embeddings) if emb is not None else self.vocab_size  # the encoder's ids
        self.decoder_start_token_id = decoder_start_token_id(model, name)
        decoder = model.get_decoder()
        self._positions_module = getattr(decoder, "embed_positions", None)
        if self._positions_module is not None:
            if not isinstance(self._positions_module, torch.nn.Embedding):
                raise SpecCascadeError(
                    f"the {name} ({type(model).__name__}) embeds decoder positions with a "
                    f"{type(self._positions_module).__name__}, which the seq2seq backend cannot give per-row "
                    f"positions; supported: relative position biases (T5, mT5) and embedding tables "
                    f"(BART, mBART, Marian, Pegasus)")
            offset = int(getattr(self._positions_module, "offset", 0))
            self.max_positions = int(self._positions_module.num_embeddings) - offset
            _install_position_hook(self._positions_module, offset)
        else:
            self.max_positions = None  # relative position biases (T5): no limit
        enc_pos = getattr(model.get_encoder(), "embed_positions", None)
        self.max_source_positions = int(enc_pos.num_embeddings) - int(getattr(enc_pos, "offset", 0)) \
            if isinstance(enc_pos, torch.nn.Embedding) else None
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.cache = None

    # -- the Backend interface -----------------------------------------------------------------

    def first_pending(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each row's first pending token: the decoder start token.  # [B]"""
        return torch.full((input_ids.shape[0],), self.decoder_start_token_id, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        from transformers import EncoderDecoderCache

        ids, mask = pack_source(input_ids.to(self.device), attention_mask.to(self.device), self.name)
        self.encoder_mask = mask.long()
        self.encoder_outputs = self.model.get_encoder()(input_ids=ids, attention_mask=self.encoder_mask,
                                                        return_dict=True)
        B = ids.shape[0]
        self.cache = EncoderDecoderCache(_dynamic_cache(self.model.config), _dynamic_cache(self.model.config))
        self.valid = torch.zeros(B, 0, dtype=torch.bool, device=self.device)   # [B, slots]
        self.n_pos = torch.zeros(B, dtype=torch.long, device=self.device)      # [B] real decoder tokens cached
        self.n_committed = self.n_pos.clone()

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        logits = masked_feed(self, tokens, lengths)                             # [B, k, V]
        if lengths is not None:
            self._compact()  # padding at the end of short rows would leave a hole before their next tokens
        return logits

    @torch.no_grad()
    def commit(self, n_keep: torch.Tensor) -> None:
        rank = self.valid.long().cumsum(1) - 1                                  # index among the row's real tokens
        limit = self.n_committed + n_keep.to(self.device).clamp_min(0)
        self.valid = self.valid & (rank < limit.unsqueeze(1))
        self.n_pos = torch.minimum(self.n_pos, limit)
        self.n_committed = self.n_pos.clone()
        self._compact()

    # -- internals ----------------------------------------------------------------------------

    def _compact(self) -> None:
        """Make each row's real slots contiguous and right-aligned, then drop the leading slots no
        row uses (one host sync)."""
        S = self.valid.shape[1]
        slot = torch.arange(S, device=self.device).unsqueeze(0)
        aligned = self.valid == (slot >= (S - self.n_pos).unsqueeze(1))
        drop = S - int(self.n_pos.max()) if S else 0
        if not bool(aligned.all()):
            order = torch.argsort(self.valid.long(), dim=1, stable=True)       # unused slots first, in order
            self.valid = self.valid.gather(1, order)
            self._select(lambda t: t.gather(2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])))
        if drop > 0:
            self.valid = self.valid[:, drop:]
            self._select(lambda t: t[:, :, drop:])

    def _select(self, fn) -> None:
        for layer in self.cache.self_attention_cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                layer.keys, layer.values = fn(layer.keys), fn(layer.values)

    def _forward(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        holder = self._positions_module
        if holder is not None:
            holder._speccascade_positions = positions
        try:
            out = self.model(encoder_outputs=self.encoder_outputs, attention_mask=self.encoder_mask,
                             decoder_input_ids=tokens, decoder_attention_mask=mask.long(), use_cache=True,
                             **{self._cache_kw: self.cache})
        finally:
            if holder is not None:
                holder._speccascade_positions = None
        return out.logits


def decoder_start_token_id(model, name: str) -> int:
    """The token every decoder row starts from: the generation config's ``decoder_start_token_id``,
    else the config's (an error naming ``name`` where neither declares one)."""
    gen = getattr(model, "generation_config", None)
    start = getattr(gen, "decoder_start_token_id", None)
    start = getattr(model.config, "decoder_start_token_id", None) if start is None else start
    if start is None:
        raise SpecCascadeError(f"the {name} ({type(model).__name__}) declares no decoder_start_token_id in its "
                               f"config or generation config; set model.config.decoder_start_token_id")
    return int(start if isinstance(start, int) else start[0])


def pack_source(ids: torch.Tensor, mask: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An encoder batch (any padding) with each row's tokens packed to the left, in order, cut to
    the longest row: ``(ids, mask)  # [B, width], bool mask``. Exact for every encoder (a row's real
    tokens keep their order and relative positions). An empty row is an error naming ``name``."""
    mask = mask.bool()
    if ids.dim() != 2 or ids.shape[1] == 0 or bool((mask.sum(1) == 0).any()):
        raise SpecCascadeError(f"empty encoder input for the {name}: every row needs at least one source "
                               f"token (an encoder-decoder model decodes from its encoder's output)")
    order = torch.argsort((~mask).long(), dim=1, stable=True)  # real tokens first, in order
    width = int(mask.sum(1).max())
    return ids.gather(1, order)[:, :width], mask.gather(1, order)[:, :width]


def _dynamic_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # older signature
        return DynamicCache()


def _install_position_hook(module: torch.nn.Embedding, offset: int) -> None:
    """Once per model: a forward hook on the decoder's position embedding that, while a backend's
    call sets ``module._speccascade_positions  # [B, k]``, returns the embeddings of those per-row
    positions instead of the shared ``cache length + i``; otherwise the module is unchanged."""
    if getattr(module, "_speccascade_hooked", False):
        return
    module._speccascade_positions = None

    def hook(mod, args, output):
        pos = mod._speccascade_positions
        if pos is None:
            return None
        return torch.nn.functional.embedding(pos + offset, mod.weight).to(output.dtype)

    module.register_forward_hook(hook)
    module._speccascade_hooked = True
