"""Sequence-level distillation: training targets written by the verifier itself.

A drafter accepts more drafts the closer its distribution is to the verifier's (the acceptance
probability at a position is 1 - D_TV(p, q), Leviathan et al. 2023). Trained on the references, a
small drafter learns the task; trained on the verifier's own translations of the same sources
(Kim & Rush 2016, sequence-level knowledge distillation), it learns the verifier. This module
writes those translations: each training source decoded by the verifier alone, greedily and / or
sampled at T = 1, into a JSONL file of ``{"en", "es", "temperature", "index", "id", "seed"}`` rows that
``speccascade train --train-file`` reads in place of the training split. The sources can be the
training verses' King James text and / or their World English Bible text (``--sources kjv,web``: two
different English inputs for the same verses). The test split is never read.

    speccascade distill --verifier runs/deep/verifier --out runs/deep/distill.jsonl.gz \\
        --temperatures 0 1 1 1 --device cuda --dtype bfloat16     # greedy, and three samples at T = 1
    speccascade train --preset deep --role drafter --train-file runs/deep/distill.jsonl.gz \\
        --out runs/deep/drafter --device cuda
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from ..data.bible import load_split
from ..errors import SpecCascadeError


def read_pairs(path: Path) -> list[dict]:
    """Rows with ``en`` and ``es`` from a JSONL file (``.gz`` read as gzip)."""
    path = Path(path)
    if not path.is_file():
        raise SpecCascadeError(f"training file {str(path)!r} does not exist (write one with `speccascade distill`)")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not (isinstance(row, dict) and isinstance(row.get("en"), str)
                        and isinstance(row.get("es"), str)):
                    raise SpecCascadeError(f"{path}:{n}: a training row needs string fields 'en' and 'es'")
                rows.append(row)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecCascadeError(f"cannot read training file {str(path)!r}: {e}") from None
    if not rows:
        raise SpecCascadeError(f"training file {str(path)!r} has no rows")
    return rows


def distill(drafter_or_verifier, tokenizer, out: Path, temperatures=(0.0, 1.0), limit: int | None = None,
            batch_size: int = 256, max_new_tokens: int = 200, seed: int = 0, with_references: bool = False,
            progress: bool = False, sources=("kjv",)) -> dict:
    """Translate the training verses' English with ``drafter_or_verifier`` alone (a model or a
    backend; ``verifier_only``) at each temperature and write the rows to ``out``. ``sources``: the
    English sides to translate (:data:`.trainer.SOURCES`: ``kjv`` and / or ``web``, the World English
    Bible's text of the same verses); ``limit``: the first N verses of each. A temperature
    given k times gives k samples of every source: its i-th repeat (from 0) is drawn with seed
    ``seed + i`` (so ``(1, 1, 1)`` is three different T = 1 translations each). With
    ``with_references`` the reference pairs are written too. Returns a summary (rows, tokens)."""
    from ..eval.tasks import translate_pairs
    from .trainer import SOURCES, check_sources

    model = drafter_or_verifier
    sources = check_sources(sources)
    pairs = [p for src in sources for p in load_split(SOURCES[src])[:limit]]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    rows, tokens = 0, 0
    with gzip.open(tmp, "wt", encoding="utf-8") if out.suffix == ".gz" else open(tmp, "w", encoding="utf-8") as f:
        if with_references:
            for i, p in enumerate(pairs):
                f.write(json.dumps({"en": p["en"], "es": p["es"], "temperature": None, "index": i, "id": p["id"]},
                                   ensure_ascii=False) + "\n")
                rows += 1
        seen: dict[float, int] = {}
        for t in temperatures:
            repeat = seen[float(t)] = seen.get(float(t), -1) + 1
            hyps, stats = translate_pairs(model, model, tokenizer, pairs, method="verifier_only",
                                          temperature=float(t), batch_size=batch_size,
                                          max_new_tokens=max_new_tokens, seed=seed + repeat, progress=progress)
            tokens += stats.emitted
            for i, (p, h) in enumerate(zip(pairs, hyps)):
                if h.strip():
                    f.write(json.dumps({"en": p["en"], "es": h, "temperature": float(t), "index": i, "id": p["id"],
                                        "seed": seed + repeat}, ensure_ascii=False) + "\n")
                    rows += 1
    tmp.replace(out)   # written whole or not at all: an interrupted run leaves no half file behind
    return {"rows": rows, "sources": len(pairs), "english": list(sources),
            "temperatures": [float(t) for t in temperatures],
            "tokens": tokens, "with_references": with_references, "out": str(out)}
