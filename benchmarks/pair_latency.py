"""Per-token decode latency of a drafter/verifier pair on one CPU thread, and sd's acceptance.

Run from the repository root (default paths are relative to it), with the package installed:
``pip install -e ".[eval]"`` (or ``scripts/setup.sh``). For example:

    python benchmarks/pair_latency.py --pair tiny --record results/pairs/tiny_cpu.json

Latency: the median over ``--repeats`` runs of the median time of one cached single-token decode
step (the backend's extend + commit) after a 40-token context, warm-up excluded. Acceptance: ``sd``
at T = 1 and gamma = 5 on the first ``--pairs`` test prompts (batch 1 each), with the measured
tokens/s of ``verifier_only``, ``sd`` and ``token_v3`` in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

import speccascade as sc
from speccascade.data.bible import load_split
from speccascade.data.prompt import EOS, encode_prompt
from speccascade.eval.tasks import translate_pairs
from speccascade.models import HFBackend, make_backend
from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm, load_tokenizer
from speccascade.models.timing import call_seconds


def step_ms(model, ctx: list[int], n: int = 30) -> float:
    """One token's step after ``ctx`` (an encoder-decoder: one decoder token with ``ctx`` as its
    encoder input), in ms."""
    return 1000 * call_seconds(make_backend(model, "m"), ctx, 1, n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", default="tiny")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--record", type=Path, required=True)
    ap.add_argument("--preset-shapes", default=None,
                    help="time randomly initialised models of a training preset's shapes (latency only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.preset_shapes:
        from speccascade.train.trainer import PRESETS, build_model

        lat = {}
        for role, recipe in PRESETS[args.preset_shapes].items():
            model = build_model(recipe.shape, 8000).eval()  # a Llama or a T5 (preset t5)
            runs = [step_ms(model, list(range(4, 44))) for _ in range(args.repeats)]
            lat[role] = {"median_ms": statistics.median(runs), "runs_ms": runs,
                         "params": sum(p.numel() for p in model.parameters())}
        lat["cost_ratio_verifier_over_drafter"] = lat["verifier"]["median_ms"] / lat["drafter"]["median_ms"]
        rec = {"preset_shapes": args.preset_shapes, "weights": "random (latency does not depend on them)",
               "cpu": platform.processor() or platform.machine(), "threads": 1, "torch": torch.__version__,
               "latency": lat}
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(rec, indent=2))
        print(json.dumps(rec, indent=2))
        return
    d_dir, v_dir = embedded_pair_dirs(args.pair)
    drafter, verifier, tok = load_causal_lm(d_dir), load_causal_lm(v_dir), load_tokenizer(TOKENIZER_DIR)
    test = load_split("test")
    ctx = encode_prompt(tok, test[0]["en"])[:40]
    lat = {}
    for name, model in (("drafter", drafter), ("verifier", verifier)):
        runs = [step_ms(model, ctx) for _ in range(args.repeats)]
        lat[name] = {"median_ms": statistics.median(runs), "runs_ms": runs,
                     "params": sum(p.numel() for p in model.parameters())}
    lat["cost_ratio_verifier_over_drafter"] = lat["verifier"]["median_ms"] / lat["drafter"]["median_ms"]
    gen = {}
    for method, alpha in (("verifier_only", None), ("sd", None), ("token_v3", 0.5)):
        _, total = translate_pairs(drafter, verifier, tok, test[: args.pairs], method=method, alpha=alpha, gamma=5,
                                   temperature=1.0, batch_size=1, max_new_tokens=200, seed=0)  # prompt i: seed i
        gen[method] = {"tokens_per_second": total.emitted / total.wall_time_s, "acceptance_rate": total.acceptance_rate,
                       "tokens_per_verifier_call": total.tokens_per_verifier_call, "emitted": total.emitted,
                       "wall_time_s": total.wall_time_s}
    from speccascade.models.timing import TimedBackend, outside_share

    for m, alpha in (("sd", None), ("token_v3", 0.5)):
        shares = []
        for i, p in enumerate(test[: min(args.pairs, 10)]):
            bd, bv = TimedBackend(HFBackend(drafter, "drafter")), TimedBackend(HFBackend(verifier, "verifier"))
            out = sc.generate(bd, bv, [encode_prompt(tok, p["en"])], method=m, alpha=alpha, gamma=5, temperature=1.0,
                              max_new_tokens=200, eos_token_id=EOS, seed=i)
            shares.append(outside_share(out.stats.wall_time_s, bd, bv))
        gen[m]["share_outside_model_forwards_median"] = statistics.median(shares)
    for m in ("sd", "token_v3"):
        gen[m]["speedup_vs_verifier_only"] = gen[m]["tokens_per_second"] / gen["verifier_only"]["tokens_per_second"]
    rec = {"pair": args.pair, "cpu": platform.processor() or platform.machine(), "threads": 1,
           "torch": torch.__version__, "speccascade": sc.__version__, "latency": lat,
           "generate_T1_gamma5_batch1": gen, "test_pairs": args.pairs}
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(rec, indent=2))
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
