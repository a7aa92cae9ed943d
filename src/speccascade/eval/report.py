"""Report a sweep: trade-off plots, Pareto fronts, the paper's Table 2 summaries, the latency model.

Reads records only (never models). For each (temperature, gamma, batch size) group:

* ``quality_vs_latency_*.png`` / ``quality_vs_rejection_*.png``: one curve per method (points
  sorted by the x value, each labelled with its alpha; its own colour and marker; a single-point
  method such as sd as one large marker), its Pareto front drawn bold; the verifier's and the
  drafter's quality as dotted reference lines; the number of examples in the title.
* Table 2 (arXiv 2405.19261, Section 6, Table 2): (i) the latency reduction when matching the verifier's quality:
  1 / (the smallest relative latency at which the method's Pareto front reaches the verifier's
  quality), found by linear interpolation between the two neighbouring front points that straddle
  that quality ("-" if no point reaches it); (ii) the best quality among measured points whose
  relative latency is <= 1 (no interpolation). Beside (i), where the cells carry per-example
  statistics (BLEU): (i') the same for the fastest measured point *not significantly below* the
  verifier's quality (paired bootstrap over the test examples, 95%; :func:`within_noise`).
* Several seeds (``sweep --seeds``): a grid point's cells are pooled into one for Table 2 and the
  plots (:func:`pool_seeds`: the corpus score of all the seeds' outputs, the seeds' summed latency);
  the latency model keeps each cell.
* Latency model: predicted = drafter_calls * drafter_step + verifier_calls * (verifier_block for
  speculative methods, verifier_step otherwise), with the per-call costs measured in the same
  sweep; compared with the measured wall-clock per cell (ratio and mean absolute error).
* What-if (optional, :func:`what_if`): the same model with *assumed* costs (drafter step = c
  verifier steps, a block call = b verifier steps), giving each cell a predicted relative latency
  from its own counters: the trade-off the measured acceptance behaviour would give on hardware
  with that cost ratio. Its plots and tables go to ``what_if_c{c}_b{b}/``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..errors import SpecCascadeError, SweepFileError
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


def curve_labels(records: list[dict]) -> dict[int, str]:
    """A curve per method, and per option set where one method was swept with several (e.g.
    ``seq_cascade`` raw and ``length_normalized``): ``id(record) -> label``."""
    variants = defaultdict(set)
    for r in records:
        if r.get("type") == "cell":
            variants[r["method"]].add(json.dumps(r.get("options") or {}, sort_keys=True))
    labels = {}
    for r in records:
        if r.get("type") == "cell":
            opts = r.get("options") or {}
            several = len(variants[r["method"]]) > 1
            labels[id(r)] = r["method"] + (f" [{', '.join(f'{k}={v}' for k, v in sorted(opts.items()))}]"
                                           if several and opts else "")
    return labels


def _kind(label: str) -> str | None:
    spec = METHODS.get(label.split(" [")[0])
    return spec.kind if spec is not None else None


def _identity(r: dict) -> tuple:
    """A cell's place in the grid, its seed left out."""
    return (r.get("_source"), r["method"], r.get("alpha"), r["gamma"], r["temperature"], r["batch_size"],
            json.dumps(r.get("options") or {}, sort_keys=True), (r.get("signature") or {}).get("drafter"))


def pool_seeds(records: list[dict], notes: list | None = None) -> list[dict]:
    """The cells of several seeds as one cell per grid point, so that Table 2 and the plots compare
    methods over all the samples drawn (a T = 1 cell of 500 examples is ~±1 BLEU from its law's
    mean; k seeds narrow it by ~sqrt(k)). Pooled over the seeds of the ``verifier_only`` cell of its
    file, temperature and batch size: the latency is the seeds' sum over the verifier's sum
    (``relative_latency``); a metric with per-example statistics (BLEU) is scored from each example's
    statistics summed over the seeds, which is the corpus score of every seed's output together and
    keeps the examples paired for :func:`within_noise`; any other metric is the seeds' mean. A cell
    lacking one of those seeds is left out (named in ``notes``). Records of one seed per group come
    back as they are."""
    from .metrics import SENTENCE_STATS

    cells = [r for r in records if r.get("type") == "cell"]
    base_seeds = defaultdict(set)
    for r in cells:
        if r["method"] == "verifier_only":
            base_seeds[(r.get("_source"), r["temperature"], r["batch_size"])].add(r["seed"])
    if all(len(v) <= 1 for v in base_seeds.values()):
        return records
    base = {(r.get("_source"), r["temperature"], r["batch_size"], r["seed"]): r
            for r in cells if r["method"] == "verifier_only"}
    by_point = defaultdict(dict)
    for r in cells:
        by_point[_identity(r)][r["seed"]] = r
    out = [r for r in records if r.get("type") != "cell"]
    for by_seed in by_point.values():
        first = next(iter(by_seed.values()))
        group = (first.get("_source"), first["temperature"], first["batch_size"])
        seeds = sorted(base_seeds.get(group, set()))
        if len(seeds) <= 1:
            out += list(by_seed.values())
            continue
        if set(by_seed) != set(seeds):
            if notes is not None:
                notes.append(f"{first['method']} alpha={first.get('alpha')} gamma={first['gamma']} "
                             f"T={first['temperature']:g}: seeds {sorted(by_seed)} of the baseline's {seeds}; "
                             f"left out of the pooled Table 2 and plots")
            continue
        rows = [by_seed[k] for k in seeds]
        quality, quality_stats = {}, {}
        for m in first["quality"]:
            stats = [(r.get("quality_stats") or {}).get(m) for r in rows]
            if m in SENTENCE_STATS and all(st is not None and len(st) == len(stats[0]) for st in stats):
                summed = [[sum(col) for col in zip(*rows_k)] for rows_k in zip(*stats)]
                quality_stats[m] = summed
                quality[m] = SENTENCE_STATS[m][1]([sum(col) for col in zip(*summed)])
            else:
                quality[m] = statistics.fmean(r["quality"][m] for r in rows)
        # each seed's relative latency weighted by its baseline's wall-clock: the seeds' summed latency over
        # the baseline's where the values are measured, and the same weights for a what-if's predicted ones
        weights = [base[group + (k,)]["latency_s"] for k in seeds]
        relative = sum(r["relative_latency"] * w for r, w in zip(rows, weights)) / sum(weights)
        pooled = first | {"seed": None, "seeds": seeds, "quality": quality, "quality_stats": quality_stats,
                          "latency_s": sum(r["latency_s"] for r in rows), "relative_latency": relative,
                          "rejection_rate": statistics.fmean(r.get("rejection_rate") or 0.0 for r in rows)}
        pooled.pop("stats", None)   # one seed's counters would pass for the point's: the cells keep theirs
        out.append(pooled)
    return out


def summarize(records: list[dict], metric: str) -> dict:
    """Table 2's two summaries per method, per (temperature, gamma, batch) group; several seeds pooled
    (:func:`pool_seeds`)."""
    records = pool_seeds(records)
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
        labels = curve_labels(rows)
        for r in rows:
            by_method[labels[id(r)]].append(r)
        for m, rs in by_method.items():
            front = pareto_front([(r["relative_latency"], r["quality"][metric]) for r in rs])
            lat = latency_at_quality(front, target)
            within = [r["quality"][metric] for r in rs if r["relative_latency"] <= 1.0]
            table[m] = {"speedup_at_verifier_quality": (1.0 / lat) if lat else None,
                        "best_quality_within_verifier_latency": max(within) if within else None,
                        "points": len(rs)} | within_noise(rs, ref, metric)
        out[f"T={T:g} gamma={g} batch={b}"] = {"verifier_quality": target, "metric": metric, "methods": table} | (
            {"seeds": ref["seeds"]} if ref.get("seeds") else {})
    return out


def within_noise(rows: list[dict], ref: dict, metric: str) -> dict:
    """Table 2's first summary allowing for the test set's sampling noise: 1 / the relative latency
    of the fastest measured point whose quality is *not significantly below* the verifier's, i.e.
    whose paired-bootstrap 95% interval of (its quality - the verifier's) reaches 0
    (:func:`.metrics.paired_bootstrap` over the per-example statistics the sweep stores). A lossless
    method (sd at T = 1, whose outputs follow the verifier's law exactly) lands below the
    verifier's corpus score about half the time by chance, where the strict summary then has no
    value. Empty where the cells carry no per-example statistics for ``metric``."""
    from .metrics import SENTENCE_STATS, paired_bootstrap

    base = (ref.get("quality_stats") or {}).get(metric)
    if metric not in SENTENCE_STATS or base is None:
        return {}
    best = None
    for r in sorted(rows, key=lambda r: r["relative_latency"]):
        stats = (r.get("quality_stats") or {}).get(metric)
        if stats is None or len(stats) != len(base):
            continue
        test = paired_bootstrap(metric, stats, base)
        if test["ci95"][1] >= 0:
            best = {"alpha": r.get("alpha"), "relative_latency": r["relative_latency"]} | test
            break
    return {"speedup_within_noise": 1.0 / best["relative_latency"] if best else None, "within_noise_point": best}


def _model_cost(r: dict, drafter_step: float, verifier_step: float, verifier_block: float,
                drafter_prefill: float = 0.0, verifier_prefill: float = 0.0,
                drafter_first_call: float | None = None) -> float:
    """Model calls times their costs; with pre-fill costs, one pre-fill per model per decoded
    batch that used it (``seq_cascade``: the verifier pre-fills only the deferred responses).
    ``drafter_first_call``: a feature drafter's first call of each block (a ragged feed of up to
    gamma + 1 tokens), priced apart from its one-token steps."""
    s = r["stats"]
    spec = METHODS.get(r["method"])
    speculative = spec is not None and spec.kind == "speculative"
    v_cost = verifier_block if speculative else verifier_step
    cost = s["drafter_calls"] * drafter_step + s["verifier_calls"] * v_cost
    if speculative and drafter_first_call is not None:
        cost += s.get("blocks", 0) * (drafter_first_call - drafter_step)
    if drafter_prefill or verifier_prefill:
        batches = math.ceil((r.get("signature") or {}).get("examples", 0) / max(r.get("batch_size", 1), 1))
        if r["method"] != "verifier_only":
            cost += batches * drafter_prefill
        if r["method"] == "seq_cascade":
            cost += s.get("deferred", 0) * verifier_prefill
        elif r["method"] != "drafter_only":
            cost += batches * verifier_prefill
    return cost


def what_if(records: list[dict], cost_ratio: float, block_cost: float = 1.0) -> list[dict]:
    """The cells re-timed by the latency model with assumed per-call costs, in units of one verifier
    step: a drafter step costs ``cost_ratio`` (c of Leviathan et al. 2023's speed-up model; the paper itself
    measures wall-clock time and has no cost ratio), a verifier call on a block of
    gamma + 1 tokens ``block_cost`` (about 1 where the verifier is memory-bound). Each cell's
    ``relative_latency`` becomes its predicted cost over the predicted cost of the ``verifier_only``
    cell of the same file, temperature, seed and batch size (counters are the sweep's own; only the
    costs are assumed); the measured value moves to ``measured_relative_latency``. Pre-fill and host
    work are outside the model."""
    import math

    for name, v in (("cost ratio", cost_ratio), ("block cost", block_cost)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise SpecCascadeError(f"what-if {name} must be a finite number > 0, got {v!r}")
    cells = [r for r in records if r.get("type") == "cell"]
    base = {(r.get("_source"), r["temperature"], r["seed"], r["batch_size"]):
            _model_cost(r, cost_ratio, 1.0, block_cost)
            for r in cells if r["method"] == "verifier_only"}
    out = []
    for r in cells:
        b = base.get((r.get("_source"), r["temperature"], r["seed"], r["batch_size"]))
        if not b:
            continue
        out.append(r | {"relative_latency": _model_cost(r, cost_ratio, 1.0, block_cost) / b,
                        "measured_relative_latency": r["relative_latency"]})
    return out


def latency_model(records: list[dict]) -> dict:
    """Each cell is predicted with the per-call costs measured in its own sweep file (``_source``)."""
    costs = {(r.get("_source"), r["gamma"]): r for r in records if r.get("type") == "costs"}
    rows, errors, spec_cells = [], [], {}
    for r in records:
        if r.get("type") != "cell" or r["batch_size"] != 1:
            continue
        c = costs.get((r.get("_source"), r["gamma"])) or next(
            (v for (src, _), v in costs.items() if src == r.get("_source")), None)
        if c is None:
            continue
        verifier_prefill = c.get("verifier_prefill_s", 0.0)
        if r["method"] != "verifier_only":   # a feature drafter's verifier pre-fills returning its states
            verifier_prefill = c.get("verifier_prefill_states_s", verifier_prefill)
        predicted = _model_cost(r, c["drafter_step_s"], c["verifier_step_s"], c["verifier_block_s"],
                                c.get("drafter_prefill_s", 0.0), verifier_prefill, c.get("drafter_first_call_s"))
        ratio = predicted / r["latency_s"] if r["latency_s"] > 0 else None
        rows.append({"key": r["key"], "measured_s": r["latency_s"], "predicted_s": predicted, "ratio": ratio})
        if ratio:
            errors.append(abs(ratio - 1))
        if METHODS.get(r["method"]) is not None and METHODS[r["method"]].kind == "speculative":
            spec_cells.setdefault(r.get("_source"), []).append(
                (r["stats"].get("blocks", 0), r["latency_s"] - predicted, (r.get("signature") or {}).get("examples")))
    ratios = sorted(r["ratio"] for r in rows if r["ratio"])
    return {"cells": rows, "mean_abs_relative_error": sum(errors) / len(errors) if errors else None,
            "median_abs_relative_error": statistics.median(errors) if errors else None,
            "median_ratio": statistics.median(ratios) if ratios else None,
            "unmodelled": [unmodelled_fit(cells) | {"source": src} for src, cells in spec_cells.items()
                           if len({b for b, _, _ in cells}) > 1],
            "note": "model calls x per-call costs measured in the sweep, plus one pre-fill per model per example "
                    "where the sweep measured pre-fill costs; host work between calls is not in the model. "
                    "unmodelled: per sweep file, the speculative cells' measured - predicted seconds fitted as "
                    "a + b x blocks (least squares): a per example (a cost each decode pays once, e.g. a "
                    "pre-fill the model misprices) and b per block (work between a block's calls)"}


def unmodelled_fit(cells: list[tuple[int, float, int | None]]) -> dict:
    """Least squares of the unmodelled seconds of cells  (blocks, measured - predicted, examples)
    against their block counts: a + b x blocks; returns a per example (where the cells agree on their
    example count), b per block and the residuals' standard deviation."""
    n = len(cells)
    xs, ys = [float(b) for b, _, _ in cells], [g for _, g, _ in cells]
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    const = my - slope * mx
    resid = [y - const - slope * x for x, y in zip(xs, ys)]
    examples = {e for _, _, e in cells}
    per_example = const / examples.pop() if len(examples) == 1 and None not in examples else None
    return {"cells": n, "constant_s": const, "per_example_s": per_example, "per_block_s": slope,
            "residual_sd_s": (sum(e * e for e in resid) / n) ** 0.5}


#: Marker per curve (cycled with the colours), so that curves stay apart where colours are close.
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "p", "h", "*", "d", "H", "8")


def _point_label(r: dict, with_gamma: bool) -> str | None:
    """The text beside a point: its alpha (and gamma where the curve mixes several); None if neither."""
    parts = []
    if r.get("alpha") is not None:
        a = r["alpha"]
        parts.append(f"α={a:g}" if isinstance(a, (int, float)) else f"α={a}")
    if with_gamma:
        parts.append(f"γ={r['gamma']}")
    return ", ".join(parts) or None


def _examples_note(rows: list[dict]) -> str:
    """"N examples" from the cells' signatures ("" when the records do not say)."""
    counts = sorted({r["signature"]["examples"] for r in rows
                     if isinstance(r.get("signature"), dict) and r["signature"].get("examples") is not None})
    if not counts:
        return ""
    seeds = max((len(r.get("seeds") or ()) for r in rows), default=0)
    times = f" × {seeds} seeds" if seeds > 1 else ""
    return (f"; {counts[0]} examples" if len(counts) == 1 else f"; {'/'.join(map(str, counts))} examples") + times


def plot(records: list[dict], metric: str, out_dir: Path, latency_label: str = "relative latency (÷ verifier alone)",
         rejection: bool = True) -> list[Path]:
    """One figure per (temperature, batch size) and x axis. Each method is a curve with its own colour
    and marker, every point labelled with its alpha; a method with one point (sd) is a large marker.
    The title gives the number of examples each point averages over."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = defaultdict(list)
    for r in pool_seeds(records):
        if r.get("type") == "cell":
            groups[(r["temperature"], r["batch_size"])].append(r)
    for (T, b), rows in sorted(groups.items()):
        axes = [("relative_latency", latency_label)]
        if rejection:
            axes.append(("rejection_rate", "rejection rate (rejected / examined drafts)"))
        for xname, xlabel in axes:
            fig, ax = plt.subplots(figsize=(8, 5.5))
            by_method = defaultdict(list)
            labels = curve_labels(rows)
            for r in rows:
                by_method[labels[id(r)]].append(r)
            colors = plt.get_cmap("tab20").colors
            for i, (m, rs) in enumerate(sorted(by_method.items())):
                if m in ("verifier_only", "drafter_only"):
                    continue
                rs = sorted(rs, key=lambda r: (r[xname], r["quality"][metric]))
                pts = [(r[xname], r["quality"][metric]) for r in rs]
                sequential = _kind(m) == "sequential"
                color, marker = colors[i % len(colors)], MARKERS[i % len(MARKERS)]
                label = f"{m} (sequential)" if sequential else m
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                if len(pts) == 1:   # a lone point (sd): a marker that stands out, no line
                    ax.plot(xs, ys, linestyle="none", marker=marker, ms=9, color=color, markeredgecolor="k",
                            markeredgewidth=0.7, label=label, zorder=3)
                else:
                    ax.plot(xs, ys, linestyle="--" if sequential else "-", marker=marker, ms=5, lw=0.8, alpha=0.75,
                            color=color, label=label)
                    front = pareto_front(pts) if xname == "relative_latency" else []
                    if len(front) > 1:
                        ax.plot([p[0] for p in front], [p[1] for p in front], "-", lw=2.2, color=color)
                with_gamma = not sequential and len({r["gamma"] for r in rs}) > 1
                for r, (x, y) in zip(rs, pts):
                    text = _point_label(r, with_gamma)
                    if text:
                        ax.annotate(text, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6,
                                    color=color)
            for m, style in (("verifier_only", ":"), ("drafter_only", "--")):
                ref = [r for r in rows if r["method"] == m]
                if ref:
                    ax.axhline(ref[0]["quality"][metric], ls=style, color="k", lw=1, label=f"{m} quality")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric)
            ax.set_title(f"{metric} vs {xlabel.split(' (')[0]} (T={T:g}, batch={b}{_examples_note(rows)})"
                         + ("; bold: Pareto front" if xname == "relative_latency" else ""), fontsize=10)
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
        seeds = f" (seeds {', '.join(map(str, s['seeds']))} pooled)" if s.get("seeds") else ""
        lines.append(f"### {group} — verifier {s['metric']} = {s['verifier_quality']:.2f}{seeds}\n")
        noise = any("speedup_within_noise" in row for row in s["methods"].values())
        lines.append(f"| method | speed-up at verifier quality | best {s['metric']} within verifier latency | points |"
                     + (" speed-up within noise (Δ, 95% CI) |" if noise else ""))
        lines.append("|---|---|---|---|" + ("---|" if noise else ""))
        for m, row in sorted(s["methods"].items(), key=lambda kv: -(kv[1]["speedup_at_verifier_quality"] or 0)):
            sp = f"{row['speedup_at_verifier_quality']:.2f}×" if row["speedup_at_verifier_quality"] else "–"
            bq = f"{row['best_quality_within_verifier_latency']:.2f}" \
                if row["best_quality_within_verifier_latency"] is not None else "–"
            line = f"| {m} | {sp} | {bq} | {row['points']} |"
            if noise:
                p = row.get("within_noise_point")
                line += (f" {row['speedup_within_noise']:.2f}× ({p['delta']:+.2f}, [{p['ci95'][0]:+.2f}, "
                         f"{p['ci95'][1]:+.2f}]) |" if p else " – |")
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


CELL_FIELDS = ("method", "gamma", "temperature", "seed", "batch_size", "quality", "relative_latency", "latency_s",
               "rejection_rate",
               "stats")


def load_records(paths: list[Path], notes: list | None = None) -> list[dict]:
    """The records of every file, each tagged with ``_source`` (its file's index), checked: a
    missing, empty, binary or non-record file, or a cell record without the fields a report
    needs, is a :class:`SweepFileError` naming the file (and line)."""
    from .sweep import read_records

    records = []
    for i, path in enumerate(paths):
        path = Path(path)
        if not path.exists():
            raise SweepFileError(f"sweep file {str(path)!r} does not exist")
        if path.is_file() and path.stat().st_size == 0:
            raise SweepFileError(f"sweep file {str(path)!r} is empty (did the sweep stop before its first cell?)")
        rs = read_records(path, notes=notes)
        if not rs:
            raise SweepFileError(f"sweep file {str(path)!r} holds no records")
        for n, r in enumerate(rs):
            if r["type"] == "cell":
                lacking = [k for k in CELL_FIELDS if k not in r]
                if lacking or not isinstance(r.get("quality"), dict) or not isinstance(r.get("stats"), dict):
                    raise SweepFileError(f"record {n + 1} of {str(path)!r} is a cell without "
                                         f"{', '.join(lacking) or 'a quality / stats object'}; not written by "
                                         f"`speccascade sweep`?")
        records += [r | {"_source": i} for r in rs]
    return records


def report(paths: Path | list[Path], out_dir: Path | None = None, metric: str | None = None,
           what_if_costs: tuple[float, float] | None = None) -> dict:
    """Report one sweep file, or several (e.g. one per worker, each with its own baseline and costs).
    ``what_if_costs``: (c, b) for :func:`what_if`, reported beside the measured results."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise SweepFileError("report needs at least one sweep file")
    notes: list[str] = []
    records = load_records(paths, notes)
    cells = [r for r in records if r.get("type") == "cell"]
    if not cells:
        raise SweepFileError(f"{', '.join(map(str, paths))} hold no cell records (only per-call costs): the sweep "
                             f"stopped before its first cell finished")
    from .sweep import same_model

    pairs = sorted({(r.get("signature", {}).get("drafter"), r.get("signature", {}).get("verifier")) for r in cells},
                   key=str)
    if any(not (same_model(a[0], b[0]) and same_model(a[1], b[1])) for a in pairs for b in pairs):
        raise SpecCascadeError("these records come from different model pairs, whose qualities and latencies "
                               f"cannot share one table or plot: {pairs}; report each pair's files separately")
    available = sorted(set.intersection(*(set(r["quality"]) for r in cells)))
    if metric is None:
        if not available:
            raise SweepFileError("the cells share no quality metric; report files of one task together")
        metric = next((m for m in cells[0]["quality"] if m in available), available[0])
    elif metric not in available:
        raise SpecCascadeError(f"metric {metric!r} is not in every cell's quality; choose one of "
                               f"{', '.join(available) or '(none shared)'}")
    if not any(r["method"] == "verifier_only" for r in cells):
        raise SweepFileError(f"{', '.join(map(str, paths))} hold no verifier_only cell: every relative latency and "
                             f"Table 2 compare with the verifier alone; rerun the sweep into the same file (it runs "
                             f"verifier_only first) or add the baseline's file")
    out_dir = out_dir or paths[0].parent / (paths[0].stem + "_report")
    if out_dir.exists() and not out_dir.is_dir():
        raise SweepFileError(f"--out {str(out_dir)!r} is a file; give a folder for the report")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SweepFileError(f"cannot create the report folder {str(out_dir)!r}: {e.strerror or e}") from None
    pooled = pool_seeds(records, notes)
    summary = summarize(pooled, metric)
    groups = {(r["temperature"], r["gamma"], r["batch_size"]) for r in cells}
    without = sorted(f"T={T:g} gamma={g} batch={b}" for T, g, b in groups
                     if f"T={T:g} gamma={g} batch={b}" not in summary)
    model = latency_model(records)
    plots = plot(pooled, metric, out_dir)
    (out_dir / "summary.json").write_text(json.dumps({"table2": summary, "latency_model": model}, indent=2))
    text = "".join(f"note: {n}\n" for n in notes) + format_table(summary)
    if without:
        text += (f"\nno verifier_only cell at {'; '.join(without)}: those groups have no Table 2 "
                 f"(their relative latencies are 1.0 placeholders)\n")
    err = model["mean_abs_relative_error"]
    text += (f"\nLatency model (batch 1): mean |predicted/measured - 1| = {err:.3f}, median "
             f"{model['median_abs_relative_error']:.3f}; median predicted/measured = {model['median_ratio']:.3f}\n"
             ) if err is not None else ""
    res = {"summary": summary, "latency_model": model, "plots": [str(p) for p in plots]}
    if what_if_costs is not None:
        c, b = what_if_costs
        predicted = what_if(records, c, b)
        wdir = out_dir / f"what_if_c{c:g}_b{b:g}"
        wdir.mkdir(exist_ok=True)
        res["what_if"] = {"cost_ratio": c, "block_cost": b, "summary": summarize(predicted, metric)}
        plots += plot(predicted, metric, wdir, latency_label=f"predicted relative latency (c={c:g}, block={b:g})",
                      rejection=False)
        res["plots"] = [str(p) for p in plots]
        (wdir / "summary.json").write_text(json.dumps(res["what_if"], indent=2))
        wtext = (f"## What-if: drafter step = {c:g} verifier steps, block call = {b:g} verifier steps "
                 "(predicted from each cell's counters; not measured)\n\n" + format_table(res["what_if"]["summary"]))
        (wdir / "summary.md").write_text(wtext)
        text += "\n" + wtext
    (out_dir / "summary.md").write_text(text)
    return res | {"text": text}
