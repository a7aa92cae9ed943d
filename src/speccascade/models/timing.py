"""Timing model calls: the cost of one call (:func:`call_seconds`, the latency model's per-call
costs and the benchmarks' per-token latencies), and a backend wrapper that times the calls of a
decode, for measuring the share spent outside the two models' forward passes (benchmarks only: it
synchronises the device around every call, which the loop itself never does per token)."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device | str | None = None) -> None:
    """Wait until ``device`` has run what was queued on it (CUDA); nothing to wait for on a CPU.
    ``None``: the current CUDA device where there is one."""
    if device is None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    elif torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def call_seconds(backend, prompt: list[int], width: int = 1, repeats: int = 20, ragged: bool = False) -> float:
    """Median seconds of one call of ``backend`` on ``width`` new tokens after ``prompt`` (extend,
    then a commit of none, so every call sees the same cache), warm-up excluded. A backend the
    loops capture (the fused backend on a GPU) is timed as graph replays, the way the loops run
    it: timed as plain calls its steps cost 5-10x more. ``ragged``: the feed comes with per-row
    lengths, as a ragged feed does (the first drafter call of an sd block, ``loop.extend_carried``)."""
    from .. import runner
    from .features import timing_feed, timing_reset

    x = torch.tensor([prompt])
    timing_reset(backend, x, torch.ones_like(x))
    feed = x[:, -1:].expand(1, width).contiguous().to(backend.device)
    none = torch.zeros(1, dtype=torch.long, device=backend.device)
    lengths = torch.full((1,), width, dtype=torch.long, device=backend.device) if ragged else None

    def call():
        timing_feed(backend, feed, lengths)   # (a feature drafter: with zero features, the same shapes)
        backend.commit(none)

    return fn_seconds(call, backend.device, repeats, captured=runner.can_capture(backend))


def fn_seconds(fn, device: torch.device, repeats: int = 20, captured: bool = False) -> float:
    """Seconds per call of ``fn`` (a function of device tensors): with ``captured``, captured as one
    CUDA graph and replayed (``runner.replay_seconds``), as the loops run a capturable step; else
    the median of ``repeats`` plain calls after 3 warm-up calls (synchronised on CUDA)."""
    from .. import runner

    if captured:
        return runner.replay_seconds(fn, device, repeats)
    times = []
    for _ in range(repeats + 3):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[3:])


class TimedBackend:
    def __init__(self, inner):
        self.inner = inner
        self.name, self.vocab_size = inner.name, inner.vocab_size
        self.max_positions, self.device = inner.max_positions, inner.device
        self.seconds = 0.0
        self.calls = 0
        # encoder-decoders; a drafter reading the verifier's states and a verifier giving them (models.features)
        for attr in ("first_pending", "encoder_decoder", "max_source_positions", "takes_features", "feature_size",
                     "gives_states", "state_size"):
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))

    def _timed(self, fn, *args):
        sync(self.device)
        t = time.perf_counter()
        out = fn(*args)
        sync(self.device)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out

    def reset(self, input_ids, attention_mask, **features):
        return self._timed(lambda: self.inner.reset(input_ids, attention_mask, **features))

    def extend(self, tokens, lengths=None):
        return self._timed(self.inner.extend, tokens, lengths)

    def reset_hidden(self, input_ids, attention_mask):
        return self._timed(self.inner.reset_hidden, input_ids, attention_mask)

    def extend_hidden(self, tokens, lengths=None):
        return self._timed(self.inner.extend_hidden, tokens, lengths)

    def extend_features(self, tokens, features, lengths=None):
        return self._timed(self.inner.extend_features, tokens, features, lengths)

    def commit(self, n_keep):
        return self.inner.commit(n_keep)  # bookkeeping, counted as outside the forwards


def outside_share(total_s: float, *backends: TimedBackend) -> float:
    """Share of ``total_s`` not spent inside the backends' reset / extend calls."""
    inside = sum(b.seconds for b in backends)
    return max(0.0, 1.0 - inside / total_s) if total_s > 0 else 0.0
