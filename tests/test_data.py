"""The Bible data pipeline: the SWORD reader on a module built here, the shipped splits, the tokenizer."""

import struct
import zlib
from pathlib import Path

import pytest

from speccascade.data.bible import (
    N_TEST,
    N_VALIDATION,
    TEST_BOOKS,
    extract_pairs,
    load_split,
    make_splits,
    second_source,
)
from speccascade.data.prompt import EOS, SEP, decode, encode_prompt, encode_target
from speccascade.data.sword import clean_osis, label_slots, read_slots
from speccascade.models.loading import TOKENIZER_DIR, load_tokenizer


def write_ztext(directory: Path, testament: str, books: list[list[str]]) -> None:
    """A zText module: one zlib block per book, slots laid out as the reader expects."""
    bzs, bzv, bzz = b"", b"", b""
    slots = [(None, ""), (None, "")]  # module and testament headers
    for b, verses in enumerate(books):
        for text in verses:
            slots.append((b, text))
    blocks: dict[int, bytes] = {}
    for b, text in slots:
        if b is None or not text:
            bzv += struct.pack("<IIH", 0, 0, 0)
            continue
        data = text.encode("utf-8")
        offset = len(blocks.get(b, b""))
        blocks[b] = blocks.get(b, b"") + data
        bzv += struct.pack("<IIH", b, offset, len(data))
    for b in range(len(books)):
        z = zlib.compress(blocks.get(b, b""))
        bzs += struct.pack("<III", len(bzz), len(z), 0)
        bzz += z
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{testament}.bzs").write_bytes(bzs)
    (directory / f"{testament}.bzv").write_bytes(bzv)
    (directory / f"{testament}.bzz").write_bytes(bzz)


def test_sword_reader_and_labels(tmp_path):
    book = ['<div osisID="Ruth" type="book"/><title>Ruth</title>', '<chapter n="1" osisID="Ruth.1"/>',
            'Now it <w lemma="x">came</w> to pass<note type="study">a note</note>, in the days.',
            '<title type="x">Heading</title>And a certain man ¶ went.', '<chapter n="2" osisID="Ruth.2"/>',
            'And Naomi &amp; Ruth.']
    write_ztext(tmp_path / "m", "ot", [book])
    slots = label_slots(read_slots(tmp_path / "m", "ot"))
    verses = [(s.book, s.chapter, s.verse, clean_osis(s.raw)) for s in slots if s.verse]
    assert verses == [("Ruth", 1, 1, "Now it came to pass, in the days."), ("Ruth", 1, 2, "And a certain man went."),
                      ("Ruth", 2, 1, "And Naomi & Ruth.")]


def test_extract_pairs_from_two_modules(tmp_path):
    en = [['<div osisID="Gen" type="book"/>', '<chapter n="1" osisID="Gen.1"/>', "In the beginning.", "And light."]]
    es = [['<div osisID="Gen" type="book"/>', '<chapter n="1" osisID="Gen.1"/>', "EN el principio.", ""]]
    for name, books in (("engKJV2006eb", en), ("spaRV1909eb", es)):
        base = tmp_path / "modules" / "texts" / "ztext" / name
        write_ztext(base, "ot", books)
        write_ztext(base, "nt", [])
    pairs = extract_pairs(tmp_path)
    assert pairs == [{"id": "Gen.1.1", "book": "Gen", "en": "In the beginning.", "es": "EN el principio."}]


def test_shipped_splits():
    splits = {name: load_split(name) for name in ("train", "validation", "test")}
    assert len(splits["test"]) == N_TEST and len(splits["validation"]) == N_VALIDATION
    assert len(splits["train"]) > 29_000
    ids = {name: {p["id"] for p in rows} for name, rows in splits.items()}
    assert not ids["test"] & ids["train"] and not ids["test"] & ids["validation"]
    assert not ids["validation"] & ids["train"]
    assert {p["book"] for p in splits["test"]} <= set(TEST_BOOKS)
    assert not {p["book"] for p in splits["train"] + splits["validation"]} & set(TEST_BOOKS)
    assert all(p["en"] and p["es"] and "<" not in p["en"] + p["es"] for rows in splits.values() for p in rows)


@pytest.mark.skipif(not Path("/usr/share/sword/modules/texts/ztext/spaRV1909eb").exists(),
                    reason="Debian's sword-text-kjv / sword-text-sparv are not installed")
def test_rebuild_from_debian_packages_matches_shipped_splits():
    splits = make_splits(extract_pairs())
    for name in ("train", "validation", "test"):
        assert splits[name] == load_split(name)


def test_words_joined_by_a_dropped_note_keep_their_space():
    raw = '<w lemma="a">God</w><note placement="foot">1:1 a note</note><w lemma="b">created</w>, <w>it</w>.'
    assert clean_osis(raw) == "God created, it."


def test_second_source_takes_each_training_verse_by_id_and_leaves_out_shifted_ones(tmp_path):
    train = [{"id": f"Gen.1.{v}", "book": "Gen", "en": en, "es": f"es {v}"} for v, en in enumerate(
        ["In the beginning God created the heaven and the earth.",
         "And the earth was without form, and void; and darkness was upon the face of the deep.",
         "And God said, Let there be light: and there was light.",
         "And God saw the light, that it was good: and God divided the light from the darkness."], start=1)]
    other = ["In the beginning, God created the heavens and the earth.",
             "God said, “Let there be light,” and there was light.",   # verses 2 and 3 in each other's slots
             "The earth was formless and empty. Darkness was on the surface of the deep.",
             "God saw the light, and saw that it was good. God divided the light from the darkness."]
    base = tmp_path / "modules" / "texts" / "ztext" / "engWEB2015eb"
    write_ztext(base, "ot", [['<div osisID="Gen" type="book"/>', '<chapter n="1" osisID="Gen.1"/>', *other]])
    write_ztext(base, "nt", [])
    rows = second_source(train, tmp_path)
    assert rows == [{"id": "Gen.1.1", "en": other[0]}, {"id": "Gen.1.4", "en": other[3]}]


def test_shipped_second_source_pairs_training_verses_only():
    train = {p["id"]: p for p in load_split("train")}
    web = load_split("train_web")
    assert len(web) > 29_000
    held = {p["id"] for name in ("validation", "test") for p in load_split(name)}
    for p in web:
        base = p["id"].removesuffix("@web")
        assert p["id"].endswith("@web") and base in train and base not in held
        assert p["es"] == train[base]["es"] and p["book"] == train[base]["book"] and p["en"] and "<" not in p["en"]
    assert sum(p["en"] != train[p["id"].removesuffix("@web")]["en"] for p in web) > 0.95 * len(web)


@pytest.mark.skipif(not Path("/usr/share/sword/modules/texts/ztext/engWEB2015eb").exists(),
                    reason="Debian's sword-text-web is not installed")
def test_rebuild_second_source_from_debian_package_matches_shipped():
    shipped = {p["id"].removesuffix("@web"): p["en"] for p in load_split("train_web")}
    assert {r["id"]: r["en"] for r in second_source(load_split("train"))} == shipped


def test_tokenizer_round_trip_and_prompt_format():
    tok = load_tokenizer(TOKENIZER_DIR)
    assert len(tok) == 8000
    for p in load_split("test")[:200]:
        assert decode(tok, encode_target(tok, p["es"])) == p["es"]
        prompt = encode_prompt(tok, p["en"])
        assert prompt[0] == 1 and prompt[-1] == SEP and decode(tok, prompt) == p["en"]
    assert encode_target(tok, "Y fué la luz.")[-1] == EOS


def test_prompt_format_needs_no_training_code():
    """Evaluation (the Bible task) uses the prompt format without importing the training package, and
    the training package's tokenizer module re-exports the very same functions."""
    import subprocess
    import sys

    code = ("import sys; from speccascade.eval.tasks import BibleTask; "
            "from speccascade.models.loading import TOKENIZER_DIR, load_tokenizer; "
            "tok = load_tokenizer(TOKENIZER_DIR); t = BibleTask(); ids = t.encode(tok, 'And God said'); "
            "assert ids[0] == 1 and ids[-1] == 3 and t.eos_token_id(tok) == 2, ids; "
            "assert t.decode(tok, ids + [2]) == 'And God said'; "
            "print(sorted(m for m in sys.modules if m.startswith('speccascade.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

    import speccascade.data.prompt as prompt
    import speccascade.train.tokenizer as train_tokenizer

    for name in ("EOS", "SEP", "BOS", "PAD", "SPECIALS", "encode_prompt", "encode_target", "decode"):
        assert getattr(train_tokenizer, name) is getattr(prompt, name)


def test_trainer_writes_a_loadable_checkpoint_with_losses_and_bleu(tmp_path):
    import torch

    from speccascade.models.loading import load_causal_lm
    from speccascade.train.trainer import train

    log = train("tiny", "drafter", tmp_path / "d", TOKENIZER_DIR, epochs=0.005, progress=False, bleu_pairs=4)
    assert log["steps"] >= 1 and log["evals"] and math_finite(log["evals"][-1]["val_loss"])
    assert set(log["validation_bleu"]) >= {"bleu", "chrf"}
    model = load_causal_lm(tmp_path / "d")
    assert model.config.vocab_size == 8000 and next(model.parameters()).dtype == torch.float32


def math_finite(x):
    import math

    return math.isfinite(x)


def test_trainer_trains_on_the_sources_it_is_given(tmp_path, monkeypatch):
    import speccascade.train.trainer as trainer
    from speccascade.errors import SpecCascadeError

    splits = {"train": load_split("train")[:30], "train_web": load_split("train_web")[:20],
              "validation": load_split("validation")[:8]}
    monkeypatch.setattr(trainer, "load_split", lambda name: splits[name])
    kw = dict(epochs=0.05, progress=False, bleu_pairs=0)
    log = trainer.train("tiny", "drafter", tmp_path / "d", TOKENIZER_DIR, sources=("kjv", "web"), **kw)
    assert log["train_pairs"] == 50 and log["sources"] == ["kjv", "web"]
    assert trainer.train("tiny", "drafter", tmp_path / "d", TOKENIZER_DIR, **kw)["train_pairs"] == 30   # tiny: kjv
    assert trainer.PRESETS["deep"]["verifier"].sources == ("kjv", "web")
    with pytest.raises(SpecCascadeError, match="choose one or more of kjv, web"):
        trainer.train("tiny", "drafter", tmp_path / "d", TOKENIZER_DIR, sources=("nrsv",), **kw)
    with pytest.raises(SpecCascadeError, match="give one"):
        trainer.train("tiny", "drafter", tmp_path / "d", TOKENIZER_DIR, sources=("kjv",),
                      train_file=tmp_path / "pairs.jsonl", **kw)


def test_trainer_keeps_a_moving_average_of_the_weights_and_saves_the_better(tmp_path, monkeypatch):
    """--ema-decay: every evaluation also scores the weights' exponential moving average; the
    checkpoint is whichever scored lower: its validation loss, recomputed from the saved file, is the
    trained weights' where they scored lower (7 steps: the average lags), and the average's where it
    is made to score lower. A decay outside (0, 1) is a clear error."""
    import torch

    import speccascade.train.trainer as trainer
    from speccascade.errors import SpecCascadeError
    from speccascade.models.loading import load_causal_lm

    val = trainer.encode_pairs(trainer.ensure_tokenizer(TOKENIZER_DIR), load_split("validation")[:8])
    kw = dict(epochs=0.03, progress=False, bleu_pairs=0, validation_pairs=8, ema_decay=0.5)

    def saved_loss(path):
        model = load_causal_lm(path, dtype=torch.float32)
        return trainer.evaluate_loss(model, val, torch.device("cpu"), collate_fn=trainer.collate)

    log = trainer.train("tiny", "drafter", tmp_path / "d", TOKENIZER_DIR, **kw)
    last = log["evals"][-1]
    assert log["recipe"]["ema_decay"] == 0.5 and last["val_loss_ema"] > last["val_loss"] + 1e-2
    assert log["best"]["weights"] == "trained" and log["best"]["val_loss"] == last["val_loss"]
    assert abs(saved_loss(tmp_path / "d") - last["val_loss"]) < 1e-3
    # the average made to score lower (its loss reported 1 lower): the checkpoint holds the average
    real, calls = trainer.evaluate_loss, []

    def evaluate_loss(model, *a, **k):
        calls.append(real(model, *a, **k))
        return calls[-1] - (1.0 if len(calls) % 2 == 0 else 0.0)   # each evaluation: trained, then average

    monkeypatch.setattr(trainer, "evaluate_loss", evaluate_loss)
    log = trainer.train("tiny", "drafter", tmp_path / "a", TOKENIZER_DIR, **kw)
    monkeypatch.undo()
    assert log["best"]["weights"] == "ema" and abs(calls[-1] - calls[-2]) > 1e-2
    assert abs(saved_loss(tmp_path / "a") - calls[-1]) < 1e-3
    with pytest.raises(SpecCascadeError, match="--ema-decay must be in"):
        trainer.train("tiny", "drafter", tmp_path / "e", TOKENIZER_DIR, epochs=0.03, progress=False, ema_decay=1.5)


def test_trainer_compiles_the_layers_and_takes_the_eager_steps(tmp_path, monkeypatch):
    """train --compile: each decoder layer of the model and of its teacher runs compiled (dynamo
    builds graphs), the steps and evaluations are the eager run's (a dropout-free drafter distilled
    from the shipped tiny verifier, the same losses to float rounding), the log says so, and the
    checkpoint is a plain one. A T5 preset is a clear error before any data is read."""
    import torch

    import speccascade.train.trainer as trainer
    from speccascade.errors import SpecCascadeError
    from speccascade.models.loading import embedded_pair_dirs

    splits = {"train": load_split("train")[:40], "validation": load_split("validation")[:8]}
    monkeypatch.setattr(trainer, "load_split", lambda name: splits[name])
    teacher = embedded_pair_dirs("tiny")[1]
    kw = dict(epochs=3, progress=False, bleu_pairs=0, teacher=teacher, batch_size=16)   # 9 steps of 16 of 40 pairs
    eager = trainer.train("tiny", "drafter", tmp_path / "e", TOKENIZER_DIR, **kw)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    real, compiled_layers = trainer.compile_layers, []
    monkeypatch.setattr(trainer, "compile_layers", lambda m: compiled_layers.append(real(m)) or compiled_layers[-1])
    compiled = trainer.train("tiny", "drafter", tmp_path / "c", TOKENIZER_DIR, compile=True, **kw)
    assert compiled_layers == [1, 8]   # the 1-layer drafter's, then the 8-layer teacher's
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1   # (compiled, not skipped)
    assert compiled["compiled"] and not eager["compiled"] and compiled["steps"] == eager["steps"] >= 1
    for a, b in zip(eager["evals"], compiled["evals"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4 and abs(a["val_loss"] - b["val_loss"]) < 1e-4
    from speccascade.models.loading import load_causal_lm

    state = load_causal_lm(tmp_path / "c").state_dict()
    assert not any("_orig_mod" in k for k in state) and "model.layers.0.self_attn.q_proj.weight" in state
    with pytest.raises(SpecCascadeError, match="--compile compiles a decoder-only"):
        trainer.train("t5", "verifier", tmp_path / "t", TOKENIZER_DIR, epochs=0.01, progress=False, compile=True)
