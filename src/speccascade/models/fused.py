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

**Compiled per region** (``compile=True``, on a GPU): the prologue (embeddings, rotary tables,
attention bias), *one* decoder layer and the head are compiled, and the step calls the layer's
compiled code once per layer with that layer's weights and cache as inputs. A 30-layer model so
compiles a one-layer program per (batch, feed width, cache size), not a 30-layer one: compiling the
whole model took minutes per specialisation on an H200, and a sweep meets dozens
(``benchmarks/compile_time.py`` measures both). The host calls ~L + 2 compiled functions per step,
which costs nothing per token where the loops replay the step as a CUDA graph (:mod:`..runner`).

Logits equal the transformers model's to float rounding (tests compare them, ragged batches,
rollbacks included).

**Tensor parallelism** (``tp=N`` under an initialised ``torch.distributed`` process group of N
ranks; issue 17): Megatron-style sharding of the *whole* model's weights, each rank keeping its
slice. Column-parallel: rank r keeps q/k/v heads ``[r·H/N, (r+1)·H/N)`` (and the matching KV heads,
so GQA groups stay whole; the KV-head count must divide by N) and gate/up columns ``[r·I/N,
(r+1)·I/N)``; row-parallel: the matching input columns of o_proj and down_proj, whose partial
outputs are summed by one ``all_reduce`` each per layer (their biases added once, after it).
Embeddings, norms and the LM head stay whole on every rank, so the logits come out whole on every
rank and ranks that run the same loop with the same seed draw the same tokens. The KV cache holds
only the rank's heads. The all-reduce is issued from the current stream (NCCL), so it is captured
in the same CUDA graph as the rest of the step (the block's, :mod:`speccascade.runner`, and the
prefill's); compiled, it is a functional collective that torch.compile traces into the step. On a
CPU (gloo) nothing is captured: the step runs eagerly (what the CPU tests exercise).

Models of another architecture raise :class:`UnsupportedModel`; use the ``graphs`` / ``compiled``
backends for them.

Contract (beyond :mod:`.base`): ``capturable = True`` (``extend`` / ``commit`` make no host read
and keep no host-side state), ``output_device == device``; ``reserve(batch, length)`` sizes the
cache before ``reset`` and is what ``generate`` calls with the request's longest sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import SpecCascadeError
from .features import mix_features
from .static import bucket

SUPPORTED = ("llama", "qwen2", "mistral")


class UnsupportedModel(SpecCascadeError):
    """The model is not of an architecture the fused backend implements."""


def unsupported_reason(cfg, name: str = "model") -> str | None:
    """Why the fused backend cannot run a model of config ``cfg`` (None: it can). Checked from the
    config alone, so a launcher can decide before any weights load."""
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        return f"the fused backend implements {', '.join(SUPPORTED)} models; the {name} is {kind}"
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu" or getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) \
            and kind == "mistral":
        return (f"the fused backend needs silu MLPs and full attention; the {name} has hidden_act={act!r} / "
                f"sliding_window")
    return None


def check_tp_shape(cfg, tp: int, name: str = "model") -> None:
    """The head and MLP widths of config ``cfg`` split evenly over ``tp`` ranks (else an error
    naming the counts)."""
    if tp == 1:
        return
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    inter = int(cfg.intermediate_size)
    if kv % tp:
        raise SpecCascadeError(f"--tp {tp}: the {name}'s {kv} key/value heads ({heads} query heads) do not divide "
                               f"by {tp}; each rank keeps whole KV heads: give a --tp that divides {kv}")
    if inter % tp:
        raise SpecCascadeError(f"--tp {tp}: the {name}'s MLP width {inter} (intermediate_size) does not divide by "
                               f"{tp}; give a --tp that divides it")


def _capacity(length: int, minimum: int = 64) -> int:
    """Cache slots for sequences up to ``length`` tokens: a power of two >= ``minimum`` (64)."""
    return max(minimum, 1 << (max(length, 1) - 1).bit_length())


#: the cache's slot count (the S slots and the trash slot) is rounded up to a multiple of this, so that
#: the attention's matrix products see row strides of 16 bytes in bf16: with S + 1 (odd) slots cuBLAS
#: took an unaligned kernel for every feed of 2 or more tokens (deep pair run 7's profile: 60 launches of
#: a ``..._align1`` kernel, 398 us of the 6-token verifier call's 1,281 us of kernels)
CACHE_ALIGN = 8


def _cache_len(slots: int) -> int:
    """Slots allocated for ``slots`` usable ones and the trash slot: ``slots + 1`` rounded up to
    :data:`CACHE_ALIGN` (the slots past the trash slot are never written and never seen)."""
    return -(-(slots + 1) // CACHE_ALIGN) * CACHE_ALIGN


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMS norm (no mean subtraction, no bias), the mean square in float32: ``w * x / rms(x)``, the
    normalised ``x`` cast to ``dtype`` (``x``'s own if None) before the scale. Llama's RMSNorm casts
    to the input's dtype; T5's ``T5LayerNorm`` to the weight's where that is half precision."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype if dtype is None else dtype)


class PositionIndexedCache:
    """What the fused backends share: the per-row, position-indexed self-attention KV cache and its
    bookkeeping, every piece of it on the device (see the module's docstring), and the compilation
    of a step per region.

    * ``reserve(batch, length)`` allocates ``k_cache`` / ``v_cache  # [layers, B, Hkv, C, D]``
      (S = :func:`_capacity` of ``length``, at least ``min_slots``; slot S is the trash slot that takes the writes of
      padding; C = :func:`_cache_len` (S): S + 1 rounded up to :data:`CACHE_ALIGN`, for aligned rows), the
      per-row counts ``n_pos`` (tokens cached, tentative ones included) and
      ``n_committed``, and bumps ``generation``;
    * ``extend`` places a feed at each row's next positions (a ragged feed's padding is not
      ``valid`` and goes to the trash slot); ``commit`` lowers ``n_pos`` to the kept count: a
      rollback copies nothing, the next feed overwrites the dropped slots;
    * :meth:`_cache_slots` gives a step where its K/V go and which slots each query sees; a step's
      ``positions`` are ``[B, w]``, or ``[B, 1]``: each row's first position, the feed's tokens at
      the positions after it (what ``extend`` passes, so that the step's compiled prologue works the
      positions out inside its own kernels), and ``valid`` is None where every token is real.

    A subclass sets ``name``, ``device``, ``dtype``, ``eps``, ``n_layers``, ``n_kv``, ``head_dim``
    and ``max_positions``, defines ``_prologue`` / ``_layer`` / ``_head`` and ``_step(tokens,
    positions, valid, k_cache, v_cache)  # -> logits [B, w, V] float32``, and calls
    :meth:`_compile_regions` from its constructor.
    """

    capturable = True
    batch = 0
    slots = 0
    min_slots = 64   # the smallest cache (a power of two above it otherwise)

    def _compile_regions(self, compile: bool, compile_options: dict | None) -> None:
        """Compiled per region (see the module's docstring): the prologue, *one* layer and the head
        are compiled; the step calls the layer's compiled code once per layer, with that layer's
        weights and cache as inputs. ``compile=False``: the same functions, eager."""
        self.compiled = compile
        self._prologue_fn, self._layer_fn, self._head_fn = self._prologue, self._layer, self._head
        self._head_states_fn = getattr(self, "_head_states", None)
        if compile:  # one specialisation per (batch, feed width, cache size): many in a sweep
            from .static import _raise_recompile_limit

            _raise_recompile_limit(1024)
            opts = dict(dynamic=False, fullgraph=True, options=compile_options or None)
            self._prologue_fn = torch.compile(self._prologue, **opts)
            self._layer_fn = torch.compile(self._layer, **opts)
            self._head_fn = torch.compile(self._head, **opts)
            if self._head_states_fn is not None:
                self._head_states_fn = torch.compile(self._head_states, **opts)
        self._step_fn = self._step

    def _allocated(self) -> None:
        """Called when new cache tensors are allocated (``generation`` bumped): drop the graphs
        that hold the old ones. A subclass that keeps more calls this too."""
        self._graphs = {}

    # -- the Backend interface (but reset) -------------------------------------------------------

    def reserve(self, batch: int, length: int) -> None:
        """Make room for ``batch`` rows of up to ``length`` tokens each (prompt, new tokens and a
        block's tentative ones). Keeps the cache (and so captured graphs) when it already fits."""
        slots = _capacity(length, self.min_slots)
        if self.batch == batch and self.slots >= slots:
            return
        if self.max_positions and length > self.max_positions:
            raise SpecCascadeError(f"{length} positions exceed the {self.name}'s context of {self.max_positions}")
        # head-major, so that a layer's keys and values are [B, Hkv, C, D] matrices the attention's
        # products read in place (a slot-major cache made inductor copy the whole cache every layer)
        n = _cache_len(slots)   # slot `slots` is the trash slot; those past it are alignment only
        shape = (self.n_layers, batch, self.n_kv, n, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.n_pos = torch.zeros(batch, dtype=torch.long, device=self.device)        # real tokens cached per row
        self.n_committed = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.ar = torch.arange(n, device=self.device)
        self.batch, self.slots = batch, slots
        self.generation = getattr(self, "generation", 0) + 1   # captured graphs hold the old tensors
        self._allocated()

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self._extend(tokens, lengths)

    def _extend(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None, states: bool = False,
                features=None):
        """:meth:`extend`; with ``states``, (logits, the last hidden states), and ``features``: a
        feature drafter's input (:class:`FusedFeatureBackend`)."""
        tokens = tokens.to(self.device)
        k = tokens.shape[1]
        # compiled: ragged feeds (token_cascade / BiLD, given `lengths`) pad up to a few widths, so they
        # meet a few compiled shapes; full feeds (the block's 1 and gamma + 1) keep their own width
        width = bucket(k) if self.compiled and lengths is not None else k
        if width > k:
            tokens = F.pad(tokens, (0, width - k))
            features = None if features is None else F.pad(features, (0, 0, 0, width - k))
        # each row's feed starts at its count of cached tokens: a view of n_pos, which the step reads
        # before the count is advanced below (its kernels come first on the stream). The step's
        # compiled prologue adds the offsets, so an extend launches one kernel of its own (the count's
        # update), not three: a speculative block makes gamma + 2 calls
        start = self.n_pos.unsqueeze(1)                                               # [B, 1]
        valid = None
        if lengths is not None:
            lengths = lengths.to(self.device)
            valid = self.ar[:width].unsqueeze(0) < lengths.unsqueeze(1)               # [B, width]
        if states or features is not None:   # (a direct call: the host-driven replays keep logits only)
            logits, hidden = self._step_fn(tokens, start, valid, self.k_cache, self.v_cache, states=True,
                                           features=features)
        else:
            logits, hidden = self._forward(tokens, start, valid), None
        self.n_pos.add_(k if lengths is None else lengths)
        return logits[:, :k] if not states else (logits[:, :k], hidden[:, :k])

    @torch.no_grad()
    def commit(self, n_keep: torch.Tensor) -> None:
        fed = self.n_pos - self.n_committed
        self.n_pos.copy_(self.n_committed + torch.minimum(n_keep.to(self.device), fed))
        self.n_committed.copy_(self.n_pos)

    # -- the step ------------------------------------------------------------------------------

    def _forward(self, tokens, positions, valid) -> torch.Tensor:
        if self._replays():   # a host-driven call (a sequential method's step): one graph launch
            positions, valid = self._feed(positions, valid, tokens.shape[1])   # whole, for the graph's buffers
            if valid is None:
                valid = torch.ones_like(positions, dtype=torch.bool)
            return self._replay(tokens, positions, valid, logits=True).clone()   # the next replay overwrites it
        return self._step_fn(tokens, positions, valid, self.k_cache, self.v_cache)

    def _replays(self) -> bool:
        """Whether this call replays a CUDA graph of the step: compiled on CUDA, and not itself
        being warmed up or captured into a caller's program (the speculative block, a token of
        single-model decoding: :mod:`speccascade.runner`), which then calls the step directly.
        Host-driven calls (a prompt's pre-fill, the sequential methods that read the host per
        token: token_cascade, BiLD, the oracle) would otherwise launch every kernel of every layer
        from the host, ~L + 2 compiled calls a step."""
        from .. import runner

        return self.compiled and runner.can_capture(self) and not runner.in_program()

    def _replay(self, tokens, positions, valid, logits: bool = True, states: bool = False, features=None):
        """The step on these inputs as a replay of a CUDA graph captured once per (batch, width,
        output, ``features`` or not) and cache generation; returns the graph's output buffer: the
        logits, or with ``states`` the last hidden states (a verifier's pre-fill for a feature
        drafter), or None (``logits=False``: the K/V only, a pre-fill; ``features  # [B, w, H]``: a
        feature drafter's)."""
        from .. import runner

        B, w = tokens.shape
        key = (B, w, logits, states, features is not None, self.generation)
        if key not in self._graphs:
            bufs = [torch.zeros(B, w, dtype=torch.long, device=self.device),
                    torch.zeros(B, w, dtype=torch.long, device=self.device),
                    torch.zeros(B, w, dtype=torch.bool, device=self.device)]   # all padding: writes only trash
            if features is not None:
                bufs.append(torch.zeros(B, w, features.shape[-1], dtype=features.dtype, device=self.device))
            width = self.state_size if states else self.vocab_size
            result = torch.empty(B, w, width, device=self.device) if logits or states else None

            extra = {} if logits and not states and features is None else \
                dict(logits=logits, states=states, features=bufs[3] if features is not None else None)

            def call():
                out = self._step_fn(*bufs[:3], self.k_cache, self.v_cache, **extra)
                if states:
                    result.copy_(out[1])
                elif logits:
                    result.copy_(out)

            self._graphs[key] = (runner.capture_call(call, self.device, warm_ups=2), bufs, result)
        graph, bufs, result = self._graphs[key]
        for buf, x in zip(bufs, (tokens, positions, valid, features)):
            buf.copy_(x)
        graph.replay()
        return result

    def _feed(self, positions, valid, w: int):
        """A step's ``positions`` whole (``[B, w]``; given ``[B, 1]``, the feed's tokens follow each
        row's first position) and its ``valid`` as given (None: every token real)."""
        if positions.shape[1] != w:
            positions = positions + self.ar[:w].unsqueeze(0)
        return positions, valid

    def _cache_slots(self, positions, valid):
        """Where a feed's K/V go and what its queries see: ``rows``, ``slots  # [B, w]`` (slot =
        position; the trash slot where not ``valid`` or past the capacity) and ``seen  # [B, w, C]``
        (each query sees its own row's slots up to its own position, never the trash slot or the
        alignment slots after it). ``positions`` whole (:meth:`_feed`), ``valid`` None: all real."""
        B, w = positions.shape
        inside = positions < self.slots
        slots = torch.where(inside if valid is None else valid & inside, positions, self.slots)   # [B, w]
        rows = torch.arange(B, device=positions.device).unsqueeze(1).expand(B, w)
        seen = self.ar.view(1, 1, -1) <= positions.unsqueeze(-1)                      # [B, w, C]
        seen[..., self.slots:] = False
        return rows, slots, seen

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, w, self.eps)


class FusedLlamaBackend(PositionIndexedCache):
    """A Llama-family causal LM with fused projections and a per-row position-indexed cache."""

    def __init__(self, model: torch.nn.Module, name: str = "model", compile: bool = False,
                 compile_options: dict | None = None, tp: int = 1, tp_group=None, device=None):
        """``model``: a whole transformers Llama-family model. ``tp`` > 1: keep this rank's shard
        (rank ``dist.get_rank(tp_group)`` of ``tp``, the default group if None) and all-reduce over
        ``tp_group``. ``device``: where the backend's weights and cache live (default: ``model``'s);
        only what the backend keeps is copied there (with ``tp`` > 1, the shard), so a verifier too
        large for one GPU can be loaded whole on the host and sharded onto the GPUs."""
        cfg = getattr(model, "config", None)
        kind = getattr(cfg, "model_type", None)
        if getattr(cfg, "is_encoder_decoder", False):
            raise SpecCascadeError(f"the fused backend is for decoder-only Llama-family models; the {name} "
                                   f"({type(model).__name__}) is an encoder-decoder model: use the seq2seq backend "
                                   f"(backend 'seq2seq' / 'dynamic' / 'auto')")
        if kind not in SUPPORTED or not hasattr(model, "model") or not hasattr(model.model, "layers"):
            raise UnsupportedModel(f"the fused backend implements {', '.join(SUPPORTED)} models; the {name} is "
                                   f"{kind or type(model).__name__}: use --backend graphs or compiled")
        reason = unsupported_reason(cfg, name)
        if reason:
            raise UnsupportedModel(f"{reason}: use --backend graphs or compiled")
        tp = int(tp)
        if tp > 1:
            check_tp_shape(cfg, tp, name)
            if not dist.is_available() or not dist.is_initialized():
                raise SpecCascadeError(f"a tensor-parallel fused {name} (tp={tp}) needs an initialised "
                                       f"torch.distributed process group (torchrun; speccascade.distributed.init_tp)")
            if dist.get_world_size(tp_group) != tp:
                raise SpecCascadeError(f"tp={tp}, but the process group has {dist.get_world_size(tp_group)} ranks")
            if any(getattr(p, "full_tensor", None) is not None for p in model.parameters()):
                raise SpecCascadeError(f"the tensor-parallel fused backend shards the whole {name} itself; it was "
                                       f"given a model already sharded by transformers (tp_plan): load it whole")
        self.tp = tp
        self.tp_group = tp_group
        self.tp_rank = dist.get_rank(tp_group) if tp > 1 else 0
        self.name = name
        self.device = next(model.parameters()).device
        self.output_device = self.device
        self.dtype = next(model.parameters()).dtype
        inner = model.model
        first = inner.layers[0].self_attn
        heads = int(cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        self.n_heads = heads // tp                                          # this rank's query heads
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or heads) // tp   # and key/value heads
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
        if device is not None and torch.device(device) != self.device:
            self._move_to(torch.device(device))
        self.vocab_size = int(self.lm_head.shape[0])
        self.state_size = int(self.embed.shape[1])   # the width of its last hidden states (extend_hidden)
        self.n_layers = len(self.layers)
        self._compile_regions(compile, compile_options)

    def _move_to(self, device: torch.device) -> None:
        """Copy every tensor the backend keeps to ``device``, once each (tied embeddings and head
        stay one tensor)."""
        moved: dict = {}

        def to(t):
            if t is None:
                return None
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
            if key not in moved:
                moved[key] = t.to(device)
            return moved[key]

        self.embed, self.final_norm, self.lm_head = to(self.embed), to(self.final_norm), to(self.lm_head)
        self.lm_head_bias, self.inv_freq = to(self.lm_head_bias), to(self.inv_freq)
        self.layers = [{k: to(v) for k, v in layer.items()} for layer in self.layers]
        self.device = self.output_device = self.embed.device

    def _fuse(self, layer) -> dict:
        """One layer's weights, fused (q/k/v, gate/up) and, with ``tp`` > 1, cut to this rank's shard."""
        att, mlp = layer.self_attn, layer.mlp
        r, D = self.tp_rank, self.head_dim

        def rows(t, n_per_rank):
            """Column-parallel: this rank's block of ``n_per_rank`` output rows (a weight or bias)."""
            return t if self.tp == 1 or t is None else t[r * n_per_rank:(r + 1) * n_per_rank]

        def cols(w, n_per_rank):
            """Row-parallel: this rank's block of ``n_per_rank`` input columns."""
            return w if self.tp == 1 else w[:, r * n_per_rank:(r + 1) * n_per_rank].contiguous()

        def cat(pairs):
            """Concatenated weights (or biases; None when no piece has one) of (module, rows per rank)."""
            ws = [rows(m.weight, n) for m, n in pairs]
            bs = [rows(m.bias, n) for m, n in pairs]
            b = None if all(x is None for x in bs) else torch.cat(
                [x if x is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
                 for x, w in zip(bs, ws)])
            return torch.cat(ws).detach(), None if b is None else b.detach()

        inter = mlp.gate_proj.weight.shape[0] // self.tp
        wqkv, bqkv = cat([(att.q_proj, self.n_heads * D), (att.k_proj, self.n_kv * D), (att.v_proj, self.n_kv * D)])
        w13, b13 = cat([(mlp.gate_proj, inter), (mlp.up_proj, inter)])
        return {
            "in_norm": layer.input_layernorm.weight.detach(),
            "wqkv": wqkv, "bqkv": bqkv,
            "wo": cols(att.o_proj.weight, self.n_heads * D).detach(),
            "bo": None if att.o_proj.bias is None else att.o_proj.bias.detach(),
            "post_norm": layer.post_attention_layernorm.weight.detach(),
            "w13": w13, "b13": b13,
            "w2": cols(mlp.down_proj.weight, inter).detach(),
            "b2": None if mlp.down_proj.bias is None else mlp.down_proj.bias.detach(),
        }

    # -- the Backend interface (reserve, extend, commit: PositionIndexedCache) ----------------------

    @torch.no_grad()
    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self._reset(input_ids, attention_mask)

    def _reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: bool = False, features=None):
        """Cache every prompt token but the last (left padding goes to the trash slot) and count them.
        Compiled on CUDA, a pre-fill is one graph replay, also one that returns the last hidden states
        (``states``: a verifier for a feature drafter) or takes ``features  # [B, L - 1, H]`` (a feature
        drafter): as a direct call it would launch every compiled region from the host, ~0.3 ms each on
        an H200 (deep pair run 14: ~9 ms a 30-layer verifier's prompt). Compiled, the prompt is
        left-padded to a width of 64, 128, 256, ..., so that prompts of many lengths meet a few compiled
        shapes. Returns the real positions' states
        # [B, L - 1, H]  with ``states`` (None for a one-token prompt: nothing is cached)."""
        input_ids = input_ids.to(self.device)
        B, L = input_ids.shape
        if self.batch != B or self.slots < L + 1:
            # a new batch size (e.g. seq_cascade re-decoding some rows) keeps the request's capacity
            self.reserve(B, max(L + 1, self.slots))
        self.n_pos.zero_()
        self.n_committed.zero_()
        if L == 1:
            return None
        tokens, valid = input_ids[:, :-1], attention_mask.to(self.device)[:, :-1].bool()
        positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        pad = _capacity(L - 1) - (L - 1) if self.compiled else 0
        if pad:
            tokens, positions, valid = F.pad(tokens, (pad, 0)), F.pad(positions, (pad, 0)), F.pad(valid, (pad, 0))
            features = None if features is None else F.pad(features, (0, 0, pad, 0))
        if self._replays():
            out = self._replay(tokens, positions, valid, logits=False, states=states, features=features)
            out = out[:, pad:].clone() if states else None   # (the next pre-fill's replay overwrites the buffer)
        else:
            out = self._step(tokens, positions, valid, self.k_cache, self.v_cache, logits=states, states=states,
                             features=features)
            out = out[1][:, pad:] if states else None
        self.n_pos.copy_(valid.sum(1))
        self.n_committed.copy_(self.n_pos)
        return out

    # -- the verifier's states, for a drafter that reads them (models.features) ----------------

    gives_states = True   # reset_hidden / extend_hidden (tp = 1)

    @torch.no_grad()
    def reset_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """:meth:`reset`, returning the last hidden states (after the final norm) of the cached prompt
        tokens  # [B, L - 1, H]  (None for one-token prompts). Compiled on CUDA: one graph replay."""
        self._check_states()
        return self._reset(input_ids, attention_mask, states=True)

    @torch.no_grad()
    def extend_hidden(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None):
        """:meth:`extend`, returning the logits  # [B, k, V]  and the last hidden states (after the
        final norm: what the head reads)  # [B, k, H]  (float32). No host read: capturable."""
        self._check_states()
        return self._extend(tokens, lengths, states=True)

    def _check_states(self) -> None:
        if self.tp > 1:
            raise SpecCascadeError(f"the {self.name}'s states for a feature drafter are not implemented with "
                                   f"tensor parallelism (tp={self.tp})")

    # -- the step ------------------------------------------------------------------------------

    def _row_parallel(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``x @ w.T + b``; with ``tp`` > 1 ``x`` and ``w`` are this rank's columns: the partial
        products of all ranks are summed (one all-reduce), then the bias is added once."""
        if self.tp == 1:
            return F.linear(x, w, b)
        y = F.linear(x, w)
        if self.compiled:   # a functional collective: torch.compile traces it (and a CUDA graph captures it)
            from torch.distributed import _functional_collectives as funcol

            y = funcol.all_reduce(y, "sum", self.tp_group if self.tp_group is not None else dist.group.WORLD)
        else:               # on the current stream: captured with the step on CUDA, eager over gloo
            dist.all_reduce(y, group=self.tp_group)
        return y if b is None else y + b

    def _step(self, tokens, positions, valid, k_cache, v_cache, logits: bool = True, states: bool = False,
              features=None):
        """Logits of ``tokens  # [B, w]`` at ``positions  # [B, w]`` (or ``[B, 1]``: :meth:`_feed`);
        writes their K/V into slot = position (the trash slot where not ``valid`` or past the capacity).
        # -> [B, w, V] float32 (``logits=False``: only the K/V, for a prompt; ``states``: (logits,
        the last hidden states after the final norm  # [B, w, H] float32)). ``features  # [B, w, H]``:
        a feature drafter's input beside the tokens (:class:`FusedFeatureBackend`)."""
        h, cos, sin, bias, rows, slots = self._prologue_fn(tokens, positions, valid, features)
        for i, L in enumerate(self.layers):
            h = self._layer_fn(h, L, cos, sin, bias, rows, slots, k_cache[i], v_cache[i])
        if states:
            return self._head_states_fn(h)
        return self._head_fn(h) if logits else None

    def _prologue(self, tokens, positions, valid, features=None):
        """What every layer shares: the embeddings ``h``, the rotary tables, the attention bias
        (each query sees its own row's slots up to its own position) and where the new K/V go."""
        B, w = tokens.shape
        positions, valid = self._feed(positions, valid, w)
        rows, slots, seen = self._cache_slots(positions, valid)
        bias = torch.where(seen, 0.0, float("-inf")).view(B, 1, 1, w, -1)            # [B, 1, 1, w, C]
        freqs = positions.unsqueeze(-1).float() * self.inv_freq                       # [B, w, D/2]
        emb = torch.cat([freqs, freqs], -1)
        cos = (emb.cos() * self.rope_scale).to(self.dtype).unsqueeze(2)               # [B, w, 1, D]
        sin = (emb.sin() * self.rope_scale).to(self.dtype).unsqueeze(2)
        return self._embed(tokens, features), cos, sin, bias, rows, slots            # h: [B, w, hidden]

    def _embed(self, tokens, features):
        return F.embedding(tokens, self.embed)

    def _layer(self, h, L: dict, cos, sin, bias, rows, slots, k_cache, v_cache) -> torch.Tensor:
        """One decoder layer: ``L`` its fused weights, ``k_cache`` / ``v_cache  # [B, Hkv, C, D]``
        its cache, written at ``slots`` in place."""
        B, w = h.shape[:2]
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        x = self._rms(h, L["in_norm"])
        qkv = F.linear(x, L["wqkv"], L["bqkv"])
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
        q = _rope(q.view(B, w, H, D), cos, sin)
        k = _rope(k.view(B, w, Hkv, D), cos, sin)
        k_cache[rows, :, slots] = k                                                    # [B, w, Hkv, D] in
        v_cache[rows, :, slots] = v.view(B, w, Hkv, D)
        o = gqa_attention(q, k_cache, v_cache, bias, self.scaling)
        h = h + self._row_parallel(o, L["wo"], L["bo"])
        x = self._rms(h, L["post_norm"])
        gate, up = F.linear(x, L["w13"], L["b13"]).chunk(2, -1)
        return h + self._row_parallel(F.silu(gate) * up, L["w2"], L["b2"])

    def _head(self, h) -> torch.Tensor:
        return F.linear(self._rms(h, self.final_norm), self.lm_head, self.lm_head_bias).float()

    def _head_states(self, h):
        x = self._rms(h, self.final_norm)
        return F.linear(x, self.lm_head, self.lm_head_bias).float(), x.float()


class FusedFeatureBackend(FusedLlamaBackend):
    """The fused backend for a :class:`.features.LlamaFeatureDrafter`: every feed carries the features
    of its positions (mixed with the tokens' embeddings in the compiled prologue), and each call
    returns the drafter's own last hidden states beside the logits. Capturable, as its parent."""

    takes_features = True

    def __init__(self, model, name: str = "drafter", compile: bool = False, compile_options: dict | None = None,
                 device=None):
        super().__init__(model, name, compile=compile, compile_options=compile_options, device=device)
        self.feature_size = int(model.config.feature_size)
        self.feature_scale = float(model.config.feature_scale)
        self.feature_mix = model.feature_mix.weight.detach().to(self.device)

    @torch.no_grad()
    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              features: torch.Tensor | None = None) -> None:
        """As :meth:`FusedLlamaBackend.reset` (compiled on CUDA: one graph replay); ``features  # [B, L - 1,
        H]``: those of the cached prompt tokens (:func:`.features.prompt_features`)."""
        if features is None and input_ids.shape[1] > 1:
            raise SpecCascadeError(f"the {self.name} is a feature drafter: its prompt needs the verifier's "
                                   f"states (the speculative loop passes them; methods that run the drafter "
                                   f"alone cannot)")
        self._reset(input_ids, attention_mask, features=None if features is None else features.to(self.device))

    @torch.no_grad()
    def extend_features(self, tokens: torch.Tensor, features: torch.Tensor, lengths: torch.Tensor | None = None):
        """Feed ``tokens  # [B, k]`` with their ``features  # [B, k, H]``; returns the logits  # [B, k, V]
        and the drafter's own last hidden states  # [B, k, H]  (float32)."""
        return self._extend(tokens, lengths, states=True, features=features.to(self.device))

    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        raise SpecCascadeError(f"the {self.name} is a feature drafter: it is fed with the verifier's states "
                               f"(extend_features), not tokens alone")

    def _embed(self, tokens, features):
        """``W [embed(x_i); s(f_{i-1})]`` (:meth:`.features.LlamaFeatureDrafter.feature_embeddings`)."""
        return mix_features(F.embedding(tokens, self.embed), features, self.feature_scale, self.feature_mix)


def gqa_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """Attention of ``q  # [B, w, H, D]`` over a layer's head-major cache ``k_cache`` / ``v_cache  #
    [B, Hkv, C, D]`` with ``bias  # [B, 1, 1, w, C]`` (0 where seen, -inf elsewhere), the scores in
    float32.  # -> [B, w, H·D] in the cache's dtype

    A KV head's G = H / Hkv query heads and the feed's w positions are the G·w rows of one matrix
    product with that head's cache (GQA), so the cache is read where it lies, never expanded or
    copied (``benchmarks/cache_layout.py`` times this against the slot-major layout it replaced)."""
    B, w, H, D = q.shape
    Hkv = k_cache.shape[1]
    G = H // Hkv
    qg = q.view(B, w, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * w, D)    # [B, Hkv, G·w, D]
    scores = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * scaling           # [B, Hkv, G·w, C]
    att = torch.softmax(scores.view(B, Hkv, G, w, -1) + bias, -1).to(k_cache.dtype)
    o = torch.matmul(att.view(B, Hkv, G * w, -1), v_cache)                             # [B, Hkv, G·w, D]
    return o.view(B, Hkv, G, w, D).permute(0, 3, 1, 2, 4).reshape(B, w, H * D)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, transformers' rotate-half convention.  # x [B, w, heads, D]"""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin
