"""Report a sweep: trade-off plots, Pareto fronts, the paper's Table 2 summaries, the latency model.

Reads records only (never models). For each (temperature, gamma, batch size) group:

* ``quality_vs_latency_*.png`` / ``quality_vs_rejection_*.png``: one curve per method (points
  sorted by the x value), its Pareto front drawn bold; the verifier's and the drafter's quality as
  dotted reference lines.
* Table 2 (PAPER.md 6.5): (i) the latency reduction when matching the verifier's quality:
  1 / (the smallest relative latency at which the method's Pareto front reaches the verifier's
  quality), found by linear interpolation between the two neighbouring front points that straddle
  that quality ("-" if no point reaches it); (ii) the best quality among measured points whose
  relative latency is <= 1 (no interpolation).
* Latency model: predicted = drafter_calls * drafter_step + verifier_calls * (verifier_block for
  speculative methods, verifier_step otherwise), with the per-call costs measured in the same
  sweep; compared with the measured wall-clock per cell (ratio and mean absolute error).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..registry import METHODS


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (latency, quality) not dominated by a faster-and-at-least-as-good point, by latency."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def latency_at_quality(front: list[tuple[float, float]], target: float) -> float | None:
    """The smallest latency at which the front reaches ``target`` quality (linear interpolation)."""
    prev = None
    for x, y in front:
        if y >= target:
            if prev is None or prev[1] >= target:
                return x
            (x0, y0) = prev
            return x0 + (target - y0) * (x - x0) / (y - y0)
        prev = (x, y)
    return None


def summarize(records: list[dict], metric: str) -> dict:
    """Table 2's two summaries per method, per (temperature, gamma, batch) group."""
    groups = defaultdict(list)
    for r in records:
        if r.get("type") == "cell":
            groups[(r["temperature"], r["gamma"], r["batch_size"])].append(r)
    # sequential methods have no gamma: let them join every gamma's group at their temperature
    out = {}
    gammas = sorted({k[1] for k in groups})
    for (T, g, b), rows in sorted(groups.items()):
        rows = list(rows)
        for other_g in gammas:
            if other_g != g:
                rows += [r for r in groups.get((T, other_g, b), []) if METHODS.get(r["method"]) is not None
                         and METHODS[r["method"]].kind == "sequential" and r not in rows]
        ref = next((r for r in rows if r["method"] == "verifier_only"), None)
        if ref is None:
            continue
        target = ref["quality"][metric]
        table = {}
        by_method = defaultdict(list)
        for r in rows:
            by_method[r["method"]].append(r)
        for m, rs in by_method.items():
            front = pareto_front([(r["relative_latency"], r["quality"][metric]) for r in rs])
            lat = latency_at_quality(front, target)
            within = [r["quality"][metric] for r in rs if r["relative_latency"] <= 1.0]
            table[m] = {"speedup_at_verifier_quality": (1.0 / lat) if lat else None,
                        "best_quality_within_verifier_latency": max(within) if within else None,
                        "points": len(rs)}
        out[f"T={T:g} gamma={g} batch={b}"] = {"verifier_quality": target, "metric": metric, "methods": table}
    return out


def latency_model(records: list[dict]) -> dict:
    """Each cell is predicted with the per-call costs measured in its own sweep file (``_source``)."""
    costs = {(r.get("_source"), r["gamma"]): r for r in records if r.get("type") == "costs"}
    rows, errors = [], []
    for r in records:
        if r.get("type") != "cell" or r["batch_size"] != 1:
            continue
        c = costs.get((r.get("_source"), r["gamma"])) or next(
            (v for (src, _), v in costs.items() if src == r.get("_source")), None)
        if c is None:
            continue
        s = r["stats"]
        spec = METHODS.get(r["method"])
        v_cost = c["verifier_block_s"] if spec is not None and spec.kind == "speculative" else c["verifier_step_s"]
        predicted = s["drafter_calls"] * c["drafter_step_s"] + s["verifier_calls"] * v_cost
        ratio = predicted / r["latency_s"] if r["latency_s"] > 0 else None
        rows.append({"key": r["key"], "measured_s": r["latency_s"], "predicted_s": predicted, "ratio": ratio})
        if ratio:
            errors.append(abs(ratio - 1))
    return {"cells": rows, "mean_abs_relative_error": sum(errors) / len(errors) if errors else None,
            "note": "prefill passes and host overhead are not in the model; per-call costs measured in the sweep"}


def plot(records: list[dict], metric: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = defaultdict(list)
    for r in records:
        if r.get("type") == "cell":
            groups[(r["temperature"], r["batch_size"])].append(r)
    for (T, b), rows in sorted(groups.items()):
        for xname, xlabel in (("relative_latency", "relative latency (÷ verifier alone)"),
                              ("rejection_rate", "rejection rate (rejected / examined drafts)")):
            fig, ax = plt.subplots(figsize=(8, 5.5))
            by_method = defaultdict(list)
            for r in rows:
                by_method[r["method"]].append(r)
            colors = plt.get_cmap("tab20").colors
            for i, (m, rs) in enumerate(sorted(by_method.items())):
                if m in ("verifier_only", "drafter_only"):
                    continue
                pts = sorted((r[xname], r["quality"][metric]) for r in rs)
                sequential = METHODS.get(m) is not None and METHODS[m].kind == "sequential"
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--" if sequential else "o-", ms=3.5,
                                lw=0.8, alpha=0.6, color=colors[i % len(colors)],
                                label=f"{m} (sequential)" if sequential else m)
                front = pareto_front(pts) if xname == "relative_latency" else []
                if front:
                    ax.plot([p[0] for p in front], [p[1] for p in front], "-", lw=2.2, color=line.get_color())
            for m, style in (("verifier_only", ":"), ("drafter_only", "--")):
                ref = [r for r in rows if r["method"] == m]
                if ref:
                    ax.axhline(ref[0]["quality"][metric], ls=style, color="k", lw=1, label=f"{m} quality")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric)
            ax.set_title(f"{metric} vs {xname.replace('_', ' ')} (T={T:g}, batch={b})"
                         + ("; bold: Pareto front" if xname == "relative_latency" else ""))
            ax.legend(fontsize=7, ncol=2)
            ax.grid(alpha=0.3)
            path = out_dir / f"quality_vs_{xname}_T{T:g}_b{b}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def format_table(summary: dict) -> str:
    lines = []
    for group, s in summary.items():
        lines.append(f"### {group} — verifier {s['metric']} = {s['verifier_quality']:.2f}\n")
        lines.append(f"| method | speed-up at verifier quality | best {s['metric']} within verifier latency | points |")
        lines.append("|---|---|---|---|")
        for m, row in sorted(s["methods"].items(), key=lambda kv: -(kv[1]["speedup_at_verifier_quality"] or 0)):
            sp = f"{row['speedup_at_verifier_quality']:.2f}×" if row["speedup_at_verifier_quality"] else "–"
            bq = f"{row['best_quality_within_verifier_latency']:.2f}" \
                if row["best_quality_within_verifier_latency"] is not None else "–"
            lines.append(f"| {m} | {sp} | {bq} | {row['points']} |")
        lines.append("")
    return "\n".join(lines)


def report(paths: Path | list[Path], out_dir: Path | None = None, metric: str | None = None) -> dict:
    """Report one sweep file, or several (e.g. one per worker, each with its own baseline and costs)."""
    from .sweep import read_records

    paths = [paths] if isinstance(paths, Path) else list(paths)
    records = [r | {"_source": i} for i, path in enumerate(paths) for r in read_records(path)]
    cells = [r for r in records if r.get("type") == "cell"]
    if not cells:
        raise ValueError(f"{', '.join(map(str, paths))} hold no sweep records")
    pairs = sorted({(r.get("signature", {}).get("drafter"), r.get("signature", {}).get("verifier")) for r in cells},
                   key=str)
    if len(pairs) > 1:
        raise ValueError("these records come from different model pairs, whose qualities and latencies "
                         f"cannot share one table or plot: {pairs}; report each pair's files separately")
    metric = metric or next(iter(cells[0]["quality"]))
    out_dir = out_dir or paths[0].parent / (paths[0].stem + "_report")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, metric)
    model = latency_model(records)
    plots = plot(records, metric, out_dir)
    (out_dir / "summary.json").write_text(json.dumps({"table2": summary, "latency_model": model}, indent=2))
    text = format_table(summary)
    err = model["mean_abs_relative_error"]
    text += f"\nLatency model (batch 1): mean |predicted/measured - 1| = {err:.3f}\n" if err is not None else ""
    (out_dir / "summary.md").write_text(text)
    return {"summary": summary, "latency_model": model, "plots": [str(p) for p in plots], "text": text}
