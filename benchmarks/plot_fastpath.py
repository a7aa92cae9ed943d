"""Plot a fast-path record (benchmarks/fastpath.py): tokens/s of each method, tiny and deep pairs.

Run from the repository root, with the package installed with its plotting extra
(``pip install -e ".[eval]"``, or ``scripts/setup.sh``):

    python benchmarks/plot_fastpath.py results/gpu/fastpath_H200.json results/gpu/fastpath_H200.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(record: str, out: str) -> None:
    r = json.load(open(record))
    pairs = [("tiny", "shipped tiny pair (0.55M / 15.7M)"),
             ("deep", "deep shape (1-layer 32M / 30-layer 135M, synthetic)")]
    methods = ["verifier_only", "sd", "token_v3", "diff", "drafter_only"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, title) in zip(axes, pairs):
        for i, T in enumerate(("T=0", "T=1")):
            row = r.get(key, {}).get(T, {})
            names = [m for m in methods if isinstance(row.get(m), dict) and "tokens_per_s" in row[m]]
            xs = [methods.index(m) + (i - 0.5) * 0.38 for m in names]
            ys = [row[m]["tokens_per_s"] for m in names]
            bars = ax.bar(xs, ys, width=0.36, label=T.replace("=", " = "))
            for b, y in zip(bars, ys):
                ax.text(b.get_x() + b.get_width() / 2, y, f"{y:,.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(methods)), methods, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("tokens / s (batch 1)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{r['card']}, bf16, fused backend, whole block captured as one CUDA graph "
                 f"({r['args']['prompts']} prompts, up to {r['args']['max_new']} tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
