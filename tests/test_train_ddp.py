"""Data-parallel training (``torchrun --nproc-per-node N -m speccascade train ...``): two gloo ranks
on the CPU take the same optimisation steps as one process.

Each rank trains on its half of every batch's sequences and scales its loss by its share of the
batch's scored tokens, so the gradient DistributedDataParallel averages is the whole batch's: the
weights after a few steps equal the single process's to float rounding. (With each rank's plain
mean loss instead, ranks whose halves hold different token counts are weighted wrongly and the
weights drift apart: the comparison below fails.)
"""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
from safetensors.torch import load_file

from speccascade.data.bible import load_split
from speccascade.models.loading import TOKENIZER_DIR

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo over localhost")

SPLITS = {"train": load_split("train")[:200], "validation": load_split("validation")[:24]}
KW = dict(epochs=3, progress=False, bleu_pairs=0)   # 2 batches (128 + 72 pairs) an epoch: 6 steps


def _train(out):
    import speccascade.train.trainer as trainer

    trainer.load_split = lambda name: SPLITS[name]
    return trainer.train("tiny", "drafter", out, TOKENIZER_DIR, **KW)


def _rank(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    log = _train(out / "two")
    (out / f"rank{rank}.json").write_text(json.dumps({k: log[k] for k in ("steps", "rank_tokens", "ranks")}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_take_the_same_steps_as_one_process(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    import speccascade.train.trainer as trainer

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(trainer, "load_split", lambda name: SPLITS[name])
    one = trainer.train("tiny", "drafter", tmp_path / "one", TOKENIZER_DIR, **KW)
    mp.spawn(_rank, args=(_free_port(), tmp_path), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    two = json.loads((tmp_path / "two" / "training.json").read_text())
    assert one["steps"] == two["steps"] == ranks[0]["steps"] == ranks[1]["steps"] == 6
    assert two["ranks"] == 2 and one["ranks"] == 1
    # each rank trained on about half of the scored tokens, together on all of them
    assert ranks[0]["rank_tokens"] + ranks[1]["rank_tokens"] == one["rank_tokens"]
    assert all(r["rank_tokens"] > 0.3 * one["rank_tokens"] for r in ranks)
    assert ranks[0]["rank_tokens"] != ranks[1]["rank_tokens"]   # shares of unequal weight: the scaling matters
    assert one["evals"][-1]["val_loss"] < one["evals"][0]["val_loss"] - 0.05   # it trained
    # the same steps: validation losses and (fp16-saved) weights agree to rounding
    for a, b in zip(one["evals"], two["evals"]):
        assert a["step"] == b["step"] and a["val_loss"] == pytest.approx(b["val_loss"], abs=2e-4)
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert w1.keys() == w2.keys()
    worst = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
    assert worst < 2e-3, worst

