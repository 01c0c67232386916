"""`qwen2vl serve`: an OpenAI-compatible HTTP API (FastAPI on uvicorn) over one loaded ModelSession.

POST /v1/chat/completions (plain and server-sent events), GET /v1/models, GET /health. Safe to share:
loopback by default (any other address needs an API key); JSON bodies only, with a Host the server
answers to (no cross-site requests, no DNS rebinding); bodies, prompts, media counts and pixels bounded;
a full queue answers 429 with Retry-After; URLs are fetched only as --allow-fetch or
--allowed-media-domains allow, and local files only below --allowed-local-media-path; every bad request
gets a 4xx with an OpenAI-style error body, and a client that goes away stops its generation."""


import asyncio
import dataclasses
import hmac
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections import deque

from .. import __version__
from ..errors import (ExitStatus, Qwen2VLError, ServerError, debug_enabled, describe_exception,
                      ending_promptly)
from ..render import error
from ..types import Completion, TextDelta
from ..engine.scheduler import median_ms
from ..engine.session import ModelSession
from . import registry
from .registry import PROOF_HEADER, proof
from .protocol import (MediaPolicy, RequestError, chunk_body, completion_body, error_body, new_id, parse_chat_request,
                       usage_body)
from ..transport import SIZED_HEADER, TOO_LONG
from .config import ServerConfig
from .worker import Job, joined, start_job

CHARS_PER_TOKEN_BOUND = 32  # a prompt of more characters than this many per allowed token is refused untokenized


def host_name(header: str) -> str:
    """'example.com:8901' -> 'example.com'; '[::1]:8901' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """Pure ASGI middleware, before any route: the Host header, the API key, a JSON Content-Type on POST,
    and the body size (413 before it is read whole)."""

    def __init__(self, app, config: ServerConfig) -> None:
        self.app, self.limit, self.key, self.hosts = app, config.max_body, config.api_key, config.hosts()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        refusal = self._refusal(scope, headers)
        if refusal:
            return await _send_json(send, refusal.status, refusal.body())
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
            return await _send_json(send, 413, self._too_large().body())

    def _refusal(self, scope, headers: dict) -> RequestError | None:
        if self.hosts is not None and host_name(headers.get(b"host", b"").decode("latin-1")) not in self.hosts:
            return RequestError("this server does not answer to that Host (serve --allowed-hosts)", status=421,
                                code="misdirected_request")
        if self.key and scope["path"] != "/health":  # /health says more only with the key (below)
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.key}".encode()):
                return RequestError("missing or wrong API key", status=401, code="invalid_api_key",
                                    kind="authentication_error")
        if scope["method"] == "POST":
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                return RequestError("the request body must be JSON (Content-Type: application/json)", status=415,
                                    code="unsupported_media_type")
        declared = headers.get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.limit:
            return self._too_large()
        return None

    def _too_large(self) -> RequestError:
        return RequestError(f"request body over {self.limit} bytes (--max-body-size)", status=413,
                            code="request_too_large")


class _TooLarge(Exception):
    pass


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


def create_app(config: ServerConfig, session: ModelSession, token: str = ""):
    """The FastAPI application (no model work happens on the event loop). `token` is this session's secret:
    /health proves it holds it (an HMAC of the client's challenge) without revealing it."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="qwen2vl", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, config=config)
    engine = session.engine
    max_prompt = min(config.max_prompt_tokens or session.context or 32768, session.context or 32768)
    policy = MediaPolicy(config.limits, config.allowed_local, config.max_images, config.max_videos, max_prompt)
    started = time.time()
    phases: deque = deque(maxlen=256)  # recent requests: (body read, admitted: parsed, media decoded, tokens counted)
    delivered: deque = deque(maxlen=256)  # recent streams: their first text piece's wait for the loop

    def timings_ms() -> dict:
        """The engine's phases with the server's own before and after them (medians, ms)."""
        recent = list(phases)
        return {**engine.timings_ms(), "read": median_ms([p[0] for p in recent]),
                "admit": median_ms([p[1] for p in recent]), "deliver": median_ms(list(delivered))}

    @app.exception_handler(RequestError)
    async def request_error(_, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", str(exc.status_code)),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        message, status = describe_exception(exc)
        print(f"qwen2vl serve: {message}", file=sys.stderr, flush=True)  # the server's log has the details
        if status == ExitStatus.ERROR and "out of memory" not in message:
            message = "internal error (the server's log says more)"  # no paths or internals to clients
        return JSONResponse(error_body(message, "server_error", "internal_error"), status_code=500)

    def weights_line() -> str | None:
        """The session's own --verbose line (weights, the path that answers, the load's phases), for a client's
        --verbose; None while unloaded (--keep-alive), or when an unload lands in the middle of it."""
        try:
            return session.describe_weights() if session.model is not None else None
        except AttributeError:
            return None

    @app.get("/health")
    async def health(request: Request):
        """Liveness and identity (pid, and an HMAC of the client's challenge) for anyone; the facts for
        holders of the key."""
        answer: dict = {"status": "ok", "pid": os.getpid()}
        challenge = request.headers.get(PROOF_HEADER)
        if challenge and token:
            answer["proof"] = proof(token, challenge)
        given = request.headers.get("authorization", "").encode()
        if config.api_key and not hmac.compare_digest(given, f"Bearer {config.api_key}".encode()):
            return answer
        return {**answer, "model": config.model_name, "device": session.device or config.spec.device,
                "version": __version__, "settings": config.spec.settings(), "resolved": session.resolved,
                "loaded": session.model is not None, "busy": engine.busy, "running": engine.running,
                "queued": engine.queued, "max_queue": config.max_queue, "idle_s": round(engine.idle_s, 1),
                "started": started,
                "timings_ms": timings_ms(), "load_s": round(session.load_s, 2),
                "load_phases_s": {name: round(seconds, 2) for name, seconds in session.phases.items()},
                "weights": weights_line()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": int(started),
                                             "owned_by": "qwen2vl", "max_model_len": session.context}]}

    def admit(body, as_sent: bool):
        """Parse, resolve media, and check the prompt's size (on a worker thread: tokenizing takes time)."""
        parsed = parse_chat_request(body, config.model_name, dataclasses.replace(policy, as_sent=as_sent))
        if parsed.characters > CHARS_PER_TOKEN_BOUND * max_prompt:
            raise RequestError(f"the prompt is {parsed.characters} characters, far over this server's limit of "
                               f"{max_prompt} tokens (--max-prompt-tokens)", param="messages", code=TOO_LONG)
        tokens = session.prompt_tokens(parsed.request)
        if tokens > max_prompt:
            raise RequestError(f"the prompt is {tokens} tokens, over this server's limit of {max_prompt} "
                               "(--max-prompt-tokens)", param="messages", code=TOO_LONG)
        try:
            session.check_context([parsed.request], [tokens])
        except Qwen2VLError as exc:
            raise RequestError(exc.reason, param="max_tokens", code=TOO_LONG) from None
        return parsed

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        received = time.perf_counter()
        if engine.queued + engine.running >= config.max_queue:
            raise RequestError(f"the server is busy ({config.max_queue} requests waiting; --max-queue)", status=429,
                               code="queue_full", kind="rate_limit_error",
                               headers={"Retry-After": str(engine.retry_after_s())})
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError):
            raise RequestError("the request body is not valid JSON") from None
        except RecursionError:  # thousands of nested brackets
            raise RequestError("the request body is nested too deeply") from None
        read = time.perf_counter()
        parsed = await run_in_threadpool(admit, body, request.headers.get(SIZED_HEADER) == "1")
        if parsed.n > config.max_queue:
            raise RequestError(f"n={parsed.n} is over this server's queue of {config.max_queue} (--max-queue)",
                               param="n")
        if parsed.n > 1 and engine.queued + engine.running + parsed.n > config.max_queue:
            raise RequestError(f"the server is busy (room for fewer than n={parsed.n} requests; --max-queue)",
                               status=429, code="queue_full", kind="rate_limit_error",
                               headers={"Retry-After": str(engine.retry_after_s())})
        jobs = [start_job(engine, choice, parsed.stream) for choice in parsed.choices()]
        phases.append((read - received, jobs[0].ticket.submitted - read))
        request_id = new_id()
        if parsed.stream:
            return StreamingResponse(_sse(jobs, request_id, config.model_name, parsed.include_usage, delivered.append),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        ends = await _answers_or_gone(jobs, request)
        failed = [end for end in ends if isinstance(end, BaseException)]
        if failed:
            raise _as_request_error(failed[0])
        return completion_body(request_id, config.model_name, ends)

    return app


async def _answers_or_gone(jobs: list[Job], request, poll_s: float = 0.25) -> list:
    """Each job's one event (a request not streamed gets no text pieces, only its end), or on the first failure
    that failure (the others cancelled); if the client disconnects first, every job is cancelled (its generation
    stops)."""
    waiting = [asyncio.ensure_future(job.events()) for job in jobs]
    try:
        while True:
            done, _ = await asyncio.wait(waiting, timeout=poll_s)
            failed = [future.result()[-1] for future in done if isinstance(future.result()[-1], BaseException)]
            if failed or len(done) == len(waiting):
                if failed:
                    for job in jobs:
                        job.cancel()
                return failed or [future.result()[-1] for future in waiting]
            if await request.is_disconnected():
                raise asyncio.CancelledError()
    except BaseException:
        for job, future in zip(jobs, waiting):
            job.cancel()
            future.cancel()
        raise


def _as_request_error(exc: BaseException) -> Exception:
    if isinstance(exc, Qwen2VLError):
        return RequestError(str(exc))
    return exc


async def _sse(jobs: list[Job], request_id: str, model: str, include_usage: bool, delivered=None):
    """Server-sent events in OpenAI's chunk format (each choice's chunks with its index), one per wake of the loop
    (the text that came meanwhile together); a client that goes away cancels every choice's generation."""
    created = int(time.time())
    ends: dict[int, Completion] = {}

    def frame(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def frames(event, index: int) -> str:
        if isinstance(event, TextDelta):
            return frame(chunk_body(request_id, model, created, {"content": event.text}, index=index))
        if isinstance(event, Completion):
            ends[index] = event
            return frame(chunk_body(request_id, model, created, {}, event.finish_reason, index=index))
        message, _ = describe_exception(event)
        return frame(error_body(message, "server_error", "generation_failed"))

    waiting = {asyncio.ensure_future(job.events()): index for index, job in enumerate(jobs)}
    try:
        yield "".join(frame(chunk_body(request_id, model, created, {"role": "assistant", "content": ""}, index=index))
                      for index in range(len(jobs)))
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if delivered is not None and jobs[0].first_text_at is not None:
                delivered(time.perf_counter() - jobs[0].first_text_at)
                delivered = None
            out = []
            for future in sorted(done, key=waiting.get):
                index = waiting.pop(future)
                events = joined(future.result())
                out += [frames(event, index) for event in events]
                if isinstance(events[-1], BaseException):  # a failed choice ends the response
                    yield "".join(out) + "data: [DONE]\n\n"
                    return
                if isinstance(events[-1], TextDelta):
                    waiting[asyncio.ensure_future(jobs[index].events())] = index
            yield "".join(out)
        usage = chunk_body(request_id, model, created, {}, usage=usage_body([ends[i] for i in range(len(jobs))]))
        yield (frame(usage) if include_usage else "") + "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancel()
        for future in waiting:
            future.cancel()


def run_server(config: ServerConfig, on_ready=None, loading=None, sock: socket.socket | None = None) -> None:
    """Bind (or take `sock`, bound by a starter), load the model, record the session for discovery, serve until
    SIGINT/SIGTERM."""
    import uvicorn

    sock = sock or config.listen()
    port = sock.getsockname()[1]
    registry.state_folder()  # where the session will be recorded: one that cannot be used is an error before the load
    import contextlib

    with loading or contextlib.nullcontext():
        session = ModelSession(config.spec).load()
    session.engine.keep_alive_s, session.engine.serving = config.keep_alive_s, True
    token = secrets.token_hex(16)
    shown_host = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{'127.0.0.1' if config.host in ('0.0.0.0', '::') else shown_host}:{port}"
    server = uvicorn.Server(uvicorn.Config(create_app(config, session, token), log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    try:
        registry.write_state({"pid": os.getpid(), "url": url, "host": config.host, "port": port, "token": token,
                              "model": config.model_name, "device": session.device, "started": time.time(),
                              **({"api_key": config.api_key} if config.private else {})})
    except OSError as exc:  # a full disk, say: unrecorded, `stop` could not find it nor a starting command see it
        raise ServerError(str(registry.state_dir()), f"cannot record this session ({exc.strerror})") from None
    # uvicorn re-raises the signal it stopped on once it has shut down: with the default SIGTERM action the
    # process would die there, before the cleanup below; as SystemExit(0) it unwinds through it: a clean stop
    previous = signal.signal(signal.SIGTERM, _terminated)
    if config.exit_when_idle and config.keep_alive_s is not None:
        threading.Thread(target=_exit_when_idle, args=(server, session.engine, config.keep_alive_s),
                         name="qwen2vl-idle", daemon=True).start()
    try:
        if on_ready:
            on_ready(url, session)
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        session.engine.close()
        registry.remove_state(os.getpid())


def run_launched() -> None:
    """The entry of a session a command started (registry.Launched): its ServerConfig comes pickled on stdin (no
    command line to parse again, no CLI to import: the load starts sooner); a failure is one line in its log
    and the exit code, as the CLI's."""
    import pickle
    import traceback

    config = pickle.loads(sys.stdin.buffer.read())
    told = int(os.environ.pop(registry.READY_FD))
    sock = socket.socket(fileno=int(os.environ.pop(registry.SOCKET_FD)))  # bound and listening: its starter's
    with ending_promptly():
        try:  # told once it is recorded: the starter's /health waits in the socket's queue for uvicorn
            run_server(config, on_ready=lambda url, session: registry.signal_ready(told), sock=sock)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the process's one error boundary
            if debug_enabled():
                traceback.print_exc()
            message, status = describe_exception(exc)
            error(message)
            sys.exit(int(status))


def _exit_when_idle(server, engine, keep_alive_s: float) -> None:
    """A session a command started ends itself after keep_alive_s without requests (as `stop` would)."""
    while not server.should_exit:
        time.sleep(min(1.0, keep_alive_s / 4))
        if not engine.busy and engine.idle_s >= keep_alive_s:
            server.should_exit = True


def _terminated(signum, frame):
    raise SystemExit(0)
