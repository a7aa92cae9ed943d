"""The cost-quality sweep: every (method, alpha, gamma, temperature, seed, batch size) cell over a
task's examples, one JSONL record per cell, resumable.

Protocol (arXiv 2405.19261, Section 6 and App. E.1, after Leviathan et al. 2023): examples are
decoded at batch size 1 by default (``batch_sizes`` may add batched cells); the latency of a cell is
the wall-clock sum over its examples; its *relative latency* divides by the ``verifier_only``
latency at the same temperature, seed and batch size, measured in the same sweep file (that cell
always runs first). A record is appended and flushed as soon as its cell finishes; on restart, cells
already in the file are skipped, so an interrupted sweep loses at most the cell in flight and never
repeats one. A torn last line (a writer killed mid-write) is cut off before anything is appended; a
file written with other settings (task, examples, max_new_tokens, backend, dtype, device, the
tensor-parallel degree ``tp``) or weights is refused, never silently extended; the whole grid (every
alpha) is validated before the first cell runs.

Each record carries a reproducibility ``signature`` (models, task, method, alpha, gamma, T, seed,
library and torch versions, device); ``type: "costs"`` records hold the per-call costs of the
latency model (:mod:`.report`).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__, loop, runner, sampling
from ..checks import as_int
from ..errors import DeviceError, SpecCascadeError, SweepFileError
from ..models import make_backend
from ..registry import METHODS, get_method
from ..sampling import SamplingConfig
from ..stats import Stats
from .tasks import Task, run_task

#: Default alpha grids per method (the paper varies alpha over [0, 1] for probability thresholds and
#: [0, 10] for BiLD, Section 6; negative alphas are included so that the pure-SD end is reached).
DEFAULT_ALPHAS: dict[str, list] = {
    "sd": [None], "verifier_only": [None], "drafter_only": [None],
    "lossy": [0.0, 0.2, 0.4, 0.6, 0.8, 0.95], "lossy_tuned": [0.0, 0.2, 0.4, 0.6, 0.8, 0.95],
    "bild_star": [0.5, 1.0, 2.0, 3.0, 5.0, 8.0],
    "chow": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], "diff": [-1.0, -0.2, 0.0, 0.1, 0.2, 0.4],
    "opt": [-10.0, -1.0, 0.0, 0.5, 1.0, 3.0, 10.0],
    "chow_log": [0.0, 0.5, 1.0, 2.0, 3.0, 5.0], "diff_log": [-2.0, -1.0, 0.0, 0.5, 1.0, 2.0],
    "opt_log": [-10.0, -1.0, 0.0, 1.0, 3.0, 10.0],
    "token_v1": [-1.0, -0.2, 0.0, 0.2, 0.5], "token_v2": [-1.0, 0.0, 0.1, 0.3, 0.6],
    "token_v3": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
    "token_cascade": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
    # eq. (1) compares the raw probability of a whole response (often < 1e-6) with 1 - alpha: the
    # grid approaches 1 geometrically (1 - 1e-15 is the last float below 1)
    "seq_cascade": [0.0, 0.9, 1 - 1e-3, 1 - 1e-6, 1 - 1e-9, 1 - 1e-12, 1 - 1e-15, 1.0],
    "oracle_diff": [-1.0, 0.0, 0.1, 0.2, 0.4, 1.0], "bild": [0.0, 1.0, 2.0, 4.0],
}
BASELINE = "verifier_only"


@dataclass(frozen=True)
class Cell:
    method: str
    alpha: float | None
    gamma: int
    temperature: float
    seed: int
    batch_size: int
    options: tuple = ()

    @property
    def key(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return (f"{self.method}|alpha={self.alpha}|gamma={self.gamma}|T={self.temperature:g}|seed={self.seed}"
                f"|batch={self.batch_size}|{opts}")


@dataclass
class SweepConfig:
    methods: list[str]
    alphas: dict[str, list] = field(default_factory=dict)
    gammas: list[int] = field(default_factory=lambda: [5])
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    n_examples: int | None = 200
    max_new_tokens: int = 128
    options: dict[str, dict] = field(default_factory=dict)

    def validate(self) -> "SweepConfig":
        """Check every setting and every alpha of the grid before anything runs (a bad alpha must
        not fail after the baseline took minutes); values are normalised in place."""
        if isinstance(self.methods, str) or not self.methods:
            raise SpecCascadeError(f"methods must be a non-empty list of method names, got {self.methods!r}")
        for m in self.methods:
            get_method(m)
        if not isinstance(self.alphas, dict):
            raise SpecCascadeError(f"alphas must be a dict {{method: [alpha, ...]}}, got {type(self.alphas).__name__}")
        for m, grid in self.alphas.items():
            spec = get_method(m)
            if m not in self.methods:
                raise SpecCascadeError(f"alphas are given for {m!r}, which is not among the swept methods "
                                       f"({', '.join(self.methods)})")
            if spec.alpha is None:
                raise SpecCascadeError(f"alphas are given for {m!r}, which takes no alpha")
            if isinstance(grid, (str, bytes)) or not hasattr(grid, "__iter__") or not list(grid):
                raise SpecCascadeError(f"the alpha grid of {m!r} must be a non-empty list of numbers, got {grid!r}")
            self.alphas[m] = [spec.alpha.check(m, a) for a in grid]
        for m in self.methods:  # the built-in grids, too
            spec = METHODS[m]
            if spec.alpha is not None and m not in self.alphas:
                for a in DEFAULT_ALPHAS.get(m) or [spec.alpha.default]:
                    spec.alpha.check(m, a)

        def ints(name, values, minimum):
            if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") or not list(values):
                raise SpecCascadeError(f"{name} must be a non-empty list of integers >= {minimum}, got {values!r}")
            return [as_int(f"each of {name}", v, minimum=minimum) for v in values]

        self.gammas = ints("gammas", self.gammas, 1)
        self.seeds = ints("seeds", self.seeds, 0)
        self.batch_sizes = ints("batch_sizes", self.batch_sizes, 1)
        if isinstance(self.temperatures, (str, bytes)) or not hasattr(self.temperatures, "__iter__") \
                or not list(self.temperatures):
            raise SpecCascadeError(f"temperatures must be a non-empty list of numbers >= 0, got {self.temperatures!r}")
        self.temperatures = [SamplingConfig(temperature=t).temperature for t in self.temperatures]
        self.n_examples = as_int("the number of examples (--examples)", self.n_examples, minimum=1, allow_none=True)
        self.max_new_tokens = as_int("max_new_tokens", self.max_new_tokens, minimum=1)
        if not isinstance(self.options, dict):
            raise SpecCascadeError(f"options must be a dict {{method: {{option: value}}}}, got {self.options!r}")
        for m, opts in self.options.items():
            if m not in self.methods:
                raise SpecCascadeError(f"options are given for {m!r}, which is not among the swept methods")
            if not isinstance(opts, dict):
                raise SpecCascadeError(f"the options of {m!r} must be a dict, got {opts!r}")
            self.options[m] = get_method(m).check_options(opts)
        return self

    def cells(self) -> list[Cell]:
        for m in self.methods:
            get_method(m)
        methods = [BASELINE] + [m for m in self.methods if m != BASELINE]
        out = []
        for T, seed, batch in itertools.product(self.temperatures, self.seeds, self.batch_sizes):
            # a greedy decode (T = 0) draws nothing, whatever the method (tests/test_eval.py): one seed
            if T == 0 and seed != self.seeds[0]:
                continue
            for m in methods:
                spec = METHODS[m]
                alphas = self.alphas.get(m) or DEFAULT_ALPHAS.get(m) or [None]
                # gamma matters only to the speculative loop
                gammas = self.gammas if spec.kind == "speculative" else [self.gammas[0]]
                opts = tuple(sorted(self.options.get(m, {}).items()))
                for a, g in itertools.product(alphas, gammas):
                    out.append(Cell(m, a if spec.alpha else None, g, T, seed, batch, opts))
        seen, unique = set(), []
        for c in out:
            if c.key not in seen:
                seen.add(c.key)
                unique.append(c)
        return unique


#: The signature fields a sweep file's cells must share with a run that extends it: a cell computed
#: under other settings would be reused as if computed under these (models are compared separately).
SETTINGS = ("task", "examples", "examples_sha1", "max_new_tokens", "backend", "dtype", "device", "tp",
            "bonus_draft_beside", "split_argmax")
RECORD_TYPES = ("cell", "costs")
GZIP_MAGIC = b"\x1f\x8b"


def read_records(path: Path, *, notes: list | None = None) -> list[dict]:
    """All records of a sweep file. A torn last line (a writer killed mid-write: no newline at the
    end, not valid JSON) is skipped (``notes`` gets a line saying so); anything else that is not a
    sweep record is a :class:`SweepFileError` naming the line: a binary file, a damaged line in
    the middle, JSON that is not a ``{"type": "cell" | "costs", ...}`` object. A missing file has
    no records. A gzip-compressed file (a committed record, ``sweep.jsonl.gz``) is read as its
    contents."""
    path = Path(path)
    if not path.exists():
        return []
    if path.is_dir():
        raise SweepFileError(f"{str(path)!r} is a folder, not a sweep file (.jsonl)")
    data = path.read_bytes()
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise SweepFileError(f"{str(path)!r} is a damaged gzip file ({e}); decompress what is left with "
                                 f"`zcat` or use the uncompressed sweep file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SweepFileError(f"{str(path)!r} is not a text file (byte {e.start} is not UTF-8); a sweep file is "
                             f"JSON lines written by `speccascade sweep`") from None
    lines = text.split("\n")
    torn = not text.endswith("\n") and lines[-1].strip() != ""
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and torn:
                if notes is not None:
                    notes.append(f"{path}: ignored a torn last line ({len(line)} characters; a writer was killed "
                                  f"mid-write)")
                continue
            raise SweepFileError(
                f"line {i + 1} of {str(path)!r} is not a JSON record ({e.msg} at column {e.colno}); the file is "
                f"damaged (e.g. a torn write followed by an append): delete that line (its cell is recomputed "
                f"by the next sweep) or use a new file") from None
        if not isinstance(rec, dict) or rec.get("type") not in RECORD_TYPES:
            raise SweepFileError(
                f"line {i + 1} of {str(path)!r} is not a sweep record (a JSON object with \"type\": \"cell\" or "
                f"\"costs\"); is this a file written by `speccascade sweep`?")
        records.append(rec)
    return records


def repair_tail(path: Path) -> str | None:
    """Make ``path`` end at a complete line before anything is appended: a torn last line (a writer
    killed mid-write) is cut off and kept in ``<path>.torn``; a complete last record without its
    newline gets one. Returns a note saying what was done (None: nothing to do)."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return None
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    try:
        rec = json.loads(tail.decode("utf-8"))
        complete = isinstance(rec, dict) and rec.get("type") in RECORD_TYPES
    except (UnicodeDecodeError, json.JSONDecodeError):
        complete = False
    if complete:
        with open(path, "ab") as f:
            f.write(b"\n")
        return f"{path}: added the missing newline after the last record"
    torn = path.with_name(path.name + ".torn")
    with open(torn, "ab") as f:
        f.write(tail + b"\n")
    with open(path, "r+b") as f:
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    return (f"{path}: removed a torn last line ({len(tail)} bytes: a writer was killed mid-write; kept in {torn}); "
            f"its cell is recomputed")


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def check_out_file(path: Path) -> None:
    """A sweep file that can be written (created if missing): a clear error otherwise."""
    path = Path(path)
    if path.is_dir():
        raise SweepFileError(f"--out {str(path)!r} is a folder; give a file path such as runs/sweep.jsonl")
    if path.suffix == ".gz" or (path.is_file() and _head(path, 2) == GZIP_MAGIC):
        raise SweepFileError(f"--out {str(path)!r} is gzip-compressed; a sweep appends plain JSON lines: "
                             f"`gunzip` it (its cells are then kept) or give a .jsonl path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SweepFileError(f"cannot create the folder of --out {str(path)!r}: {e.strerror or e}") from None
    # A missing file is not created here (a reader polling for it would see it come and go):
    # its folder must take new files instead.
    if path.exists():
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as e:
            raise SweepFileError(f"cannot write --out {str(path)!r}: {e.strerror or e}") from None
    elif not os.access(path.parent, os.W_OK | os.X_OK):
        raise SweepFileError(f"cannot write --out {str(path)!r}: its folder {str(path.parent)!r} is not writable")


class _Locked:
    """An exclusive, non-blocking lock on the sweep file for the duration of a sweep: two sweeps
    appending to one file would interleave and repeat cells. (The file is created if missing, and
    removed again if the sweep stops before writing anything.)"""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.f = None

    def __enter__(self):
        self.created = not self.path.exists()
        self.f = open(self.path, "a", encoding="utf-8")
        try:
            import fcntl
        except ImportError:  # pragma: no cover  (not POSIX: no lock)
            return self
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            self.f = None
            raise SweepFileError(f"another sweep is writing {str(self.path)!r} (it holds the file's lock); wait for "
                                 f"it to finish, or write to another --out file") from None
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            if self.created and self.path.stat().st_size == 0:
                self.path.unlink()
            self.f.close()  # releases the lock
        return False


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_settings_match(out: Path, records: list[dict], sig: dict) -> None:
    """Refuse to extend a file whose records were computed under other settings (task, examples,
    max_new_tokens, backend, dtype, device) or with other weights."""
    for r in records:
        old = r.get("signature") or {}
        for k in SETTINGS:
            if k in old and k in sig and old[k] != sig[k]:
                raise SweepFileError(
                    f"{str(out)!r} holds {r['type']} records computed with {k}={old[k]!r}, but this run has "
                    f"{k}={sig[k]!r}: its cells would be reused as if computed with this run's settings. Rerun with "
                    f"the file's settings to extend it, or write to a new --out file")
        if r.get("type") == "cell" and "examples_sha1" in old and old["examples_sha1"] != sig["examples_sha1"]:
            raise SweepFileError(f"{str(out)!r} holds cells of another example set; use a new file")
        if not (same_model(old.get("drafter"), sig["drafter"]) and same_model(old.get("verifier"), sig["verifier"])):
            raise SweepFileError(
                f"{str(out)!r} holds cells of another model pair ({old.get('drafter')}, {old.get('verifier')}; "
                f"now {sig['drafter']}, {sig['verifier']}): the weights differ; use a new file")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}:threads={torch.get_num_threads()}"


def model_id(model, name: str) -> str:
    """``name:parameter count:weights fingerprint``. The fingerprint (SHA-1 of up to 4,096 evenly
    spaced values of every parameter tensor, as float32) tells two trainings of one shape apart,
    so a sweep file never mixes them and a report never compares across them."""
    path = getattr(model.config, "_name_or_path", "") or name
    n, h = 0, hashlib.sha1()
    with torch.no_grad():
        for p in model.parameters():
            n += p.numel()
            p = p.full_tensor() if hasattr(p, "full_tensor") else p  # a tensor-parallel shard (DTensor): gathered
            flat = p.detach().reshape(-1)
            h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return f"{Path(str(path)).name or name}:{n}:{h.hexdigest()[:10]}"


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two model ids can name the same weights: equal, or equal but for the fingerprint that
    records written before fingerprints existed lack (``name:count`` vs ``name:count:fingerprint``)."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    pa, pb = a.split(":"), b.split(":")
    return len(pa) != len(pb) and pa[:2] == pb[:2]


def measure_costs(drafter, verifier, prompt: list[int], gamma: int, repeats: int = 20) -> dict:
    """The per-call costs of the latency model (:func:`..models.timing.call_seconds`: graph
    replays where the loops capture the calls): one drafter step (1 token), one verifier step
    (1 token) and one verifier block call (gamma + 1 tokens) on a cached prefix, and each model's
    pre-fill of ``prompt`` (median wall time); with a feature drafter (:mod:`..models.features`) also the
    verifier's pre-fill that returns its states and the drafter's first call of a block (a ragged feed
    of up to gamma + 1 tokens). ``drafter`` / ``verifier`` are backends."""
    from ..models.features import is_feature_drafter, timing_reset
    from ..models.timing import call_seconds

    def prefill(be, states: bool = False):
        x = torch.tensor([prompt])
        times = []
        for _ in range(max(repeats // 4, 3) + 2):
            if be.device.type == "cuda":
                torch.cuda.synchronize(be.device)
            t = time.perf_counter()
            timing_reset(be, x, torch.ones_like(x), states)
            if be.device.type == "cuda":
                torch.cuda.synchronize(be.device)
            times.append(time.perf_counter() - t)
        return statistics.median(times[2:])

    return {"drafter_step_s": call_seconds(drafter, prompt, 1, repeats),
            "verifier_step_s": call_seconds(verifier, prompt, 1, repeats),
            "verifier_block_s": call_seconds(verifier, prompt, gamma + 1, repeats), "gamma": gamma,
            "drafter_prefill_s": prefill(drafter), "verifier_prefill_s": prefill(verifier),
            # a feature drafter's verifier pre-fills returning its states (the loop's prefill_with_states)
            **({"verifier_prefill_states_s": prefill(verifier, True),
                # and its first call of a block: the last block's accepted drafts and new token, ragged
                "drafter_first_call_s": call_seconds(drafter, prompt, gamma + 1, repeats, ragged=True)}
               if is_feature_drafter(drafter) else {}),
            "prefill_prompt_tokens": len(prompt),
            "timing": "graph replays" if runner.can_capture(drafter, verifier) else "calls"}


def run_cell(drafter, verifier, tokenizer, task: Task, examples, cell: Cell,
             max_new_tokens: int) -> tuple[list[str], Stats]:
    return run_task(drafter, verifier, tokenizer, task, [ex.input for ex in examples], method=cell.method,
                    alpha=cell.alpha, gamma=cell.gamma, temperature=cell.temperature, batch_size=cell.batch_size,
                    max_new_tokens=max_new_tokens, seed=cell.seed, **dict(cell.options))


def warm_up(drafter, verifier, tokenizer, task: Task, examples, cells: list[Cell], max_new_tokens: int) -> None:
    """Compile and capture every shape the cells will meet before anything is timed: each method
    (first alpha, each gamma and temperature) on one example of each padded prompt width, outputs
    discarded. Backends that size their cache per request (``reserve``; the fused T5 backend also
    its cross-attention buffers, for the longest source) are first sized for the longest request of
    the sweep, so no timed cell meets a new cache size (which would recompile the model step and
    re-capture every graph inside the timing)."""
    from ..models import bucket
    from ..models.base import reserve_request
    from ..models.features import timing_feed, timing_reset

    longest = max(len(task.encode(tokenizer, ex.input)) for ex in examples)

    def fix_capacity(batch: int) -> None:
        for be in (drafter, verifier):
            reserve_request(be, batch, longest, max_new_tokens, max(c.gamma for c in cells))

    fix_capacity(1)
    widths = {}
    for ex in examples:
        widths.setdefault(bucket(max(len(task.encode(tokenizer, ex.input)) - 1, 64)), ex)
    probe = list(widths.values())
    # every feed width a loop can ask for (ragged feeds of token_cascade / BiLD: up to 11 tokens)
    x = torch.tensor([task.encode(tokenizer, probe[0].input)])
    for be in (drafter, verifier):
        for w in sorted({1, 2, 4, 8, 16} | {bucket(c.gamma + 1) for c in cells}):
            timing_reset(be, x, torch.ones_like(x))
            timing_feed(be, x[:, -1:].expand(1, w))
            be.commit(torch.zeros(1, dtype=torch.long))
    seen = set()
    for cell in cells:
        key = (cell.method, cell.gamma, cell.temperature, cell.batch_size)
        if key not in seen:
            seen.add(key)
            fix_capacity(cell.batch_size)
            run_cell(drafter, verifier, tokenizer, task, probe * cell.batch_size, cell, max_new_tokens)
    fix_capacity(cells[0].batch_size if cells else 1)


def warm_up_grid(drafter, verifier, tokenizer, task: Task, config: SweepConfig, backend: str) -> int:
    """Compile and capture every shape ``config``'s cells will meet, time nothing, write nothing:
    torch's on-disk compile caches then serve a later sweep of models of the same shapes (the
    weights do not matter), e.g. one started on another GPU while these models were still
    training. Returns the number of cells whose shapes were warmed."""
    config.validate()
    examples = task.examples(config.n_examples)
    check_context(drafter, verifier, tokenizer, task, examples, config)
    cells = config.cells()
    warm_up(make_backend(drafter, "drafter", backend), make_backend(verifier, "verifier", backend), tokenizer, task,
            examples, cells, config.max_new_tokens)
    return len(cells)


def check_context(drafter, verifier, tokenizer, task: Task, examples, config: SweepConfig) -> None:
    """Every example fits both models' contexts with ``max_new_tokens`` and a draft block (checked
    before the first cell, not when the cell that meets the longest prompt runs)."""
    longest, which = 0, None
    for ex in examples:
        n = len(task.encode(tokenizer, ex.input))
        if n > longest:
            longest, which = n, ex.id
    need = longest + config.max_new_tokens + max(config.gammas) + 1
    for name, model in (("drafter", drafter), ("verifier", verifier)):
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit and need > limit:
            raise SpecCascadeError(
                f"example {which!r} has {longest} prompt tokens; with max_new_tokens={config.max_new_tokens} and a "
                f"draft block of {max(config.gammas) + 1} it needs {need} positions, more than the {name}'s "
                f"{limit}: lower --max-new-tokens")


def run_sweep(drafter, verifier, tokenizer, task: Task, config: SweepConfig, out: Path,
              names: tuple[str, str] = ("drafter", "verifier"), progress: bool = True, on_record=None,
              backend: str = "dynamic", notes: list | None = None, cells: list[Cell] | None = None) -> list[dict]:
    """Run every cell of ``config`` not yet in ``out``; returns all records of the file (as read
    back from it at the end). ``cells``: only these cells of the grid, in this order (a worker's
    share in :mod:`.parallel`; a cell's ``verifier_only`` baseline must come before it).

    Before any cell runs: the config is validated (every alpha in range), the file is locked
    against a second writer, a torn last line is repaired (:func:`repair_tail`; ``notes`` and
    stderr say so), the file's records must have been computed with this run's settings
    (:data:`SETTINGS`) and weights, and every example must fit both contexts.

    ``backend``: ``dynamic`` (HFBackend), ``static`` or ``compiled`` (StaticHFBackend without / with
    torch.compile and CUDA graphs), ``graphs`` (GraphHFBackend); it is part of every record's
    signature. A compiled or graphs sweep first
    warms up (:func:`warm_up`), so no compilation is timed."""
    import sys

    from tqdm.auto import tqdm

    config.validate()
    out = Path(out)
    check_out_file(out)
    notes = [] if notes is None else notes
    examples = task.examples(config.n_examples)
    if not examples:
        raise SpecCascadeError(f"task {task.describe()} has no examples")
    if config.n_examples is not None and config.n_examples > len(examples):
        raise SpecCascadeError(f"--examples {config.n_examples} is more than the {len(examples)} examples of task "
                               f"{task.describe()}; give at most {len(examples)}")
    refs = [ex.reference for ex in examples]
    ex_hash = hashlib.sha1("\n".join(ex.id for ex in examples).encode()).hexdigest()[:12]
    device = next(verifier.parameters()).device
    if next(drafter.parameters()).device != device:
        raise DeviceError(f"the drafter is on {next(drafter.parameters()).device} and the verifier on {device}; "
                          f"put both models on one device")
    base_sig = {"drafter": model_id(drafter, names[0]), "verifier": model_id(verifier, names[1]),
                "task": task.describe(), "examples": len(examples), "examples_sha1": ex_hash,
                "speccascade": __version__, "torch": torch.__version__, "device": device_name(device),
                "max_new_tokens": config.max_new_tokens, "backend": backend,
                # --tp: the verifier's tensor-parallel degree (transformers' sharding, or the fused backend's)
                "tp": getattr(verifier, "tp_size", None) or getattr(verifier, "speccascade_tp", None) or 1,
                "dtype": str(next(verifier.parameters()).dtype).removeprefix("torch."),
                # where a captured block runs a cascade's bonus-position call (loop.bonus_draft_beside): timing
                # (on a GPU; elsewhere the call always runs on the one stream)
                "bonus_draft_beside": loop.BONUS_DRAFT_BESIDE and device.type == "cuda",
                # the vocabulary's argmaxes split into chunks (sampling.wide_argmax): the same tokens, its own timing
                "split_argmax": sampling.SPLIT_ARGMAX}
    check_context(drafter, verifier, tokenizer, task, examples, config)
    d_be, v_be = make_backend(drafter, "drafter", backend), make_backend(verifier, "verifier", backend)
    cells = config.cells() if cells is None else list(cells)
    with _Locked(out):
        note = repair_tail(out)
        if note:
            notes.append(note)
            print(f"speccascade: note: {note}", file=sys.stderr)
        records = read_records(out)
        check_settings_match(out, records, base_sig)
        done = {r["key"] for r in records if r.get("type") == "cell"}
        todo = [c for c in cells if c.key not in done]
        if backend in ("compiled", "graphs", "fused", "fused_eager", "auto") and todo:
            warm_up(d_be, v_be, tokenizer, task, examples, todo, config.max_new_tokens)
        for gamma in sorted({c.gamma for c in cells}):
            if not any(r.get("type") == "costs" and r.get("gamma") == gamma for r in records):
                rec = {"type": "costs", "signature": base_sig} | measure_costs(
                    d_be, v_be, task.encode(tokenizer, examples[0].input), gamma)
                _append(out, rec)
                records.append(rec)
        for cell in tqdm(todo, desc="sweep", unit="cell", disable=not progress):
            hyps, stats = run_cell(d_be, v_be, tokenizer, task, examples, cell, config.max_new_tokens)
            quality = task.score(hyps, refs)
            # the reference: a baseline cell is its own; any other cell's is the group's latest baseline, this
            # process's own where it ran one (a later run that appends other gammas runs its own baseline
            # first: same host state), else the one a resumed file holds
            base = None if cell.method == BASELINE else next(
                (r for r in reversed(records) if r.get("type") == "cell" and r["method"] == BASELINE
                 and r["temperature"] == cell.temperature and r["seed"] == cell.seed
                 and r["batch_size"] == cell.batch_size), None)
            latency = stats.wall_time_s
            rec = {"type": "cell", "key": cell.key, "method": cell.method, "alpha": cell.alpha, "gamma": cell.gamma,
                   "temperature": cell.temperature, "seed": cell.seed, "batch_size": cell.batch_size,
                   "options": dict(cell.options), "quality": quality,
                   "quality_stats": task.sentence_stats(hyps, refs), "latency_s": latency,
                   "relative_latency": latency / base["latency_s"] if base else 1.0,
                   "rejection_rate": stats.rejection_rate, "stats": stats.to_dict(),
                   "signature": base_sig | {"method": cell.method, "alpha": cell.alpha, "gamma": cell.gamma,
                                            "temperature": cell.temperature, "seed": cell.seed,
                                            "batch_size": cell.batch_size},
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            _append(out, rec)
            records.append(rec)
            if on_record is not None:
                on_record(rec)
        on_disk = read_records(out)
    check_every_cell_once(out, on_disk, cells)
    return on_disk


def check_every_cell_once(out: Path, records: list[dict], cells) -> None:
    """``records`` (read back from ``out``) hold each of ``cells`` exactly once."""
    keys = [r["key"] for r in records if r.get("type") == "cell"]
    missing = [c.key for c in cells if c.key not in set(keys)]
    if missing or len(keys) != len(set(keys)):
        raise SweepFileError(f"{str(out)!r} does not hold every cell exactly once after the sweep "
                             f"({len(missing)} missing, {len(keys) - len(set(keys))} repeated); was it written to "
                             f"while this sweep ran?")
