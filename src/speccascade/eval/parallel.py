"""Data-parallel sweeps: ``speccascade sweep --workers N`` spreads a sweep's cells over N worker
processes (issue 17).

* **Processes.** ``torch.multiprocessing`` with the *spawn* start method: each worker loads its own
  copy of the pair. With ``--device cuda`` worker *i* runs on GPU *i* (N must not exceed the GPUs
  present), started with ``CUDA_VISIBLE_DEVICES`` naming that GPU alone, so that it sees it as
  ``cuda:0``: torch's compile caches key a compiled program by its tensors' device, so a program
  cached on ``cuda:0`` (by ``sweep --warm-up-only`` or an earlier run) is a miss on ``cuda:1``, and
  a worker that sees its GPU as ``cuda:1`` would compile everything again (measured on two H200s: the
  second worker started its cells 45 s after the first). On a CPU every worker runs on ``cpu`` pinned
  to ``--threads`` torch threads (N x threads should not exceed the cores, or the workers time each
  other's contention).
* **Balance.** Cells that differ only in alpha share a compiled program and go to one worker
  together (each worker compiles only its own programs); these groups are dealt out
  longest-processing-time first on an estimated cost
  (:func:`cell_cost`): ``ceil(examples / batch) x max_new_tokens`` decoding steps, times a per-token
  weight in verifier steps (``verifier_only`` 1; ``drafter_only`` :data:`DRAFTER_STEP`; the other
  sequential methods, which call both models, 1 + :data:`DRAFTER_STEP`; a speculative cell
  ``(gamma x DRAFTER_STEP + BLOCK_CALL) / (1 + gamma x ACCEPTANCE)``), times ``1 + (batch - 1) / 8``
  for a batched call. A cell goes to the worker whose load would be lowest *including* the
  ``verifier_only`` baseline it must run first if it holds no cell of that (temperature, seed,
  batch) yet, so groups tend to stay on one worker.
* **Baselines.** Every worker runs ``verifier_only`` for each (temperature, seed, batch size) it
  holds cells of, and times its cells against *its own* baseline (same device, same process). The
  sweep file keeps one ``verifier_only`` record per group (the first to land); every record gets
  ``"worker": i``, and on a GPU ``"gpu"``: the UUID of the GPU its worker ran on.
* **One file.** Workers append to ``<out>.parts/worker-<i>.jsonl`` (each locked, torn-line safe,
  resumable: it is an ordinary sweep file). The parent holds ``--out``'s lock for the whole run and
  copies each worker's new records into ``--out`` as they land (about twice a second), skipping a
  cell ``--out`` already holds, so ``--out`` stays the single source of truth and holds every cell
  exactly once. A killed run leaves the part files; the next run first merges what they hold, then
  runs only what ``--out`` lacks. The parts folder is removed once ``--out`` holds the whole grid.
  Workers die with the parent (Linux ``PR_SET_PDEATHSIG``).

Every record a worker writes is checked against ``--out``'s settings (:data:`.sweep.SETTINGS`) and
weights before it is merged; a mismatch stops the run with the same error a single-process sweep
gives.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

from ..checks import as_int
from ..errors import DeviceError, SpecCascadeError
from ..registry import METHODS
from .sweep import (
    BASELINE,
    Cell,
    SweepConfig,
    _append,
    _Locked,
    check_every_cell_once,
    check_out_file,
    check_settings_match,
    read_records,
    repair_tail,
)

#: cost-model constants (verifier steps): a drafter step, a verifier block call of gamma + 1
#: tokens, and the assumed per-draft acceptance of a speculative cell
DRAFTER_STEP = 0.25
BLOCK_CALL = 1.2
ACCEPTANCE = 0.6


def cell_cost(cell: Cell, n_examples: int, max_new_tokens: int) -> float:
    """The estimated cost of a cell in verifier steps (see the module's docstring): a ranking for
    load balancing, not a prediction of wall time."""
    spec = METHODS[cell.method]
    if cell.method == BASELINE:
        per_token = 1.0
    elif cell.method == "drafter_only":
        per_token = DRAFTER_STEP
    elif spec.kind == "speculative":
        per_token = (cell.gamma * DRAFTER_STEP + BLOCK_CALL) / (1 + cell.gamma * ACCEPTANCE)
    else:
        per_token = 1.0 + DRAFTER_STEP
    steps = math.ceil(n_examples / cell.batch_size) * max_new_tokens
    return steps * per_token * (1 + (cell.batch_size - 1) / 8)


def _group(cell: Cell) -> tuple:
    return cell.temperature, cell.seed, cell.batch_size


def _program(cell: Cell) -> tuple:
    """What a cell compiles and captures on a GPU: cells differing only in alpha share it."""
    return cell.method, cell.gamma, cell.temperature, cell.batch_size, cell.options


def assign(cells: list[Cell], workers: int, n_examples: int, max_new_tokens: int) -> list[list[Cell]]:
    """Deal ``cells`` out to ``workers`` shares. Cells that share a compiled program (the same
    method, gamma, temperature, batch size and options: only alpha differs) go to one worker
    together, so no two workers compile the same program (on a GPU a sweep's warm-up is mostly
    compiling: 13 minutes per worker on an H200 for its share of 19 methods at two temperatures); the
    groups are dealt longest first, each to the
    worker whose load (including a baseline it would have to add) stays lowest; ties go to the lower
    worker index. Deterministic. Each share is in grid order."""
    order = {c.key: i for i, c in enumerate(cells)}
    programs: dict[tuple, list[Cell]] = {}
    for c in cells:
        programs.setdefault(_program(c), []).append(c)
    loads = [0.0] * workers
    groups: list[set] = [set() for _ in range(workers)]
    shares: list[list[Cell]] = [[] for _ in range(workers)]

    def cost(cs):
        return sum(cell_cost(c, n_examples, max_new_tokens) for c in cs)

    for cs in sorted(programs.values(), key=lambda cs: (-cost(cs), order[cs[0].key])):
        c = cs[0]
        base = cell_cost(Cell(BASELINE, None, c.gamma, c.temperature, c.seed, c.batch_size), n_examples,
                         max_new_tokens)
        totals = [loads[w] + cost(cs) + (0.0 if _group(c) in groups[w] or c.method == BASELINE else base)
                  for w in range(workers)]
        w = min(range(workers), key=lambda w: (totals[w], w))
        loads[w] = totals[w]
        groups[w].add(_group(c))
        shares[w].extend(cs)
    return [sorted(s, key=lambda c: order[c.key]) for s in shares]


def worker_cells(share: list[Cell], grid: list[Cell]) -> list[Cell]:
    """A worker's run order: for each group it holds, that group's ``verifier_only`` cell of the
    grid, then its share's cells of the group, in grid order."""
    out, seen = [], set()
    for c in share:
        g = _group(c)
        if g not in seen:
            seen.add(g)
            base = next((b for b in grid if b.method == BASELINE and _group(b) == g), None)
            if base is None:  # a cell outside the grid's baselines: make one
                base = Cell(BASELINE, None, grid[0].gamma if grid else 5, *g)
            out.append(base)
        if c.method != BASELINE:
            out.append(c)
    return out


def parts_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".parts")


def part_file(out: Path, worker: int) -> Path:
    return parts_dir(out) / f"worker-{worker}.jsonl"


def gpu_file(part: Path) -> Path:
    """Where a GPU worker writes the identity (UUID) of the GPU it runs on, beside its part file."""
    return Path(part).with_suffix(".gpu")


class _Merger:
    """Copies the workers' new records into ``out`` (whose lock the caller holds)."""

    def __init__(self, out: Path, records: list[dict]):
        self.out = Path(out)
        self.records = records
        self.keys = {r["key"] for r in records if r.get("type") == "cell"}
        self.gammas = {r.get("gamma") for r in records if r.get("type") == "costs"}
        self.seen: dict[Path, int] = {}

    def merge(self) -> list[dict]:
        """Append to ``out`` every complete record of every part file not yet merged; returns the
        cell records appended."""
        new = []
        folder = parts_dir(self.out)
        if not folder.is_dir():
            return new
        for part in sorted(folder.glob("worker-*.jsonl")):
            try:
                worker = int(part.stem.split("-", 1)[1])
            except ValueError:
                continue
            recs = read_records(part)  # a torn last line (being written) is skipped
            gpu = gpu_file(part).read_text().strip() if gpu_file(part).exists() else None
            for rec in recs[self.seen.get(part, 0):]:
                sig = rec.get("signature") or {}
                if {"drafter", "verifier", "examples_sha1"} <= set(sig):
                    check_settings_match(self.out, self.records, sig)
                if rec["type"] == "cell":
                    if rec.get("key") in self.keys:
                        continue
                    rec = rec | {"worker": worker} | ({"gpu": gpu} if gpu else {})
                    self.keys.add(rec["key"])
                    new.append(rec)
                elif rec["type"] == "costs":
                    if rec.get("gamma") in self.gammas:
                        continue
                    self.gammas.add(rec.get("gamma"))
                _append(self.out, rec)
                self.records.append(rec)
            self.seen[part] = len(recs)
        return new


def _set_parent_death_signal() -> None:
    """Linux: this process gets SIGKILL when its parent dies (a killed sweep leaves no workers
    holding the part files' locks)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover  (no glibc: workers outlive a killed parent)
        return


def _wait_for_lock(path: Path, timeout: float = 30.0) -> None:
    """Wait (up to ``timeout`` s) until no other process holds ``path``'s lock: a worker of a
    killed run may take a moment to die."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return
    deadline = time.monotonic() + timeout
    with open(path, "a", encoding="utf-8") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except OSError:
                if time.monotonic() > deadline:
                    return  # run_sweep raises its own clear error
                time.sleep(0.2)


def _worker_main(worker: int, job: dict) -> None:
    """One worker (a spawned process): load the pair on its device, run its cells into its part
    file. A failure leaves its one-line message in ``worker-<i>.error`` and exits non-zero."""
    _set_parent_death_signal()
    part = Path(job["part"])
    err = part.with_suffix(".error")
    code = 0
    try:
        import torch

        from ..cli import _load_pair
        from ..models.loading import set_threads
        from .sweep import run_sweep
        from .tasks import get_task

        set_threads(job["threads"])
        if job["device"].startswith("cuda"):
            torch.cuda.set_device(torch.device(job["device"]))
            # which physical GPU this worker has (it sees it as cuda:0): its records carry it as "gpu"
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            gpu_file(part).write_text(str(getattr(props, "uuid", "") or os.environ.get("CUDA_VISIBLE_DEVICES", "?")))
        parent = job["parent_pid"]

        def orphaned(_record):
            if os.getppid() != parent:
                raise SystemExit(3)

        _wait_for_lock(part)
        drafter, verifier, tok, names = _load_pair(argparse.Namespace(**job["load"]))
        run_sweep(drafter, verifier, tok, get_task(*job["task"]), job["config"], part, names=names, progress=False,
                  backend=job["backend"], cells=job["cells"], on_record=orphaned)
    except SpecCascadeError as e:
        err.write_text(str(e), encoding="utf-8")
        code = 2
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        if isinstance(e, SystemExit):
            code = int(e.code or 0)
        else:
            first = (str(e).strip().splitlines() or [""])[0]
            err.write_text(f"unexpected {type(e).__name__}: {first}", encoding="utf-8")
            code = 1
    sys.stdout.flush()
    sys.exit(code)


def worker_devices(device: str, workers: int) -> list[str]:
    """Each worker's device: ``cuda:i`` for ``--device cuda``, ``cpu`` for ``--device cpu``."""
    import torch

    dev = str(device).strip()
    if dev == "cpu":
        return ["cpu"] * workers
    if dev in ("cuda", "cuda:0") or dev.startswith("cuda"):
        if dev not in ("cuda", "cuda:0"):
            raise DeviceError(f"--workers {workers} with --device {dev}: give --device cuda (worker i uses cuda:i)")
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError(f"--device {dev}: this machine has no CUDA GPU that torch can use; use --device cpu")
        if workers > n:
            raise DeviceError(f"--workers {workers} is more than the {n} CUDA GPU(s) of this machine (worker i uses "
                              f"cuda:i); give --workers {n} or fewer")
        return [f"cuda:{i}" for i in range(workers)]
    raise DeviceError(f"--workers runs on --device cpu or cuda, not {dev!r}")


def visible_gpu(worker: int, inherited: str | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of GPU worker ``worker``: the ``worker``-th entry of the one this
    process was given (``inherited``; ids or UUIDs), or ``worker`` itself when none was given."""
    if inherited is None or not inherited.strip():
        return str(worker)
    ids = [x.strip() for x in inherited.split(",") if x.strip()]
    if worker >= len(ids):
        raise DeviceError(f"GPU worker {worker}: CUDA_VISIBLE_DEVICES={inherited!r} names only {len(ids)} GPU(s); "
                          f"give fewer --workers")
    return ids[worker]


def start_process(ctx, env: dict[str, str], **kwargs):
    """Start ``ctx.Process(**kwargs)`` with ``env`` added to the environment it starts with (a spawned
    child copies this process's environment when it starts; ours is restored at once)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        p = ctx.Process(**kwargs)
        p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return p


def run_parallel_sweep(load: dict, task: tuple, config: SweepConfig, out: Path, workers: int, *, threads: int = 1,
                       backend: str = "dynamic", progress: bool = True, notes: list | None = None,
                       poll_s: float = 0.5) -> list[dict]:
    """Run every cell of ``config`` not yet in ``out`` on ``workers`` processes; returns all records
    of ``out`` (read back at the end), which then holds every cell of the grid exactly once.

    ``load``: the arguments of :func:`speccascade.cli._load_pair` (drafter, verifier, tokenizer,
    pair, device, dtype); ``task``: ``(name, task_file, metric)`` of :func:`.tasks.get_task`."""
    import torch.multiprocessing as mp
    from tqdm.auto import tqdm

    from .tasks import get_task

    workers = as_int("--workers", workers, minimum=1)
    threads = as_int("--threads", threads, minimum=0, hint=" (0: torch's default)")
    config.validate()
    out = Path(out)
    check_out_file(out)
    notes = [] if notes is None else notes
    the_task = get_task(*task)
    available = len(the_task.load())
    if config.n_examples is not None and config.n_examples > available:
        raise SpecCascadeError(f"--examples {config.n_examples} is more than the {available} examples of task "
                               f"{the_task.describe()}; give at most {available}")
    n_examples = config.n_examples or available
    devices = worker_devices(load.get("device", "cpu"), workers)
    if devices[0] == "cpu" and workers > 1 and (not threads or workers * threads > (os.cpu_count() or 1)):
        each = f"{threads} threads" if threads else "torch's default threads (all cores)"
        note = (f"{workers} workers x {each} is more than this machine's {os.cpu_count()} cores: the workers' "
                f"timings include each other's contention (give --threads so that workers x threads <= cores)")
        notes.append(note)
        print(f"speccascade: note: {note}", file=sys.stderr)
    grid = config.cells()
    folder = parts_dir(out)
    with _Locked(out):
        note = repair_tail(out)
        if note:
            notes.append(note)
            print(f"speccascade: note: {note}", file=sys.stderr)
        merger = _Merger(out, read_records(out))
        if folder.is_dir():
            for part in sorted(folder.glob("worker-*.jsonl")):
                _wait_for_lock(part)
                note = repair_tail(part)
                if note:
                    notes.append(note)
            before = len(merger.keys)
            merger.merge()  # what a killed run's workers finished
            if len(merger.keys) > before:
                notes.append(f"merged {len(merger.keys) - before} cells a previous run's workers had finished")
        todo = [c for c in grid if c.key not in merger.keys]
        if todo:
            shares = [s for s in assign(todo, workers, n_examples, config.max_new_tokens) if s]
            folder.mkdir(exist_ok=True)
            ctx = mp.get_context("spawn")
            procs = []
            for i, share in enumerate(shares):
                err = part_file(out, i).with_suffix(".error")
                err.unlink(missing_ok=True)
                env, device = {}, devices[i]
                if device.startswith("cuda"):  # the worker sees its GPU alone, as cuda:0 (module docstring)
                    env = {"CUDA_VISIBLE_DEVICES": visible_gpu(i, os.environ.get("CUDA_VISIBLE_DEVICES"))}
                    device = "cuda:0"
                job = {"part": str(part_file(out, i)), "threads": threads, "device": device,
                       "parent_pid": os.getpid(), "load": dict(load) | {"device": device}, "task": tuple(task),
                       "config": config, "backend": backend, "cells": worker_cells(share, grid)}
                procs.append(start_process(ctx, env, target=_worker_main, args=(i, job),
                                           name=f"speccascade-sweep-worker-{i}"))
            bar = tqdm(total=len(todo), desc=f"sweep x{len(procs)}", unit="cell", disable=not progress)
            wanted = {c.key for c in todo}
            failed = None
            try:
                while True:
                    alive = [p for p in procs if p.is_alive()]
                    bar.update(sum(r["key"] in wanted for r in merger.merge()))
                    failed = next(((i, p) for i, p in enumerate(procs) if p.exitcode not in (None, 0)), None)
                    if failed or not alive:
                        break
                    time.sleep(poll_s)
            finally:
                if failed or any(p.is_alive() for p in procs):
                    for p in procs:
                        if p.is_alive():
                            p.terminate()
                for p in procs:
                    p.join()
                bar.update(sum(r["key"] in wanted for r in merger.merge()))
                bar.close()
            if failed:
                i, p = failed
                err = part_file(out, i).with_suffix(".error")
                msg = err.read_text(encoding="utf-8") if err.exists() else f"exit status {p.exitcode}"
                raise SpecCascadeError(f"sweep worker {i} ({devices[i]}) failed: {msg}") \
                    if p.exitcode == 2 else RuntimeError(f"sweep worker {i} ({devices[i]}) failed: {msg}")
        on_disk = read_records(out)
        check_every_cell_once(out, on_disk, grid)
        shutil.rmtree(folder, ignore_errors=True)
    return on_disk
