"""Does starting a 1-layer drafter from its verifier's embeddings and first layer (``train
--init-from``) raise its agreement with the verifier, against a random start, for the same
distillation steps?

Both drafters train on the same rows (the verifier's greedy translations of the first
``--train-sources`` training sources, `speccascade distill`) with the verifier as teacher, the
same recipe (``--preset``'s drafter, as wide as the verifier), seed and step count; then each is
measured teacher-forced on the verifier's greedy translations of ``--eval-sources`` validation
sources: top-1 agreement and SD acceptance E[sum min(p, q)] at T = 1. Run from the repository root:

    python benchmarks/drafter_init.py --verifier DIR --out runs/drafter_init --record F.json

The drafter has one layer of the verifier's width (heads, intermediate size) and otherwise
``--preset``'s drafter recipe (learning rate, distillation weight, ...). By default the verifier is
the shipped tiny pair's (8 x 384), small enough for a CPU (pinned to one thread there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

import speccascade
from speccascade.data.bible import load_split
from speccascade.eval.agreement import teacher_forced_agreement
from speccascade.eval.tasks import translate_pairs
from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm
from speccascade.train.distill import distill
from speccascade.train.tokenizer import encode_prompt, encode_target, load_tokenizer
from speccascade.train.trainer import PRESETS, Shape, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--verifier", type=Path, default=None, help="default: the shipped tiny verifier")
    ap.add_argument("--preset", default="deep", help="whose drafter recipe (its shape: 1 layer of the verifier's)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--record", type=Path, default=None)
    ap.add_argument("--train-sources", type=int, default=3000)
    ap.add_argument("--eval-sources", type=int, default=200)
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    v_dir = args.verifier or embedded_pair_dirs("tiny")[1]
    tok = load_tokenizer(TOKENIZER_DIR)
    verifier = load_causal_lm(v_dir, device=args.device, dtype=torch.float32).eval()
    c = verifier.config
    shape = Shape(c.hidden_size, 1, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size)
    PRESETS["drafter_init"] = {"drafter": dataclasses.replace(PRESETS[args.preset]["drafter"], shape=shape)}
    rows = args.out / "distill.jsonl.gz"
    start = time.perf_counter()
    if not rows.exists():
        distill(verifier, tok, rows, temperatures=(0.0,), limit=args.train_sources, batch_size=128)
    distill_s = time.perf_counter() - start

    # the verifier's own greedy translations of held-out sources: what the drafter should predict
    pairs = load_split("validation")[:args.eval_sources]
    hyps, _ = translate_pairs(verifier, verifier, tok, pairs, method="verifier_only", temperature=0.0,
                              batch_size=100, max_new_tokens=200)
    seqs = []
    for p, h in zip(pairs, hyps):
        src = encode_prompt(tok, p["en"])
        seqs.append((src + encode_target(tok, h), len(src)))

    record = {"verifier": str(v_dir), "recipe_of": args.preset, "drafter_shape": dataclasses.asdict(shape),
              "train_sources": args.train_sources,
              "eval_sources": args.eval_sources, "epochs": args.epochs, "device": args.device,
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "speccascade": speccascade.__version__, "distill_seconds": distill_s,
              "runs": {}}
    for name, init in (("random_start", None), ("init_from_verifier", v_dir)):
        log = train("drafter_init", "drafter", args.out / name, TOKENIZER_DIR, device=args.device, epochs=args.epochs,
                    max_minutes=600, progress=False, bleu_pairs=0, train_file=rows, teacher=v_dir, init_from=init,
                    validation_pairs=200)
        drafter = load_causal_lm(args.out / name, device=args.device, dtype=torch.float32).eval()
        agree = teacher_forced_agreement(drafter, verifier, seqs)
        record["runs"][name] = {"steps": log["steps"], "train_seconds": log["train_seconds"],
                                "best_val_loss": log["best"]["val_loss"], **agree}
        print(name, json.dumps(record["runs"][name]))
    r = record["runs"]
    record["top1_gain"] = r["init_from_verifier"]["top1_agreement"] - r["random_start"]["top1_agreement"]
    record["acceptance_gain"] = r["init_from_verifier"]["sd_acceptance_T1"] - r["random_start"]["sd_acceptance_T1"]
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("top1_gain", "acceptance_gain")}))


if __name__ == "__main__":
    main()
