"""A backend wrapper that times the model calls, for measuring the share of a decode spent outside
the two models' forward passes (benchmarks only: it synchronises the device around every call,
which the loop itself never does per token)."""

from __future__ import annotations

import time

import torch


class TimedBackend:
    def __init__(self, inner):
        self.inner = inner
        self.name, self.vocab_size = inner.name, inner.vocab_size
        self.max_positions, self.device = inner.max_positions, inner.device
        self.seconds = 0.0
        self.calls = 0
        for attr in ("first_pending", "encoder_decoder", "max_source_positions"):  # encoder-decoders
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, fn, *args):
        self._sync()
        t = time.perf_counter()
        out = fn(*args)
        self._sync()
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out

    def reset(self, input_ids, attention_mask):
        return self._timed(self.inner.reset, input_ids, attention_mask)

    def extend(self, tokens, lengths=None):
        return self._timed(self.inner.extend, tokens, lengths)

    def commit(self, n_keep):
        return self.inner.commit(n_keep)  # bookkeeping, counted as outside the forwards


def outside_share(total_s: float, *backends: TimedBackend) -> float:
    """Share of ``total_s`` not spent inside the backends' reset / extend calls."""
    inside = sum(b.seconds for b in backends)
    return max(0.0, 1.0 - inside / total_s) if total_s > 0 else 0.0
