"""The ``speccascade`` command line: a thin layer over the Python API.

    speccascade generate "And God said, Let there be light"        # the embedded pair, EN -> ES
    speccascade generate --drafter D --verifier V --method opt --alpha 0.3 "prompt"
    speccascade methods                                             # every method, alpha's meaning and range
    speccascade train --preset tiny --role verifier --out DIR       # reproduce a shipped model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import NonFiniteLogitsError, SpecCascadeError
from .models.hf import BACKENDS
from .registry import METHODS


def _generate(args) -> int:
    import torch

    from .api import generate
    from .eval.tasks import BibleTask, Task

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    embedded = args.drafter is None and args.verifier is None
    drafter, verifier, tok, _ = _load_pair(args)
    task = BibleTask() if (args.format or ("translate" if embedded else "raw")) == "translate" else Task()
    ids, eos = task.encode(tok, args.prompt), task.eos_token_id(tok)
    options = {}
    if args.alpha_f is not None:
        options["alpha_f"] = args.alpha_f
    for text in args.option:
        _, key, value = parse_option(text, args.method)
        options[key] = value
    if args.backend != "dynamic":
        from .models import make_backend

        drafter, verifier = make_backend(drafter, "drafter", args.backend), make_backend(verifier, "verifier", args.backend)
    out = generate(drafter, verifier, [ids], method=args.method, alpha=args.alpha, gamma=args.gamma,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   max_new_tokens=args.max_new_tokens, eos_token_id=eos, seed=args.seed,
                   progress=not args.quiet, **options)
    tokens = out.tokens[0]
    text = task.decode(tok, tokens)
    if args.json:
        print(json.dumps({"text": text, "tokens": tokens, "method": args.method, "alpha": out.alpha,
                          "stats": out.stats.to_dict()}, ensure_ascii=False))
    else:
        print(text)
        print(f"[{args.method} alpha={out.alpha} gamma={args.gamma} T={args.temperature}] {out.stats.summary()}",
              file=sys.stderr if args.quiet else sys.stdout)
    return 0


def _serve(args) -> int:
    from .server import serve

    return serve(args, _load_pair)


def _methods(args) -> int:
    rows = []
    for name, spec in METHODS.items():
        rng = spec.alpha.describe() if spec.alpha else "-"
        default = f"{spec.alpha.default:g}" if spec.alpha else "-"
        meaning = spec.alpha.meaning if spec.alpha else "no threshold"
        extra = {k: (v.describe() if hasattr(v, "describe") else v) for k, v in spec.extra.items()}
        rows.append((name, spec.kind, spec.title, spec.paper, rng, default, meaning, extra))
    if args.json:
        keys = ("name", "kind", "title", "paper", "alpha_range", "alpha_default", "alpha_meaning", "options")
        print(json.dumps([dict(zip(keys, r)) for r in rows], indent=2))
        return 0
    print(f"{'method':14} {'kind':11} {'alpha range':13} {'default':8} meaning")
    for name, kind, title, paper, rng, default, meaning, extra in rows:
        more = f"; options {extra}" if extra else ""
        print(f"{name:14} {kind:11} {rng:13} {default:8} {title} ({paper}): {meaning}{more}")
    return 0


def _train(args) -> int:
    from .train.trainer import train

    from .models.loading import TOKENIZER_DIR

    tok_dir = args.tokenizer or TOKENIZER_DIR
    roles = ["drafter", "verifier"] if args.role == "both" else [args.role]
    for role in roles:
        out = args.out / role if args.role == "both" else args.out
        log = train(args.preset, role, out, Path(tok_dir), device=args.device, seed=args.seed,
                    epochs=args.epochs, max_minutes=args.minutes)
        print(json.dumps({k: log.get(k) for k in ("preset", "role", "params", "steps", "train_seconds", "best")}))
    return 0


def _load_pair(args):
    from .models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm, load_tokenizer

    tok_path = args.tokenizer
    if args.drafter is None and args.verifier is None:
        d_path, v_path = embedded_pair_dirs(args.pair)
        tok_path = tok_path or TOKENIZER_DIR
    elif args.drafter is None or args.verifier is None:
        raise SpecCascadeError("give both --drafter and --verifier, or neither (the embedded pair)")
    else:
        d_path, v_path = Path(args.drafter), Path(args.verifier)
    import torch

    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    drafter = load_causal_lm(d_path, device=args.device, dtype=dtype)
    verifier = load_causal_lm(v_path, device=args.device, dtype=dtype)
    return drafter, verifier, load_tokenizer(tok_path or v_path), (str(d_path), str(v_path))


def parse_alphas(text: str | None) -> dict[str, list]:
    """``"chow=0,0.5;opt=-1,0,1"`` -> {"chow": [0.0, 0.5], "opt": [-1.0, 0.0, 1.0]}."""
    out = {}
    for part in filter(None, (text or "").split(";")):
        name, _, values = part.partition("=")
        out[name.strip()] = [float(v) for v in values.split(",") if v.strip()]
    return out


def parse_option(text: str, method: str | None = None) -> tuple[str, str, object]:
    """``"seq_cascade.length_normalized=true"`` (or ``"length_normalized=true"`` with ``method``
    given) -> (method, key, value); the value is read as JSON (true, 3, 0.5, null), else kept as a
    string. Unknown methods or options are a clear error."""
    name, eq, raw = text.partition("=")
    if not eq:
        raise SpecCascadeError(f"--option takes {'KEY' if method else 'METHOD.KEY'}=VALUE, got {text!r}")
    if method is None:
        method, dot, name = name.partition(".")
        if not dot:
            raise SpecCascadeError(f"--option takes METHOD.KEY=VALUE, got {text!r}")
    spec = METHODS.get(method.strip())
    if spec is None:
        raise SpecCascadeError(f"--option {text!r}: unknown method {method!r}")
    if name.strip() not in spec.extra:
        raise SpecCascadeError(f"--option {text!r}: method {method!r} has no option {name.strip()!r}; "
                               f"it takes {sorted(spec.extra) or 'none'}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return method.strip(), name.strip(), value


def _sweep(args) -> int:
    import torch

    from .eval.sweep import SweepConfig, run_sweep
    from .eval.tasks import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task, args.task_file, args.metric)
    methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    options = {}
    if args.alpha_f is not None:
        options["bild"] = {"alpha_f": args.alpha_f}
    for text in args.option:
        method, key, value = parse_option(text)
        if method not in methods:
            raise SpecCascadeError(f"--option {text!r}: {method!r} is not among the swept methods")
        options.setdefault(method, {})[key] = value
    cfg = SweepConfig(methods=methods, alphas=parse_alphas(args.alphas), gammas=args.gammas,
                      temperatures=args.temperatures, seeds=args.seeds, batch_sizes=args.batch_sizes,
                      n_examples=args.examples, max_new_tokens=args.max_new_tokens, options=options)
    drafter, verifier, tok, names = _load_pair(args)
    records = run_sweep(drafter, verifier, tok, task, cfg, args.out, names=names, progress=not args.quiet,
                        backend=args.backend)
    print(f"{sum(r.get('type') == 'cell' for r in records)} cells in {args.out}")
    return 0


def _report(args) -> int:
    from .eval.report import report

    what_if_costs = None
    if args.what_if:
        try:
            parts = [float(x) for x in args.what_if.split(",")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2):
            raise SpecCascadeError(f"--what-if takes C or C,B (numbers), got {args.what_if!r}")
        what_if_costs = (parts[0], parts[1] if len(parts) == 2 else 1.0)
    res = report(args.results, args.out, args.metric, what_if_costs=what_if_costs)
    print(res["text"])
    print("plots:", *res["plots"], sep="\n  ")
    return 0


DTYPES = ("float32", "bfloat16", "float16")


def _model_args(p: argparse.ArgumentParser) -> None:
    """Where and how the two models run (generate and sweep)."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model weights' dtype (bfloat16 on a GPU)")
    p.add_argument("--backend", default="dynamic", choices=BACKENDS,
                   help="compiled = static cache + torch.compile / CUDA graphs; graphs = static cache + "
                        "hand-captured CUDA graphs (a CUDA GPU; faster on small models). Both compile first, "
                        "so they pay off over long or repeated generation")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="speccascade", description="Faster cascades via speculative decoding.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="decode a prompt with a drafter and a verifier")
    g.add_argument("prompt")
    g.add_argument("--drafter", help="drafter checkpoint directory or .gguf file (default: the embedded pair)")
    g.add_argument("--verifier", help="verifier checkpoint directory or .gguf file")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the verifier's)")
    g.add_argument("--pair", default="tiny", help="embedded pair to use when no models are given")
    g.add_argument("--format", choices=["translate", "raw"], help="prompt format (default: translate for the embedded pair)")
    g.add_argument("--method", default="token_v3", choices=list(METHODS))
    g.add_argument("--alpha", type=float, default=None, help="the method's threshold (see `speccascade methods`)")
    g.add_argument("--alpha-f", type=float, default=None, help="BiLD's fallback threshold")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. length_normalized=true for seq_cascade (see `speccascade methods`)")
    g.add_argument("--gamma", type=int, default=5, help="draft block size")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--seed", type=int, default=0)
    _model_args(g)
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--quiet", action="store_true", help="no progress bar; stats to stderr")
    g.set_defaults(fn=_generate)

    from .server.config import add_serve_arguments

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the 'serve' extra; docs/server.md)")
    add_serve_arguments(sv)
    _model_args(sv)
    sv.set_defaults(fn=_serve)

    m = sub.add_parser("methods", help="list every method with its threshold's meaning and range")
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=_methods)

    s = sub.add_parser("sweep", help="run the cost-quality sweep; appends one JSONL record per cell (resumable)")
    s.add_argument("--task", default="bible_en_es")
    s.add_argument("--task-file", help="JSONL file of {input, reference} rows (task 'jsonl')")
    s.add_argument("--metric", default=None, help="metric of a jsonl task: bleu, chrf, rouge1/2/L, exact_match, token_f1")
    s.add_argument("--drafter")
    s.add_argument("--verifier")
    s.add_argument("--tokenizer")
    s.add_argument("--pair", default="tiny")
    s.add_argument("--methods", default="all", help="comma-separated names or 'all'")
    s.add_argument("--alphas", default=None, help="per-method grids, e.g. 'chow=0,0.5;opt=-1,0,1' (default: built-in)")
    s.add_argument("--alpha-f", type=float, default=None, help="BiLD's fallback threshold")
    s.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method option for its cells, e.g. seq_cascade.length_normalized=true (repeatable)")
    s.add_argument("--gammas", type=int, nargs="+", default=[5])
    s.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    s.add_argument("--seeds", type=int, nargs="+", default=[0])
    s.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    s.add_argument("--examples", type=int, default=200)
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--out", type=Path, required=True, help="JSONL file (appended to; resumed)")
    _model_args(s)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_sweep)

    r = sub.add_parser("report", help="plots, Pareto fronts, Table 2 summaries and the latency model of a sweep")
    r.add_argument("results", type=Path, nargs="+", help="sweep JSONL file(s)")
    r.add_argument("--out", type=Path, default=None, help="output folder (default: next to the results)")
    r.add_argument("--metric", default=None)
    r.add_argument("--what-if", default=None, metavar="C[,B]",
                   help="also predict every cell's relative latency from its counters with a drafter step of "
                        "C verifier steps and a block call of B verifier steps (default 1)")
    r.set_defaults(fn=_report)

    t = sub.add_parser("train", help="train a preset's drafter and/or verifier on the Bible EN->ES pairs")
    t.add_argument("--preset", default="tiny", choices=["tiny", "base", "base_deep", "base_wide"])
    t.add_argument("--role", default="both", choices=["drafter", "verifier", "both"])
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: the shipped one)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=float, default=None)
    t.add_argument("--minutes", type=float, default=None, help="wall-clock cap per model")
    t.set_defaults(fn=_train)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (SpecCascadeError, NonFiniteLogitsError) as e:
        print(f"speccascade: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
