"""How the host drives a decoding step function: eagerly, or as replays of one captured CUDA graph.

A *step* is a function of device state only (the speculative block of :mod:`.loop`, one token of
single-model decoding in :mod:`.baselines`): it reads and writes tensors at fixed addresses and
makes no host read. Its last act is to write the state's ``flags`` (all rows done, a non-finite
flag per model, tokens emitted so far). The host's only job is to call the step (or replay it)
and, once per call, look at those flags (:class:`StepSync`).

* **Eager** (any backend, CPU or GPU): call the step, read the flags, repeat.
* **Captured** (CUDA, backends with ``capturable = True``, e.g. the fused backend): the step is
  run twice as a warm-up (torch.compile compiles, allocations settle), then ``per_replay`` steps
  are captured as one CUDA graph, keyed by everything the captured program depends on (batch
  size, gamma, method, sampling settings, ``max_new_tokens``, EOS ids, the caches' identity).
  Later calls with the same key only copy their inputs into the state and replay. The graph
  draws its random numbers from a generator registered with it (graph-safe: every replay
  advances it as eager draws would), whose state is copied from, and back to, the caller's
  generator, so a seed still gives the same output.

The flags are read one step late on a GPU (the next replay is queued before the host waits), so
the device never idles for the host; the step run past the end is wasted work whose output is
already ignored (every row is done) and whose counters are masked on the device. A step may also
say that the *next* one is likely the last (the flags' "near the end" value: a speculative block
in which the drafter gives EOS some probability, or a row one step from ``max_new_tokens``); the
host then waits for that step's flags before queuing another, trading one idle gap of the device (a
launch) for the step past the end (for a speculative block at batch 1, ~5% of a decode's wall on an H200:
results/deep_pair/run5/NOTE.md).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import NonFiniteLogitsError

#: steps per replay of a captured graph (speculative blocks; single-model tokens). One step per
#: replay keeps the device busy already (in a batch the host queues replay i + 1 before it reads the
#: flags of replay i; one row reads them at once, AT_ONCE_ROWS) and wastes at most one step at the
#: end; more steps per replay wake the host less often but compute up to that many steps past the end.
BLOCKS_PER_REPLAY = 1
TOKENS_PER_REPLAY = 1
#: a replayed decode of at most this many rows reads each replay's flags at once (StepSync)
AT_ONCE_ROWS = 1


def raise_if_nonfinite(flags: list[bool], names: list[str]) -> None:
    for flag, name in zip(flags, names):
        if flag:
            raise NonFiniteLogitsError(f"the {name} returned non-finite (NaN or inf) logits; "
                                       f"check its weights and dtype (fp16 overflow?)")


def step_flags(done: torch.Tensor, finite_flags: list[torch.Tensor], kept: torch.Tensor,
               near_end: torch.Tensor | None = None) -> torch.Tensor:
    """[all rows done, every row done or near its end, a non-finite flag per model, tokens kept] as
    one long tensor. ``near_end  # [B]``: rows whose next step is likely their last (None: no guess)."""
    near = done.all() if near_end is None else (done | near_end).all()
    return torch.stack([done.all().long(), near.long(), *(f.long() for f in finite_flags), kept.sum()])


class StepSync:
    """The end of a decoding step: the one point where the host reads device state.

    ``end_step`` copies the step's flags (see :func:`step_flags`) to the host. On a CPU it reads
    them at once. On a GPU the copy is asynchronous and the host reads the flags of the
    *previous* step, so the device always has the next step queued and never waits for the host;
    when those flags say "done", the step queued after them is wasted work: its output is already
    ignored (every row is done), host-side call counts it made are taken back out of the stats and
    the random generator is put back to where that step found it, so results do not depend on the
    lag. When they say "near the end" instead, the host also waits for the step just queued and
    reads its flags at once (``Stats.end_waits`` counts these), so that a last step is not followed by one
    run past the end. With ``cumulative=True`` the last flag counts tokens emitted so far (not this
    step's).

    A captured decode of one row (``replayed``) reads each replay's flags at once instead, on a GPU
    too: on an H200 (the deep pair's run 8, ``benchmarks/end_wait.py``, 100 test verses, 3 rounds)
    that ran ``sd`` 3.4% and ``verifier_only`` 0.5% faster than reading one step late with the wait
    near the end, which still ran a block past 48 of the 100 ends: an idle gap of the device after
    each replay costs less than those blocks. Batches keep the lag (not measured there).
    """

    #: read flags one step late: None = on a GPU, except a replayed decode of AT_ONCE_ROWS rows
    #: (tests force it on the CPU; benchmarks/end_wait.py compares the modes)
    lagged: bool | None = None
    #: near the end, read the step just queued at once (benchmarks/end_wait.py switches it off to compare)
    wait_near_end: bool = True

    def __init__(self, device: torch.device, stats, names: list[str], progress=None,
                 generator: torch.Generator | None = None, cumulative: bool = False):
        self.generator = generator
        self.cuda = device.type == "cuda"
        self.lag = self.cuda if self.lagged is None else self.lagged
        self.stats, self.names, self.progress = stats, names, progress
        self.cumulative, self.shown = cumulative, 0
        self.pending = None
        self.near = False   # the last flags read said "near the end": read the next step's at once
        self._host: list[torch.Tensor] = []   # two pinned buffers and events, used in turn
        self._events: list = []
        self._turn = 0

    def replayed(self, rows: int) -> None:
        """The steps are replays of a captured program of ``rows`` rows: with ``lagged`` unset, a
        decode of at most ``AT_ONCE_ROWS`` rows reads each replay's flags at once (see above)."""
        if self.lagged is None and rows <= AT_ONCE_ROWS:
            self.lag = False

    def end_step(self, done: torch.Tensor, finite_flags: list[torch.Tensor], kept: torch.Tensor) -> bool:
        """True when every row is done (as of the last step whose flags the host has read)."""
        return self.end(step_flags(done, finite_flags, kept))

    def end(self, flags: torch.Tensor) -> bool:
        calls = (self.stats.drafter_calls, self.stats.verifier_calls)
        if not self.lag:
            return self._read(flags.tolist(), calls)
        host, event = flags, None
        if self.cuda:
            if not self._host:
                self._host = [torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True) for _ in range(2)]
                self._events = [torch.cuda.Event() for _ in range(2)]
            # buffer `turn` was last written two steps ago and has been read since
            host, event = self._host[self._turn], self._events[self._turn]
            host.copy_(flags, non_blocking=True)
            event.record()
            self._turn ^= 1
        else:
            host = flags.clone()
        if self.generator is not None:
            calls = calls + (self.generator.get_state(),)
        current = (host, event, calls)
        if self.near and self.wait_near_end:   # the last flags read said the end is near: read this step's now
            return self._read_now(current)
        previous, self.pending = self.pending, current
        if previous is None:
            return False
        values = self._wait(previous)
        if self._read(values, previous[2]):
            self.stats.steps_past_end += 1   # the step queued after it (its work is discarded)
            return True
        if not (values[1] and self.wait_near_end):
            return False
        # near the end: the step just queued may be the last; read it before queuing another
        self.pending = None
        return self._read_now(current)

    def _read_now(self, current: tuple) -> bool:
        """Wait for the step just queued and read its flags (near the end); while they still say
        "near", the next step is read the same way, else one step late again."""
        self.stats.end_waits += 1
        values = self._wait(current)
        self.near = bool(values[1])
        return self._read(values, current[2])

    @staticmethod
    def _wait(pending: tuple) -> list[int]:
        if pending[1] is not None:
            pending[1].synchronize()
        return pending[0].tolist()

    def _read(self, values: list[int], calls: tuple) -> bool:
        raise_if_nonfinite(values[2:-1], self.names)
        if self.progress is not None:
            self.progress.update(values[-1] - self.shown if self.cumulative else values[-1])
            self.shown = values[-1] if self.cumulative else self.shown
        if values[0]:
            self.stats.drafter_calls, self.stats.verifier_calls = calls[:2]  # drop a step run past the end
            if len(calls) > 2:
                self.generator.set_state(calls[2])
            return True
        return False


# ---------------------------------------------------------------------------------------------
# captured steps


@dataclass
class Captured:
    """One captured program: ``per_replay`` steps over ``state``, drawing from ``generator``."""

    graph: object
    state: object
    generator: torch.Generator
    per_replay: int
    replays: int = 0   # replays so far (all calls), for benchmarks


def can_capture(*backends) -> bool:
    """True where the steps can be captured: CUDA, and every backend keeps its state on the device."""
    return all(getattr(b, "capturable", False) and b.device.type == "cuda" for b in backends)


def graph_cache(backend) -> dict:
    """The captured programs of a backend (they hold its cache tensors, so they live with it)."""
    if not hasattr(backend, "_captured"):
        backend._captured = {}
    return backend._captured


def capture(step: Callable[[torch.Generator], None], state, device: torch.device, per_replay: int,
            restart: Callable[[], None]) -> Captured:
    """Capture ``per_replay`` calls of ``step`` as one program, then ``restart()`` (the warm-up
    advanced the state and the caches)."""
    graph, gen = capture_graph(step, device, per_replay)
    restart()
    return Captured(graph=graph, state=state, generator=gen, per_replay=per_replay)


def capture_error_mode() -> str:
    """``torch.cuda.graph``'s ``capture_error_mode``: ``"thread_local"`` under an initialised
    torch.distributed process group (a tensor-parallel backend's NCCL all-reduces are captured with
    the step, and the NCCL watchdog thread queries CUDA events meanwhile, which the default
    ``"global"`` mode would count as an error of this capture), else torch's default ``"global"``."""
    import torch.distributed as dist

    return "thread_local" if dist.is_available() and dist.is_initialized() else "global"


_in_program = 0   # > 0 while a program is being warmed up or captured (see in_program)


def in_program() -> bool:
    """True while :func:`capture_graph` / :func:`capture_call` warm up or capture a program: a
    backend that replays graphs of its own calls (the fused backend's host-driven calls) then
    calls its step directly, to be captured into the caller's program."""
    return _in_program > 0


@contextlib.contextmanager
def program():
    """The extent of a program's warm-up and capture (:func:`in_program` is True inside)."""
    global _in_program
    _in_program += 1
    try:
        yield
    finally:
        _in_program -= 1


def capture_call(fn: Callable[[], None], device: torch.device, warm_ups: int = 1):
    """``fn`` (a function of device tensors at fixed addresses) run ``warm_ups`` times on a side
    stream (torch.compile compiles, allocations settle), then captured as one CUDA graph, which
    is returned: ``graph.replay()`` runs it again. (Tests replace this function to run on a CPU.)"""
    with program():
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warm_ups):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode=capture_error_mode()):
            fn()
    return graph


def replay_seconds(fn: Callable[[], None], device: torch.device, reps: int = 50) -> float:
    """Seconds per call of ``fn`` captured as one CUDA graph and replayed ``reps`` times back to
    back (after a warm-up call on a side stream): what a call costs inside a captured program.
    ``fn`` must leave the state it reads as it found it, or tolerate ``reps`` repeats."""
    graph = capture_call(fn, device)
    graph.replay()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / reps


def capture_graph(step: Callable[[torch.Generator], None], device: torch.device, per_replay: int):
    """Warm ``step`` up twice on a side stream (torch.compile compiles, allocations settle), then
    capture ``per_replay`` calls of it as one CUDA graph drawing from a generator registered with
    it. Returns the graph and that generator. (Tests replace this function to run on a CPU.)"""
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    with program():
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step(gen)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(gen)
        with torch.cuda.graph(graph, capture_error_mode=capture_error_mode()):
            for _ in range(per_replay):
                step(gen)
    return graph, gen


def run_steps(step: Callable[[torch.Generator], None], state, sync: StepSync,
              generator: torch.Generator | None, captured: Captured | None = None, after=None) -> None:
    """Run until the state's flags say every row is done: eager calls of ``step``, or replays.
    ``after(emitter)``, if given, runs on the host after each step (streaming: it reads the new
    tokens, one host read per step, and may mark rows done)."""
    if captured is None:
        while True:
            step(generator)
            if after is not None:
                after(state.emitter)
            if sync.end(state.flags):
                return
    sync.replayed(state.emitter.done.shape[0])
    if generator is not None:
        captured.generator.set_state(generator.get_state())
        # the flags are read a step late: the sync puts the program's generator back before the
        # draws of a step run past the end (as it does the caller's on the eager path)
        sync.generator = captured.generator
    while True:
        captured.graph.replay()
        captured.replays += 1
        if after is not None:
            after(state.emitter)
        if sync.end(state.flags):
            break
    if generator is not None:
        generator.set_state(captured.generator.get_state())
