"""Quality metrics, all on a 0-100 scale: BLEU and chrF (sacrebleu), ROUGE-1/2/L F1 (rouge-score),
exact match and token F1 (SQuAD-style normalisation). ``METRICS`` maps a name to a function
``(hyps, refs) -> float``."""

from __future__ import annotations

import re
import string
from collections import Counter


def bleu(hyps: list[str], refs: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


def chrf(hyps: list[str], refs: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(hyps, [refs]).score)


def _rouge(kind: str):
    def fn(hyps: list[str], refs: list[str]) -> float:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer([kind], use_stemmer=False)
        scores = [scorer.score(r, h)[kind].fmeasure for h, r in zip(hyps, refs)]
        return 100.0 * sum(scores) / max(len(scores), 1)

    fn.__name__ = kind
    return fn


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and the articles a / an / the, collapse spaces (SQuAD)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(hyps: list[str], refs: list[str]) -> float:
    hits = [normalize_answer(h) == normalize_answer(r) for h, r in zip(hyps, refs)]
    return 100.0 * sum(hits) / max(len(hits), 1)


def token_f1(hyps: list[str], refs: list[str]) -> float:
    scores = []
    for h, r in zip(hyps, refs):
        ht, rt = normalize_answer(h).split(), normalize_answer(r).split()
        common = sum((Counter(ht) & Counter(rt)).values())
        if not ht or not rt:
            scores.append(float(ht == rt))
        elif common == 0:
            scores.append(0.0)
        else:
            p, rc = common / len(ht), common / len(rt)
            scores.append(2 * p * rc / (p + rc))
    return 100.0 * sum(scores) / max(len(scores), 1)


def bleu_sentence_stats(hyps: list[str], refs: list[str]) -> list[list[int]]:
    """Per-example sufficient statistics of corpus BLEU, as sacrebleu extracts them (hypothesis and
    reference lengths, then matched and total n-grams for n = 1..4): the corpus BLEU of any subset
    of the examples is the BLEU of the sum of their rows (:func:`bleu_from_stats`), which is what a
    bootstrap over examples resamples."""
    from sacrebleu.metrics import BLEU

    return [[int(x) for x in row] for row in BLEU()._extract_corpus_statistics(hyps, [refs])]


def bleu_from_stats(total) -> float:
    """Corpus BLEU of summed :func:`bleu_sentence_stats` rows."""
    from sacrebleu.metrics import BLEU

    return float(BLEU()._compute_score_from_stats([int(x) for x in total]).score)


#: metric -> per-example statistics whose sums give the corpus score (see :func:`paired_bootstrap`)
SENTENCE_STATS = {"bleu": (bleu_sentence_stats, bleu_from_stats)}


def paired_bootstrap(metric: str, stats, baseline_stats, n_samples: int = 1000, seed: int = 0) -> dict:
    """The difference ``metric(system) - metric(baseline)`` on the same examples, with its 95%
    interval from a paired bootstrap over the examples (Koehn 2004; the resampling sacrebleu's
    paired test does): each resample draws the examples with replacement and scores both
    systems on the same draw. Returns ``{"delta", "ci95": [lo, hi]}``."""
    import numpy as np

    _, score = SENTENCE_STATS[metric]
    a, b = np.asarray(stats, dtype=np.int64), np.asarray(baseline_stats, dtype=np.int64)
    if a.shape != b.shape:
        raise ValueError(f"paired statistics need the same examples: {a.shape} vs {b.shape}")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_samples, len(a)))
    diffs = np.array([score(a[i].sum(0)) - score(b[i].sum(0)) for i in idx])
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"delta": score(a.sum(0)) - score(b.sum(0)), "ci95": [float(lo), float(hi)]}


METRICS = {"bleu": bleu, "chrf": chrf, "rouge1": _rouge("rouge1"), "rouge2": _rouge("rouge2"),
           "rougeL": _rouge("rougeL"), "exact_match": exact_match, "token_f1": token_f1}


def signatures() -> dict[str, str]:
    from sacrebleu.metrics import BLEU, CHRF

    out = {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        metric.corpus_score(["a"], [["a"]])  # a signature needs the number of references
        out[name] = str(metric.get_signature())
    return out
