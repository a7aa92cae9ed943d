"""Train a preset's drafter and verifier, then measure them on the 1,000 test pairs.

Run from the repository root (default paths are relative to it), with the package installed:
``pip install -e ".[eval]"`` (or ``scripts/setup.sh``). For example:

    python benchmarks/train_pair.py --preset tiny --out runs/tiny --device cuda
    python benchmarks/train_pair.py --arch t5 --out runs/t5 --device cuda     # the T5 pair (preset t5)

``--roles ""`` evaluates a pair trained earlier (``OUT/drafter``, ``OUT/verifier``).
Writes ``OUT/drafter``, ``OUT/verifier`` (Hugging Face checkpoints) and ``OUT/pair.json``: the
training logs, BLEU / chrF of each model (greedy and T = 1) on the test split, and the
teacher-forced SD acceptance and top-1 agreement of the pair; flat keys ``verifier_params``,
``drafter_params``, ``{role}_test_bleu_greedy``, ``{role}_test_bleu_T1``, ``sd_acceptance_T1``.

The deep pair (a distilled 1-layer drafter for a 30-layer verifier), one command per step:

    speccascade train --preset deep --role verifier --out runs/deep/verifier --device cuda
    speccascade distill --verifier runs/deep/verifier --out runs/deep/distill.jsonl.gz \
        --device cuda --dtype bfloat16 --backend fused
    python benchmarks/train_pair.py --preset deep --roles drafter --out runs/deep \
        --drafter-train-file runs/deep/distill.jsonl.gz
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import speccascade
from speccascade.data.bible import load_split
from speccascade.errors import SpecCascadeError
from speccascade.eval.agreement import teacher_forced_agreement
from speccascade.eval.metrics import signatures
from speccascade.eval.tasks import score_pairs, translate_pairs
from speccascade.models import make_backend
from speccascade.models.loading import TOKENIZER_DIR as TOKENIZER
from speccascade.models.loading import load_causal_lm
from speccascade.train.tokenizer import encode_prompt, encode_target, load_tokenizer
from speccascade.train.trainer import ARCHS, preset_arch, resolve_preset, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=None, help="default: the architecture's (llama: tiny, t5: t5)")
    ap.add_argument("--arch", default=None, choices=list(ARCHS), help="default: the preset's (llama for tiny)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--roles", default="drafter,verifier", help="which to train ('' = evaluate trained ones)")
    ap.add_argument("--epochs", type=float, default=None, help="override the preset (smoke runs)")
    ap.add_argument("--minutes", type=float, default=None, help="training time cap per model")
    ap.add_argument("--test-pairs", type=int, default=1000)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="the tokenizer to train with (default: the shipped one); the test reads the verifier's own")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--backend", default="dynamic",
                    help="the test set's batched decode: dynamic (transformers' forward) or fused_eager (ours)")
    ap.add_argument("--drafter-train-file", type=Path, default=None,
                    help="train the drafter on these rows (e.g. `speccascade distill` output) instead of the split")
    args = ap.parse_args()
    try:
        args.preset = resolve_preset(args.preset, args.arch)
    except SpecCascadeError as e:
        ap.error(str(e))
    try:
        sigs = signatures()
    except ImportError:
        sigs = None
    record = {"preset": args.preset, "arch": preset_arch(args.preset), "torch": torch.__version__,
              "python": platform.python_version(), "speccascade": speccascade.__version__, "device": args.device,
              "metrics": sigs,
              "card": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
              "backend": args.backend, "training": {}, "test": {}}
    for role in ("drafter", "verifier"):
        if role not in args.roles.split(","):  # trained earlier (e.g. on another GPU): read its log
            record["training"][role] = json.loads((args.out / role / "training.json").read_text())
            continue
        record["training"][role] = train(args.preset, role, args.out / role, args.tokenizer or TOKENIZER,
                                         device=args.device,
                                         epochs=args.epochs, max_minutes=args.minutes, progress=False,
                                         train_file=args.drafter_train_file if role == "drafter" else None)
        print(role, {k: record["training"][role][k] for k in ("params", "steps", "train_seconds", "best")}, flush=True)
    tok = load_tokenizer(args.out / "verifier")   # saved with it (the shipped one, or e.g. a pretrained start's)
    models = {r: load_causal_lm(args.out / r, device=args.device, dtype=torch.float32, role=r)  # or an encoder-decoder
              for r in ("drafter", "verifier")}
    test = load_split("test")[: args.test_pairs]
    for role, model in models.items():
        be = model if args.backend == "dynamic" else make_backend(model, role, args.backend)   # once a role
        for temperature in (0.0, 1.0):
            t0 = time.perf_counter()
            hyps, stats = translate_pairs(be, be, tok, test, method="verifier_only", temperature=temperature,
                                          batch_size=args.batch_size)
            res = {"seconds": time.perf_counter() - t0, "tokens": stats.emitted, "hypotheses": hyps}
            try:
                res |= score_pairs(hyps, test)
            except ImportError as e:  # scored later from the hypotheses
                res["error"] = repr(e)
            record["test"][f"{role}_T{temperature:g}"] = res
            print(role, temperature, {k: res.get(k) for k in ("bleu", "chrf", "seconds")}, flush=True)
    seqs = []
    for p in test:
        src = encode_prompt(tok, p["en"])
        seqs.append((src + encode_target(tok, p["es"]), len(src)))
    record["agreement"] = teacher_forced_agreement(models["drafter"], models["verifier"], seqs)
    print(record["agreement"], flush=True)
    # the headline figures of a pair, flat
    record.update({f"{r}_params": sum(p.numel() for p in m.parameters()) for r, m in models.items()})
    for role in ("drafter", "verifier"):
        for t, name in ((0.0, "greedy"), (1.0, "T1")):
            record[f"{role}_test_bleu_{name}"] = record["test"][f"{role}_T{t:g}"].get("bleu")
    record["sd_acceptance_T1"] = record["agreement"]["sd_acceptance_T1"]
    (args.out / "pair.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
