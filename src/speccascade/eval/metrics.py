"""Corpus-level quality metrics through sacrebleu (BLEU, chrF), with their signatures."""

from __future__ import annotations


def bleu(hyps: list[str], refs: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


def chrf(hyps: list[str], refs: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(hyps, [refs]).score)


def signatures() -> dict[str, str]:
    from sacrebleu.metrics import BLEU, CHRF

    out = {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        metric.corpus_score(["a"], [["a"]])  # a signature needs the number of references
        out[name] = str(metric.get_signature())
    return out
