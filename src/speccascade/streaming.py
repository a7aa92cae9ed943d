"""Per-block streaming: what ``generate(..., streamer=...)`` calls while it decodes.

A *streamer* is any object with

* ``put(new_tokens: list[list[int]])``: each row's tokens emitted since the previous call (EOS
  kept, nothing after it; a row with nothing new gets ``[]``), called after every block (every
  step of the sequential methods) in which some row got a token;
* ``end()``: called once, after the last ``put``, when ``generate`` returns.

Optional, for callers that want more than tokens (the server, :mod:`speccascade.server.engine`):

* ``wants_tokens`` (default True): False skips the per-block host read of the tokens; ``put``
  then receives every row's tokens once, at the end;
* ``record(counts, accepted_at)``: per-row counters on the device, no host read, called once
  at the end of a speculative decode with each row's totals: ``counts  # [B, 8]`` (blocks,
  drafted, accepted, rejected, bonus, deferred, emitted, truncated) and ``accepted_at  # [B, gamma]``
  (blocks whose draft j was accepted); only the speculative loop provides them;
* ``stop_rows() -> list[int]``: rows to finish now (a cancelled request, a stop string, a row's own
  token limit): they are marked done, emit nothing more and stop counting.

The loops call :class:`BlockHook` after each block (the runner's ``after``, or one line in the
sequential loops), before the step's sync; on a GPU the per-block host read of the tokens forgoes the
loop's one-block-late pipelining, so a streamer costs one device sync per block. ``seq_cascade``
(which may regenerate a whole response) has no hook: its tokens are put once, at the end.
"""

from __future__ import annotations

import torch


class BlockHook:
    """Adapts a streamer to the loops: ``hook(emitter)`` per block, ``totals(counts, accepted_at)``
    and ``finish(tokens)`` at the end."""

    def __init__(self, streamer, rows: int):
        self.streamer = streamer
        self.sent = [0] * rows
        self.wants_tokens = bool(getattr(streamer, "wants_tokens", True))
        self._record = getattr(streamer, "record", None)
        self._stop_rows = getattr(streamer, "stop_rows", None)

    def __call__(self, emitter) -> None:
        if self.wants_tokens:
            n = emitter.n_out.tolist()
            lo, hi = min(self.sent), max(n)
            if hi > lo:
                block = emitter.out[:, lo:hi].tolist()
                new = [row[s - lo:m - lo] for row, s, m in zip(block, self.sent, n)]
                self.sent = n
                self.streamer.put(new)
        if self._stop_rows is not None:
            rows = self._stop_rows()
            if rows:
                emitter.done[torch.tensor(rows, dtype=torch.long, device=emitter.done.device)] = True

    def totals(self, counts: torch.Tensor, accepted_at: torch.Tensor) -> None:
        """Each row's counters summed over its blocks (``counts  # [B, 8]``, ``accepted_at  # [B, gamma]``)."""
        if self._record is not None:
            self._record(counts, accepted_at)

    def finish(self, tokens: list[list[int]]) -> None:
        """Put what the hook has not sent yet (everything, for a method without the hook), then end."""
        new = [t[s:] for t, s in zip(tokens, self.sent)]
        self.sent = [len(t) for t in tokens]
        if any(new):
            self.streamer.put(new)
        self.streamer.end()
