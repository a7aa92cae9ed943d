"""How well a drafter matches a verifier, teacher-forced on reference sequences.

At each scored position t (the target side of a pair) with q_t, p_t at T = 1:
* SD acceptance: E[sum_v min(p_t(v), q_t(v))] = 1 - D_TV(p_t, q_t), the probability that
  lossless SD accepts a draft there (Leviathan et al. 2023);
* top-1 agreement: 1(argmax q_t = argmax p_t).

A decoder-only pair reads each sequence whole; an encoder-decoder pair reads the tokens before the
first scored one as the encoder input and decodes the rest from its ``decoder_start_token_id``.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def teacher_forced_agreement(drafter, verifier, sequences: list[tuple[list[int], int]], batch_size: int = 32,
                             device=None) -> dict[str, float]:
    """``sequences``: (token ids, index of the first scored token)."""
    from ..errors import SpecCascadeError
    from ..models.base import is_encoder_decoder

    if is_encoder_decoder(drafter) != is_encoder_decoder(verifier):
        raise SpecCascadeError("teacher-forced agreement needs two decoder-only or two encoder-decoder models")
    device = device or next(verifier.parameters()).device
    acc_sum, top1_sum, n = 0.0, 0.0, 0
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i:i + batch_size]
        q = _scored_probs(drafter, chunk, device, is_encoder_decoder(drafter))
        p = _scored_probs(verifier, chunk, device, is_encoder_decoder(verifier))
        acc_sum += float(torch.minimum(p, q).sum(-1).sum())
        top1_sum += float((p.argmax(-1) == q.argmax(-1)).sum())
        n += p.shape[0]
    return {"sd_acceptance_T1": acc_sum / n, "top1_agreement": top1_sum / n, "positions": n}


def _scored_probs(model, chunk: list[tuple[list[int], int]], device, encoder_decoder: bool) -> torch.Tensor:
    """The model's T = 1 distribution at every scored position of ``chunk``, row after row.  # [N, V]"""
    if encoder_decoder:
        src = [seq[:start] for seq, start in chunk]
        tgt = [seq[start:] for seq, start in chunk]
        start_id = model.generation_config.decoder_start_token_id
        start_id = model.config.decoder_start_token_id if start_id is None else start_id
        ids, mask, _ = _pad(src, device)
        dec, _, score = _pad([[int(start_id)] + t[:-1] for t in tgt], device)  # logits at j predict tgt[j]
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    else:
        ids, mask, score = _pad([seq for seq, _ in chunk], device)
        score[:] = False
        for b, (seq, start) in enumerate(chunk):
            score[b, start - 1:len(seq) - 1] = True  # logits at t-1 predict token t
        logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.softmax(logits.float(), -1)[score]


def _pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (0), the attention mask and a bool copy of it."""
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    return ids.to(device), mask.to(device), mask.bool().to(device)
