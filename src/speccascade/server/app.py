"""The HTTP layer: FastAPI routes over one :class:`~.engine.Engine`, and ``speccascade serve``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``. Handlers validate, enqueue and wait or stream; the engine's one
decode loop owns the models. Every refusal is an OpenAI-style error body
``{"error": {"message", "type", "param", "code"}}``: 400 for bad requests (malformed JSON and
wrong types included), 404 for an unknown model or route, 503 while draining, 500 for a failure of
the decode itself (the server keeps serving).

Shutdown: on SIGTERM (or SIGINT) the server drains: new requests get 503, queued and running
requests get ``--drain-timeout`` seconds to finish (then running rows end at their next block with
finish reason ``abort`` and queued ones get 503), then uvicorn exits. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import SpecCascadeError
from .engine import Engine, Row, combine
from .protocol import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    chat_response,
    completion_response,
    error_body,
    new_id,
    sse,
    usage,
    validation_message,
)

log = logging.getLogger("speccascade.server")
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _CountRequests:
    """ASGI middleware: count answered requests by route and status (pure ASGI, so a client's
    disconnect still reaches a streaming response)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in ROUTES else "other", str(status["code"])).inc()


def _unsupported(body) -> None:
    if body.n != 1:
        raise RequestError(f"n={body.n}: only n = 1 is supported (send a list of prompts instead)", "n")
    if body.presence_penalty or body.frequency_penalty:
        raise RequestError("presence_penalty and frequency_penalty are not supported", "presence_penalty")
    if body.logit_bias:
        raise RequestError("logit_bias is not supported", "logit_bias")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise RequestError("echo is not supported", "echo")
        if body.logprobs is not None:
            raise RequestError("logprobs are not supported", "logprobs")
        if body.best_of not in (None, 1):
            raise RequestError("best_of is not supported", "best_of")
        if body.suffix:
            raise RequestError("suffix is not supported", "suffix")
    elif body.logprobs or body.top_logprobs:
        raise RequestError("logprobs are not supported", "logprobs")


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise RequestError(f"stop takes at most 4 strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise RequestError("a stop string is empty", "stop")
    return stops


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(engine: Engine) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="speccascade", version=engine.info.get("version") or "0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.add_middleware(_CountRequests, metrics=engine.metrics)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param, code = validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=400)

    @app.exception_handler(RequestError)
    async def _refused(request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(SpecCascadeError)
    async def _spec_error(request, exc: SpecCascadeError):
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    def check_model(model: str | None) -> None:
        if model is not None and model != engine.model_name:
            raise RequestError(f"model {model!r} is not served here; this server serves {engine.model_name!r}",
                               "model", status=404, code="model_not_found")

    async def run(request: Request, body, prompts: list[list[int]], chat: bool):
        rid = new_id("chatcmpl" if chat else "cmpl")
        max_tokens = body.max_tokens
        if chat and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        settings = engine.settings_for(body, max_tokens)
        engine.check_lengths(prompts, settings)
        stop = _stops(body.stop)
        t0 = time.perf_counter()
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        if body.stream:
            events: asyncio.Queue = asyncio.Queue()
            rows = engine.submit(rid, prompts, settings, stop, events)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(engine, rows, events, rid, chat, include_usage, t0, endpoint),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        rows = engine.submit(rid, prompts, settings, stop, None)
        watcher = asyncio.ensure_future(_disconnected(request))
        results = asyncio.ensure_future(asyncio.gather(*(r.done for r in rows)))
        try:
            await asyncio.wait({watcher, results}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not results.done():   # the client went away
            engine.cancel(rows)
            await results
            return Response(status_code=499)
        out = results.result()
        failed = next((r for r in out if r is not None and r.error is not None), None)
        if failed is not None:
            return JSONResponse(failed.error.body(), status_code=failed.error.status)
        engine.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return JSONResponse(_response(engine, rid, rows, chat))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine.check_open()
        check_model(body.model)
        _unsupported(body)
        return await run(request, body, engine.encode_prompts(body.prompt), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        engine.check_open()
        check_model(body.model)
        _unsupported(body)
        return await run(request, body, [engine.encode_chat(body.messages)], chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": created,
                                            "owned_by": "speccascade", **engine.info}]}

    @app.get("/health")
    async def health():
        body = {"status": "draining" if engine.draining else "ok", "queue": len(engine.pending),
                "running": len(engine.running)}
        return JSONResponse(body, status_code=503 if engine.draining else 200)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=engine.metrics.content_type)

    return app


def _choice(row: Row, chat: bool) -> dict:
    r = row.result
    extra = {"token_ids": r.tokens, "speculation": r.speculation}
    if chat:
        return {"index": row.index, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                "finish_reason": r.finish_reason, **extra}
    return {"index": row.index, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason, **extra}


def _usage(rows: list[Row]) -> dict:
    return usage(sum(r.result.prompt_tokens for r in rows), sum(len(r.result.tokens) for r in rows),
                 combine([r.result.speculation for r in rows]))


def _response(engine: Engine, rid: str, rows: list[Row], chat: bool) -> dict:
    build = chat_response if chat else completion_response
    return build(rid, engine.model_name, [_choice(r, chat) for r in rows], _usage(rows))


async def _stream(engine: Engine, rows: list[Row], events: asyncio.Queue, rid: str, chat: bool, include_usage: bool,
                  t0: float, endpoint: str):
    """Server-sent events in OpenAI's chunk format, ``data: [DONE]`` last. A client that goes
    away cancels this generator, which cancels its rows (and only its rows)."""
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        out = {"id": rid, "object": obj, "created": created, "model": engine.model_name, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    try:
        if chat:
            for row in rows:
                yield sse(chunk(row.index, None, None, role=True))
        left = len(rows)
        while left:
            index, kind, payload = await events.get()
            if kind == "delta":
                yield sse(chunk(index, payload, None))
            elif kind == "end":
                left -= 1
                yield sse(chunk(index, None if chat else "", payload.finish_reason))
            else:  # error
                left -= 1
                yield sse(payload.error.body())
        if all(r.result is not None and r.result.error is None for r in rows):
            engine.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            if include_usage:
                yield sse({"id": rid, "object": obj, "created": created, "model": engine.model_name, "choices": [],
                           "usage": _usage(rows)})
        yield sse("[DONE]")
    finally:
        engine.cancel([r for r in rows if not r.finished])


# ---------------------------------------------------------------------------------------------
# running it


def _uvicorn_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, but SIGTERM / SIGINT drain the engine first (new requests get 503
        meanwhile) and then exit; a second signal exits at once."""

        def __init__(self, config, engine: Engine, drain_timeout: float):
            super().__init__(config)
            self.engine, self.drain_timeout = engine, drain_timeout
            self._draining = False

        def handle_exit(self, sig, frame) -> None:
            if self._draining or self.engine.loop is None:
                self.should_exit = True
                self.force_exit = self._draining
                return
            self._draining = True
            self.engine.begin_drain()
            self.engine.loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            asyncio.ensure_future(self._drain())

        async def _drain(self) -> None:
            try:
                clean = await self.engine.drain(self.drain_timeout)
                log.info("drained (%s)", "all requests finished" if clean else "deadline reached")
            finally:
                self.should_exit = True

    return DrainingServer


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
                log_level: str = "info"):
    """A uvicorn server for ``engine`` (call ``.run()``), with draining on SIGTERM."""
    import uvicorn

    config = uvicorn.Config(create_app(engine), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout + 15, lifespan="on")
    return _uvicorn_server_class()(config, engine, drain_timeout)


class ServerThread:
    """A server in a background thread (tests, benchmarks): ``start()`` waits until it listens."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0, drain_timeout: float = 30.0,
                 log_level: str = "warning"):
        if port == 0:
            import socket

            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.engine, self.host, self.port = engine, host, port
        self.server = make_server(engine, host, port, drain_timeout, log_level)
        self.thread = threading.Thread(target=self.server.run, name="speccascade-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def drain(self) -> None:
        """What SIGTERM does."""
        import signal

        self.server.handle_exit(signal.SIGTERM, None)

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def build_engine(args, load_pair) -> Engine:
    """The engine ``speccascade serve`` runs, from its arguments (``load_pair``: cli._load_pair)."""
    import torch

    import speccascade

    from ..eval.tasks import BibleTask, Task
    from ..models import make_backend
    from .calibration import Calibration
    from .engine import Defaults

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    calibration = Calibration.load(args.calibration) if args.calibration else None
    for name, value, low in (("--gamma", args.gamma, 1), ("--max-tokens", args.max_tokens, 1),
                             ("--max-batch-size", args.max_batch_size, 1), ("--max-prompts", args.max_prompts, 1)):
        if value < low:
            raise SpecCascadeError(f"{name} must be >= {low}, got {value}")
    if args.alpha is not None:
        spec = speccascade.METHODS[args.method]
        if spec.alpha is None:
            raise SpecCascadeError(f"--method {args.method} takes no --alpha")
        spec.alpha.check(args.method, args.alpha)
    embedded = args.drafter is None and args.verifier is None
    drafter, verifier, tok, names = load_pair(args)
    task = BibleTask() if (args.format or ("translate" if embedded else "raw")) == "translate" else Task()
    d, v = make_backend(drafter, "drafter", args.backend), make_backend(verifier, "verifier", args.backend)
    from pathlib import Path

    model_name = args.model_name or (f"speccascade-{args.pair}" if embedded else Path(names[1]).name)
    info = {"drafter": names[0], "verifier": names[1], "backend": args.backend, "device": str(args.device),
            "dtype": args.dtype, "format": task.name, "version": speccascade.__version__,
            "defaults": {"method": args.method, "alpha": args.alpha, "gamma": args.gamma,
                         "temperature": args.temperature, "max_tokens": args.max_tokens},
            "methods": list(speccascade.METHODS), "calibration": str(args.calibration) if args.calibration else None}
    return Engine(d, v, tok, task, model_name=model_name, max_batch_size=args.max_batch_size,
                  batch_wait_s=args.batch_wait_ms / 1000.0, max_prompts=args.max_prompts, calibration=calibration,
                  pad_batches=args.backend != "dynamic", info=info,
                  defaults=Defaults(method=args.method, alpha=args.alpha, gamma=args.gamma,
                                    temperature=args.temperature, max_tokens=args.max_tokens))


def serve(args, load_pair) -> int:
    """``speccascade serve``: load the pair, then serve until SIGTERM (drained) or SIGINT."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = build_engine(args, load_pair)
    print(f"speccascade: serving {engine.model_name} on http://{args.host}:{args.port} "
          f"(default method {args.method}, gamma {args.gamma}; backend {args.backend} on {args.device})", flush=True)
    make_server(engine, args.host, args.port, args.drain_timeout, args.log_level).run()
    return 0
