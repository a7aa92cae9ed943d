"""Would a drafter that reads the verifier's features be accepted more often? An offline experiment.

The deep pair's 1-layer drafter is accepted at ~0.57 a position greedy and ~0.60 at T = 1 (runs 4-12),
and a 4x wider MLP added ~0.01 (run 12): its single attention layer has to find, from the tokens
alone, where in the English source the translation stands. EAGLE-style drafters (Li et al., 2024)
read the verifier's last hidden state instead: at position i the drafter's input is the token x_i
*and* the verifier's feature f_{i-1} (the state from which the verifier predicted x_i), mixed by one
linear map, and it predicts x_{i+1}. This script trains 1-layer drafters of the same shape on the
same data, steps and objective, with and without the features, and compares how often the verifier
would accept them on held-out verses:

* every drafter is as wide as the verifier and starts as it, cut after its first layer (its
  embeddings, first layer, final norm and head: ``train --init-from``'s start); a feature drafter's
  map starts as the identity on the token's embedding and zero on the feature, so all start equal
  (each feature vector is scaled to the embeddings' RMS first: the verifier's normed states are
  ~30x larger);
* the variants: ``tokens_only``; ``with_verifier_features`` (trained on the verifier's true
  features); ``features_and_regression`` (also trained to predict the verifier's feature at its own
  position, EAGLE's regression: its last hidden state, what its head reads, against f_i, as a
  relative squared error added to the token loss), so that a block's later drafts, which read the
  drafter's own state in place of the feature the verifier has not computed yet, read a better one;
* the objective: cross-entropy against the verifier's greedy next token (``--objective hard``) or
  KL(verifier || drafter) at T = 1 (``kl``), at every Spanish position of the reference verses (or of
  ``--train-file``'s rows, e.g. the verifier's own translations from ``speccascade distill``);
* teacher-forced on the test verses, at every Spanish position: E[sum_v min(p_v, q_v)] at T = 1 (the
  acceptance of one draft, Algorithm 2's) and the top-1 agreement; these read the true feature
  everywhere, which only a block's first draft has;
* a whole block at T = 0 (``--gamma``): along the verifier's own greedy translation of each test
  verse, from every position, the drafter drafts gamma tokens greedily; the first reads the
  verifier's true feature, each later one the drafter's own last hidden state at the position
  before (the drafter's cache before the block holds true-feature states: the accepted tokens are
  re-fed with the verifier's features, as EAGLE does). A draft counts while every draft so far
  equals the verifier's token. Reported: the mean accepted drafts a block (over every start) and
  the per-position rate a that gives the same mean as i.i.d. acceptance (sum_{k=1..gamma} a^k),
  the figure the latency model and ``analysis.json``'s ``acceptance_needed`` use.

``--reference-drafter DIR`` also measures a trained drafter (e.g. the deep pair's, or a feature drafter
from ``speccascade train --features``) the same way; with ``--variants ""`` it is the only one measured.

Runs on a CPU in ~25 minutes with the shipped tiny verifier (8 x 384, 15.7M parameters):

    python benchmarks/feature_drafter.py --out results/pairs/feature_drafter_cpu.json

and in ~2 minutes on one GPU with the deep pair's verifier (benchmarks/gpu_deep_pair_run.sh,
``FEATURES=1``):

    python benchmarks/feature_drafter.py --verifier runs/deep/verifier --reference-drafter runs/deep/drafter \
        --device cuda --train-pairs 30000 --test-pairs 500 --epochs 3 --batch-size 64 --objective kl \
        --out runs/deep/feature_drafter.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from types import SimpleNamespace

import torch

VARIANTS = ("tokens_only", "with_verifier_features", "features_and_regression")


def load(n_train: int, n_test: int, seed: int, verifier_dir: str | None = None, device: str = "cpu",
         train_file: str | None = None):
    """The verifier (``verifier_dir``, else the shipped tiny one) on ``device``, ``n_train`` shuffled
    training pairs (of the training split, or of ``train_file``: e.g. the verifier's own translations,
    ``speccascade distill``) and the first ``n_test`` test pairs, encoded as (ids, first Spanish index)."""
    from speccascade.data.bible import load_split
    from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm
    from speccascade.train.distill import read_pairs
    from speccascade.train.tokenizer import load_tokenizer
    from speccascade.train.trainer import encode_pairs

    path = verifier_dir or embedded_pair_dirs("tiny")[1]
    tok = load_tokenizer(path if verifier_dir else TOKENIZER_DIR)   # the verifier's own, saved with it
    verifier = load_causal_lm(path, dtype=torch.float32).to(device).eval().requires_grad_(False)
    rng = random.Random(seed)
    train = read_pairs(train_file) if train_file else load_split("train")
    rng.shuffle(train)
    return verifier, encode_pairs(tok, train[:n_train]), encode_pairs(tok, load_split("test")[:n_test])


def batches(data, size: int, rng: random.Random | None = None, device="cpu"):
    """Batches of (ids [B, L], Spanish mask [B, L]: position i is scored when x_{i+1} is Spanish), as
    the trainer collates them."""
    from speccascade.train.trainer import collate

    order = list(range(len(data)))
    if rng:
        rng.shuffle(order)
    for k in range(0, len(order), size):
        inputs, targets = collate([data[j] for j in order[k:k + size]], device)
        yield inputs["input_ids"], targets != -100


@torch.no_grad()
def verifier_view(verifier, ids):
    """The verifier's logits and last hidden states (after its final norm: what its head reads)."""
    feats = verifier.model(input_ids=ids).last_hidden_state.float()
    return verifier.lm_head(feats).float(), feats


class Drafter(torch.nn.Module):
    """A 1-layer Llama cut from the verifier; ``features``: a
    :class:`speccascade.models.LlamaFeatureDrafter` made from it, whose input embedding is
    ``W [embed(x_i); f_{i-1}]`` (W starts as [I, 0]), EAGLE's mix of token and verifier feature."""

    def __init__(self, verifier, features: bool, lm=None):
        """``lm``: a trained causal LM (a drafter, or the verifier itself), measured as it is."""
        super().__init__()
        from transformers import LlamaForCausalLM

        from speccascade.models import LlamaFeatureDrafter
        from speccascade.train.trainer import copy_first_layers

        if lm is None:
            cfg = verifier.config.__class__(**(verifier.config.to_dict() | {"num_hidden_layers": 1}))
            lm = LlamaForCausalLM(cfg).to(next(verifier.parameters()).device)
            copy_first_layers(lm, verifier)
            if features:
                lm = LlamaFeatureDrafter.from_drafter(lm)
        self.lm = lm
        self.features = isinstance(lm, LlamaFeatureDrafter)

    def embed(self, ids, prev):
        """The input at each position: the token's embedding, mixed with ``prev``, the feature of the
        position before (``prev[:, i] = f_{i-1}``), for a feature drafter."""
        return self.lm.feature_embeddings(ids, prev) if self.features else self.lm.model.embed_tokens(ids)

    def hidden(self, ids, feats, **kw):
        """The drafter's last hidden state (after its final norm) at every position, fed the verifier's
        features ``feats`` (position 0 sees none), and the model output (its cache with ``use_cache``)."""
        from speccascade.train.trainer import previous_features

        out = self.lm.model(inputs_embeds=self.embed(ids, previous_features(feats)), **kw)
        return out.last_hidden_state, out

    def forward(self, ids, feats):
        return self.lm.lm_head(self.hidden(ids, feats)[0]).float()


def measure(drafter, verifier, test, batch: int) -> dict:
    """:func:`speccascade.eval.agreement.teacher_forced_agreement` of the drafter, fed the verifier's
    features of each batch: acceptance E[sum min(p, q)] at T = 1 and top-1 agreement."""
    from speccascade.eval.agreement import teacher_forced_agreement

    def reading(input_ids, attention_mask=None):   # right padding: the real positions are unaffected
        return SimpleNamespace(logits=drafter(input_ids, verifier_view(verifier, input_ids)[1]))

    drafter.eval()
    device = next(verifier.parameters()).device
    r = teacher_forced_agreement(reading, verifier, test, batch_size=batch, device=device)
    drafter.train()
    return {"acceptance_T1": r["sd_acceptance_T1"], "top1_agreement": r["top1_agreement"], "positions": r["positions"]}


@torch.no_grad()
def greedy_sequences(verifier, test, batch: int) -> list[tuple[list[int], int]]:
    """Each test verse's prompt followed by the verifier's own greedy translation (EOS kept), with
    the index of its first new token: the sequences a T = 0 decode accepts drafts along."""
    from speccascade.api import generate

    out = []
    longest = max(len(seq) - start for seq, start in test) + 16
    for k in range(0, len(test), batch):
        prompts = [seq[:start] for seq, start in test[k:k + batch]]
        gen = generate(verifier, verifier, prompts, method="verifier_only", temperature=0.0, max_new_tokens=longest)
        out += [(p + t, len(p)) for p, t in zip(prompts, gen.tokens)]
    return out


def _prefix_cache(cache, n: int, config):
    """A new KV cache holding the first ``n`` positions of ``cache`` (which is left as it is)."""
    from speccascade.models.dynamic import _new_cache

    prefix = _new_cache(config)
    for i, layer in enumerate(cache.layers):
        prefix.update(layer.keys[:, :, :n], layer.values[:, :, :n], i)
    return prefix


@torch.no_grad()
def draft_block(drafter, cache, token, feat, n: int, gamma: int):
    """``gamma`` greedy drafts after position ``n`` (``cache``: the drafter's states of positions < n,
    extended in place): the first call feeds ``token  # [B]`` (x_n) with ``feat  # [B, H]`` (the
    verifier's f_{n-1}), each later one the last draft with the drafter's own last hidden state at
    the position before. Returns the drafts  # [B, gamma]  and those states  # [B, gamma, H]."""
    from speccascade.models.dynamic import cache_keyword

    kw = cache_keyword(drafter.lm)
    drafts, states = [], []
    for j in range(gamma):
        pos = torch.full((token.shape[0], 1), n + j, device=token.device)
        out = drafter.lm.model(inputs_embeds=drafter.embed(token[:, None], feat[:, None]), position_ids=pos,
                               use_cache=True, **{kw: cache})
        feat = out.last_hidden_state[:, -1].float()
        token = drafter.lm.lm_head(feat).argmax(-1)
        drafts.append(token)
        states.append(feat)
    return torch.stack(drafts, 1), torch.stack(states, 1)


@torch.no_grad()
def block_acceptance(drafter, verifier, seqs: list[tuple[list[int], int]], gamma: int, batch: int) -> dict:
    """Greedy blocks of ``gamma`` drafts (:func:`draft_block`) from every position of the verifier's
    own translations (``seqs``: :func:`greedy_sequences`): a draft counts while every draft of its
    block so far equals the verifier's token. Returns the mean accepted drafts a block, P(accepted
    >= k) for k = 1..gamma, and the equivalent i.i.d. per-position rate."""
    drafter.eval()
    device = next(verifier.parameters()).device
    at_least = torch.zeros(gamma, dtype=torch.float64, device=device)
    blocks = 0
    for k in range(0, len(seqs), batch):
        chunk = seqs[k:k + batch]
        width = max(len(s) for s, _ in chunk) + gamma   # room for the last block's targets
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for b, (seq, _) in enumerate(chunk):
            ids[b, :len(seq)] = torch.tensor(seq)
        ids = ids.to(device)
        length = torch.tensor([len(s) for s, _ in chunk], device=device)
        first = torch.tensor([start for _, start in chunk], device=device)
        feats = verifier_view(verifier, ids)[1]
        _, full = drafter.hidden(ids, feats, use_cache=True)   # every position's state on true features
        ahead = torch.arange(1, gamma + 1, device=device)
        for n in range(int(first.min()) - 1, int(length.max()) - 1):   # n: the pending token's position
            valid = (n >= first - 1) & (n + 1 < length)   # [B] the next token is one the verifier made
            if not valid.any():
                continue
            cache = _prefix_cache(full.past_key_values, n, drafter.lm.config)
            drafts, _ = draft_block(drafter, cache, ids[:, n], feats[:, n - 1], n, gamma)
            hit = (drafts == ids[:, n + 1:n + 1 + gamma]) & (n + ahead < length.unsqueeze(1))   # [B, gamma]
            at_least += (hit.long().cumprod(1).bool() & valid.unsqueeze(1)).sum(0)
            blocks += int(valid.sum())
    drafter.train()
    probs = (at_least.cpu() / max(blocks, 1)).tolist()
    mean = sum(probs)
    return {"gamma": gamma, "blocks": blocks, "mean_accepted": mean, "p_at_least": probs,
            "per_position_equivalent": iid_rate(mean, gamma)}


def iid_rate(mean: float, gamma: int) -> float:
    """The a in [0, 1] with sum_{k=1..gamma} a^k = ``mean`` (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid ** k for k in range(1, gamma + 1)) < mean else (lo, mid)
    return (lo + hi) / 2


def verifier_batches(verifier, data, batch: int, seed: int, device) -> list:
    """The training batches with the verifier's features (from which its head gives its logits),
    computed once for every drafter: (ids, scored, features)."""
    return [(ids, scored, verifier_view(verifier, ids)[1]) for ids, scored in
            batches(data, batch, random.Random(seed), device)]


def train(drafter, verifier, cached: list, epochs: float, lr: float, seed: int, objective: str = "hard",
          regression: float = 0.0, unroll: int = 0) -> dict:
    """``epochs`` passes over ``cached`` (AdamW, one-cycle); the token loss (``objective``) plus, with
    ``regression`` > 0, that weight times the relative squared error of the drafter's last hidden
    state against the verifier's feature at the same position: the library's loss
    (:func:`speccascade.train.trainer.feature_loss`, ``train --features``'s), with the KL alone (``kl``)
    or the cross-entropy against the verifier's greedy token alone (``hard``) as the token loss; with
    ``unroll`` = K > 0 (a feature drafter), averaged over a block's depths 0..K as the loop drafts them
    (``train --feature-unroll``)."""
    from speccascade.train.trainer import feature_loss

    opt = torch.optim.AdamW(drafter.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    steps = int(epochs * len(cached))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    t, losses, regs, order = time.time(), [], [], []
    for _ in range(steps):
        if not order:   # an epoch: every batch once, in a new order
            order = rng.sample(range(len(cached)), len(cached))
        ids, scored, feats = cached[order.pop()]
        with torch.no_grad():
            teacher = verifier.lm_head(feats).float()
        targets = torch.where(scored, teacher.argmax(-1), -100)   # (hard: the verifier's greedy token)
        loss, reg = feature_loss(drafter.lm, {"input_ids": ids}, targets, teacher, feats, ids.device,
                                 distill_weight=1.0 if objective == "kl" else 0.0, regression=regression,
                                 unroll=unroll if drafter.features else 0)
        if regression > 0:
            regs.append(reg.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    fit = {"steps": steps, "seconds": time.time() - t, "loss_mean_last_20": sum(losses[-20:]) / min(20, len(losses))}
    if regs:
        fit["regression_mean_last_20"] = sum(regs[-20:]) / min(20, len(regs))
    return fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--verifier", help="a trained verifier's directory (default: the shipped tiny verifier)")
    ap.add_argument("--reference-drafter", help="also measure this trained drafter as it is: a token drafter on its "
                                                "own tokens, a feature drafter (e.g. `train --features`'s) fed the "
                                                "verifier's features")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, of {', '.join(VARIANTS)} (empty: none trained, only --reference-drafter "
                         "measured)")
    ap.add_argument("--train-file", help="train on these JSONL rows {en, es} (e.g. `speccascade distill`'s output, "
                                         "the verifier's own translations) instead of the training split")
    ap.add_argument("--train-pairs", type=int, default=3000)
    ap.add_argument("--test-pairs", type=int, default=300)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-batch-size", type=int, default=64, help="sequences a batch when measuring")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--objective", choices=("hard", "kl"), default="hard")
    ap.add_argument("--regression", type=float, default=1.0, help="the feature regression's weight (its variant)")
    ap.add_argument("--unroll", type=int, default=0,
                    help="the feature variants also train a block's next K drafts, each reading the drafter's own "
                         "state (EAGLE-3's training-time test, `train --feature-unroll`; default 0)")
    ap.add_argument("--gamma", type=int, default=5, help="the block's drafts (0: no block measurement)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (this measures acceptance, not speed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", help="save each variant's trained drafter in DIR/VARIANT (fp16, with the tokenizer; "
                                   "the feature drafters run in the speculative loop: speccascade.models.features)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if any(v not in VARIANTS for v in variants):
        ap.error(f"--variants {args.variants!r}: choose from {', '.join(VARIANTS)}")
    if not variants and not args.reference_drafter:
        ap.error("--variants is empty and no --reference-drafter is given: nothing to measure")
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    verifier, data, test = load(args.train_pairs if variants else 0, args.test_pairs, args.seed, args.verifier,
                                args.device, args.train_file)
    record = {"benchmark": "feature_drafter", "torch": torch.__version__, "device": args.device,
              "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "cpu": platform.processor() or platform.machine(), "args": vars(args),
              "verifier": args.verifier or "the shipped tiny verifier (8 layers x 384, 15.7M)",
              "verifier_params": sum(p.numel() for p in verifier.parameters()),
              "train_sequences": len(data), "test_sequences": len(test), "results": {}}

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)

    t = time.time()
    cached = verifier_batches(verifier, data, args.batch_size, args.seed, args.device)
    seqs = greedy_sequences(verifier, test, args.eval_batch_size) if args.gamma else []
    record["verifier_pass_seconds"] = time.time() - t

    def measured(drafter, block: bool = True) -> dict:
        r = {"teacher_forced": measure(drafter, verifier, test, args.eval_batch_size)}
        if args.gamma and block:
            r["block_T0"] = block_acceptance(drafter, verifier, seqs, args.gamma, args.eval_batch_size)
        return r

    if args.reference_drafter:
        from speccascade.models.loading import load_causal_lm

        ref = Drafter(verifier, False, lm=load_causal_lm(args.reference_drafter, dtype=torch.float32).to(args.device))
        record["reference_drafter"] = {"path": args.reference_drafter, "features": ref.features,
                                       "parameters": sum(p.numel() for p in ref.parameters()), **measured(ref)}
        print("reference", json.dumps(record["reference_drafter"]), flush=True)
        save()
        del ref
    for name in variants:
        torch.manual_seed(args.seed)
        drafter = Drafter(verifier, name != "tokens_only")
        start = measured(drafter, block=False)   # (all start equal: the teacher-forced figures show it)
        fit = train(drafter, verifier, cached, args.epochs, args.lr, args.seed, args.objective,
                    args.regression if name == "features_and_regression" else 0.0, args.unroll)
        record["results"][name] = {"parameters": sum(p.numel() for p in drafter.parameters()), "at_start": start,
                                   "training": fit, "trained": measured(drafter)}
        print(name, json.dumps(record["results"][name]), flush=True)
        save()
        if args.save:
            from pathlib import Path

            from speccascade.models.loading import TOKENIZER_DIR
            from speccascade.train.tokenizer import load_tokenizer
            from speccascade.train.trainer import save_checkpoint

            save_checkpoint(drafter.lm, load_tokenizer(args.verifier or TOKENIZER_DIR), Path(args.save) / name)
            record["results"][name]["saved"] = str(Path(args.save) / name)
            save()
    record["summary"] = {"order": variants, **{
        key: [record["results"][v]["trained"]["teacher_forced"][key] for v in variants]
        for key in ("acceptance_T1", "top1_agreement")}}
    if args.gamma:
        for key in ("mean_accepted", "per_position_equivalent"):
            record["summary"][f"block_T0_{key}"] = [record["results"][v]["trained"]["block_T0"][key] for v in variants]
    save()
    print(json.dumps(record["summary"]))


if __name__ == "__main__":
    main()
