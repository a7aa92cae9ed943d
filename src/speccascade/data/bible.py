"""English (KJV) -> Spanish (Reina-Valera 1909) verse pairs: extraction, splits, loading.

``python -m speccascade.data.bible build`` extracts the pairs from Debian's ``sword-text-kjv`` and
``sword-text-sparv`` (both in KJV versification, so verse slots align by index), cleans them and
writes the fixed splits to ``speccascade/assets/bible/{train,validation,test}.jsonl.gz``:

* test: 1,000 pairs drawn (seed 0) from books held out whole (``TEST_BOOKS``), never trained on;
  the other verses of those books are not used at all;
* validation: 500 pairs drawn (seed 0) from the remaining books;
* train: everything else.

A second English source for the training verses: the World English Bible (Debian's
``sword-text-web``, public domain; NRSVA versification, whose verse ids match KJV's for these
books): ``python -m speccascade.data.bible build-web`` writes ``train_web.jsonl.gz`` (each training
verse's WEB text, by id; verses whose same-id text looks shifted against its neighbours are left
out), and ``load_split("train_web")`` pairs it with the training split's Spanish. Only training
verses: the validation and test verses, and the held-out books, stay unseen.

``load_split(name)`` reads a shipped split; nobody needs the Debian packages to use them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
from pathlib import Path

from .sword import SWORD_ROOT, clean_osis, read_module

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "bible"
SOURCE, TARGET = "engKJV2006eb", "spaRV1909eb"
SECOND_SOURCE = "engWEB2015eb"   # the World English Bible
TEST_BOOKS = ("Ruth", "Esth", "Joel", "Jonah", "Mic", "Phil", "Col", "Titus", "Jas", "1Pet", "1John")
N_TEST, N_VALIDATION = 1000, 500
SPLITS = ("train", "validation", "test")
EXTRA_SPLITS = ("train_web",)   # the training verses from a second English source


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


_WORD = re.compile(r"[a-z]+")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def second_source(train: list[dict], root: Path = SWORD_ROOT, module: str = SECOND_SOURCE) -> list[dict]:
    """``{"id", "en"}``: ``module``'s text of each training verse (same id). A verse is left out
    where the two English texts look shifted (a versification difference): their overlap of words,
    weighted by rarity, is low (< 0.3) and a neighbouring verse of ``module`` overlaps clearly more
    (by > 0.2)."""
    other = {f"{s.book}.{s.chapter}.{s.verse}": clean_osis(s.raw) for s in read_module(module, root) if s.verse}
    docs = [_words(p["en"]) for p in train] + [_words(t) for t in other.values()]
    df: dict[str, int] = {}
    for d in docs:
        for w in d:
            df[w] = df.get(w, 0) + 1
    idf = {w: math.log(len(docs) / c) for w, c in df.items()}

    def overlap(a: str, b: str) -> float:
        wa, wb = _words(a), _words(b)
        return sum(idf[w] for w in wa & wb) / max(1e-9, min(sum(idf[w] for w in wa), sum(idf[w] for w in wb)))

    rows = []
    for p in train:
        text = other.get(p["id"])
        if not text:
            continue
        book, chapter, verse = p["id"].rsplit(".", 2)
        same = overlap(p["en"], text)
        nearby = [other.get(f"{book}.{chapter}.{int(verse) + d}") for d in (-1, 1)]
        best = max([overlap(p["en"], t) for t in nearby if t] or [0.0])
        if same < 0.3 and best > same + 0.2:
            continue
        rows.append({"id": p["id"], "en": text})
    return rows


def write_splits(splits: dict[str, list[dict]], out_dir: Path = ASSETS) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        # mtime=0 keeps the gzip bytes reproducible
        with gzip.GzipFile(out_dir / f"{name}.jsonl.gz", "wb", mtime=0) as f:
            for row in rows:
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def load_split(name: str, data_dir: Path = ASSETS) -> list[dict]:
    """A shipped split's pairs ``{"id", "book", "en", "es"}``; ``train_web``: the training pairs
    whose English is the second source's (ids suffixed ``@web``)."""
    if name not in SPLITS + EXTRA_SPLITS:
        raise ValueError(f"unknown split {name!r}; choose one of {SPLITS + EXTRA_SPLITS}")
    path = data_dir / f"{name}.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    if name == "train_web":
        train = {p["id"]: p for p in load_split("train", data_dir)}
        rows = [train[r["id"]] | {"id": r["id"] + "@web", "en": r["en"]} for r in rows]
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["build", "build-web"])
    ap.add_argument("--sword-root", type=Path, default=SWORD_ROOT)
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args(argv)
    if args.command == "build-web":   # the shipped training split's verses from the second source
        rows = second_source(load_split("train", args.out), args.sword_root)
        write_splits({"train_web": rows}, args.out)
        print({"train_web": len(rows), "train": len(load_split("train", args.out))})
        return
    splits = make_splits(extract_pairs(args.sword_root))
    write_splits(splits, args.out)
    print({k: len(v) for k, v in splits.items()})


if __name__ == "__main__":
    main()
