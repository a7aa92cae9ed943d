"""The graphs backend: the static backend with each decode call a replay of a hand-captured CUDA graph."""

from __future__ import annotations

import torch

from ..errors import SpecCascadeError
from .static import StaticHFBackend, _raise_recompile_limit, bucket


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
