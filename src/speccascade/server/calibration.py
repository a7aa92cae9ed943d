"""Calibration: which (method, alpha, gamma) a request with ``quality_floor`` or ``latency_budget`` gets.

The file (``serve --calibration PATH``) is JSON::

    {"format": "speccascade-calibration/1", "metric": "bleu", "source": [...],
     "entries": [{"method": "token_v3", "alpha": 0.5, "gamma": 5, "temperature": 1.0, "options": {},
                  "quality": 15.1, "quality_delta": -2.0, "relative_latency": 1.42}, ...]}

(a bare list of entries is accepted too). ``quality_delta`` is the quality *lost* against the
verifier alone (verifier quality - entry quality; negative: better than the verifier), in the
metric's units; ``relative_latency`` is the entry's latency over the verifier's (the sweep's
``relative_latency``). ``PATH`` may also be sweep records (``speccascade sweep`` JSONL): the
entries are then built on the fly by :func:`from_records`.

Choosing, among the entries at the request's temperature:

* ``quality_floor`` = the largest quality loss allowed: the fastest entry with
  ``quality_delta <= quality_floor`` (ties: the smaller loss);
* ``latency_budget`` = the largest relative latency allowed: the best-quality entry with
  ``relative_latency <= latency_budget`` (ties: the faster);
* both: the fastest entry meeting both.

Build a file from sweep records::

    python -m speccascade.server.calibration results/sweep_tiny_cpu/*.jsonl --out calibration.json

(``speccascade report``'s ``summary.json`` holds only Table 2's per-method summaries, not the
alphas, so the per-cell sweep records are the source.)
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SpecCascadeError
from ..registry import METHODS

FORMAT = "speccascade-calibration/1"


@dataclass(frozen=True)
class Entry:
    method: str
    alpha: float | None
    gamma: int
    temperature: float
    quality_delta: float
    relative_latency: float
    options: dict = field(default_factory=dict, hash=False, compare=False)
    quality: float | None = None

    def describe(self) -> str:
        a = "" if self.alpha is None else f" alpha={self.alpha:g}"
        o = "".join(f" {k}={v}" for k, v in sorted(self.options.items()))
        return (f"{self.method}{a} gamma={self.gamma}{o} (quality loss {self.quality_delta:+.3g}, "
                f"relative latency {self.relative_latency:.3g})")


class NoEntry(SpecCascadeError):
    """No calibrated setting meets the request; the message says what is achievable."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class Calibration:
    entries: list[Entry]
    metric: str | None = None
    source: list[str] = field(default_factory=list)

    # -- files ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        if not path.exists():
            raise SpecCascadeError(f"calibration file {str(path)!r} does not exist")
        if path.suffix == ".jsonl":
            from ..eval.sweep import read_records

            return from_records(read_records(path), source=[str(path)])
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SpecCascadeError(f"calibration file {str(path)!r} is not JSON: {e}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data, where: str = "calibration") -> "Calibration":
        rows = data if isinstance(data, list) else data.get("entries") if isinstance(data, dict) else None
        if not isinstance(rows, list) or not rows:
            raise SpecCascadeError(f"{where}: expected a non-empty list of entries (or {{'entries': [...]}})")
        entries = []
        for i, r in enumerate(rows):
            try:
                method = str(r["method"])
                if method not in METHODS:
                    raise SpecCascadeError(f"{where}: entry {i}: unknown method {method!r}")
                entries.append(Entry(method=method, alpha=None if r.get("alpha") is None else float(r["alpha"]),
                                     gamma=int(r.get("gamma", 5)), temperature=float(r["temperature"]),
                                     quality_delta=float(r["quality_delta"]),
                                     relative_latency=float(r["relative_latency"]),
                                     options=dict(r.get("options") or {}),
                                     quality=None if r.get("quality") is None else float(r["quality"])))
            except (KeyError, TypeError, ValueError) as e:
                raise SpecCascadeError(f"{where}: entry {i} needs method, temperature, quality_delta and "
                                       f"relative_latency (numbers): {e!r}") from None
        meta = data if isinstance(data, dict) else {}
        return cls(entries, metric=meta.get("metric"), source=list(meta.get("source") or [where]))

    def to_dict(self) -> dict:
        return {"format": FORMAT, "metric": self.metric, "source": self.source,
                "entries": [asdict(e) for e in self.entries]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    # -- choosing ------------------------------------------------------------------------------

    def temperatures(self) -> list[float]:
        return sorted({e.temperature for e in self.entries})

    def choose(self, temperature: float, quality_floor: float | None = None,
               latency_budget: float | None = None) -> Entry:
        for name, v in (("quality_floor", quality_floor), ("latency_budget", latency_budget)):
            if v is not None and not math.isfinite(v):
                raise NoEntry(f"{name} must be a finite number, got {v!r}", name)
        if latency_budget is not None and latency_budget <= 0:
            raise NoEntry(f"latency_budget is a latency relative to the verifier alone (> 0), got {latency_budget!r}",
                          "latency_budget")
        param = "quality_floor" if quality_floor is not None else "latency_budget"
        pool = [e for e in self.entries if math.isclose(e.temperature, temperature, abs_tol=1e-9)]
        if not pool:
            raise NoEntry(f"the calibration has no entries at temperature {temperature:g}; it has "
                          f"{', '.join(f'{t:g}' for t in self.temperatures())}", "temperature")
        ok = [e for e in pool if (quality_floor is None or e.quality_delta <= quality_floor)
              and (latency_budget is None or e.relative_latency <= latency_budget)]
        if not ok:
            best_q = min(pool, key=lambda e: (e.quality_delta, e.relative_latency))
            fastest = min(pool, key=lambda e: (e.relative_latency, e.quality_delta))
            unit = f" {self.metric}" if self.metric else ""
            want = " and ".join(s for s in (
                None if quality_floor is None else f"a quality loss <= {quality_floor:g}{unit}",
                None if latency_budget is None else f"a relative latency <= {latency_budget:g}") if s)
            raise NoEntry(f"no calibrated setting at temperature {temperature:g} has {want}; the smallest loss is "
                          f"{best_q.describe()}, the fastest {fastest.describe()}", param)
        if latency_budget is not None and quality_floor is None:
            return min(ok, key=lambda e: (e.quality_delta, e.relative_latency))
        return min(ok, key=lambda e: (e.relative_latency, e.quality_delta))


def from_records(records: list[dict], metric: str | None = None, batch_size: int | None = None,
                 source: list[str] | None = None) -> Calibration:
    """Entries from sweep cells: one per (method, alpha, gamma, temperature, options), averaging
    repeated cells (seeds, workers). Each cell's quality loss is against the ``verifier_only`` cell
    of its own file (``_source``), temperature, seed and batch size when there is one, else against
    the mean of the ``verifier_only`` cells at its temperature and batch size. ``batch_size``:
    which cells (default: the smallest batch size swept)."""
    cells = [r for r in records if r.get("type") == "cell"]
    if not cells:
        raise SpecCascadeError("these records hold no sweep cells")
    metric = metric or next(iter(cells[0]["quality"]))
    batch_size = batch_size if batch_size is not None else min(r["batch_size"] for r in cells)
    cells = [r for r in cells if r["batch_size"] == batch_size and metric in r.get("quality", {})]
    base, base_t = {}, defaultdict(list)
    for r in cells:
        if r["method"] == "verifier_only":
            base[(r.get("_source"), r["temperature"], r["seed"])] = r["quality"][metric]
            base_t[r["temperature"]].append(r["quality"][metric])
    groups = defaultdict(list)
    for r in cells:
        ref = base.get((r.get("_source"), r["temperature"], r["seed"]))
        if ref is None and base_t.get(r["temperature"]):
            ref = sum(base_t[r["temperature"]]) / len(base_t[r["temperature"]])
        if ref is None:
            continue
        opts = json.dumps(r.get("options") or {}, sort_keys=True)
        key = (r["method"], r["alpha"], r["gamma"], r["temperature"], opts)
        groups[key].append((ref - r["quality"][metric], r["relative_latency"], r["quality"][metric]))
    if not groups:
        raise SpecCascadeError(f"no cell at batch size {batch_size} has a verifier_only baseline to compare with")
    entries = []
    for (method, alpha, gamma, T, opts), vals in sorted(groups.items(), key=lambda kv: str(kv[0])):
        n = len(vals)
        entries.append(Entry(method=method, alpha=alpha, gamma=gamma, temperature=T,
                             quality_delta=sum(v[0] for v in vals) / n, relative_latency=sum(v[1] for v in vals) / n,
                             options=json.loads(opts), quality=sum(v[2] for v in vals) / n))
    return Calibration(entries, metric=metric, source=list(source or []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m speccascade.server.calibration",
                                 description="build a serve --calibration file from sweep JSONL records")
    ap.add_argument("records", type=Path, nargs="+", help="sweep JSONL file(s) (speccascade sweep --out)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--metric", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args(argv)
    from ..eval.sweep import read_records

    records = [r | {"_source": i} for i, p in enumerate(args.records) for r in read_records(p)]
    cal = from_records(records, args.metric, args.batch_size, source=[str(p) for p in args.records])
    cal.save(args.out)
    print(f"{len(cal.entries)} entries ({cal.metric}) at temperatures {cal.temperatures()} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
