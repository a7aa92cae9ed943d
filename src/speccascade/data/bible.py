"""English (KJV) -> Spanish (Reina-Valera 1909) verse pairs: extraction, splits, loading.

``python -m speccascade.data.bible build`` extracts the pairs from Debian's ``sword-text-kjv`` and
``sword-text-sparv`` (both in KJV versification, so verse slots align by index), cleans them and
writes the fixed splits to ``speccascade/assets/bible/{train,validation,test}.jsonl.gz``:

* test: 1,000 pairs drawn (seed 0) from books held out whole (``TEST_BOOKS``), never trained on;
  the other verses of those books are not used at all;
* validation: 500 pairs drawn (seed 0) from the remaining books;
* train: everything else.

``load_split(name)`` reads a shipped split; nobody needs the Debian packages to use them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

from .sword import SWORD_ROOT, clean_osis, read_module

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "bible"
SOURCE, TARGET = "engKJV2006eb", "spaRV1909eb"
TEST_BOOKS = ("Ruth", "Esth", "Joel", "Jonah", "Mic", "Phil", "Col", "Titus", "Jas", "1Pet", "1John")
N_TEST, N_VALIDATION = 1000, 500
SPLITS = ("train", "validation", "test")


def extract_pairs(root: Path = SWORD_ROOT) -> list[dict]:
    en, es = read_module(SOURCE, root), read_module(TARGET, root)
    if len(en) != len(es):
        raise ValueError(f"versification mismatch: {len(en)} vs {len(es)} slots")
    pairs = []
    for a, b in zip(en, es):
        if a.verse == 0 or (a.book, a.chapter, a.verse) != (b.book, b.chapter, b.verse):
            continue
        src, tgt = clean_osis(a.raw), clean_osis(b.raw)
        if src and tgt:
            pairs.append({"id": f"{a.book}.{a.chapter}.{a.verse}", "book": a.book, "en": src, "es": tgt})
    return pairs


def make_splits(pairs: list[dict], seed: int = 0) -> dict[str, list[dict]]:
    held = [p for p in pairs if p["book"] in TEST_BOOKS]
    rest = [p for p in pairs if p["book"] not in TEST_BOOKS]
    if len(held) < N_TEST:
        raise ValueError(f"held-out books give only {len(held)} pairs")
    rng = random.Random(seed)
    test = sorted(rng.sample(range(len(held)), N_TEST))
    val = set(rng.sample(range(len(rest)), N_VALIDATION))
    return {
        "train": [p for i, p in enumerate(rest) if i not in val],
        "validation": [p for i, p in enumerate(rest) if i in val],
        "test": [held[i] for i in test],
    }


def write_splits(splits: dict[str, list[dict]], out_dir: Path = ASSETS) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        # mtime=0 keeps the gzip bytes reproducible
        with gzip.GzipFile(out_dir / f"{name}.jsonl.gz", "wb", mtime=0) as f:
            for row in rows:
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def load_split(name: str, data_dir: Path = ASSETS) -> list[dict]:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
    path = data_dir / f"{name}.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["build"])
    ap.add_argument("--sword-root", type=Path, default=SWORD_ROOT)
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args(argv)
    splits = make_splits(extract_pairs(args.sword_root))
    write_splits(splits, args.out)
    print({k: len(v) for k, v in splits.items()})


if __name__ == "__main__":
    main()
