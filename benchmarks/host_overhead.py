"""Host work per block of the speculative loop, with models so small that it dominates (issue 5's
"time outside the model forwards").

On a GPU every eager tensor op outside the captured model calls is one kernel launch from Python,
so the count of such ops per block is the engine's host overhead in units that carry over from
this CPU to a GPU; the CPU time per block is measured too (one pinned torch thread, medians).
Counts come from a ``TorchDispatchMode`` that counts every aten op dispatched outside the backends'
step functions (the model call and its cache bookkeeping, one CUDA-graph replay on the fast path);
view ops (no kernel on a GPU) are counted apart.

Run from the repository root (default paths are relative to it), with the package installed:
``pip install -e .`` (or ``scripts/setup.sh``). For example:

    python benchmarks/host_overhead.py --out results/host_overhead.json
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import speccascade as sc
from speccascade.models import StaticHFBackend

VIEWS = {"aten.unsqueeze.default", "aten.slice.Tensor", "aten.select.int", "aten.alias.default",
         "aten.squeeze.dim", "aten.view.default", "aten.expand.default", "aten.t.default",
         "aten.transpose.int", "aten.permute.default", "aten.detach.default", "aten.unbind.int"}


class OutsideSteps(TorchDispatchMode):
    """Counts aten ops dispatched while ``paused`` is False."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def tiny_llama(layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def measure(method: str, alpha, gamma: int, new_tokens: int, repeats: int) -> dict:
    d = StaticHFBackend(tiny_llama(1, 0), "drafter", max_cache_len=512)
    v = StaticHFBackend(tiny_llama(1, 1), "verifier", max_cache_len=512)
    kw = dict(method=method, alpha=alpha, gamma=gamma, temperature=1.0, max_new_tokens=new_tokens, seed=0,
              eos_token_id=None)
    prompt = [[1, 2, 3, 4]]
    sc.generate(d, v, prompt, **kw)  # warm-up
    counter = OutsideSteps()
    for be in (d, v):
        def step(tokens, valid, _orig=be._step):
            counter.paused = True
            try:
                return _orig(tokens, valid)
            finally:
                counter.paused = False
        be._step_fn = step
    with counter:
        out = sc.generate(d, v, prompt, **kw)
    units = out.stats.blocks or out.stats.verifier_calls
    views = sum(n for op, n in counter.ops.items() if op in VIEWS)
    total = sum(counter.ops.values())
    # time per unit (block, or step of a sequential method), the step functions back in place
    d._step_fn, v._step_fn = d._step, v._step
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        o = sc.generate(d, v, prompt, **kw)
        times.append((time.perf_counter() - t) / (o.stats.blocks or o.stats.verifier_calls))
    return {"units": "blocks" if out.stats.blocks else "steps", "per_unit": units,
            "ops_outside_steps_per_unit": (total - views) / units, "view_ops_per_unit": views / units,
            "cpu_seconds_per_unit_median": statistics.median(times),
            "top_ops": counter.ops.most_common(12)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--new-tokens", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import subprocess

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    rec = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": 1,
           "git_head": rev, "speccascade": sc.__version__, "methods": {}}
    for method, alpha in (("verifier_only", None), ("sd", None), ("token_v3", 0.5), ("diff", 0.2)):
        rec["methods"][method] = r = measure(method, alpha, 5, args.new_tokens, args.repeats)
        print(method, {k: v for k, v in r.items() if k != "top_ops"}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
