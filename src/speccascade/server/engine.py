"""The one decode loop that owns the models.

HTTP handlers only validate, enqueue and wait (or stream); one asyncio task, :meth:`Engine._run`,
takes batches from the queue and runs :func:`speccascade.generate` on them in a worker thread (one
thread: the models are never used by two batches at once).

Batching policy: requests that arrive while a batch decodes wait in the queue; when the loop is
free it takes the request at the head of the queue and every queued prompt that can share its
batch (same method, gamma, temperature, top-p, top-k and method options; alpha may differ per row
for the speculative methods, whose rules take a per-row alpha; the sequential methods also need
the same alpha and max_tokens), up to ``max_batch_size`` prompts, and decodes them as one ragged
batch. A request arriving at an idle loop waits ``batch_wait_s`` for company. Prompts do not join a
batch that has started (no continuous batching: ``generate`` decodes a fixed batch).

Each row of a batch has its own ``max_tokens`` (speculative methods): the batch runs to the largest
and a row that reaches its own is finished at the next block boundary (through the streaming
hook, :mod:`speccascade.streaming`), as are rows whose stop string appeared, rows whose client went
away, and (after a drain's deadline) every row. A finished row emits nothing more and stops
counting; its slot is still computed until the batch ends (``generate`` keeps finished rows in the
batch).

Per-row speculation records (``usage.speculation``): for the speculative methods the loop's
per-row counters of each block (accepted, rejected, deferred, ... and acceptance per position) are
summed on the device and read once at the end: they are the row's own, exact. Model calls are
attributed to a row while it was unfinished (gamma + 1 drafter calls, gamma for sd and lossy SD,
and one verifier call per block the row took part in; batched calls serve every row at once). ``verifier_only`` /
``drafter_only`` records are per row too (one call per token). The other sequential methods
(``token_cascade``, ``seq_cascade``, ``oracle_diff``, ``bild``) report their batch's counters,
marked ``"scope": "batch"`` with the batch size.

Seeds: a sampled request (temperature > 0) with a ``seed`` is decoded in a batch of its own (its
prompts together, in order), so its output is ``generate(prompts, seed=seed)``'s. Unseeded sampled
requests share batches and draw from a fresh random generator. Greedy requests need no seed; a
greedy row's tokens do not depend on its batch-mates (tested against single-prompt ``generate``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..api import generate
from ..errors import SpecCascadeError
from ..registry import METHODS
from .calibration import Calibration, NoEntry
from .metrics import Metrics
from .protocol import RequestError

log = logging.getLogger("speccascade.server")

COUNTERS = ("blocks", "drafted", "accepted", "rejected", "bonus", "deferred", "emitted", "truncated")
SUMMED = COUNTERS + ("recovered", "drafter_calls", "verifier_calls")


@dataclass(frozen=True)
class Settings:
    """How one prompt is decoded (resolved from the request and the server's defaults)."""

    method: str
    alpha: float | None
    gamma: int
    temperature: float
    top_p: float
    top_k: int
    options: str          # JSON of the method options (hashable)
    max_tokens: int
    seed: int | None


@dataclass
class Defaults:
    method: str = "token_v3"
    alpha: float | None = None
    gamma: int = 5
    temperature: float = 1.0
    max_tokens: int = 128


@dataclass
class RowResult:
    tokens: list[int]
    text: str
    finish_reason: str
    speculation: dict
    prompt_tokens: int
    error: RequestError | None = None


class Row:
    """One prompt of one request, from the queue to its result."""

    def __init__(self, request_id: str, index: int, prompt_ids: list[int], settings: Settings, stop: list[str],
                 events: asyncio.Queue | None, key: tuple, dummy: bool = False):
        self.request_id, self.index, self.prompt_ids, self.settings = request_id, index, prompt_ids, settings
        self.stop, self.events, self.key, self.dummy = stop, events, key, dummy
        self.tokens: list[int] = []
        self.text_sent = ""
        self.stop_hit = False
        self.stop_requested = False   # finish at the next block (read by the worker thread)
        self.cancelled = dummy        # the client is gone: drop the output, stop the row
        self.aborted = False          # finished by a drain's deadline
        self.finished = False
        self.result: RowResult | None = None
        self.done: asyncio.Future | None = None
        self.t_arrival = time.perf_counter()
        self.t_first: float | None = None


class _BatchStreamer:
    """The batch's streamer (runs in the worker thread): per-row counters on the device, new tokens
    handed to the event loop, rows to finish."""

    def __init__(self, engine: "Engine", rows: list[Row]):
        self.engine, self.rows = engine, rows
        self.limits = [r.settings.max_tokens for r in rows]
        self.n = [0] * len(rows)
        self.stopped = [False] * len(rows)
        self.wants_tokens = any(r.events is not None or r.stop for r in rows) or len(set(self.limits)) > 1
        self.counts = None           # [B, 8] long, device
        self.accepted_at = None      # [B, gamma] long, device

    def record(self, counts, accepted_at) -> None:
        if self.counts is None:
            self.counts, self.accepted_at = counts.clone(), accepted_at.long()
        else:
            self.counts += counts
            self.accepted_at += accepted_at

    def put(self, new: list[list[int]]) -> None:
        for b, toks in enumerate(new):
            if toks:
                self.n[b] += len(toks)
                row = self.rows[b]
                if not row.cancelled:
                    self.engine.loop.call_soon_threadsafe(self.engine._on_tokens, row, toks)

    def stop_rows(self) -> list[int]:
        out = []
        for b, row in enumerate(self.rows):
            if not self.stopped[b] and (row.cancelled or row.stop_requested or self.n[b] >= self.limits[b]):
                self.stopped[b] = True
                out.append(b)
        return out

    def end(self) -> None:
        pass


class Engine:
    def __init__(self, drafter, verifier, tokenizer, task, *, defaults: Defaults | None = None,
                 model_name: str = "speccascade", max_batch_size: int = 32, batch_wait_s: float = 0.002,
                 max_prompts: int = 64, calibration: Calibration | None = None, pad_batches: bool = False,
                 metrics: Metrics | None = None, info: dict | None = None):
        from ..models.base import as_backend

        self.drafter, self.verifier = as_backend(drafter, "drafter"), as_backend(verifier, "verifier")
        self.tokenizer, self.task = tokenizer, task
        self.defaults = defaults or Defaults()
        self.model_name = model_name
        self.max_batch_size, self.batch_wait_s, self.max_prompts = max_batch_size, batch_wait_s, max_prompts
        self.calibration = calibration
        self.pad_batches = pad_batches   # static / graphs backends: pad a batch to a power of two (fewer shapes)
        self.metrics = metrics or Metrics()
        self.info = info or {}
        self.eos = task.eos_token_id(tokenizer)
        self.eos_set = set([self.eos] if isinstance(self.eos, int) else (self.eos or []))
        self.vocab = min(self.drafter.vocab_size, self.verifier.vocab_size)
        sizes = [m.max_positions for m in (self.drafter, self.verifier) if m.max_positions]
        self.max_positions = min(sizes) if sizes else None
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self.pending: deque[Row] = deque()
        self.running: list[Row] = []
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speccascade-decode")
        self._batch_ids = itertools.count()
        self.batch_log: deque[dict] = deque(maxlen=256)   # recent batches (sizes, methods): /health and tests

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="speccascade-decode-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for row in list(self.pending) + list(self.running):
            self._fail(row, RequestError("the server stopped", status=503, type="unavailable"))
        self.pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def begin_drain(self) -> None:
        self.draining = True
        self.metrics.draining.set(1)

    async def drain(self, timeout: float, grace: float = 10.0) -> bool:
        """Stop taking requests; let queued and running ones finish for ``timeout`` seconds; then
        refuse what is still queued (503) and finish running rows at their next block (finish
        reason ``abort``, output so far). True when everything finished in time."""
        self.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self.pending or self.running) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        clean = not (self.pending or self.running)
        for row in list(self.pending):
            self._fail(row, RequestError("the server is shutting down", status=503, type="unavailable",
                                         code="draining"))
        self.pending.clear()
        for row in self.running:
            row.aborted = row.stop_requested = True
        end = loop.time() + grace
        while self.running and loop.time() < end:
            await asyncio.sleep(0.02)
        return clean

    def check_open(self) -> None:
        if self.draining:
            raise RequestError("the server is shutting down and takes no new requests", status=503,
                               type="unavailable", code="draining")

    # -- requests ------------------------------------------------------------------------------

    def settings_for(self, body, max_tokens) -> Settings:
        """The request's decoding settings (server defaults filled in, every value checked)."""
        d = self.defaults
        temperature = d.temperature if body.temperature is None else body.temperature
        if not (math.isfinite(temperature) and temperature >= 0):
            raise RequestError(f"temperature must be a finite number >= 0, got {temperature!r}", "temperature")
        top_p = 1.0 if body.top_p is None else body.top_p
        if not (0.0 < top_p <= 1.0):
            raise RequestError(f"top_p must be in (0, 1], got {top_p!r}", "top_p")
        top_k = 0 if body.top_k is None else body.top_k
        if top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}", "top_k")
        options = dict(body.options or {})
        if body.quality_floor is not None or body.latency_budget is not None:
            param = "quality_floor" if body.quality_floor is not None else "latency_budget"
            if self.calibration is None:
                raise RequestError(f"{param} picks a method and alpha from a calibration file, and this server has "
                                   "none: start it with --calibration PATH (docs/server.md)", param,
                                   code="no_calibration")
            if body.method is not None or body.alpha is not None or body.gamma is not None:
                raise RequestError(f"give either method / alpha / gamma or {param}, not both", param)
            try:
                entry = self.calibration.choose(temperature, body.quality_floor, body.latency_budget)
            except NoEntry as e:
                raise RequestError(str(e), e.param, code="no_calibrated_setting") from None
            method, alpha, gamma, options = entry.method, entry.alpha, entry.gamma, entry.options | options
        else:
            method = body.method or d.method
            alpha = body.alpha if body.alpha is not None else (d.alpha if method == d.method else None)
            gamma = d.gamma if body.gamma is None else body.gamma
        spec = METHODS.get(method)
        if spec is None:
            raise RequestError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}", "method",
                               code="unknown_method")
        if spec.alpha is None:
            if body.alpha is not None:
                raise RequestError(f"method {method!r} takes no alpha (got alpha={body.alpha!r})", "alpha")
            alpha = None
        else:
            try:
                alpha = spec.alpha.default if alpha is None else spec.alpha.check(method, alpha)
            except SpecCascadeError as e:
                raise RequestError(str(e), "alpha", code="alpha_out_of_range") from None
        if isinstance(gamma, bool) or gamma < 1:
            raise RequestError(f"gamma (the draft block size) must be an integer >= 1, got {gamma!r}", "gamma")
        unknown = set(options) - set(spec.extra)
        if unknown:
            raise RequestError(f"method {method!r} has no option(s) {sorted(unknown)}; it takes "
                               f"{sorted(spec.extra) or 'none'}", "options")
        for name, rng in spec.extra.items():
            if name not in options:
                continue
            if hasattr(rng, "check"):
                try:
                    options[name] = rng.check(method, options[name], name)
                except SpecCascadeError as e:
                    raise RequestError(str(e), f"options.{name}") from None
            elif name == "max_drafter_run":
                v = options[name]
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    raise RequestError(f"max_drafter_run must be an integer >= 1 or null, got {v!r}",
                                       f"options.{name}")
            elif not isinstance(options[name], type(rng)):
                raise RequestError(f"option {name} of {method!r} must be a {type(rng).__name__}, got {options[name]!r}",
                                   f"options.{name}")
        max_tokens = d.max_tokens if max_tokens is None else max_tokens
        if isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}", "max_tokens")
        return Settings(method=method, alpha=alpha, gamma=int(gamma), temperature=float(temperature),
                        top_p=float(top_p), top_k=int(top_k), options=json.dumps(options, sort_keys=True),
                        max_tokens=int(max_tokens), seed=body.seed)

    def encode_prompts(self, prompt) -> list[list[int]]:
        """Token ids of a completion request's prompt(s): a string or a list of strings (the task's
        prompt format: for the embedded pair, English text), or token ids (a list, or a list of lists)."""
        if isinstance(prompt, str):
            items = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise RequestError("prompt is empty: give a string, a list of strings or token ids", "prompt",
                               code="empty_prompt")
        if len(items) > self.max_prompts:
            raise RequestError(f"{len(items)} prompts in one request; this server takes at most {self.max_prompts}",
                               "prompt")
        out = []
        for i, item in enumerate(items):
            where = "prompt" if len(items) == 1 else f"prompt {i}"
            if isinstance(item, str):
                if not item.strip():
                    raise RequestError(f"{where} is empty", "prompt", code="empty_prompt")
                ids = list(self.task.encode(self.tokenizer, item))
            else:
                ids = list(item)
                if not ids:
                    raise RequestError(f"{where} is empty", "prompt", code="empty_prompt")
                bad = [t for t in ids if not 0 <= t < self.vocab]
                if bad:
                    raise RequestError(f"{where} holds token id {bad[0]} outside the vocabulary [0, {self.vocab})",
                                       "prompt")
            out.append(ids)
        return out

    def encode_chat(self, messages) -> list[int]:
        if not messages:
            raise RequestError("messages is empty", "messages", code="empty_prompt")
        if self.chat_template:
            msgs = [{"role": m.role, "content": m.text()} for m in messages]
            ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        from ..eval.tasks import BibleTask

        if isinstance(self.task, BibleTask):
            users = [m for m in messages if m.role == "user"]
            if not users or not users[-1].text().strip():
                raise RequestError("the translation model needs a user message holding the English text",
                                   "messages", code="empty_prompt")
            return list(self.task.encode(self.tokenizer, users[-1].text()))
        raise RequestError("this model's tokenizer has no chat template: use /v1/completions", "messages",
                           code="no_chat_template")

    def check_lengths(self, prompts: list[list[int]], settings: Settings) -> None:
        if not self.max_positions:
            return
        for i, ids in enumerate(prompts):
            need = len(ids) + settings.max_tokens + settings.gamma + 1
            if need > self.max_positions:
                where = "prompt" if len(prompts) == 1 else f"prompt {i}"
                raise RequestError(f"{where} is too long: {len(ids)} prompt tokens + max_tokens={settings.max_tokens} "
                                   f"(+ {settings.gamma + 1} for a draft block) exceed the models' context of "
                                   f"{self.max_positions} positions", "prompt", code="context_length_exceeded")

    def submit(self, request_id: str, prompts: list[list[int]], settings: Settings, stop: list[str],
               events: asyncio.Queue | None) -> list[Row]:
        """Queue a request's prompts; returns its rows (await ``row.done``)."""
        self.check_open()
        spec = METHODS[settings.method]
        key = (settings.method, settings.gamma, settings.temperature, settings.top_p, settings.top_k, settings.options)
        if spec.kind != "speculative":
            key += (settings.alpha, settings.max_tokens)
        if settings.temperature > 0 and settings.seed is not None:
            key += ("seeded", request_id)
        rows = []
        for i, ids in enumerate(prompts):
            row = Row(request_id, i, ids, settings, stop, events, key)
            row.done = self.loop.create_future()
            rows.append(row)
        self.pending.extend(rows)
        self.metrics.queue.set(len(self.pending))
        self._wake.set()
        return rows

    def cancel(self, rows: list[Row]) -> None:
        """The client went away: drop these rows' output; a queued row leaves the queue, a running
        one is finished at the next block of its batch."""
        for row in rows:
            if row.finished or row.cancelled:
                continue
            row.cancelled = True
            row.finished = True
            try:
                self.pending.remove(row)
            except ValueError:
                pass
            self.metrics.rows.labels("cancelled").inc()
            if not row.done.done():
                row.done.set_result(None)
        self.metrics.queue.set(len(self.pending))

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            idle = not self.pending
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            if idle and self.batch_wait_s > 0:
                await asyncio.sleep(self.batch_wait_s)
            rows = self._take_batch()
            if rows:
                try:
                    await self._decode(rows)
                except Exception as e:  # pragma: no cover - a bug; keep serving
                    log.exception("decode loop error")
                    for row in rows:
                        self._fail(row, RequestError(f"internal error: {e}", status=500, type="server_error"))

    def _take_batch(self) -> list[Row]:
        head = self.pending[0]
        seeded = "seeded" in head.key
        limit = len(self.pending) if seeded else self.max_batch_size
        longest, most = 0, 0
        rows = []
        for row in self.pending:
            if len(rows) >= limit:
                break
            if row.key != head.key:
                continue
            lo, mo = max(longest, len(row.prompt_ids)), max(most, row.settings.max_tokens)
            if rows and self.max_positions and lo + mo + row.settings.gamma + 1 > self.max_positions:
                continue  # would make generate's batch too long for the context; it waits for a later batch
            rows.append(row)
            longest, most = lo, mo
        taken = set(map(id, rows))
        self.pending = deque(r for r in self.pending if id(r) not in taken)
        self.metrics.queue.set(len(self.pending))
        return rows

    async def _decode(self, rows: list[Row]) -> None:
        now = time.perf_counter()
        for row in rows:
            self.metrics.queue_wait.observe(now - row.t_arrival)
        batch = list(rows)
        if self.pad_batches and len(batch) > 1:
            size = 1 << (len(batch) - 1).bit_length()
            batch += [Row("pad", 0, rows[0].prompt_ids, rows[0].settings, [], None, rows[0].key, dummy=True)
                      for _ in range(size - len(batch))]
        self.running = rows
        self.metrics.running.set(len(rows))
        batch_id = next(self._batch_ids)
        s = rows[0].settings
        self.batch_log.append({"id": batch_id, "size": len(rows), "method": s.method,
                               "requests": sorted({r.request_id for r in rows}),
                               "alphas": sorted({r.settings.alpha for r in rows if r.settings.alpha is not None})})
        try:
            parts = await self.loop.run_in_executor(self._executor, self._generate_parts, batch)
        except Exception as e:
            log.exception("batch %d failed", batch_id)
            for row in rows:
                self._fail(row, RequestError(f"{type(e).__name__}: {e}", status=500, type="server_error"))
        else:
            for part_rows, res in parts:
                if isinstance(res, SpecCascadeError):
                    for row in part_rows:
                        self._fail(row, RequestError(str(res), status=400))
                    continue
                out, _streamer, counts, accepted_at, elapsed = res
                self.metrics.batches.labels(s.method).inc()
                self.metrics.batch_size.observe(sum(not r.dummy for r in part_rows))
                self.metrics.batch_time.observe(elapsed)
                real = sum(not r.dummy for r in part_rows)
                self.batch_log[-1].setdefault("tokens", []).extend(
                    (r.request_id, len(t)) for r, t in zip(part_rows, out.tokens) if not r.dummy)
                for b, row in enumerate(part_rows):
                    if row.dummy:
                        continue
                    rec = self._record(row, out, b, counts, accepted_at, real, batch_id)
                    self._finish(row, out.tokens[b], rec)
        finally:
            self.running = []
            self.metrics.running.set(0)

    def _generate_parts(self, batch: list[Row]):
        """(worker thread) Decode the batch; if generate refuses it (a row it finds bad), decode
        each row alone so that only the bad one fails."""
        try:
            return [(batch, self._generate(batch))]
        except SpecCascadeError as e:
            real = [r for r in batch if not r.dummy]
            if len(real) <= 1:
                return [(batch, e)]
            parts = []
            for row in real:
                try:
                    parts.append(([row], self._generate([row])))
                except SpecCascadeError as e1:
                    parts.append(([row], e1))
            return parts

    def _generate(self, rows: list[Row]):
        s = rows[0].settings
        spec = METHODS[s.method]
        alpha = [r.settings.alpha for r in rows] if spec.kind == "speculative" and spec.alpha is not None else s.alpha
        streamer = _BatchStreamer(self, rows)
        seed = s.seed if s.temperature > 0 else 0
        t0 = time.perf_counter()
        out = generate(self.drafter, self.verifier, [r.prompt_ids for r in rows], method=s.method, alpha=alpha,
                       gamma=s.gamma, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                       max_new_tokens=max(r.settings.max_tokens for r in rows), eos_token_id=self.eos, seed=seed,
                       streamer=streamer, **json.loads(s.options))
        counts = streamer.counts.tolist() if streamer.counts is not None else None
        accepted_at = streamer.accepted_at.tolist() if streamer.accepted_at is not None else None
        return out, streamer, counts, accepted_at, time.perf_counter() - t0

    # -- event-loop side: tokens, text, results ------------------------------------------------

    def _on_tokens(self, row: Row, toks: list[int]) -> None:
        if row.finished or row.cancelled:
            return
        toks = toks[:row.settings.max_tokens - len(row.tokens)]
        if not toks:
            return
        if row.t_first is None:
            row.t_first = time.perf_counter()
            self.metrics.ttft.observe(row.t_first - row.t_arrival)
        row.tokens.extend(toks)
        if row.events is not None or row.stop:
            self._advance_text(row, self.decode(row.tokens), final=False)

    def decode(self, tokens: list[int]) -> str:
        return self.task.decode(self.tokenizer, tokens)

    def _cut_at_stop(self, row: Row, text: str) -> str:
        cuts = [i for i in (text.find(s) for s in row.stop if s) if i >= 0]
        if cuts:
            row.stop_hit = row.stop_requested = True
            return text[:min(cuts)]
        return text

    def _advance_text(self, row: Row, text: str, final: bool) -> None:
        """Stream the part of ``text`` not yet sent: held back while it might still change (an
        incomplete UTF-8 sequence at its end, a possible start of a stop string)."""
        if row.stop_hit and not final:
            return
        text = self._cut_at_stop(row, text)
        safe = text
        if not final and not row.stop_hit:
            safe = safe.rstrip("\ufffd")
            hold = max((len(s) for s in row.stop), default=1) - 1
            if hold > 0:
                safe = safe[:max(0, len(safe) - hold)]
        if not safe.startswith(row.text_sent):
            if final:
                log.warning("row %s:%d: final text does not extend the streamed text", row.request_id, row.index)
            return
        if len(safe) > len(row.text_sent):
            delta, row.text_sent = safe[len(row.text_sent):], safe
            if row.events is not None:
                row.events.put_nowait((row.index, "delta", delta))

    def _finish(self, row: Row, tokens: list[int], speculation: dict) -> None:
        if row.finished:
            return
        row.finished = True
        tokens = tokens[:row.settings.max_tokens]
        row.tokens = tokens
        text = self.decode(tokens)
        self._advance_text(row, text, final=True)
        text = self._cut_at_stop(row, text)
        if row.stop_hit or (tokens and tokens[-1] in self.eos_set):
            reason = "stop"
        elif len(tokens) >= row.settings.max_tokens:
            reason = "length"
        else:
            reason = "abort" if row.aborted else "length"
        row.result = RowResult(tokens=tokens, text=text, finish_reason=reason, speculation=speculation,
                               prompt_tokens=len(row.prompt_ids))
        now = time.perf_counter()
        if row.t_first is None and tokens:
            row.t_first = now
            self.metrics.ttft.observe(now - row.t_arrival)
        self.metrics.record_prompt(row.settings.method, len(row.prompt_ids), len(tokens), speculation)
        if row.events is not None:
            row.events.put_nowait((row.index, "end", row.result))
        row.done.set_result(row.result)

    def _fail(self, row: Row, error: RequestError) -> None:
        if row.finished or row.dummy:
            return
        row.finished = True
        row.result = RowResult(tokens=[], text="", finish_reason="error", speculation={}, prompt_tokens=0, error=error)
        self.metrics.rows.labels("failed").inc()
        if row.events is not None:
            row.events.put_nowait((row.index, "error", row.result))
        if row.done is not None and not row.done.done():
            row.done.set_result(row.result)

    def _record(self, row: Row, out, b: int, counts, accepted_at, batch_size: int, batch_id: int) -> dict:
        """The row's speculation record (see the module docstring for what is per row)."""
        s = row.settings
        spec = METHODS[s.method]
        n = len(out.tokens[b][:s.max_tokens])
        rec = {"method": s.method, "alpha": s.alpha, "gamma": s.gamma if spec.kind == "speculative" else None}
        if counts is not None:
            c = dict(zip(COUNTERS, counts[b]))
            over = max(0, c["emitted"] - n)   # tokens of its last block past the row's own max_tokens
            c["emitted"], c["truncated"] = c["emitted"] - over, c["truncated"] + over
            rec |= {"scope": "row", **c, "recovered": c["rejected"],
                    "drafter_calls": c["blocks"] * spec.drafter_calls_per_block(s.gamma),
                    "verifier_calls": c["blocks"], "accepted_per_position": list(accepted_at[b])}
        elif s.method in ("verifier_only", "drafter_only"):
            v = s.method == "verifier_only"
            rec |= {"scope": "row", **dict.fromkeys(COUNTERS, 0), "emitted": n, "recovered": 0,
                    "deferred": n if v else 0, "drafter_calls": 0 if v else n, "verifier_calls": n if v else 0,
                    "accepted_per_position": []}
        else:
            st = out.stats
            rec |= {"scope": "batch", "batch_size": batch_size, "batch_id": batch_id,
                    **{k: getattr(st, k) for k in SUMMED}, "accepted_per_position": list(st.accepted_per_position)}
        return with_rates(rec)


def with_rates(rec: dict) -> dict:
    """Add the derived figures (conventions of :mod:`speccascade.stats`) to a record of counters."""
    blocks, drafted, acc, rej = rec["blocks"], rec["drafted"], rec["accepted"], rec["rejected"]
    examined = acc + rej
    rec["acceptance_rate"] = acc / drafted if drafted else 0.0
    rec["mean_accepted_length"] = 1 + acc / blocks if blocks else None
    rec["deferral_rate"] = rec["deferred"] / examined if examined else (
        rec["deferred"] / rec["emitted"] if rec["emitted"] else 0.0)
    rec["acceptance_per_position"] = [a / blocks for a in rec["accepted_per_position"]] if blocks else []
    return rec


def combine(records: list[dict]) -> dict:
    """A request's record from its rows' (batch-scope records of one batch counted once)."""
    records = [r for r in records if r]
    if not records:
        return {}
    if len(records) == 1:
        return records[0]
    seen, parts = set(), []
    for r in records:
        if r.get("scope") == "batch":
            if r["batch_id"] in seen:
                continue
            seen.add(r["batch_id"])
        parts.append(r)
    out = {k: records[0][k] for k in ("method", "gamma", "scope")}
    alphas = sorted({r["alpha"] for r in records if r["alpha"] is not None})
    out["alpha"] = alphas[0] if len(alphas) == 1 else (alphas or None)
    for k in SUMMED:
        out[k] = sum(r[k] for r in parts)
    width = max(len(r["accepted_per_position"]) for r in parts)
    out["accepted_per_position"] = [sum(r["accepted_per_position"][j] for r in parts
                                        if j < len(r["accepted_per_position"])) for j in range(width)]
    if out["scope"] == "batch":
        out["batch_size"] = sum(r["batch_size"] for r in parts)
    out["prompts"] = len(records)
    return with_rates(out)
