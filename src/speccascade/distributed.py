"""Beyond one GPU (issue 17): a tensor-parallel verifier (``--tp N``) and the dispatch of scaled-out
sweeps (``--workers N``, :mod:`.eval.parallel`).

Tensor parallelism
------------------
``--tp N`` (``generate``, ``sweep``, ``serve``) splits the verifier over N processes started by
``torchrun --nproc-per-node N``, one per GPU::

    torchrun --nproc-per-node 2 -m speccascade generate --tp 2 --backend fused --device cuda \
        --dtype bfloat16 --drafter D --verifier V "prompt"

Each rank holds a shard of the verifier and the *whole* drafter, and runs the same decoding loop
with the same seed (the verifier's logits come out whole on every rank, so every rank draws the
same tokens); rank 0 alone prints (``generate``), writes ``--out`` (``sweep``; the other ranks
write a scratch copy that is thrown away) or listens for HTTP requests (``serve``: it sends each
batch it decodes to the other ranks, which decode it with it). With ``--device cuda`` rank *r*
uses ``cuda:LOCAL_RANK``; on a CPU the ranks talk over gloo (slow: for tests).

Two ways to shard the verifier, by ``--backend``:

* ``fused`` (Llama-family verifiers: llama, qwen2, mistral; the fast path; :func:`tp_uses_fused`,
  :func:`mark_tp`): every rank loads the *whole* verifier onto its device and
  :class:`~speccascade.models.fused.FusedLlamaBackend` keeps the rank's Megatron-style shard
  (q/k/v heads and gate/up columns split by rank, o_proj and down_proj rows split, one all-reduce
  after attention and one after the MLP per layer; embeddings and LM head whole). The all-reduces
  run inside the step, so on CUDA the whole speculative block, collectives included, is one
  captured CUDA graph per replay, as at ``--tp 1``. The KV-head count and the MLP width must
  divide by N (an error names the counts). Memory: each rank loads the whole transformers model
  on the *host* (``sweep`` reads its weight fingerprint there) and its backend copies only what it
  keeps to the rank's GPU: its 1/N shard of the layers, and the embeddings, norms and LM head whole;
  so the layers need not fit one GPU (the host needs the whole model once per rank).
* ``dynamic`` (the CLI's default backend; :func:`load_tp_verifier`): transformers' own tensor
  parallelism (``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))``, the
  model's ``base_model_tp_plan``), eager;
  any model type that has a plan in the installed transformers. Slow (measured at half of
  ``--tp 1``'s speed on two GPUs); kept as the reference and for non-Llama verifiers.
* ``auto``: ``fused`` when the verifier's config is Llama-family, else ``dynamic``.

The drafter is whole on every rank (its backend as ``--backend`` gives it: fused for a Llama-family
drafter with ``fused`` / ``auto``). The static / compiled / graphs backends are refused with
``--tp``: they pre-allocate a cache from the config's full head counts. A non-Llama-family verifier
with ``--backend fused --tp N`` is refused naming its type; under ``dynamic`` / ``auto``, models
without a tensor-parallel plan in the installed transformers (``config.base_model_tp_plan``) are
refused, naming the model type, and so are encoder-decoder verifiers (the ``seq2seq`` backend).
``--tp`` and ``--workers`` do not combine (yet).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
from pathlib import Path

from .checks import as_int
from .errors import DeviceError, SpecCascadeError

#: the backends that take a tensor-parallel (sharded) verifier: transformers' sharding (dynamic) or
#: the fused backend's own (fused; auto picks fused for a Llama-family verifier, else dynamic)
TP_BACKENDS = ("dynamic", "fused", "auto")


def world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) without it."""
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
                int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise SpecCascadeError("RANK / LOCAL_RANK / WORLD_SIZE must be integers (set by torchrun)") from None


def rank() -> int:
    return world()[0]


def check_tp(tp, device="cpu", backend: str = "dynamic", command: str = "generate") -> int:
    """Check a ``--tp`` request before anything loads; returns N. Errors name the fix: a launch
    without torchrun, a world size other than N, more ranks than GPUs, a backend that cannot take
    a sharded model."""
    n = as_int("--tp", tp, minimum=1)
    if n == 1:
        return 1
    if backend not in TP_BACKENDS:
        raise SpecCascadeError(f"--tp {n} needs --backend {', '.join(TP_BACKENDS[:-1])} or {TP_BACKENDS[-1]}: the "
                               f"{backend!r} backend cannot take a sharded verifier (static, compiled and graphs size "
                               f"their cache from the full head counts; seq2seq is for encoder-decoders)")
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise SpecCascadeError(f"--tp {n} runs one process per GPU: launch with torchrun --nproc-per-node {n} -m "
                               f"speccascade {command} --tp {n} ... (WORLD_SIZE / RANK are not set)")
    _, local, size = world()
    if size != n:
        raise SpecCascadeError(f"--tp {n} under a launch of {size} processes: give torchrun --nproc-per-node {n} "
                               f"(one process per tensor-parallel rank)")
    dev = str(device).strip()
    if dev.startswith("cuda"):
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n > have:
            raise DeviceError(f"--tp {n} is more than the {have} CUDA GPU(s) of this machine; give --tp {have} or "
                              f"fewer" if have else f"--tp {n} with --device {dev}: this machine has no CUDA GPU "
                              f"that torch can use (use --device cpu to try tensor parallelism over gloo)")
        if dev not in ("cuda", f"cuda:{local}"):
            raise DeviceError(f"--tp {n}: give --device cuda (rank r uses cuda:LOCAL_RANK), not {dev}")
    elif dev != "cpu":
        raise DeviceError(f"--tp {n} runs on --device cuda (or cpu over gloo), not {dev!r}")
    return n


def init_tp(device="cpu") -> None:
    """Start torch.distributed for this rank (nccl on CUDA, gloo on a CPU) and bind its GPU; ranks
    other than 0 get a silent stdout."""
    import torch
    import torch.distributed as dist

    r, local, size = world()
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=r, world_size=size,
                                device_id=torch.device("cuda", local) if cuda else None)
        atexit.register(shutdown)   # at a normal exit (else NCCL warns of leaked resources)
    if r != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


#: seconds the process group's teardown may take before the process exits without it
SHUTDOWN_TIMEOUT_S = 20.0


def shutdown(timeout_s: float | None = None, exit_code: int = 0) -> None:
    """Tear the process group down, in at most ``timeout_s`` seconds (:data:`SHUTDOWN_TIMEOUT_S`).

    On two H200s, ``destroy_process_group`` after a run whose NCCL all-reduces were captured in CUDA
    graphs never returned (the results were written; the processes hung until killed: PyTorch issue
    115388, a hang in ``ncclCommDestroy`` after graph capture of NCCL operations). So the
    teardown runs in a daemon thread: if it has not returned in time, this says so on stderr,
    flushes, and ends the process with ``exit_code`` (``os._exit``: every result is written by then).
    """
    import threading

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    done = threading.Thread(target=dist.destroy_process_group, daemon=True, name="speccascade-shutdown")
    done.start()
    wait = SHUTDOWN_TIMEOUT_S if timeout_s is None else timeout_s
    done.join(wait)
    if done.is_alive():
        print(f"speccascade: the process group's teardown did not end in {wait:g} s; "
              f"exiting without it (every result is written)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exit_code)


def check_tp_plan(path, role: str = "verifier") -> None:
    """The model at ``path`` has a tensor-parallel plan in the installed transformers."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if getattr(cfg, "is_encoder_decoder", False):
        raise SpecCascadeError(f"--tp takes a causal LM {role}; {str(path)!r} is an encoder-decoder "
                               f"({cfg.model_type}, the seq2seq backend): run it with --tp 1")
    if not getattr(cfg, "base_model_tp_plan", None):
        import transformers

        raise SpecCascadeError(f"--tp: the {role} ({cfg.model_type}, {str(path)!r}) has no tensor-parallel plan in "
                               f"transformers {transformers.__version__} (its config's base_model_tp_plan is empty); "
                               f"run it with --tp 1, or use a model type that has one (llama, mistral, qwen2, ...)")


def tp_uses_fused(path, tp: int, backend: str, role: str = "verifier") -> bool:
    """Whether ``--tp tp --backend backend`` shards the verifier at ``path`` with the fused backend
    (``fused``; ``auto`` for a Llama-family config), from its config alone (no weights read, no
    process group needed). Errors: ``fused`` with a model it does not implement (naming the type),
    head counts or an MLP width that do not divide by ``tp`` (naming them)."""
    if tp == 1 or backend not in ("fused", "auto"):
        return False
    from transformers import AutoConfig

    from .models.fused import check_tp_shape, unsupported_reason

    try:
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception:  # noqa: BLE001 - a .gguf file or an unreadable config: the loaders name the problem
        return False
    if getattr(cfg, "is_encoder_decoder", False):
        if backend == "fused":
            raise SpecCascadeError(f"--tp {tp} --backend fused: the {role} ({cfg.model_type}, {str(path)!r}) is an "
                                   f"encoder-decoder; the tensor-parallel fused backend is for Llama-family causal LMs")
        return False
    reason = unsupported_reason(cfg, role)
    if reason:
        if backend == "fused":
            raise SpecCascadeError(f"--tp {tp} --backend fused: {reason} ({str(path)!r}); give --backend dynamic "
                                   f"(transformers' tensor parallelism) or auto")
        return False
    check_tp_shape(cfg, tp, role)
    return True


def mark_tp(model, tp: int, device=None):
    """Mark a whole (unsharded) verifier to be sharded ``tp`` ways by the fused backend
    (:func:`speccascade.models.make_backend` reads the mark; ``sweep`` records it as the run's
    ``tp``), the shard placed on ``device`` (default: the model's own; the CLI loads the whole
    verifier on the host and gives each rank's GPU)."""
    model.speccascade_tp = int(tp)
    if device is not None:
        model.speccascade_device = device
    return model


def load_tp_verifier(path, tp: int, device, dtype):
    """The verifier sharded over the ``tp`` ranks (this rank's part on ``device``)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from .errors import ModelLoadError
    from .models.loading import _first_line, _quiet_transformers, check_model_path

    path, gguf = check_model_path(path, "verifier")
    if gguf:
        raise SpecCascadeError("--tp needs a Hugging Face checkpoint folder for the verifier, not a .gguf file")
    check_tp_plan(path)
    if str(device).startswith("cpu") and torch.cuda.is_available():
        # transformers (5.x) shards onto the machine's accelerator whenever torch sees one, whatever the
        # process group: its shard would land on a GPU beside a drafter on the CPU
        raise DeviceError(f"--tp {tp} --device cpu on a machine with a CUDA GPU: transformers' tensor parallelism "
                          f"shards the verifier onto the GPUs whenever torch sees one; give --device cuda, or hide "
                          f"the GPUs (CUDA_VISIBLE_DEVICES=) to run the ranks over gloo on the CPU")
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                         distributed_config=DistributedConfig(tp_size=tp))
    except Exception as e:  # noqa: BLE001 - transformers / torch.distributed raise many kinds
        raise ModelLoadError(f"could not load the verifier from {str(path)!r} with --tp {tp}: {type(e).__name__}: "
                             f"{_first_line(e)}") from None
    del torch
    return model.eval()


def sweep_scaled_out(args, cfg, task, load_pair) -> int:
    """``speccascade sweep`` with ``--workers N`` (:mod:`.eval.parallel`) or ``--tp N``."""
    from .eval.sweep import run_sweep

    workers = as_int("--workers", args.workers, minimum=1)
    tp = as_int("--tp", args.tp, minimum=1)
    if workers > 1 and tp > 1:
        raise SpecCascadeError("--workers and --tp do not combine yet: give one of them")
    if workers > 1:
        from .eval.parallel import run_parallel_sweep

        if world()[2] > 1:
            raise SpecCascadeError(f"sweep --workers {workers} starts its own worker processes: run it without "
                                   f"torchrun (torchrun is for --tp)")

        load = {k: getattr(args, k) for k in ("drafter", "verifier", "tokenizer", "pair", "device", "dtype")}
        records = run_parallel_sweep(load, (args.task, args.task_file, args.metric), cfg, args.out, workers,
                                     threads=args.threads, backend=args.backend, progress=not args.quiet)
    else:
        check_tp(tp, args.device, args.backend, "sweep")
        drafter, verifier, tok, names = load_pair(args)
        import torch.distributed as dist

        out = Path(args.out)
        if rank() != 0:  # the same cells as rank 0 (a copy of its file), written to a scratch file
            dist.barrier()
            scratch = out.with_name(f".{out.name}.rank{rank()}")
            if out.exists():
                shutil.copyfile(out, scratch)
            else:
                scratch.unlink(missing_ok=True)
            dist.barrier()
            out = scratch
        else:
            dist.barrier()  # rank 0's file is not written before every rank has copied it
            dist.barrier()
        try:
            records = run_sweep(drafter, verifier, tok, task, cfg, out, names=names,
                                progress=not args.quiet and rank() == 0, backend=args.backend)
        finally:
            if rank() != 0:
                out.unlink(missing_ok=True)
                Path(str(out) + ".torn").unlink(missing_ok=True)
        dist.barrier()
    cells = [r for r in records if r.get("type") == "cell"]
    print(f"{len(cells)} cells in {args.out} ({len(cfg.cells())} in this grid)")
    return 0


# --------------------------------------------------------------------------------------------
# serve --tp N: rank 0 serves; every batch it decodes is sent to the other ranks, which decode it too


def _control_group():
    """A gloo group for the serve loop's messages, with no practical timeout (the other ranks wait
    for the next request as long as the server is idle)."""
    from datetime import timedelta

    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(days=365))


def _bcast(obj, group):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class _LeaderStreamer:
    """Rank 0's streamer: the server's, whose per-block ``stop_rows`` (cancelled requests, stop
    strings, per-row limits) is also sent to the other ranks, so every rank stops the same rows at
    the same block."""

    def __init__(self, inner, group):
        self.inner, self.group = inner, group
        self.wants_tokens = getattr(inner, "wants_tokens", True)
        if hasattr(inner, "record"):
            self.record = inner.record

    def put(self, new):
        self.inner.put(new)

    def end(self):
        self.inner.end()

    def stop_rows(self):
        rows = self.inner.stop_rows() if hasattr(self.inner, "stop_rows") else []
        return _bcast(list(rows), self.group)


class _FollowerStreamer:
    """The other ranks' streamer: rank 0's stop decisions, nothing streamed."""

    wants_tokens = False

    def __init__(self, group):
        self.group = group

    def put(self, new):
        pass

    def end(self):
        pass

    def stop_rows(self):
        return _bcast(None, self.group)


def serve_tp(args, load_pair) -> int:
    """``speccascade serve --tp N`` under torchrun: rank 0 runs the HTTP server; ranks > 0 follow."""
    from .server import serve

    check_tp(args.tp, args.device, args.backend, "serve")
    init_tp(args.device)
    group = _control_group()  # every rank, before the collectives of loading
    if rank() == 0:
        from .server import engine as engine_module

        real = engine_module.generate

        def generate(drafter, verifier, prompts, **kw):
            streamer = kw.pop("streamer", None)
            _bcast({"prompts": prompts, "kw": kw, "streamer": streamer is not None}, group)
            if streamer is not None:
                kw["streamer"] = _LeaderStreamer(streamer, group)
            return real(drafter, verifier, prompts, **kw)

        engine_module.generate = generate
        try:
            return serve(args, load_pair)
        finally:
            engine_module.generate = real
            _bcast(None, group)  # the other ranks stop
    from .api import generate
    from .models import make_backend

    drafter, verifier, _, _ = load_pair(args)
    d, v = make_backend(drafter, "drafter", args.backend), make_backend(verifier, "verifier", args.backend)
    while True:
        call = _bcast(None, group)
        if call is None:
            return 0
        kw = call["kw"]
        if call["streamer"]:
            kw["streamer"] = _FollowerStreamer(group)
        try:
            generate(d, v, call["prompts"], **kw)
        except SpecCascadeError:
            pass  # rank 0 met the same error (checked before decoding) and answers the request
