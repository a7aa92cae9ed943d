"""How well a drafter matches a verifier, teacher-forced on reference sequences.

At each scored position t (the target side of a pair) with q_t, p_t at T = 1:
* SD acceptance: E[sum_v min(p_t(v), q_t(v))] = 1 - D_TV(p_t, q_t), the probability that
  lossless SD accepts a draft there (Leviathan et al. 2023);
* top-1 agreement: 1(argmax q_t = argmax p_t).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def teacher_forced_agreement(drafter, verifier, sequences: list[tuple[list[int], int]], batch_size: int = 32,
                             device=None) -> dict[str, float]:
    """``sequences``: (token ids, index of the first scored token)."""
    device = device or next(verifier.parameters()).device
    acc_sum, top1_sum, n = 0.0, 0.0, 0
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i:i + batch_size]
        L = max(len(s) for s, _ in chunk)
        ids = torch.zeros(len(chunk), L, dtype=torch.long)
        mask = torch.zeros(len(chunk), L, dtype=torch.long)
        score = torch.zeros(len(chunk), L, dtype=torch.bool)
        for b, (seq, start) in enumerate(chunk):
            ids[b, :len(seq)] = torch.tensor(seq)
            mask[b, :len(seq)] = 1
            score[b, start - 1:len(seq) - 1] = True  # logits at t-1 predict token t
        ids, mask, score = ids.to(device), mask.to(device), score.to(device)
        q = torch.softmax(drafter(input_ids=ids, attention_mask=mask).logits.float(), -1)[score]
        p = torch.softmax(verifier(input_ids=ids, attention_mask=mask).logits.float(), -1)[score]
        acc_sum += float(torch.minimum(p, q).sum(-1).sum())
        top1_sum += float((p.argmax(-1) == q.argmax(-1)).sum())
        n += int(score.sum())
    return {"sd_acceptance_T1": acc_sum / n, "top1_agreement": top1_sum / n, "positions": n}
