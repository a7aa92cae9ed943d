"""The cost-quality sweep: every (method, alpha, gamma, temperature, seed, batch size) cell over a
task's examples, one JSONL record per cell, resumable.

Protocol (PAPER.md 6.4): examples are decoded at batch size 1 by default (``batch_sizes`` may add
batched cells); the latency of a cell is the wall-clock sum over its examples; its *relative
latency* divides by the ``verifier_only`` latency at the same temperature, seed and batch size,
measured in the same sweep file (that cell always runs first). A record is appended and flushed
as soon as its cell finishes; on restart, cells already in the file are skipped, so an
interrupted sweep loses at most the cell in flight and never repeats one.

Each record carries a reproducibility ``signature`` (models, task, method, alpha, gamma, T, seed,
library and torch versions, device); ``type: "costs"`` records hold the per-call costs of the
latency model (:mod:`.report`).
"""

from __future__ import annotations

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

from .. import __version__
from ..errors import SpecCascadeError
from ..models import make_backend
from ..registry import METHODS, get_method
from ..stats import Stats
from .tasks import Task, run_task

#: Default alpha grids per method (PAPER.md section 4 / the notebook's ranges, negative alphas
#: included so that the pure-SD end is reached).
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

    def cells(self) -> list[Cell]:
        for m in self.methods:
            get_method(m)
        methods = [BASELINE] + [m for m in self.methods if m != BASELINE]
        out = []
        for T, seed, batch in itertools.product(self.temperatures, self.seeds, self.batch_sizes):
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


def read_records(path: Path) -> list[dict]:
    """All complete records of a sweep file (a torn last line from a crash is ignored)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
    """Median wall time of one drafter step (1 token), one verifier step (1 token) and one verifier
    block call (gamma + 1 tokens) on a cached prefix: the per-call costs of the latency model.
    ``drafter`` / ``verifier`` are backends."""
    def timed(be, k):
        x = torch.tensor([prompt])
        be.reset(x, torch.ones_like(x))
        times = []
        for _ in range(repeats + 3):
            t = time.perf_counter()
            be.extend(x[:, -1:].expand(1, k).contiguous())
            be.commit(torch.tensor([0]))
            if be.device.type == "cuda":
                torch.cuda.synchronize(be.device)
            times.append(time.perf_counter() - t)
        return statistics.median(times[3:])

    return {"drafter_step_s": timed(drafter, 1), "verifier_step_s": timed(verifier, 1),
            "verifier_block_s": timed(verifier, gamma + 1), "gamma": gamma}


def run_cell(drafter, verifier, tokenizer, task: Task, examples, cell: Cell, max_new_tokens: int) -> tuple[list[str], Stats]:
    return run_task(drafter, verifier, tokenizer, task, [ex.input for ex in examples], method=cell.method,
                    alpha=cell.alpha, gamma=cell.gamma, temperature=cell.temperature, batch_size=cell.batch_size,
                    max_new_tokens=max_new_tokens, seed=cell.seed, **dict(cell.options))


def warm_up(drafter, verifier, tokenizer, task: Task, examples, cells: list[Cell], max_new_tokens: int) -> None:
    """Compile and capture every shape the cells will meet before anything is timed: each method
    (first alpha, each gamma and temperature) on one example of each padded prompt width, outputs
    discarded."""
    from ..models import bucket

    widths = {}
    for ex in examples:
        widths.setdefault(bucket(max(len(task.encode(tokenizer, ex.input)) - 1, 64)), ex)
    probe = list(widths.values())
    # every feed width a loop can ask for (ragged feeds of token_cascade / BiLD: up to 11 tokens)
    x = torch.tensor([task.encode(tokenizer, probe[0].input)])
    for be in (drafter, verifier):
        for w in sorted({1, 2, 4, 8, 16} | {bucket(c.gamma + 1) for c in cells}):
            be.reset(x, torch.ones_like(x))
            be.extend(x[:, -1:].expand(1, w))
            be.commit(torch.zeros(1, dtype=torch.long))
    seen = set()
    for cell in cells:
        key = (cell.method, cell.gamma, cell.temperature, cell.batch_size)
        if key not in seen:
            seen.add(key)
            run_cell(drafter, verifier, tokenizer, task, probe * cell.batch_size, cell, max_new_tokens)


def run_sweep(drafter, verifier, tokenizer, task: Task, config: SweepConfig, out: Path,
              names: tuple[str, str] = ("drafter", "verifier"), progress: bool = True, on_record=None,
              backend: str = "dynamic") -> list[dict]:
    """Run every cell of ``config`` not yet in ``out``; returns all records of the file.

    ``backend``: ``dynamic`` (HFBackend), ``static`` or ``compiled`` (StaticHFBackend without / with
    torch.compile and CUDA graphs), ``graphs`` (GraphHFBackend); it is part of every record's
    signature. A compiled or graphs sweep first
    warms up (:func:`warm_up`), so no compilation is timed."""
    from tqdm.auto import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    examples = task.examples(config.n_examples)
    refs = [ex.reference for ex in examples]
    ex_hash = hashlib.sha1("\n".join(ex.id for ex in examples).encode()).hexdigest()[:12]
    device = next(verifier.parameters()).device
    base_sig = {"drafter": model_id(drafter, names[0]), "verifier": model_id(verifier, names[1]),
                "task": task.describe(), "examples": len(examples), "examples_sha1": ex_hash,
                "speccascade": __version__, "torch": torch.__version__, "device": device_name(device),
                "max_new_tokens": config.max_new_tokens, "backend": backend,
                "dtype": str(next(verifier.parameters()).dtype).removeprefix("torch.")}
    d_be, v_be = make_backend(drafter, "drafter", backend), make_backend(verifier, "verifier", backend)
    records = read_records(out)
    done = {r["key"] for r in records if r.get("type") == "cell"}
    for r in records:
        if r.get("type") == "cell" and r["signature"].get("examples_sha1") != ex_hash:
            raise SpecCascadeError(f"{out} holds cells of another example set; use a new file")
        sig = r.get("signature", {})
        if not (same_model(sig.get("drafter"), base_sig["drafter"]) and same_model(sig.get("verifier"), base_sig["verifier"])):
            raise SpecCascadeError(
                f"{out} holds cells of another model pair ({sig.get('drafter')}, {sig.get('verifier')}; "
                f"now {base_sig['drafter']}, {base_sig['verifier']}): the weights differ; use a new file")
    todo = [c for c in config.cells() if c.key not in done]
    if backend in ("compiled", "graphs") and todo:
        warm_up(d_be, v_be, tokenizer, task, examples, todo, config.max_new_tokens)
    for gamma in sorted({c.gamma for c in config.cells()}):
        if not any(r.get("type") == "costs" and r.get("gamma") == gamma for r in records):
            rec = {"type": "costs", "signature": base_sig} | measure_costs(
                d_be, v_be, task.encode(tokenizer, examples[0].input), gamma)
            _append(out, rec)
            records.append(rec)
    for cell in tqdm(todo, desc="sweep", unit="cell", disable=not progress):
        hyps, stats = run_cell(d_be, v_be, tokenizer, task, examples, cell, config.max_new_tokens)
        quality = task.score(hyps, refs)
        base = next((r for r in records if r.get("type") == "cell" and r["method"] == BASELINE
                     and r["temperature"] == cell.temperature and r["seed"] == cell.seed
                     and r["batch_size"] == cell.batch_size), None)
        latency = stats.wall_time_s
        rec = {"type": "cell", "key": cell.key, "method": cell.method, "alpha": cell.alpha, "gamma": cell.gamma,
               "temperature": cell.temperature, "seed": cell.seed, "batch_size": cell.batch_size,
               "options": dict(cell.options), "quality": quality, "latency_s": latency,
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
    return records
