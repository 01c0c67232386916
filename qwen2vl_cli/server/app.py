"""`qwen2vl serve`: an OpenAI-compatible HTTP API (FastAPI on uvicorn) over one loaded ModelSession.

POST /v1/chat/completions (plain and server-sent events), GET /v1/models, GET /health. Loopback by
default; any other address needs an API key. Bodies are capped (413); local files are read only below
--allowed-local-media-path; every bad request gets a 4xx with an OpenAI-style error body."""


import asyncio
import hmac
import ipaddress
import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import Qwen2VLError, UsageError, describe_exception
from ..session import Completion, ModelSession, ModelSpec, TextDelta
from ..sources import FetchLimits
from . import registry
from .registry import DEFAULT_PORT
from .protocol import (MediaPolicy, RequestError, chunk_body, completion_body, error_body, new_id,
                       parse_chat_request, usage_body)
from .worker import GenerationWorker, Job

DEFAULT_MAX_BODY = 100 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    spec: ModelSpec
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    keep_alive_s: float | None = 600.0
    max_body: int = DEFAULT_MAX_BODY
    allowed_local: Path | None = None
    limits: FetchLimits = FetchLimits()
    served_name: str | None = None

    @property
    def model_name(self) -> str:
        return self.served_name or self.spec.model


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BodyLimit:
    """Pure ASGI middleware: a body over `limit` bytes gets 413 before it is read whole."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, self._error())
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            return await self.app(scope, limited_receive, send)
        except _TooLarge:
            return await _send_json(send, 413, self._error())

    def _error(self) -> dict:
        return error_body(f"request body over {self.limit} bytes (--max-body-size)", "invalid_request_error",
                          "request_too_large")


class _TooLarge(Exception):
    pass


async def _send_json(send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def create_app(config: ServerConfig, worker: GenerationWorker):
    """The FastAPI application (no model work happens on the event loop)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="qwen2vl", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=config.max_body)
    policy = MediaPolicy(config.limits, config.allowed_local)
    started = time.time()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if config.api_key:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {config.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return JSONResponse(error_body("missing or wrong API key", "authentication_error",
                                               "invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def request_error(_, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", str(exc.status_code)),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        return JSONResponse(error_body(describe_exception(exc)[0], "server_error", "internal_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "device": worker.session.device or config.spec.device,
                "loaded": worker.session.model is not None, "idle_s": round(worker.idle_s, 1),
                "queued": worker.queued, "pid": os.getpid(), "started": started}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": int(started),
                                             "owned_by": "qwen2vl"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError):
            raise RequestError("the request body is not valid JSON") from None
        except RecursionError:  # thousands of nested brackets
            raise RequestError("the request body is nested too deeply") from None
        parsed = await run_in_threadpool(parse_chat_request, body, config.model_name, policy)
        job = Job(parsed.request, parsed.stream, asyncio.get_running_loop())
        worker.submit(job)
        request_id = new_id()
        if parsed.stream:
            return StreamingResponse(_sse(job, request_id, config.model_name, parsed.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            event = await job.events.get()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if isinstance(event, BaseException):
            raise _as_request_error(event)
        return completion_body(request_id, config.model_name, event)

    return app


def _as_request_error(exc: BaseException) -> Exception:
    if isinstance(exc, Qwen2VLError):
        return RequestError(str(exc))
    return exc


async def _sse(job: Job, request_id: str, model: str, include_usage: bool):
    """Server-sent events in OpenAI's chunk format; a client that goes away cancels its generation."""
    created = int(time.time())

    def frame(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield frame(chunk_body(request_id, model, created, {"role": "assistant", "content": ""}))
        while True:
            event = await job.events.get()
            if isinstance(event, TextDelta):
                yield frame(chunk_body(request_id, model, created, {"content": event.text}))
            elif isinstance(event, Completion):
                yield frame(chunk_body(request_id, model, created, {}, event.finish_reason))
                if include_usage:
                    yield frame(chunk_body(request_id, model, created, {}, usage=usage_body(event)))
                break
            else:
                message, _ = describe_exception(event)
                yield frame(error_body(message, "server_error", "generation_failed"))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


def run_server(config: ServerConfig, on_ready=None, loading=None) -> None:
    """Load the model, bind, record the session for discovery, serve until SIGINT/SIGTERM."""
    import uvicorn

    if not is_loopback(config.host) and not config.api_key:
        raise UsageError(f"--host {config.host}", "binding beyond loopback needs an API key "
                                                  "(--api-key or QWEN2VL_API_KEY)")
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        raise UsageError(f"{config.host}:{config.port}", exc.strerror or str(exc)) from None
    port = sock.getsockname()[1]
    import contextlib

    with loading or contextlib.nullcontext():
        session = ModelSession(config.spec).load()
    worker = GenerationWorker(session, config.keep_alive_s)
    worker.start()
    shown_host = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{'127.0.0.1' if config.host in ('0.0.0.0', '::') else shown_host}:{port}"
    server = uvicorn.Server(uvicorn.Config(create_app(config, worker), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    registry.write_state({"pid": os.getpid(), "url": url, "host": config.host, "port": port,
                          "model": config.model_name, "device": session.device, "started": time.time()})
    # uvicorn re-raises the signal it stopped on once it has shut down: with the default SIGTERM action the
    # process would die there, before the cleanup below; as SystemExit(0) it unwinds through it: a clean stop
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        if on_ready:
            on_ready(url, session)
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        worker.stop()
        registry.remove_state(os.getpid())


def _terminated(signum, frame):
    raise SystemExit(0)
