"""The fused backend: a Llama-family decoder step of our own over a position-indexed KV cache.

Why a second forward pass beside transformers': on a GPU at batch 1 a model call of a small
model is a few hundred tiny kernels, and the speculative block must run with no host work at all
to pay (every kernel launch and every host-side bookkeeping step costs as much as a drafter's
arithmetic). This backend

* reads the weights of a transformers Llama-family model (``LlamaForCausalLM``, and the same
  structure under ``Qwen2`` / ``Mistral`` names) and fuses the q/k/v projections into one matrix
  and the gate/up projections into another, so a layer is 4 matrix products, not 7;
* keeps a **position-indexed** KV cache per row (as gpt-fast does): row b's token at position i
  lives in slot i, so a rollback is only a smaller position count (``commit``), nothing is
  copied, rolled-back slots are simply overwritten, and the capacity is the longest sequence a
  request can reach (checked before decoding starts: the cache never fills mid-way);
* keeps every piece of state on the device (``n_pos``, ``n_committed``: per-row counts), so
  ``extend`` and ``commit`` are pure tensor programs and the loop around them can be captured as
  one CUDA graph (:mod:`speccascade.runner`);
* attends over the cache length of the request (a power of two >= the longest sequence), not a
  fixed large pre-allocation.

Logits equal the transformers model's to float rounding (tests compare them, ragged batches,
rollbacks included). Models of another architecture raise :class:`UnsupportedModel`; use the
``graphs`` / ``compiled`` backends for them.

Contract (beyond :mod:`.base`): ``capturable = True`` (``extend`` / ``commit`` make no host read
and keep no host-side state), ``output_device == device``; ``reserve(batch, length)`` sizes the
cache before ``reset`` and is what ``generate`` calls with the request's longest sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import SpecCascadeError
from .static import bucket

SUPPORTED = ("llama", "qwen2", "mistral")


class UnsupportedModel(SpecCascadeError):
    """The model is not of an architecture the fused backend implements."""


def _capacity(length: int) -> int:
    """Cache slots for sequences up to ``length`` tokens: a power of two >= 64."""
    return max(64, 1 << (max(length, 1) - 1).bit_length())


class FusedLlamaBackend:
    """A Llama-family causal LM with fused projections and a per-row position-indexed cache."""

    capturable = True

    def __init__(self, model: torch.nn.Module, name: str = "model", compile: bool = False,
                 compile_options: dict | None = None):
        cfg = getattr(model, "config", None)
        kind = getattr(cfg, "model_type", None)
        if getattr(cfg, "is_encoder_decoder", False):
            raise SpecCascadeError(f"the fused backend is for decoder-only Llama-family models; the {name} "
                                   f"({type(model).__name__}) is an encoder-decoder model: use the seq2seq backend "
                                   f"(backend 'seq2seq' / 'dynamic' / 'auto')")
        if kind not in SUPPORTED or not hasattr(model, "model") or not hasattr(model.model, "layers"):
            raise UnsupportedModel(f"the fused backend implements {', '.join(SUPPORTED)} models; the {name} is "
                                   f"{kind or type(model).__name__}: use --backend graphs or compiled")
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu" or getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) \
                and kind == "mistral":
            raise UnsupportedModel(f"the fused backend needs silu MLPs and full attention; the {name} has "
                                   f"hidden_act={act!r} / sliding_window: use --backend graphs or compiled")
        self.name = name
        self.device = next(model.parameters()).device
        self.output_device = self.device
        self.dtype = next(model.parameters()).dtype
        inner = model.model
        first = inner.layers[0].self_attn
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.scaling = float(getattr(first, "scaling", self.head_dim ** -0.5))
        self.eps = float(cfg.rms_norm_eps)
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_token_id = eos if eos is not None else getattr(cfg, "eos_token_id", None)   # the model's own EOS
        rot = inner.rotary_emb
        self.inv_freq = rot.inv_freq.detach().float().to(self.device)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        with torch.no_grad():
            self.embed = inner.embed_tokens.weight.detach()
            self.final_norm = inner.norm.weight.detach()
            head = model.get_output_embeddings()
            self.lm_head = head.weight.detach()
            self.lm_head_bias = None if getattr(head, "bias", None) is None else head.bias.detach()
            self.layers = [self._fuse(layer) for layer in inner.layers]
        self.vocab_size = int(self.lm_head.shape[0])
        self.n_layers = len(self.layers)
        self.batch = 0
        self.slots = 0
        self.compiled = compile
        if compile:  # one specialisation per (batch, feed width, cache size): many in a sweep
            from .static import _raise_recompile_limit

            _raise_recompile_limit(1024)
        self._step_fn = torch.compile(self._step, dynamic=False, fullgraph=True, options=compile_options or None) \
            if compile else self._step

    @staticmethod
    def _fuse(layer) -> dict:
        att, mlp = layer.self_attn, layer.mlp

        def bias(*mods):
            bs = [m.bias for m in mods]
            if all(b is None for b in bs):
                return None
            return torch.cat([b if b is not None else torch.zeros(m.weight.shape[0], dtype=m.weight.dtype,
                                                                  device=m.weight.device) for b, m in zip(bs, mods)])

        return {
            "in_norm": layer.input_layernorm.weight.detach(),
            "wqkv": torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).detach(),
            "bqkv": bias(att.q_proj, att.k_proj, att.v_proj),
            "wo": att.o_proj.weight.detach(), "bo": None if att.o_proj.bias is None else att.o_proj.bias.detach(),
            "post_norm": layer.post_attention_layernorm.weight.detach(),
            "w13": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
            "b13": bias(mlp.gate_proj, mlp.up_proj),
            "w2": mlp.down_proj.weight.detach(),
            "b2": None if mlp.down_proj.bias is None else mlp.down_proj.bias.detach(),
        }

    # -- the Backend interface -----------------------------------------------------------------

    def reserve(self, batch: int, length: int) -> None:
        """Make room for ``batch`` rows of up to ``length`` tokens each (prompt, new tokens and a
        block's tentative ones). Keeps the cache (and so captured graphs) when it already fits."""
        slots = _capacity(length)
        if self.batch == batch and self.slots >= slots:
            return
        if self.max_positions and length > self.max_positions:
            raise SpecCascadeError(f"{length} positions exceed the {self.name}'s context of {self.max_positions}")
        shape = (self.n_layers, batch, slots + 1, self.n_kv, self.head_dim)   # the last slot is a trash slot
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.n_pos = torch.zeros(batch, dtype=torch.long, device=self.device)        # real tokens cached per row
        self.n_committed = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.ar = torch.arange(slots + 1, device=self.device)
        self.batch, self.slots = batch, slots
        self.generation = getattr(self, "generation", 0) + 1   # captured graphs hold the old tensors
        self._prefill_graphs = {}

    @torch.no_grad()
    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        input_ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device).long()
        B, L = input_ids.shape
        if self.batch != B or self.slots < L + 1:
            # a new batch size (e.g. seq_cascade re-decoding some rows) keeps the request's capacity
            self.reserve(B, max(L + 1, self.slots))
        self.n_pos.zero_()
        self.n_committed.zero_()
        if L > 1:   # cache all prompt tokens but the last; left padding goes to the trash slot
            valid = mask[:, :-1].bool()
            positions = (valid.long().cumsum(1) - 1).clamp_min(0)
            if self.compiled and self.device.type == "cuda":
                self._prefill_replay(input_ids[:, :-1], positions, valid)
            else:
                self._step(input_ids[:, :-1], positions, valid, self.k_cache, self.v_cache, False)
            self.n_pos.copy_(valid.sum(1))
            self.n_committed.copy_(self.n_pos)

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        tokens = tokens.to(self.device)
        B, k = tokens.shape
        # compiled: ragged feeds (token_cascade / BiLD, given `lengths`) pad up to a few widths, so they
        # meet a few compiled shapes; full feeds (the block's 1 and gamma + 1) keep their own width
        width = bucket(k) if self.compiled and lengths is not None else k
        if width > k:
            tokens = F.pad(tokens, (0, width - k))
            if lengths is None:
                lengths = torch.full((B,), k, dtype=torch.long, device=self.device)
        offsets = self.ar[:width].unsqueeze(0)                                        # [1, width]
        positions = self.n_pos.unsqueeze(1) + offsets                                 # [B, width]
        if lengths is None:
            valid = None
            self.n_pos.add_(k)
        else:
            lengths = lengths.to(self.device)
            valid = offsets < lengths.unsqueeze(1)                                    # [B, width]
            self.n_pos.add_(lengths)
        return self._forward(tokens, positions, valid)[:, :k]

    @torch.no_grad()
    def commit(self, n_keep: torch.Tensor) -> None:
        fed = self.n_pos - self.n_committed
        self.n_pos.copy_(self.n_committed + torch.minimum(n_keep.to(self.device), fed))
        self.n_committed.copy_(self.n_pos)

    # -- the step ------------------------------------------------------------------------------

    def _forward(self, tokens, positions, valid) -> torch.Tensor:
        return self._step_fn(tokens, positions, valid if valid is not None else positions >= 0,
                             self.k_cache, self.v_cache)

    def _prefill_replay(self, tokens, positions, valid) -> None:
        """The prompt's K/V written by a replay of a CUDA graph captured per (batch, width), the
        prompt left-padded to a width of 64, 128, 256, ... (padding goes to the trash slot)."""
        B, L = tokens.shape
        width = _capacity(L)
        key = (B, width, self.generation)
        if key not in self._prefill_graphs:
            bufs = (torch.zeros(B, width, dtype=torch.long, device=self.device),
                    torch.zeros(B, width, dtype=torch.long, device=self.device),
                    torch.zeros(B, width, dtype=torch.bool, device=self.device))   # all padding: writes only trash
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step_fn(*bufs, self.k_cache, self.v_cache, False)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step_fn(*bufs, self.k_cache, self.v_cache, False)
            self._prefill_graphs[key] = (graph, bufs)
        graph, (t_buf, p_buf, v_buf) = self._prefill_graphs[key]
        pad = width - L
        t_buf[:, :pad].zero_()
        p_buf[:, :pad].zero_()
        v_buf[:, :pad].zero_()
        t_buf[:, pad:].copy_(tokens)
        p_buf[:, pad:].copy_(positions)
        v_buf[:, pad:].copy_(valid)
        graph.replay()

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _step(self, tokens, positions, valid, k_cache, v_cache, logits: bool = True) -> torch.Tensor | None:
        """Logits of ``tokens  # [B, w]`` at ``positions  # [B, w]``; writes their K/V into slot =
        position (the trash slot where not ``valid`` or past the capacity).  # -> [B, w, V] float32
        (``logits=False``: only the K/V, for a prompt)"""
        B, w = tokens.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        G = H // Hkv
        slots = torch.where(valid & (positions < self.slots), positions, self.slots)   # [B, w]
        rows = torch.arange(B, device=tokens.device).unsqueeze(1).expand(B, w)
        # which cache slots each query sees: its own row's positions up to its own
        seen = self.ar[: self.slots + 1].view(1, 1, -1) <= positions.unsqueeze(-1)      # [B, w, S+1]
        seen[..., self.slots] = False
        bias = torch.where(seen, 0.0, float("-inf")).view(B, 1, 1, w, -1)            # [B, 1, 1, w, S+1]
        freqs = positions.unsqueeze(-1).float() * self.inv_freq                       # [B, w, D/2]
        emb = torch.cat([freqs, freqs], -1)
        cos = (emb.cos() * self.rope_scale).to(self.dtype).unsqueeze(2)               # [B, w, 1, D]
        sin = (emb.sin() * self.rope_scale).to(self.dtype).unsqueeze(2)
        h = F.embedding(tokens, self.embed)                                           # [B, w, hidden]
        for i, L in enumerate(self.layers):
            x = self._rms(h, L["in_norm"])
            qkv = F.linear(x, L["wqkv"], L["bqkv"])
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
            q = _rope(q.view(B, w, H, D), cos, sin)
            k = _rope(k.view(B, w, Hkv, D), cos, sin)
            k_cache[i, rows, slots] = k
            v_cache[i, rows, slots] = v.view(B, w, Hkv, D)
            keys = k_cache[i].permute(0, 2, 3, 1).unsqueeze(2)                         # [B, Hkv, 1, D, S+1]
            vals = v_cache[i].transpose(1, 2).unsqueeze(2)                             # [B, Hkv, 1, S+1, D]
            qg = q.view(B, w, Hkv, G, D).permute(0, 2, 3, 1, 4)                        # [B, Hkv, G, w, D]
            scores = torch.matmul(qg, keys).float() * self.scaling                     # [B, Hkv, G, w, S+1]
            att = torch.softmax(scores + bias, -1).to(self.dtype)
            o = torch.matmul(att, vals)                                                # [B, Hkv, G, w, D]
            o = o.permute(0, 3, 1, 2, 4).reshape(B, w, H * D)
            h = h + F.linear(o, L["wo"], L["bo"])
            x = self._rms(h, L["post_norm"])
            gate, up = F.linear(x, L["w13"], L["b13"]).chunk(2, -1)
            h = h + F.linear(F.silu(gate) * up, L["w2"], L["b2"])
        if not logits:
            return None
        h = self._rms(h, self.final_norm)
        return F.linear(h, self.lm_head, self.lm_head_bias).float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, transformers' rotate-half convention.  # x [B, w, heads, D]"""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin
