"""RemoteSession: ModelSession's interface over any OpenAI-compatible server (qwen2vl serve, vLLM,
SGLang). Media are checked here (so errors and exit codes match the in-process path) and sent raw as
data URIs, with resolution and sampling in mm_processor_kwargs; the server resizes them exactly as the
in-process path does. Imports neither torch nor transformers."""

from __future__ import annotations

import base64
import json
import mimetypes
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from .errors import InputError, ModelLoadError, ServerError
from .session import ChatRequest, Completion, Media, TextDelta
from .sources import FetchLimits, ImageOptions, decode_image, display_name, read_source

RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
RETRIES = 4
DEFAULT_CONCURRENCY = 4


def data_uri(data: bytes, kind: str, source: str) -> str:
    mime = mimetypes.guess_type(source)[0] if not source.startswith("data:") else None
    if not mime or not mime.startswith(kind):
        mime = "image/png" if kind == "image" else "video/mp4"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class RemoteSession:
    """Answers through an OpenAI-compatible server; `load()` only checks that it is there."""

    device = "remote"
    load_s = 0.0
    model = True  # nothing to load locally

    def __init__(self, url: str, model: str, api_key: str | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                 timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.model_name = model
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout = timeout

    # ---- media ---------------------------------------------------------------------------------
    def image_media(self, source: str, options: ImageOptions, limits: FetchLimits) -> Media:
        """Read and check the image here; send its original bytes."""
        name = display_name(source)
        data = read_source(source, limits)
        image = decode_image(data, name)
        return Media("image", name, data_uri(data, "image", source),
                     facts={"width": image.size[0], "height": image.size[1]})

    def video_media(self, source: str, options, limits: FetchLimits) -> Media:
        from .video import is_frame_sequence

        name = display_name(source)
        if is_frame_sequence(source):
            raise InputError(name, "frame directories and globs are read in-process only (add --no-server)")
        return Media("video", name, data_uri(read_source(source, limits), "video", source))

    # ---- generation ----------------------------------------------------------------------------
    def load(self) -> "RemoteSession":
        return self

    def prepare(self, requests: list[ChatRequest], on_device: bool = False):
        return None

    def body(self, request: ChatRequest, stream: bool) -> dict:
        """The OpenAI request for a ChatRequest; greedy is temperature 0 (what vLLM and qwen2vl read as greedy)."""
        content = [{"type": f"{m.kind}_url", f"{m.kind}_url": {"url": m.data}} for m in request.media]
        content.append({"type": "text", "text": request.prompt})
        messages = [{"role": "system", "content": request.system}] if request.system else []
        messages.append({"role": "user", "content": content})
        options = request.generation
        body: dict = {"model": self.model_name, "messages": messages, "max_tokens": options.max_new_tokens,
                      "stream": stream, "temperature": options.temperature if options.sampling else 0.0}
        if stream:
            body["stream_options"] = {"include_usage": True}
        for key, value in (("top_p", options.top_p), ("top_k", options.top_k), ("seed", options.seed),
                           ("repetition_penalty", options.repetition_penalty)):
            if value is not None:
                body[key] = value
        if request.vision_kwargs:
            body["mm_processor_kwargs"] = request.vision_kwargs
        if request.vision_ids:
            body["add_vision_id"] = True
        return body

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _raise_for(self, response) -> None:
        if response.status_code < 400:
            return
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text.strip()[:200] or response.reason_phrase
        if response.status_code == 401:
            raise ServerError(self.url, "unauthorized: set --api-key or QWEN2VL_API_KEY")
        if response.status_code == 404 and "model" in message:
            raise ModelLoadError(self.model_name, message)
        if response.status_code in (400, 403, 413, 422):
            subject, _, reason = message.partition(": ")
            raise InputError(subject, reason) if reason else InputError(self.url, message)
        raise ServerError(self.url, f"HTTP {response.status_code}: {message}")

    def stream(self, request: ChatRequest) -> Iterator[TextDelta | Completion]:
        """Server-sent events -> TextDelta pieces, then one Completion (usage from the server)."""
        import httpx

        start = time.perf_counter()
        text, first, usage, finish = [], None, {}, "stop"
        try:
            with httpx.stream("POST", self.url + "/chat/completions", json=self.body(request, True),
                              headers=self._headers(), timeout=httpx.Timeout(self.timeout, connect=10)) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise ServerError(self.url, chunk["error"].get("message", "generation failed"))
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        finish = choice.get("finish_reason") or finish
                        if piece:
                            first = first if first is not None else time.perf_counter() - start
                            text.append(piece)
                            yield TextDelta(piece)
        except httpx.HTTPError as exc:
            raise ServerError(self.url, f"cannot reach the server ({type(exc).__name__})") from None
        yield Completion("".join(text), usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), finish,
                         first, time.perf_counter() - start)

    def complete(self, request: ChatRequest) -> Completion:
        """One non-streamed request, retried with exponential backoff on transient failures."""
        import httpx

        start = time.perf_counter()
        for attempt in range(RETRIES + 1):
            try:
                response = httpx.post(self.url + "/chat/completions", json=self.body(request, False),
                                      headers=self._headers(), timeout=httpx.Timeout(self.timeout, connect=10))
                if response.status_code not in RETRY_STATUSES or attempt == RETRIES:
                    self._raise_for(response)
                    body = response.json()
                    choice, usage = body["choices"][0], body.get("usage") or {}
                    return Completion(choice["message"]["content"] or "", usage.get("prompt_tokens", 0),
                                      usage.get("completion_tokens", 0), choice.get("finish_reason") or "stop",
                                      None, time.perf_counter() - start)
            except (httpx.TransportError, ValueError, KeyError) as exc:
                if attempt == RETRIES:
                    raise ServerError(self.url, f"no answer after {RETRIES + 1} tries ({type(exc).__name__})") from None
            time.sleep(min(30.0, 0.5 * 2 ** attempt) * (0.5 + random.random()))
        raise ServerError(self.url, "no answer")  # pragma: no cover - the loop returns or raises

    def generate_batch(self, requests: list[ChatRequest], prepared=None) -> list[Completion]:
        """Up to `concurrency` requests in flight at once."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.complete, requests))
