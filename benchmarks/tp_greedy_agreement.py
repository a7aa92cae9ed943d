"""Greedy ``--tp 2`` against ``--tp 1`` on a trained pair (issue 17): on how many test prompts the
tokens agree, and whether each difference is a near-tie.

    torchrun --standalone --nproc-per-node 2 benchmarks/tp_greedy_agreement.py \\
        --out results/multigpu/tp_greedy_agreement.json
    # on a CPU (gloo): add --device cpu

The embedded ``tiny`` pair (a trained 8-layer verifier, 6 query and 2 KV heads: 3 + 1 a rank), in
float32, on the fused backend (compiled on a GPU, each block a CUDA graph): the verifier whole on
every rank (``--tp 1``) and split over the ranks (``--tp 2``, a Megatron shard a rank, two
all-reduces a layer) in the same SPMD program, so both see the same prompts, batches and seeds.
``verifier_only`` and ``sd`` (γ = 5) decode the first ``--prompts`` test verses greedily, in
batches of ``--batch-size``. For each row whose tokens differ,
the record names the first position that differs and the whole verifier's margin there (transformers,
float32, the prompt and the tokens both runs share before it): the gap between its two best logits.
A difference is a near-tie when that margin is below ``--tie`` (logits): the two runs' float32 sums,
ordered differently across the ranks, picked different tokens of almost equal score. The ranks must
also agree with each other (checked). Rank 0 writes the record.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch


def margin_at(model, prefix: list[int]) -> tuple[float, list[int]]:
    """The gap between ``model``'s two best next-token logits after ``prefix``, and those two tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([prefix], device=model.device)).logits[0, -1].double()
    top = torch.topk(logits, 2)
    return float(top.values[0] - top.values[1]), top.indices.tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=500, help="the first N test verses")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--tie", type=float, default=1e-3, help="a margin below this (logits) is a near-tie")
    args = ap.parse_args()

    import torch.distributed as dist

    import speccascade as sc
    from speccascade.data.bible import load_split
    from speccascade.distributed import init_tp, world
    from speccascade.eval.tasks import BibleTask
    from speccascade.models import FusedLlamaBackend
    from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm, load_tokenizer

    rank, local, size = world()
    if size != 2:
        print("run under torchrun --nproc-per-node 2 (WORLD_SIZE is not 2)", file=sys.stderr)
        return 2
    device = f"cuda:{local}" if args.device == "cuda" else "cpu"
    init_tp(args.device)
    torch.set_num_threads(1)
    d_dir, v_dir = embedded_pair_dirs("tiny")
    drafter = load_causal_lm(d_dir, device=device, dtype=torch.float32)
    verifier = load_causal_lm(v_dir, device=device, dtype=torch.float32)
    tok = load_tokenizer(TOKENIZER_DIR)
    task = BibleTask()
    pairs = load_split("test")[:args.prompts]
    prompts = [task.encode(tok, p["en"]) for p in pairs]
    eos = task.eos_token_id(tok)
    compile = args.device == "cuda"   # the GPU's fastest path: compiled steps, the block one CUDA graph
    fd = FusedLlamaBackend(drafter, "drafter", compile=compile)
    tp1 = FusedLlamaBackend(verifier, "verifier", compile=compile)
    tp2 = FusedLlamaBackend(verifier, "verifier", compile=compile, tp=2)

    record = {"benchmark": "tp_greedy_agreement", "pair": "tiny (embedded)", "dtype": "float32",
              "backend": "fused", "compiled": compile,
              "device": torch.cuda.get_device_name(local) if args.device == "cuda" else platform.processor() or "cpu",
              "ranks": size, "torch": torch.__version__,
              "speccascade": sc.__version__, "prompts": len(prompts), "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "tie_below": args.tie, "methods": {}}
    for method in ("verifier_only", "sd"):
        rows, differing = 0, []
        for k in range(0, len(prompts), args.batch_size):
            batch = prompts[k:k + args.batch_size]
            kw = dict(method=method, gamma=5, temperature=0.0, max_new_tokens=args.max_new_tokens, seed=k,
                      eos_token_id=eos)
            one, two = sc.generate(fd, tp1, batch, **kw).tokens, sc.generate(fd, tp2, batch, **kw).tokens
            ranks = [None] * size
            dist.all_gather_object(ranks, two)
            if ranks[0] != ranks[1]:
                raise SystemExit(f"the ranks decoded different tokens ({method}, batch {k}): they must agree")
            for i, (a, b) in enumerate(zip(one, two)):
                rows += 1
                if a == b:
                    continue
                pos = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                gap, best = margin_at(verifier, batch[i] + a[:pos])
                differing.append({"prompt": k + i, "position": pos, "tp1_token": a[pos] if pos < len(a) else None,
                                  "tp2_token": b[pos] if pos < len(b) else None, "margin": gap, "top2": best,
                                  "near_tie": gap < args.tie})
        record["methods"][method] = {
            "rows": rows, "identical": rows - len(differing), "fraction_identical": (rows - len(differing)) / rows,
            "differing": differing, "all_differences_near_ties": all(x["near_tie"] for x in differing)}
        if rank == 0:
            print(method, {k: v for k, v in record["methods"][method].items() if k != "differing"}, flush=True)
    if rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
