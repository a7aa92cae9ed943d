"""Tasks: where examples come from, how a prompt is built, how outputs are scored.

``TASKS`` is the registry: ``bible_en_es`` (the shipped test split, BLEU + chrF, the translation
prompt format of :mod:`speccascade.data.prompt`) and ``jsonl`` (any file of
``{"input", "reference"}`` rows, the input encoded as is with the verifier's tokenizer, scored by a
chosen metric of :data:`speccascade.eval.metrics.METRICS`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..data import prompt as bible_prompt
from ..errors import SpecCascadeError
from .metrics import METRICS, SENTENCE_STATS


@dataclass
class Example:
    id: str
    input: str
    reference: str


class Task:
    """A task's examples, prompt format and scoring. The base class encodes and decodes text as is
    with the model's tokenizer (what ``speccascade generate --format raw`` uses)."""

    name = "raw"
    metrics: tuple[str, ...] = ()

    def examples(self, n: int | None = None, seed: int = 0) -> list[Example]:
        """``n`` examples drawn without replacement (seeded), in file order; all when ``n`` is None
        or at least the number available."""
        rows = self.load()
        if n is not None and n < len(rows):
            rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]
        return rows

    def load(self) -> list[Example]:
        raise NotImplementedError

    def encode(self, tokenizer, text: str) -> list[int]:
        return tokenizer.encode(text)

    def eos_token_id(self, tokenizer) -> int | None:
        return tokenizer.eos_token_id

    def decode(self, tokenizer, ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    def score(self, hyps: list[str], refs: list[str]) -> dict[str, float]:
        return {m: METRICS[m](hyps, refs) for m in self.metrics}

    def sentence_stats(self, hyps: list[str], refs: list[str]) -> dict[str, list[list[int]]]:
        """Per-example statistics of the task's corpus metrics that have them (BLEU): what a paired
        bootstrap of two cells' qualities needs (:func:`.metrics.paired_bootstrap`)."""
        return {m: SENTENCE_STATS[m][0](hyps, refs) for m in self.metrics if m in SENTENCE_STATS}

    def describe(self) -> str:
        return self.name


class BibleTask(Task):
    name = "bible_en_es"
    metrics = ("bleu", "chrf")

    def load(self) -> list[Example]:
        from ..data.bible import load_split

        return [Example(p["id"], p["en"], p["es"]) for p in load_split("test")]

    def encode(self, tokenizer, text):
        return bible_prompt.encode_prompt(tokenizer, text)

    def eos_token_id(self, tokenizer):
        return bible_prompt.EOS

    def decode(self, tokenizer, ids):
        return bible_prompt.decode(tokenizer, ids)


class JsonlTask(Task):
    name = "jsonl"

    def __init__(self, path: str | Path, metric: str = "bleu"):
        self.path = Path(path)
        if not self.path.exists():
            raise SpecCascadeError(f"task file {str(self.path)!r} does not exist")
        if not self.path.is_file():
            raise SpecCascadeError(f"task file {str(self.path)!r} is not a file (a JSONL file of "
                                   f"{{\"input\", \"reference\"}} rows is expected)")
        if metric not in METRICS:
            raise SpecCascadeError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
        self.metrics = (metric,)
        self._rows = None

    def load(self):
        if self._rows is not None:
            return self._rows
        try:
            text = self.path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise SpecCascadeError(f"task file {str(self.path)!r} is not a UTF-8 text file (JSONL expected)") from None
        rows = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpecCascadeError(f"{self.path}:{i + 1}: not a JSON line ({e.msg}); each line is "
                                       f"{{\"input\": ..., \"reference\": ...}}") from None
            if not isinstance(row, dict) or "input" not in row or "reference" not in row:
                raise SpecCascadeError(f"{self.path}:{i + 1}: a row needs 'input' and 'reference'")
            if not isinstance(row["input"], str) or not isinstance(row["reference"], str) or not row["input"]:
                raise SpecCascadeError(f"{self.path}:{i + 1}: 'input' must be a non-empty string and 'reference' "
                                       f"a string")
            rows.append(Example(str(row.get("id", i)), row["input"], row["reference"]))
        if not rows:
            raise SpecCascadeError(f"task file {str(self.path)!r} holds no rows")
        ids = [r.id for r in rows]
        if len(set(ids)) != len(ids):
            raise SpecCascadeError(f"task file {str(self.path)!r} repeats an 'id'; ids must be unique")
        self._rows = rows
        return rows

    def describe(self):
        return f"jsonl:{self.path.name}:{self.metrics[0]}"


TASKS = {"bible_en_es": BibleTask, "jsonl": JsonlTask}


def get_task(name: str | None = None, path: str | None = None, metric: str | None = None) -> Task:
    """A task by name; ``name=None`` is ``jsonl`` when a ``path`` is given, else ``bible_en_es``.
    A file given to a task that takes none, or a metric a task does not score, is an error."""
    if name is None:
        name = "jsonl" if path is not None else "bible_en_es"
    if name not in TASKS:
        raise SpecCascadeError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    if name == "jsonl":
        if path is None:
            raise SpecCascadeError("task 'jsonl' needs a file (--task-file)")
        return JsonlTask(path, metric or "bleu")
    task = TASKS[name]()
    if path is not None:
        raise SpecCascadeError(f"task {name!r} takes no --task-file (its examples ship with speccascade); "
                               f"use --task jsonl --task-file {path}")
    if metric is not None and metric not in task.metrics:
        raise SpecCascadeError(f"task {name!r} scores {', '.join(task.metrics)}, not {metric!r}")
    return task


def batch_order(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """The indices of ``prompts`` cut into batches of ``batch_size``: sorted by length when batched
    (rows of similar length pad little), in input order at batch size 1."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if batch_size > 1 else list(range(len(prompts)))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def run_task(drafter, verifier, tokenizer, task: Task, inputs: list[str], *, method: str, alpha=None, gamma: int = 5,
             temperature: float = 0.0, batch_size: int = 1, max_new_tokens: int = 128, seed: int = 0,
             progress: bool = False, **options):
    """Decode every input of ``task`` with one method; returns (outputs in input order, summed Stats).

    Batched runs group prompts of similar length (:func:`batch_order`); the k-th batch of size B is seeded
    ``seed * 100_003 + k * B`` (its first row's place in that order).
    """
    from tqdm.auto import tqdm

    from ..api import generate
    from ..stats import Stats

    prompts = [task.encode(tokenizer, text) for text in inputs]
    outputs, total = [""] * len(prompts), Stats()
    for k, idx in enumerate(tqdm(batch_order(prompts, batch_size), desc=method, disable=not progress)):
        out = generate(drafter, verifier, [prompts[i] for i in idx], method=method, alpha=alpha, gamma=gamma,
                       temperature=temperature, max_new_tokens=max_new_tokens,
                       eos_token_id=task.eos_token_id(tokenizer),
                       seed=seed * 100_003 + k * batch_size, **options)
        for i, toks in zip(idx, out.tokens):
            outputs[i] = task.decode(tokenizer, toks)
        total.add(out.stats)
    return outputs, total


def translate_pairs(drafter, verifier, tokenizer, pairs: list[dict], *, method: str = "verifier_only", alpha=None,
                    gamma: int = 5, temperature: float = 0.0, batch_size: int = 64, max_new_tokens: int = 200,
                    seed: int = 0, progress: bool = False, **options):
    """The Spanish of each Bible pair's ``en`` (dicts with ``en`` / ``es``), in input order: :func:`run_task`
    on :class:`BibleTask`; returns (outputs, summed Stats)."""
    return run_task(drafter, verifier, tokenizer, BibleTask(), [p["en"] for p in pairs], method=method, alpha=alpha,
                    gamma=gamma, temperature=temperature, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    seed=seed, progress=progress, **options)


def score_pairs(hyps: list[str], pairs: list[dict]) -> dict[str, float]:
    """BLEU and chrF of ``hyps`` against each pair's ``es`` (:class:`BibleTask`'s metrics)."""
    return BibleTask().score(hyps, [p["es"] for p in pairs])
