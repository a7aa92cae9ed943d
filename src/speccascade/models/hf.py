"""A backend for any ``transformers`` causal LM, with a dynamic KV cache and masked rollback.

Rows of a batch advance by different numbers of tokens per block. All rows share one cache
length; a slot a row does not use (left padding, a rejected draft, padding of a ragged feed) is
masked out of attention by the 2-D ``attention_mask``, and each row's ``position_ids`` count only
its real tokens, so a row's logits are exactly those of its own sequence. Slots that no row uses
any more are cropped from the end of the cache after each commit; at batch size 1 this is an
exact rollback and the cache never holds a hole.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import SpecCascadeError


def _new_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # older signature
        return DynamicCache()


class HFBackend:
    def __init__(self, model: torch.nn.Module, name: str = "model"):
        if not hasattr(model, "config") or not callable(getattr(model, "forward", None)):
            raise SpecCascadeError(f"{name} must be a transformers causal LM (AutoModelForCausalLM), got {type(model).__name__}")
        self.model = model.eval()
        self.name = name
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab_size = int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self.cache = None
        # transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version takes
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # -- the Backend interface -----------------------------------------------------------------

    @torch.no_grad()
    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        input_ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device).bool()
        self.cache = self._make_cache(input_ids.shape[0])
        self.valid = mask[:, :-1].clone()              # [B, slots] which cache slots each row uses
        self.n_pos = self.valid.sum(1)                  # [B] real tokens cached (committed + tentative)
        self.n_committed = self.n_pos.clone()           # [B]
        self.n_tentative_slots = 0
        if input_ids.shape[1] > 1:
            positions = (self.valid.long().cumsum(1) - 1).clamp_min(0)
            self._forward(input_ids[:, :-1], self.valid, positions)

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        tokens = tokens.to(self.device)
        B, k = tokens.shape
        offsets = torch.arange(k, device=self.device).unsqueeze(0)            # [1, k]
        new_valid = (offsets < lengths.to(self.device).unsqueeze(1)) if lengths is not None \
            else torch.ones(B, k, dtype=torch.bool, device=self.device)      # [B, k]
        positions = self.n_pos.unsqueeze(1) + offsets                          # [B, k]
        if self.max_positions:
            positions = positions.clamp(max=self.max_positions - 1)  # only padding can reach it
        mask = torch.cat([self.valid, new_valid], dim=1)
        logits = self._forward(tokens, mask, positions)
        self.valid = mask
        self.n_pos = self.n_pos + new_valid.sum(1)
        self.n_tentative_slots += k
        return logits.float()                                                  # [B, k, V]

    @torch.no_grad()
    def commit(self, n_keep: torch.Tensor) -> None:
        t = self.n_tentative_slots
        if t:
            tentative = self.valid[:, -t:]
            kept = tentative & (tentative.long().cumsum(1) <= n_keep.to(self.device).unsqueeze(1))
            self.valid = torch.cat([self.valid[:, :-t], kept], dim=1)
            self.n_pos = self.n_committed + kept.sum(1)
        self.n_committed = self.n_pos.clone()
        self.n_tentative_slots = 0
        self._drop_unused_slots()

    def _drop_unused_slots(self) -> None:
        """Crop cache slots that no row uses any more from the end (a host sync)."""
        used = self.valid.any(0).nonzero()
        keep_slots = int(used.max()) + 1 if used.numel() else 0
        drop = self.valid.shape[1] - keep_slots
        if drop > 0:
            self.cache.crop(-drop)
            self.valid = self.valid[:, :keep_slots]

    # -- internals ----------------------------------------------------------------------------

    def _make_cache(self, batch: int):
        return _new_cache(self.model.config)

    def _forward(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens, attention_mask=mask.long(), position_ids=positions,
                         use_cache=True, **{self._cache_kw: self.cache})
        return out.logits


def bucket(k: int) -> int:
    """The width a compiled call is padded to: 1, then powers of two up to 64, then multiples of
    128 (so a ragged feed or a prompt of any length meets one of a few captured shapes)."""
    if k <= 1:
        return 1
    if k <= 64:
        return 1 << (k - 1).bit_length()
    return -(-k // 128) * 128


def _raise_recompile_limit(n: int = 64) -> None:
    # each (backend, width) pair is one specialisation of the same step function
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name) and getattr(torch._dynamo.config, name) < n:
            setattr(torch._dynamo.config, name, n)


class StaticHFBackend(HFBackend):
    """The same contract over a pre-allocated, position-indexed KV cache (transformers'
    ``StaticCache``) of ``max_cache_len`` slots, with every model call at a fixed shape.

    * Slots are used in order and never cropped or copied: a rejected suffix, left padding and the
      padding of a ragged feed stay in their slots, masked out of attention (holes). Rollback is a
      change of the mask and of each row's position count, on the device: no host sync.
    * All bookkeeping (write the new tokens' mask bits at the next slots, each row's positions,
      advance the counters) lives in device tensors at fixed addresses and runs inside one step
      function with the model call, so under ``compile=True`` (``torch.compile``, mode
      ``reduce-overhead``: CUDA graphs on a GPU) a whole model call is one graph replay. A commit
      is a few small eager kernels (compiling it would add a graph per tentative width).
    * Feeds are padded to a few widths (:func:`bucket`: 1, 2, 4, 8, ..., 64, then multiples of
      128; prompts to at least 64), so ragged feeds and prompts of any length reuse a handful of
      captured graphs.

    The cache (and the captured graphs) are kept across generations of the same batch size.
    """

    def __init__(self, model: torch.nn.Module, name: str = "model", max_cache_len: int = 1024, compile: bool = False):
        super().__init__(model, name)
        self.max_cache_len = max_cache_len
        self.max_positions = min(self.max_positions, max_cache_len) if self.max_positions else max_cache_len
        self.compiled = compile
        self._static = None
        self._static_batch = None
        if compile:
            _raise_recompile_limit()
            self._step_fn = torch.compile(self._step, mode="reduce-overhead", dynamic=False)
        else:
            self._step_fn = self._step

    # -- the Backend interface -----------------------------------------------------------------

    @torch.no_grad()
    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        input_ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device).long()
        B, L = input_ids.shape
        if self._prepare(B):
            # a new cache allocates its tensors on the first call: make that call eagerly (one
            # masked dummy token), outside any compiled graph, then start clean
            dummy = torch.zeros(B, 1, dtype=torch.long, device=self.device)
            self._step(dummy, dummy)
            self._prepare(B)
            self._on_new_cache(B)
        self.slots, self.n_tentative_slots = 0, 0
        if L > 1:  # cache all prompt tokens but the last, left-padded to a bucket width
            pad = bucket(max(L - 1, 64)) - (L - 1)  # prompts: 64, 128, 256, ... slots
            tokens = torch.nn.functional.pad(input_ids[:, :-1], (pad, 0))
            valid = torch.nn.functional.pad(mask[:, :-1], (pad, 0))
            self._call(tokens, valid)
            self.n_tentative_slots = 0
            self._n_committed.copy_(self._n_pos)

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        tokens = tokens.to(self.device)
        B, k = tokens.shape
        width = bucket(k)
        if lengths is None:  # every row feeds k real tokens: a constant mask, no kernel
            valid = self._full_valid.get((B, k, width))
            if valid is None:
                valid = self._full_valid[(B, k, width)] = (self._ar[:width] < k).long().expand(B, width).contiguous()
        else:
            valid = (self._ar[:width].unsqueeze(0) < lengths.to(self.device).unsqueeze(1)).long()  # [B, width]
        if width > k:
            tokens = torch.nn.functional.pad(tokens, (0, width - k))
        elif self.compiled:
            tokens = self._canonical(tokens)
        logits = self._call(tokens, valid)[:, :k]
        # a CUDA graph's output is overwritten by its next replay: the caller gets its own copy
        return logits.to(torch.float32, copy=self.compiled)                                    # [B, k, V]

    @torch.no_grad()
    def commit(self, n_keep: torch.Tensor) -> None:
        if self.n_tentative_slots:
            self._commit_step(n_keep.to(self.device).long(), self.n_tentative_slots)
        self._n_committed.copy_(self._n_pos)
        self.n_tentative_slots = 0

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def _canonical(tokens: torch.Tensor) -> torch.Tensor:
        """Canonical strides for a compiled step: a [B, 1] view of a longer tensor would recompile it."""
        return tokens.clone(memory_format=torch.contiguous_format)

    def _on_new_cache(self, batch: int) -> None:
        """Called once a new cache exists (its tensors allocated, its state zero); subclasses
        capture graphs here."""

    def _prepare(self, batch: int) -> bool:
        """Reset (or first build) the cache and the device state; True if newly built."""
        from transformers import StaticCache

        if self._static is not None and self._static_batch == batch:
            self._static.reset()
            self._mask.zero_()
            self._n_pos.zero_()
            self._n_committed.zero_()
            self._slot.zero_()
            return False
        self.cache = self._static = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
        self._static_batch = batch
        dev = self.device
        self._mask = torch.zeros(batch, self.max_cache_len, dtype=torch.long, device=dev)  # which slots a row uses
        self._n_pos = torch.zeros(batch, dtype=torch.long, device=dev)          # real tokens cached per row
        self._n_committed = torch.zeros(batch, dtype=torch.long, device=dev)
        self._slot = torch.zeros((), dtype=torch.long, device=dev)              # next free slot
        self._ar = torch.arange(self.max_cache_len, device=dev)
        self._full_valid = {}
        for t in (self._mask, self._n_pos, self._n_committed, self._slot, self._ar):
            torch._dynamo.mark_static_address(t)
        return True

    def _call(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        width = tokens.shape[1]
        if self.slots + width > self.max_cache_len:
            raise SpecCascadeError(f"the {self.name}'s static cache is full ({self.max_cache_len} slots); "
                                   "raise max_cache_len")
        self.slots += width
        self.n_tentative_slots += width
        return self._step_fn(tokens, valid)

    def _step(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One model call on ``tokens  # [B, w]`` (``valid``: which are real) at the next w slots."""
        w = tokens.shape[1]
        self._mask.index_copy_(1, self._slot + self._ar[:w], valid)
        positions = (self._n_pos.unsqueeze(1) + valid.cumsum(1) - 1).clamp(0, self.max_positions - 1)
        logits = self.model(input_ids=tokens, attention_mask=self._mask, position_ids=positions, use_cache=True,
                            **{self._cache_kw: self._static}).logits
        self._n_pos.add_(valid.sum(1))
        self._slot.add_(w)
        return logits

    def _commit_step(self, n_keep: torch.Tensor, t: int) -> None:
        """Of the last ``t`` (tentative) slots, each row keeps the mask bits of its first ``n_keep``
        real tokens. The host knows where those slots are (``self.slots`` counts every slot fed), so
        they are a view of the mask: a few small kernels, no host sync."""
        tentative = self._mask[:, self.slots - t:self.slots]                                  # [B, t] view
        tentative.mul_(tentative.cumsum(1) <= n_keep.unsqueeze(1))
        torch.add(self._n_committed, tentative.sum(1), out=self._n_pos)


class GraphHFBackend(StaticHFBackend):
    """:class:`StaticHFBackend` whose decode calls replay CUDA graphs captured by hand
    (``torch.cuda.CUDAGraph``), one per feed width in ``widths`` and batch size, captured as soon as
    a cache is built; inside each graph the step (model call and bookkeeping) is inductor-compiled
    without CUDA graphs. A replay is one launch: torch.compile's own CUDA graphs (``compile=True``)
    also check every input of the call on each replay (every parameter and cache tensor, so their
    host cost grows with the layer count), which at batch 1 is most of a small model's call.
    The pre-fill and any width outside ``widths`` run the compiled step directly. CUDA only."""

    requires_cuda = True  # tests replace the capture by a simulation and run on the CPU

    def __init__(self, model: torch.nn.Module, name: str = "model", max_cache_len: int = 1024,
                 widths: tuple[int, ...] = (1, 2, 4, 8, 16)):
        super().__init__(model, name, max_cache_len, compile=False)
        if self.requires_cuda and self.device.type != "cuda":
            raise SpecCascadeError(f"GraphHFBackend captures CUDA graphs: the {name} is on {self.device}; "
                                   "use StaticHFBackend (compile=True also works on a CPU)")
        bad = [w for w in widths if bucket(w) != w]
        if bad:
            raise SpecCascadeError(f"graph widths must be bucket widths (1, 2, 4, ..., 64), got {bad}")
        self.compiled = True  # outputs of a replay are overwritten by the next one: extend copies them
        self.widths = tuple(sorted(set(widths), reverse=True))
        _raise_recompile_limit()
        self._inner = torch.compile(self._step, dynamic=False)
        self._graphs: dict = {}
        self._pool = None
        self._step_fn = self._replay_or_step

    def _canonical(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens  # a replay copies the feed into its own buffer; the fallback canonicalises

    def _on_new_cache(self, batch: int) -> None:
        self._graphs = {}
        self._pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        for w in self.widths:  # widest first, so the narrower graphs reuse its memory pool
            tokens = torch.zeros(batch, w, dtype=torch.long, device=self.device)
            valid = torch.ones(batch, w, dtype=torch.long, device=self.device)
            graph, logits = self._capture(tokens, valid)
            self._graphs[(batch, w)] = (graph, tokens, valid, logits)
            self._prepare(batch)  # the warm-up calls advanced the state: start clean again

    def _capture(self, tokens: torch.Tensor, valid: torch.Tensor):
        """Warm the step up on a side stream (compile, autotune, allocate), then capture one call
        reading ``tokens`` / ``valid``; returns the graph and the logits tensor each replay fills."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._inner(tokens, valid)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._inner(tokens, valid)
        return graph, logits

    def _replay_or_step(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        entry = self._graphs.get(tuple(tokens.shape))
        if entry is None:
            return self._inner(StaticHFBackend._canonical(tokens), valid)
        graph, static_tokens, static_valid, logits = entry
        static_tokens.copy_(tokens)
        static_valid.copy_(valid)
        graph.replay()
        return logits


BACKENDS = ("dynamic", "static", "compiled", "graphs")


def make_backend(model, name: str, kind: str = "dynamic", max_cache_len: int = 2048):
    """A backend by name: ``dynamic`` (:class:`HFBackend`), ``static`` or ``compiled``
    (:class:`StaticHFBackend` without / with torch.compile and CUDA graphs), ``graphs``
    (:class:`GraphHFBackend`: hand-captured CUDA graphs; CUDA only)."""
    if kind == "dynamic":
        return HFBackend(model, name)
    if kind in ("static", "compiled"):
        return StaticHFBackend(model, name, max_cache_len=max_cache_len, compile=kind == "compiled")
    if kind == "graphs":
        return GraphHFBackend(model, name, max_cache_len=max_cache_len)
    raise SpecCascadeError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
