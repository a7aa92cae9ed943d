"""The ``speccascade`` command line: a thin layer over the Python API.

    speccascade generate "And God said, Let there be light"        # the embedded pair, EN -> ES
    speccascade generate --drafter D --verifier V --method opt --alpha 0.3 "prompt"
    speccascade methods                                             # every method, alpha's meaning and range
    speccascade train --preset tiny --role verifier --out DIR       # reproduce a shipped model

Defaults are the API's (:data:`speccascade.api.DEFAULTS`). Bad input of any kind (arguments, paths,
devices, sweep and report files) prints one line, ``speccascade: error: ...``, and exits with 2;
settings are checked before any model loads. An unexpected failure prints one line and exits with 1
(``SPECCASCADE_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .api import DEFAULTS
from .errors import SpecCascadeError
from .models import BACKENDS
from .registry import METHODS, get_method


def _generate(args) -> int:
    from .api import check_settings, generate
    from .eval.tasks import BibleTask, Task
    from .models.loading import set_threads

    set_threads(args.threads)
    embedded = args.drafter is None and args.verifier is None
    options = {}
    if args.alpha_f is not None:
        options["alpha_f"] = args.alpha_f
    for text in args.option:
        _, key, value = parse_option(text, args.method)
        options[key] = value
    settings = dict(gamma=args.gamma, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, seed=args.seed)
    check_settings(args.method, args.alpha, **settings, **options)  # before the models load
    drafter, verifier, tok, _ = _load_pair(args)
    task = BibleTask() if (args.format or ("translate" if embedded else "raw")) == "translate" else Task()
    ids, eos = task.encode(tok, args.prompt), task.eos_token_id(tok)
    if not ids:
        raise SpecCascadeError(f"the prompt {args.prompt!r} encodes to no tokens; give some text")
    if args.backend != "dynamic":
        from .models import make_backend

        drafter = make_backend(drafter, "drafter", args.backend)
        verifier = make_backend(verifier, "verifier", args.backend)
    settings["eos_token_id"] = eos
    if args.compare:  # time both without the first call's one-off costs
        for m, a, o in ((args.method, args.alpha, options), ("verifier_only", None, {})):
            generate(drafter, verifier, [ids], method=m, alpha=a, **(settings | {"max_new_tokens": 2}), **o)
    out = generate(drafter, verifier, [ids], method=args.method, alpha=args.alpha, progress=not args.quiet,
                   **settings, **options)
    base = None
    if args.compare and args.method != "verifier_only":
        base = generate(drafter, verifier, [ids], method="verifier_only", progress=not args.quiet, **settings)
    tokens = out.tokens[0]
    text = task.decode(tok, tokens)
    if args.json:
        res = {"text": text, "tokens": tokens, "method": args.method, "alpha": out.alpha,
               "eos_token_id": out.eos_token_id, "stats": out.stats.to_dict()}
        if base is not None:
            res["verifier_only"] = {"text": task.decode(tok, base.tokens[0]), "stats": base.stats.to_dict(),
                                    "speedup_tokens_per_second": out.stats.tokens_per_second
                                    / base.stats.tokens_per_second if base.stats.tokens_per_second else None}
        print(json.dumps(res, ensure_ascii=False))
    else:
        print(text)
        spec = METHODS[args.method]
        head = [args.method] + ([f"alpha={out.alpha:g}"] if out.alpha is not None else []) \
            + ([f"gamma={args.gamma}"] if spec.kind == "speculative" else []) + [f"T={args.temperature:g}"]
        print(f"[{' '.join(head)}] {out.stats.summary(args.method, base.stats if base else None)}",
              file=sys.stderr if args.quiet else sys.stdout)
        if base is not None and base.tokens[0] != tokens:
            print(f"[verifier_only] {task.decode(tok, base.tokens[0])}", file=sys.stderr if args.quiet else sys.stdout)
    return 0


def _serve(args) -> int:
    from .server import serve

    if args.tp != 1:
        from .distributed import serve_tp

        return serve_tp(args, _load_pair)

    return serve(args, _load_pair)


def _methods(args) -> int:
    from .stats import DEFERRED_MEANINGS, deferred_meaning

    rows = []
    for name, spec in METHODS.items():
        rng = spec.alpha.describe() if spec.alpha else "-"
        default = f"{spec.alpha.default:g}" if spec.alpha else "-"
        meaning = spec.alpha.meaning if spec.alpha else "no threshold"
        extra = {k: _describe_option(v) for k, v in spec.extra.items()}
        rows.append((name, spec.kind, spec.title, spec.paper, rng, default, meaning, extra, deferred_meaning(name)))
    if args.json:
        keys = ("name", "kind", "title", "paper", "alpha_range", "alpha_default", "alpha_meaning", "options",
                "deferred_counts")
        print(json.dumps([dict(zip(keys, r)) for r in rows], indent=2))
        return 0
    print(f"{'method':14} {'kind':11} {'alpha range':13} {'default':8} meaning")
    for name, kind, title, paper, rng, default, meaning, extra, _ in rows:
        more = "; options: " + "; ".join(f"{k} = {v}" for k, v in extra.items()) if extra else ""
        print(f"{name:14} {kind:11} {rng:13} {default:8} {title} ({paper}): {meaning}{more}")
    print("\nThe stats line of `speccascade generate`: tokens emitted, wall time and tokens/s; verifier and drafter "
          "calls (a speculative\nblock is gamma + 1 drafter calls and 1 verifier call); for methods that draft "
          "(speculative ones, bild): drafts proposed,\naccepted (acceptance rate = accepted / proposed), rejected, "
          "discarded after a rejection; 'deferred' counts:")
    print(f"  speculative methods: {DEFERRED_MEANINGS['speculative']}")
    for name in ("token_cascade", "oracle_diff", "seq_cascade", "bild"):
        print(f"  {name}: {DEFERRED_MEANINGS[name]}")
    print("  verifier_only, drafter_only: not counted. `generate --compare` adds the speed-up against verifier_only.")
    return 0


def _describe_option(spec) -> str:
    if hasattr(spec, "low"):  # an AlphaRange
        meaning = f": {spec.meaning}" if spec.meaning else ""
        return f"a number in {spec.describe()} (default {spec.default:g}){meaning}"
    return spec.describe() + (f": {spec.meaning}" if getattr(spec, "meaning", "") else "")


def _train(args) -> int:
    from .models.loading import TOKENIZER_DIR, check_device
    from .train.trainer import check_feature_args, check_train_args, preset_arch, train

    roles = ["drafter", "verifier"] if args.role == "both" else [args.role]
    if args.features and args.role == "both":
        raise SpecCascadeError("--features trains a drafter that reads its verifier's states: give --role drafter")
    if args.teacher is not None and args.role == "both":
        raise SpecCascadeError("--teacher distils one model from a trained one: give --role drafter")
    for role in roles:
        preset = check_train_args(args.preset, role, args.epochs, args.minutes, args.arch)
        check_feature_args(args.features, role, preset_arch(preset), args.teacher, args.feature_regression,
                           args.feature_unroll)
    check_device(args.device, "model to train")
    if args.tokenizer is not None and not (args.tokenizer.is_dir() or
                                           (args.tokenizer.suffix == ".gguf" and args.tokenizer.is_file())):
        raise SpecCascadeError(f"--tokenizer {str(args.tokenizer)!r} is not a folder or a .gguf file (give the folder "
                               f"that holds tokenizer.json, or the .gguf file of the model given to --init-from; an "
                               f"existing empty folder gets a newly trained tokenizer)")
    tok_dir = args.tokenizer or TOKENIZER_DIR
    _check_out_dir(args.out, "--out")
    for role in roles:
        out = args.out / role if args.role == "both" else args.out
        log = train(preset, role, out, Path(tok_dir), device=args.device, seed=args.seed,
                    epochs=args.epochs, max_minutes=args.minutes, train_file=args.train_file,
                    sources=None if args.sources is None else _sources(args.sources),
                    teacher=args.teacher, distill_weight=args.distill_weight, batch_size=args.batch_size,
                    lr=args.lr, init_from=args.init_from, ema_decay=args.ema_decay, compile=args.compile,
                    intermediate=args.intermediate, features=args.features,
                    feature_regression=args.feature_regression, dropout=args.dropout,
                    label_smoothing=args.label_smoothing, feature_unroll=args.feature_unroll)
        print(json.dumps({k: log.get(k) for k in ("preset", "arch", "role", "params", "steps", "train_seconds",
                                                  "best")}))
    return 0


def _sources(text: str) -> tuple[str, ...]:
    """``--sources kjv,web`` -> ("kjv", "web") (checked where they are used)."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _distill(args) -> int:
    from .models import make_backend
    from .models.loading import load_causal_lm, load_tokenizer
    from .train.distill import distill
    from .train.trainer import check_sources

    if args.limit is not None and args.limit < 1:
        raise SpecCascadeError(f"--limit must be >= 1, got {args.limit}")
    sources = check_sources(_sources(args.sources))   # before the model loads
    dtype = getattr(__import__("torch"), args.dtype)
    model = load_causal_lm(args.verifier, device=args.device, dtype=dtype)
    backend = make_backend(model, "verifier", args.backend) if args.backend != "dynamic" else model
    summary = distill(backend, load_tokenizer(args.tokenizer or args.verifier), args.out,
                      temperatures=args.temperatures, limit=args.limit, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, seed=args.seed, with_references=args.with_references,
                      progress=not args.quiet, sources=sources)
    print(json.dumps(summary))
    return 0


def _check_out_dir(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise SpecCascadeError(f"{flag} {str(path)!r} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpecCascadeError(f"cannot create the {flag} folder {str(path)!r}: {e.strerror or e}") from None


def _load_pair(args):
    from .distributed import check_tp, init_tp, load_tp_verifier, mark_tp, tp_uses_fused
    from .models.loading import (
        TOKENIZER_DIR,
        TOKENIZER_FILES,
        check_device,
        check_model_path,
        embedded_pair_dirs,
        load_causal_lm,
        load_tokenizer,
    )

    tp = check_tp(getattr(args, "tp", 1), args.device, getattr(args, "backend", "dynamic"),
                  getattr(args, "command", "generate"))
    dev = check_device(args.device, "drafter and verifier (--device)")
    tok_path, tok_role = args.tokenizer, "--tokenizer"
    if args.drafter is None and args.verifier is None:
        d_path, v_path = embedded_pair_dirs(args.pair)
        if tok_path is None:
            tok_path, tok_role = TOKENIZER_DIR, "embedded tokenizer"
    elif args.drafter is None or args.verifier is None:
        raise SpecCascadeError("give both --drafter and --verifier, or neither (the embedded pair)")
    else:
        d_path, v_path = Path(args.drafter), Path(args.verifier)
    # cheap checks first (no weights read), so that the first problem reported is the first one
    check_model_path(d_path, "drafter")
    check_model_path(v_path, "verifier")
    if tok_path is None:
        tok_path, tok_role = v_path, "verifier's tokenizer"
        if v_path.is_dir() and not any((v_path / f).is_file() for f in TOKENIZER_FILES):
            raise SpecCascadeError(f"the verifier folder {str(v_path)!r} has no tokenizer files (tokenizer.json, "
                                   f"tokenizer_config.json, ...) and no --tokenizer was given; pass --tokenizer DIR "
                                   f"with the folder that holds the tokenizer both models share")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    tokenizer = load_tokenizer(tok_path, role=tok_role)  # cheap: fail before the models load
    # --tp with the fused backend: every rank loads the whole verifier; its backend keeps the rank's shard
    fused_tp = tp_uses_fused(v_path, tp, getattr(args, "backend", "dynamic"))
    if tp > 1:
        init_tp(args.device)
        dev = check_device(args.device, "drafter and verifier (--device)")
    drafter = load_causal_lm(d_path, device=dev, dtype=dtype, role="drafter")
    if fused_tp:   # the whole verifier on the host; each rank's backend copies its shard to its device
        verifier = mark_tp(load_causal_lm(v_path, device="cpu", dtype=dtype, role="verifier"), tp, dev)
    elif tp == 1:
        verifier = load_causal_lm(v_path, device=dev, dtype=dtype, role="verifier")
    else:
        verifier = load_tp_verifier(v_path, tp, dev, dtype)
    return drafter, verifier, tokenizer, (str(d_path), str(v_path))


def parse_alphas(text: str | None, methods: list[str] | None = None) -> dict[str, list]:
    """``"chow=0,0.5;opt=-1,0,1"`` -> {"chow": [0.0, 0.5], "opt": [-1.0, 0.0, 1.0]}, every value
    checked against its method's range; an unknown method, a method that takes no alpha or is not
    swept (``methods``), a value that is not a number or out of range is an error."""
    out = {}
    if text is None:
        return out
    example = "e.g. --alphas 'chow=0,0.5;opt=-1,0,1'"
    for part in text.split(";"):
        if not part.strip():
            continue
        name, eq, values = part.partition("=")
        name = name.strip()
        if not eq:
            raise SpecCascadeError(f"--alphas: {part.strip()!r} is not METHOD=A,B,...; {example}")
        spec = METHODS.get(name)
        if spec is None:
            raise SpecCascadeError(f"--alphas: unknown method {name!r}; choose among {', '.join(METHODS)}")
        if spec.alpha is None:
            raise SpecCascadeError(f"--alphas: method {name!r} takes no alpha")
        if methods is not None and name not in methods:
            raise SpecCascadeError(f"--alphas: {name!r} is not among the swept methods ({', '.join(methods)})")
        if name in out:
            raise SpecCascadeError(f"--alphas names {name!r} twice; give all its values at once: {name}=A,B,C")
        raw = [v.strip() for v in values.split(",")]
        if not any(raw) or not all(raw):
            raise SpecCascadeError(f"--alphas: {part.strip()!r} has an empty value; {example}")
        out[name] = [spec.alpha.parse(name, v) for v in raw]
    if not out:
        raise SpecCascadeError(f"--alphas {text!r} gives no grid; {example}")
    return out


def parse_option(text: str, method: str | None = None) -> tuple[str, str, object]:
    """``"seq_cascade.length_normalized=true"`` (or ``"length_normalized=true"`` with ``method``
    given) -> (method, key, value); the value is read by the option's typed spec (true/false,
    an integer, a number, none). Unknown methods or options, and ill-typed values, are clear errors."""
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
    key = name.strip()
    if key not in spec.extra:
        raise SpecCascadeError(f"--option {text!r}: method {method!r} has no option {key!r}; "
                               f"it takes {sorted(spec.extra) or 'none'}")
    return method.strip(), key, spec.extra[key].parse(method.strip(), raw, key)


def _sweep(args) -> int:
    from .eval.sweep import SweepConfig, check_out_file, run_sweep
    from .eval.tasks import get_task
    from .models.loading import set_threads

    set_threads(args.threads)
    methods = (list(METHODS) if args.methods.strip() == "all"
               else [m.strip() for m in args.methods.split(",") if m.strip()])
    if not methods:
        raise SpecCascadeError(f"--methods {args.methods!r} names no method; give names separated by commas, or 'all'")
    for m in methods:
        get_method(m)
    options = {}
    if args.alpha_f is not None:
        if "bild" not in methods:
            raise SpecCascadeError("--alpha-f is BiLD's fallback threshold, but bild is not among the swept methods")
        options["bild"] = {"alpha_f": args.alpha_f}
    for text in args.option:
        method, key, value = parse_option(text)
        if method not in methods:
            raise SpecCascadeError(f"--option {text!r}: {method!r} is not among the swept methods")
        options.setdefault(method, {})[key] = value
    cfg = SweepConfig(methods=methods, alphas=parse_alphas(args.alphas, methods), gammas=args.gammas,
                      temperatures=args.temperatures, seeds=args.seeds, batch_sizes=args.batch_sizes,
                      n_examples=args.examples, max_new_tokens=args.max_new_tokens, options=options)
    cfg.validate()
    task = get_task(args.task, args.task_file, args.metric)
    available = len(task.load())  # reads (and checks) a task file before the models load
    if cfg.n_examples is not None and cfg.n_examples > available:
        raise SpecCascadeError(f"--examples {cfg.n_examples} is more than the {available} examples of task "
                               f"{task.describe()}; give at most {available}")
    if args.warm_up_only:
        from .eval.sweep import warm_up_grid

        if args.workers != 1 or args.tp != 1:
            raise SpecCascadeError("--warm-up-only runs in one process: drop --workers / --tp")
        drafter, verifier, tok, _ = _load_pair(args)
        n = warm_up_grid(drafter, verifier, tok, task, cfg, args.backend)
        print(f"warmed up the shapes of {n} cells (nothing timed or written)")
        return 0
    if args.out is None:
        raise SpecCascadeError("sweep needs --out FILE.jsonl (the records are appended there)")
    check_out_file(args.out)
    if args.workers != 1 or args.tp != 1:
        from .distributed import sweep_scaled_out

        return sweep_scaled_out(args, cfg, task, _load_pair)
    drafter, verifier, tok, names = _load_pair(args)
    records = run_sweep(drafter, verifier, tok, task, cfg, args.out, names=names, progress=not args.quiet,
                        backend=args.backend)
    cells = [r for r in records if r.get("type") == "cell"]
    print(f"{len(cells)} cells in {args.out} ({len(cfg.cells())} in this grid)")
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


def _pair_args(p: argparse.ArgumentParser, prompt_format: bool = False) -> None:
    """Which two models (generate, serve, sweep): checkpoints or the embedded pair."""
    p.add_argument("--drafter", help="drafter checkpoint directory or .gguf file (default: the embedded pair)")
    p.add_argument("--verifier", help="verifier checkpoint directory or .gguf file")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the verifier's)")
    p.add_argument("--pair", default="tiny", help="embedded pair to use when no models are given")
    if prompt_format:
        p.add_argument("--format", choices=["translate", "raw"],
                       help="prompt format (default: translate for the embedded pair: the prompt is English text)")


def _model_args(p: argparse.ArgumentParser) -> None:
    """Where and how the two models run (generate and sweep)."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model weights' dtype (bfloat16 on a GPU)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel verifier over N GPUs: launch with torchrun --nproc-per-node N "
                        "(docs/scale-out.md; --backend fused: our sharded Llama step, captured; dynamic: "
                        "transformers' sharding; auto: fused for Llama-family verifiers)")
    p.add_argument("--backend", default="dynamic", choices=BACKENDS,
                   help="fused = Llama-family and T5 models with the whole speculative block captured as one "
                        "CUDA graph (the GPU fast path; eager on a CPU); fused_eager = the same without "
                        "torch.compile (no compile time; for large batches or short jobs); auto = fused where "
                        "it applies (T5: on CUDA; other encoder-decoders: seq2seq); compiled / "
                        "graphs = transformers' static cache with per-call CUDA graphs. The GPU paths compile "
                        "and capture first, so they pay off over long or repeated generation")


class _Parser(argparse.ArgumentParser):
    """argparse with speccascade's error line (``speccascade: error: ...``, exit 2); subcommands'
    parsers are of this class too."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"speccascade: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="speccascade", description="Faster cascades via speculative decoding.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="decode a prompt with a drafter and a verifier")
    g.add_argument("prompt")
    _pair_args(g, prompt_format=True)
    g.add_argument("--method", default=DEFAULTS.method, choices=list(METHODS),
                   help=f"decoding method (default {DEFAULTS.method}; see `speccascade methods`)")
    g.add_argument("--alpha", type=float, default=DEFAULTS.alpha,
                   help="the method's threshold (default: the method's own; see `speccascade methods`)")
    g.add_argument("--alpha-f", type=float, default=None, help="BiLD's fallback threshold")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. length_normalized=true for seq_cascade (see `speccascade methods`)")
    g.add_argument("--gamma", type=int, default=DEFAULTS.gamma, help=f"draft block size (default {DEFAULTS.gamma})")
    g.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                   help=f"0 = greedy (default {DEFAULTS.temperature:g}); 0 < T < 1e-4 is refused")
    g.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help="0 = off")
    g.add_argument("--top-p", type=float, default=DEFAULTS.top_p, help="1 = off")
    g.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens,
                   help=f"default {DEFAULTS.max_new_tokens}; a row also stops at the tokenizer's EOS token")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed)
    _model_args(g)
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0, the default: torch's default)")
    g.add_argument("--compare", action="store_true",
                   help="also decode with verifier_only (same settings and seed) and print the speed-up")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--quiet", action="store_true", help="no progress bar; stats to stderr")
    g.set_defaults(fn=_generate)

    from .server.config import add_serve_arguments

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the 'serve' extra; docs/server.md)")
    _pair_args(sv, prompt_format=True)
    add_serve_arguments(sv)
    _model_args(sv)
    sv.set_defaults(fn=_serve)

    m = sub.add_parser("methods", help="list every method with its threshold's meaning and range")
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=_methods)

    s = sub.add_parser("sweep", help="run the cost-quality sweep; appends one JSONL record per cell (resumable)")
    s.add_argument("--task", default=None, help="bible_en_es (the default) or jsonl (the default with --task-file)")
    s.add_argument("--task-file", help="JSONL file of {input, reference} rows (task 'jsonl')")
    s.add_argument("--metric", default=None,
                   help="metric of a jsonl task: bleu, chrf, rouge1/2/L, exact_match, token_f1")
    _pair_args(s)
    s.add_argument("--methods", default="all", help="comma-separated names or 'all'")
    s.add_argument("--alphas", default=None, help="per-method grids, e.g. 'chow=0,0.5;opt=-1,0,1' (default: built-in)")
    s.add_argument("--alpha-f", type=float, default=None, help="BiLD's fallback threshold")
    s.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method option for its cells, e.g. seq_cascade.length_normalized=true (repeatable)")
    s.add_argument("--gammas", type=int, nargs="+", default=[5])
    s.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    s.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="each sampled cell once per seed (T = 0 runs the first only: greedy draws nothing); "
                        "the report pools a cell's seeds")
    s.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    s.add_argument("--examples", type=int, default=200, help="examples of the task (>= 1; default 200)")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--out", type=Path, default=None, help="JSONL file (appended to; resumed); required "
                   "unless --warm-up-only")
    _model_args(s)
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default)")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="spread the cells over N worker processes (GPU i each with --device cuda; on a CPU each "
                        "with --threads threads), merged into --out (docs/scale-out.md)")
    s.add_argument("--warm-up-only", action="store_true",
                   help="compile and capture every shape of the grid, then exit (fills torch's compile caches "
                        "for a later sweep of models of the same shapes); writes nothing")
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

    from .train.trainer import ARCHS, DEFAULT_PRESETS, PRESETS

    t = sub.add_parser("train", help="train a preset's drafter and/or verifier on the Bible EN->ES pairs")
    t.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="the recipes (default: the architecture's, " + ", ".join(
                       f"{a}: {p}" for a, p in DEFAULT_PRESETS.items()) + ")")
    t.add_argument("--arch", default=None, choices=list(ARCHS),
                   help="llama (decoder-only; the default) or t5 (encoder-decoder); default: the preset's")
    t.add_argument("--role", default="both", choices=["drafter", "verifier", "both"])
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory, or a pretrained model's .gguf file (default: the shipped one)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=float, default=None)
    t.add_argument("--minutes", type=float, default=None, help="wall-clock cap per model")
    t.add_argument("--train-file", type=Path, default=None,
                   help="JSONL rows {en, es} to train on instead of the training split (`speccascade distill`)")
    t.add_argument("--sources", default=None,
                   help="English sides of the training verses, comma-separated: kjv (King James), web (World "
                        "English Bible); default: the preset's (deep's verifier: kjv,web)")
    t.add_argument("--teacher", type=Path, default=None,
                   help="a trained verifier to distil from (same tokenizer): the loss adds KL(p_teacher || q)")
    t.add_argument("--distill-weight", type=float, default=None,
                   help="weight of the distillation term in [0, 1] (default: the recipe's, else 0.5)")
    t.add_argument("--batch-size", type=int, default=None,
                   help="sequences per optimisation step, over all data-parallel ranks (default: the recipe's)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    t.add_argument("--init-from", type=Path, default=None,
                   help="a trained model as wide as this one (e.g. the verifier, for a drafter): its embeddings, "
                        "final norm and first layers start this model")
    t.add_argument("--intermediate", type=int, default=None,
                   help="the feed-forward (MLP) width, replacing the recipe's; with --init-from at least the "
                        "source's (its units come first, the others start with zero output)")
    t.add_argument("--dropout", type=float, default=None,
                   help="the residual dropout, replacing the recipe's (e.g. 0.1 to fine-tune a pretrained --init-from)")
    t.add_argument("--label-smoothing", type=float, default=None,
                   help="the training loss's label smoothing, replacing the recipe's (e.g. 0.1, the "
                        "verifiers'; 0: none)")
    t.add_argument("--ema-decay", type=float, default=None,
                   help="also keep an exponential moving average of the weights with this decay (e.g. 0.998); "
                        "each evaluation saves the better of the trained and the averaged weights")
    t.add_argument("--features", action="store_true",
                   help="with --role drafter --teacher VERIFIER: train an EAGLE-style feature drafter, which reads "
                        "the verifier's last hidden state of the position before beside each token (as wide as "
                        "the verifier: e.g. --init-from it; runs in the speculative loop only)")
    t.add_argument("--feature-regression", type=float, default=None, metavar="W",
                   help="with --features: the weight of the regression of the drafter's last hidden state onto "
                        "the verifier's at the same position (EAGLE's; default 1.0; 0: none)")
    t.add_argument("--feature-unroll", type=int, default=0, metavar="K",
                   help="with --features: also train the block's next K drafts as the loop makes them, each "
                        "reading the drafter's own state of the position before (EAGLE-3's training-time test; "
                        "default 0: the first draft only, on the verifier's states)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer, and the teacher's (Llama presets), after a compile "
                        "that counts against --minutes; on an H200 it did not pay for the deep pair (verifier "
                        "steps 0.64x eager, the drafter's no faster); on another machine: benchmarks/train_step.py")
    t.set_defaults(fn=_train)

    x = sub.add_parser("distill", help="write a verifier's own translations of the training sources (for a drafter)")
    x.add_argument("--verifier", type=Path, required=True, help="the verifier's checkpoint directory")
    x.add_argument("--out", type=Path, required=True, help="JSONL file to write (.gz: gzip)")
    x.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0],
                   help="one pass over the sources per value; a value given k times: k samples (seeds SEED..SEED+k-1)")
    x.add_argument("--limit", type=int, default=None, help="only the first N training verses of each source")
    x.add_argument("--sources", default="kjv",
                   help="English sides of the training verses to translate, comma-separated: kjv (King James), "
                        "web (World English Bible)")
    x.add_argument("--with-references", action="store_true", help="write the reference pairs too")
    x.add_argument("--batch-size", type=int, default=256)
    x.add_argument("--max-new-tokens", type=int, default=200)
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: the verifier's)")
    _model_args(x)
    x.add_argument("--quiet", action="store_true")
    x.set_defaults(fn=_distill)
    return ap


def main(argv=None) -> int:
    """Run the command line; returns the exit status: 0, 2 for bad input (``speccascade: error: ...``
    on stderr, never a traceback), 1 for an unexpected failure (its one-line description; set
    SPECCASCADE_TRACEBACK=1 for the traceback), 130 when interrupted."""
    args = build_parser().parse_args(argv)
    rc = _run(args)
    from .distributed import shutdown

    shutdown(exit_code=rc)   # under torchrun (--tp): the process group's teardown, bounded in time
    return rc


def _run(args) -> int:
    import os

    try:
        return args.fn(args)
    except SpecCascadeError as e:
        print(f"speccascade: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("speccascade: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an environment failure: one line, not a traceback
        if os.environ.get("SPECCASCADE_TRACEBACK"):
            raise
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"speccascade: error: unexpected {type(e).__name__}{where}: {first}"
              f" (set SPECCASCADE_TRACEBACK=1 to see where; please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
