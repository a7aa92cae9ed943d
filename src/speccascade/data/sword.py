"""Read a SWORD zText Bible module (the format of Debian's ``sword-text-*`` packages).

Files per testament (``ot``/``nt``) in ``modules/texts/ztext/<module>/``:

* ``.bzv``: one 10-byte record ``<IIH`` (block, offset, size) per verse slot, in versification
  order: module header, testament header, then per book a book-intro slot and per chapter a
  chapter-intro slot followed by its verses;
* ``.bzs``: one 12-byte record ``<III`` (offset, size, unused) per block into ``.bzz``;
* ``.bzz``: zlib streams, one per block (``BlockType=BOOK``: a block per book).

Verse text carries OSIS markup; :func:`clean_osis` strips tags, notes and headings.
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

SWORD_ROOT = Path("/usr/share/sword")


@dataclass
class Slot:
    book: str        # OSIS book id, e.g. "Gen"
    chapter: int
    verse: int       # 0 for intro slots
    raw: str


def read_slots(module_dir: Path, testament: str) -> list[str]:
    """The raw text of every verse slot of one testament, in order."""
    bzs = (module_dir / f"{testament}.bzs").read_bytes()
    bzv = (module_dir / f"{testament}.bzv").read_bytes()
    bzz = (module_dir / f"{testament}.bzz").read_bytes()
    blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]
    cache: dict[int, bytes] = {}
    out = []
    for i in range(0, len(bzv), 10):
        block, offset, size = struct.unpack_from("<IIH", bzv, i)
        if size == 0:
            out.append("")
            continue
        if block not in cache:
            start, length, _ = blocks[block]
            cache[block] = zlib.decompress(bzz[start:start + length])
        out.append(cache[block][offset:offset + size].decode("utf-8"))
    return out


_BOOK = re.compile(r'osisID="([^".]+)"[^>]*type="book"|type="book"[^>]*osisID="([^".]+)"')
_CHAPTER = re.compile(r'<chapter[^>]*\bn="(\d+)"')


def label_slots(slots: list[str]) -> list[Slot]:
    """Attach book / chapter / verse to each slot by walking the book and chapter markers."""
    labelled, book, chapter, verse = [], "", 0, 0
    for raw in slots:
        m = _BOOK.search(raw)
        if m:
            book, chapter, verse = m.group(1) or m.group(2), 0, 0
            labelled.append(Slot(book, 0, 0, raw))
            continue
        m = _CHAPTER.search(raw)
        if m:
            chapter, verse = int(m.group(1)), 0
            labelled.append(Slot(book, chapter, 0, raw))
            continue
        if chapter == 0:
            labelled.append(Slot(book, 0, 0, raw))
            continue
        verse += 1
        labelled.append(Slot(book, chapter, verse, raw))
    return labelled


_DROP_ELEMENTS = re.compile(r"<(note|title)\b[^>]*?(?<!/)>.*?</\1>", re.S)
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


_JOINED_WORDS = re.compile(r"</w>(?=<w\b)")


def clean_osis(raw: str) -> str:
    text = _DROP_ELEMENTS.sub("", raw)
    text = _JOINED_WORDS.sub("</w> ", text)   # two words whose separator was a dropped note (WEB)
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("¶", " ")
    text = _SPACE.sub(" ", text).strip()
    return text


def read_module(name: str, root: Path = SWORD_ROOT) -> list[Slot]:
    module_dir = root / "modules" / "texts" / "ztext" / name
    if not module_dir.is_dir():
        raise FileNotFoundError(
            f"SWORD module {name!r} not found under {module_dir}; install Debian's sword-text-* package")
    return label_slots(read_slots(module_dir, "ot")) + label_slots(read_slots(module_dir, "nt"))
