"""Would a drafter that reads the verifier's features be accepted more often? An offline experiment.

The deep pair's 1-layer drafter is accepted at ~0.57 a position greedy and ~0.60 at T = 1 (runs 4-12),
and a 4x wider MLP added ~0.01 (run 12): its single attention layer has to find, from the tokens
alone, where in the English source the translation stands. EAGLE-style drafters (Li et al., 2024)
read the verifier's last hidden state instead: at position i the drafter's input is the token x_i
*and* the verifier's feature f_{i-1} (the state from which the verifier predicted x_i), mixed by one
linear map, and it predicts x_{i+1}. This script trains two 1-layer drafters of the same shape on the
same data, steps and objective, one with the features and one without, and compares how often the
verifier would accept them, teacher-forced on held-out verses:

* both are as wide as the verifier and start as it, cut after its first layer (its embeddings, first
  layer, final norm and head: ``train --init-from``'s start); the feature drafter's map starts as the
  identity on the token's embedding and zero on the feature, so the two start equal (each feature
  vector is scaled to the embeddings' RMS first: the verifier's normed states are ~30x larger);
* the objective: cross-entropy against the verifier's greedy next token at every Spanish position
  (hard distillation; the verifier's inputs are the reference verses);
* measured on the test verses, at every Spanish position: E[sum_v min(p_v, q_v)] at T = 1 (the
  acceptance of one draft, Algorithm 2's) and the top-1 agreement (greedy acceptance).

What it does not measure: the feature drafter's acceptance at the later positions of a block, where
EAGLE feeds its own predicted features (no feature regression is trained here). The first position
of a block is where the true feature is known, so this is the case most in its favour; a block's
later positions would be lower. It is the cheap test of whether building the feature path (the
loop passing the verifier's hidden states to the drafter) is worth it.

Runs on a CPU in ~15 minutes with the shipped tiny verifier (8 x 384, 15.7M parameters):

    python benchmarks/feature_drafter.py --out results/pairs/feature_drafter_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def load(n_train: int, n_test: int, seed: int):
    from speccascade.data.bible import load_split
    from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm
    from speccascade.train.tokenizer import load_tokenizer
    from speccascade.train.trainer import encode_pairs

    tok = load_tokenizer(TOKENIZER_DIR)
    verifier = load_causal_lm(embedded_pair_dirs("tiny")[1], dtype=torch.float32).eval().requires_grad_(False)
    rng = random.Random(seed)
    train = load_split("train")
    rng.shuffle(train)
    return verifier, encode_pairs(tok, train[:n_train]), encode_pairs(tok, load_split("test")[:n_test])


def batches(data, size: int, rng: random.Random | None = None):
    """Batches of (ids [B, L], Spanish mask [B, L]: position i is scored when x_{i+1} is Spanish), as
    the trainer collates them."""
    from speccascade.train.trainer import collate

    order = list(range(len(data)))
    if rng:
        rng.shuffle(order)
    for k in range(0, len(order), size):
        inputs, targets = collate([data[j] for j in order[k:k + size]], "cpu")
        yield inputs["input_ids"], targets != -100


@torch.no_grad()
def verifier_view(verifier, ids):
    """The verifier's logits and last hidden states (after its final norm: what its head reads)."""
    out = verifier(input_ids=ids, output_hidden_states=True)
    return out.logits.float(), out.hidden_states[-1].float()


class Drafter(torch.nn.Module):
    """A 1-layer Llama cut from the verifier; ``features``: its input embedding is
    ``W [embed(x_i); f_{i-1}]`` (W starts as [I, 0]), EAGLE's mix of token and verifier feature."""

    def __init__(self, verifier, features: bool):
        super().__init__()
        from transformers import LlamaForCausalLM

        from speccascade.train.trainer import copy_first_layers

        cfg = verifier.config.__class__(**(verifier.config.to_dict() | {"num_hidden_layers": 1}))
        self.lm = LlamaForCausalLM(cfg)
        copy_first_layers(self.lm, verifier)
        H = cfg.hidden_size
        self.mix = None
        if features:   # the features (RMS ~1.7 in the tiny verifier) scaled to the embeddings' RMS (~0.06)
            self.feature_rms = float(self.lm.model.embed_tokens.weight.detach().pow(2).mean().sqrt())
            self.mix = torch.nn.Linear(2 * H, H, bias=False)
            with torch.no_grad():
                self.mix.weight.zero_()
                self.mix.weight[:, :H].copy_(torch.eye(H))

    def forward(self, ids, feats):
        emb = self.lm.model.embed_tokens(ids)
        if self.mix is not None:   # f_{i-1} beside x_i; position 0 sees no feature
            prev = F.pad(feats[:, :-1], (0, 0, 1, 0))
            prev = prev * (self.feature_rms / prev.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
            emb = self.mix(torch.cat([emb, prev], -1))
        return self.lm(inputs_embeds=emb).logits.float()


def measure(drafter, verifier, test, batch: int) -> dict:
    """:func:`speccascade.eval.agreement.teacher_forced_agreement` of the drafter, fed the verifier's
    features of each batch: acceptance E[sum min(p, q)] at T = 1 and top-1 agreement."""
    from speccascade.eval.agreement import teacher_forced_agreement

    def reading(input_ids, attention_mask=None):   # right padding: the real positions are unaffected
        return SimpleNamespace(logits=drafter(input_ids, verifier_view(verifier, input_ids)[1]))

    drafter.eval()
    r = teacher_forced_agreement(reading, verifier, test, batch_size=batch, device=torch.device("cpu"))
    drafter.train()
    return {"acceptance_T1": r["sd_acceptance_T1"], "top1_agreement": r["top1_agreement"], "positions": r["positions"]}


def verifier_batches(verifier, data, batch: int, seed: int) -> list:
    """The training batches with the verifier's view of each, computed once for both drafters:
    (ids, scored, the verifier's greedy next token, its features)."""
    out = []
    for ids, scored in batches(data, batch, random.Random(seed)):
        logits, feats = verifier_view(verifier, ids)
        out.append((ids, scored, logits.argmax(-1), feats))
    return out


def train(drafter, cached: list, epochs: float, lr: float, seed: int) -> dict:
    opt = torch.optim.AdamW(drafter.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    steps = int(epochs * len(cached))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    t, losses, order = time.time(), [], []
    for _ in range(steps):
        if not order:   # an epoch: every batch once, in a new order
            order = rng.sample(range(len(cached)), len(cached))
        ids, scored, targets, feats = cached[order.pop()]
        loss = F.cross_entropy(drafter(ids, feats)[scored], targets[scored])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return {"steps": steps, "seconds": time.time() - t, "loss_mean_last_20": sum(losses[-20:]) / min(20, len(losses))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-pairs", type=int, default=3000)
    ap.add_argument("--test-pairs", type=int, default=300)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (this measures acceptance, not speed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    verifier, data, test = load(args.train_pairs, args.test_pairs, args.seed)
    record = {"benchmark": "feature_drafter", "torch": torch.__version__, "device": "cpu",
              "cpu": platform.processor() or platform.machine(), "args": vars(args),
              "verifier": "the shipped tiny verifier (8 layers x 384, 15.7M)", "train_sequences": len(data),
              "test_sequences": len(test), "results": {}}
    t = time.time()
    cached = verifier_batches(verifier, data, args.batch_size, args.seed)
    record["verifier_pass_seconds"] = time.time() - t
    for name, features in (("tokens_only", False), ("with_verifier_features", True)):
        torch.manual_seed(args.seed)
        drafter = Drafter(verifier, features)
        start = measure(drafter, verifier, test, args.batch_size)
        fit = train(drafter, cached, args.epochs, args.lr, args.seed)
        record["results"][name] = {"parameters": sum(p.numel() for p in drafter.parameters()), "at_start": start,
                                   "training": fit, "trained": measure(drafter, verifier, test, args.batch_size)}
        print(name, json.dumps(record["results"][name]), flush=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    a, b = (record["results"][k]["trained"] for k in ("tokens_only", "with_verifier_features"))
    record["summary"] = {"acceptance_T1": [a["acceptance_T1"], b["acceptance_T1"]],
                         "top1_agreement": [a["top1_agreement"], b["top1_agreement"]],
                         "order": ["tokens_only", "with_verifier_features"]}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record["summary"]))


if __name__ == "__main__":
    main()
