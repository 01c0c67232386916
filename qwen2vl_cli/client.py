"""RemoteSession: ModelSession's interface over any OpenAI-compatible server (qwen2vl serve, vLLM,
SGLang). Media are read and checked here by the same code as in-process answers. A qwen2vl server (0.2 on) is
sent a photo as its own bytes and the size the model sees it at (it resizes by the same code: ~14x fewer bytes
than the pixels, and no resizing here), other images as their sized pixels (BMP); other servers get images at
their final size as lossless PNG data URIs, so that their processors leave them as they are; videos go as the
frames the model sees, in the frame-list form vLLM reads (`data:video/jpeg;base64,F1,F2,...`). No
mm_processor_kwargs are needed, so a stock vLLM answers every option exactly as in-process; vision ids go as
chat_template_kwargs. Images import neither torch nor transformers (videos need the decoders)."""

from __future__ import annotations

import base64
import io
import json
import random
import time
from typing import TYPE_CHECKING, Iterator

from .errors import ServerError, UsageError
from .transport import SIZED_HEADER, TOO_LONG, TransportError, http
from .types import ChatRequest, Completion, Media, TextDelta
from .sources import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, PATCH_FACTOR, on_grid
from .video import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
RETRIES = 4
DEFAULT_CONCURRENCY = 4  # requests in flight to a --server (anyone's: a polite few)
# to a local session (the user's own, its engine batching them): enough rows to keep its GPU busy, half of a
# session's queue (server.config.DEFAULT_MAX_QUEUE), so one-liners run meanwhile get a place and not a 429
SESSION_CONCURRENCY = 32
OWN_BYTES_SINCE = (0, 2)  # qwen2vl servers from 0.2 resize an image sent as its bytes (resized_height/width by the url)
# the forms any Pillow the server may have (>= 10, any build) decodes, and to the same pixels: not AVIF (Pillow 11.3
# on), a plugin's HEIF, TIFF (its codecs are libtiff's build), nor 16-bit or float pixels (their conversion to RGB
# has changed between Pillow versions); those go as their pixels
OWN_BYTES_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP"})
OWN_BYTES_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})
VLLM_FRAME_LIST_DEFAULT = 32  # a stock vLLM reads this many frames of a frame list (--media-io-kwargs num_frames)
# what Qwen2-VL's processors (vLLM's included) size images and video frames within by default, in tokens
IMAGE_TOKENS = (IMAGE_MIN_PIXELS // PATCH_FACTOR ** 2, IMAGE_MAX_PIXELS // PATCH_FACTOR ** 2)
VIDEO_TOKENS = (VIDEO_MIN_PIXELS // PATCH_FACTOR ** 2, VIDEO_MAX_PIXELS // PATCH_FACTOR ** 2)


def release(version) -> tuple[int, ...]:
    """(major, minor, ...) of a version string; () for none (a server that did not say)."""
    import re

    return tuple(int(part) for part in re.findall(r"\d+", version)[:3]) if isinstance(version, str) else ()


def image_data_uri(image, form: str = "PNG") -> str:
    """A lossless data URI of an RGB image: PNG (small) or BMP (no compression: ~15x quicker to make)."""
    buffer = io.BytesIO()
    image.save(buffer, form, **({"compress_level": 1} if form == "PNG" else {}))
    return f"data:image/{form.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


class RemoteSession:
    """Answers through an OpenAI-compatible server; `load()` checks that it is there and what it is."""

    device = "remote"
    load_s = 0.0

    def __init__(self, url: str, model: str, api_key: str | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                 timeout: float = 600.0, adopt: bool = False, kind: str | None = None) -> None:
        """`adopt`: no model was named (`model` is the default): where the server serves one other, use it.
        `kind`: what the server is, where that is known already (a local session that proved itself: "qwen2vl"),
        so that `load()` does not ask it again."""
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.model_name = model
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout = timeout
        self.adopt = adopt
        self.kind = kind  # set by load(): "qwen2vl" for a qwen2vl server, "openai" for any other
        # whether the server resizes an image sent as its own bytes (image_media): a local session found running
        # is this version (registry.serves); another's /health says its version
        self.own_bytes = kind == "qwen2vl"
        self._pool: ThreadPoolExecutor | None = None

    # ---- media ---------------------------------------------------------------------------------
    def image_media(self, image) -> Media:
        """A read image (sources.read_image, as in-process) as a server takes it: the sized pixels, losslessly
        (BMP to a qwen2vl server: nothing to compress; PNG to others), or to a qwen2vl server the source's own
        bytes and the size to make of them (it resizes them by the same code), where that is less work: a photo
        (OWN_BYTES_FORMATS) near the size the model sees it at (decoding it there costs about what resizing it
        here does) in fewer bytes than its pixels."""
        facts = image.facts
        tokens = facts["tokens"]
        if self.load().kind == "qwen2vl":
            width, height = image.size
            source_pixels = image.decoded.width * image.decoded.height
            # on the grid and at least 4 tokens: resized_height/width give that size back exactly (fit_size)
            if (self.own_bytes and image.decoded.format in OWN_BYTES_FORMATS and image.decoded.mode in OWN_BYTES_MODES
                    and len(image.data) < width * height * 3
                    and source_pixels <= 2 * width * height and on_grid(width, height)
                    and width * height >= IMAGE_MIN_PIXELS):
                from PIL import Image

                mime = Image.MIME.get(image.decoded.format or "", "application/octet-stream")
                return Media("image", image.name, f"data:{mime};base64,{base64.b64encode(image.data).decode()}",
                             metadata={"resized_width": width, "resized_height": height}, facts=facts)
            return Media("image", image.name, image_data_uri(image.sized(), "BMP"), facts=facts)
        notes = [] if IMAGE_TOKENS[0] <= tokens <= IMAGE_TOKENS[1] else [
            f"{image.name}: {tokens} tokens; this server's processor resizes images to {IMAGE_TOKENS[0]}-"
            f"{IMAGE_TOKENS[1]} tokens (its defaults), so the answer will differ from an in-process one"]
        return Media("image", image.name, image_data_uri(image.sized(), "PNG"), facts=facts, notes=notes)

    def video_media(self, video) -> Media:
        """A sampled video (video.resolve_video, as in-process) as a server takes it: the frames the model sees."""
        from .video import frame_list_uri

        notes = list(video.notes)
        frames, tokens = int(video.facts["frames"]), video.facts["width"] * video.facts["height"] // PATCH_FACTOR ** 2
        if self.load().kind != "qwen2vl":  # what other servers' processors do not take as sent
            if frames > VLLM_FRAME_LIST_DEFAULT:
                notes.append(f"{video.source}: sending {frames} frames; a vLLM server reads only the first "
                             f"{VLLM_FRAME_LIST_DEFAULT} unless started with --media-io-kwargs "
                             "'{\"video\": {\"num_frames\": -1}}' (or use --max-frames 32)")
            if not VIDEO_TOKENS[0] <= tokens <= VIDEO_TOKENS[1]:
                notes.append(f"{video.source}: frames of {tokens} tokens; this server's processor resizes them to "
                             f"{VIDEO_TOKENS[0]}-{VIDEO_TOKENS[1]} tokens (its defaults), so the answer will "
                             "differ from an in-process one")
        return Media("video", video.source, frame_list_uri(video.frames), facts=video.facts, notes=notes)

    # ---- generation ----------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self.kind is not None

    def load(self) -> "RemoteSession":
        """Find out once whether the server answers, and whether it is a qwen2vl server."""
        if self.kind is None:
            try:
                response = http(self.url).get(self.url[:-len("/v1")] + "/health", timeout=10, headers=self._headers())
            except TransportError as exc:
                raise ServerError(self.url, f"cannot reach the server ({exc})") from None
            try:
                facts = response.json()
            except ValueError:
                facts = None
            self.kind = "qwen2vl" if isinstance(facts, dict) and "pid" in facts else "openai"
            self.own_bytes = self.kind == "qwen2vl" and release(facts.get("version")) >= OWN_BYTES_SINCE
            if self.adopt:
                self._adopt_model()
        return self

    def describe_weights(self) -> str:
        """One --verbose line: which server answers and, a qwen2vl session, its own line (weights, the path that
        answers, the load's phases), from its /health."""
        where = self.url[:-len("/v1")]
        if self.load().kind != "qwen2vl":
            return f"answering through {where} (an OpenAI-compatible server, model {self.model_name})"
        try:
            facts = http(self.url).get(where + "/health", timeout=10, headers=self._headers()).json()
        except (TransportError, ValueError):
            facts = None
        if not isinstance(facts, dict) or "pid" not in facts:
            return f"answering through session at {where}"
        line = facts.get("weights") or ("its model is not loaded: this request loads it" if "loaded" in facts
                                        else "its weights are told to holders of its API key")
        return f"answering through session {facts['pid']} at {where}: {line}"

    def _adopt_model(self) -> None:
        """The server's model where it serves exactly one (and not the default name the request would carry)."""
        try:
            served = [m.get("id") for m in http(self.url).get(self.url + "/models", timeout=10,
                                                                headers=self._headers()).json()["data"]]
        except (TransportError, ValueError, KeyError, TypeError, AttributeError):
            return  # the request itself will say what is wrong
        if len(served) == 1 and isinstance(served[0], str) and served[0] != self.model_name:
            self.model_name = served[0]

    def prepare_one(self, request: ChatRequest):
        return None  # the server prepares

    def body(self, request: ChatRequest, stream: bool) -> dict:
        """The OpenAI request for a ChatRequest; greedy is temperature 0 (what vLLM and qwen2vl read as greedy)."""
        # an image sent as its source's bytes carries the size to make of it (image_media)
        content = [{"type": f"{m.kind}_url",
                    f"{m.kind}_url": {"url": m.data, **(m.metadata if m.kind == "image" and m.metadata else {})}}
                   for m in request.media]
        content.append({"type": "text", "text": request.prompt})
        messages = [{"role": "system", "content": request.system}] if request.system else []
        messages.append({"role": "user", "content": content})
        options = request.generation
        body: dict = {"model": self.model_name, "messages": messages, "max_tokens": options.max_new_tokens,
                      "stream": stream, "temperature": options.temperature if options.sampling else 0.0}
        if stream:
            body["stream_options"] = {"include_usage": True}
        for key, value in (("top_p", options.top_p), ("top_k", options.top_k), ("seed", options.seed),
                           ("repetition_penalty", options.repetition_penalty), ("stop", list(options.stop) or None),
                           ("frequency_penalty", options.frequency_penalty),
                           ("presence_penalty", options.presence_penalty)):
            if value is not None:
                body[key] = value
        if request.vision_ids:
            body["chat_template_kwargs"] = {"add_vision_id": True}
        return body

    def _headers(self) -> dict:
        """The key, and (read by qwen2vl servers, ignored by others) that every medium is sized already."""
        return {SIZED_HEADER: "1", **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}

    def _raise_for(self, response, request: ChatRequest) -> None:
        """A refusal is exit 6 with the server's own message; a prompt over the context (OpenAI's code for it) is
        the usage error (exit 2) the request gets in process."""
        if response.status_code < 400:
            return
        try:
            error = response.json()["error"]
            message, code = error["message"], error.get("code")
        except (ValueError, KeyError, TypeError, AttributeError):
            message, code = response.text.strip()[:300] or response.reason_phrase, None
        message = " ".join(str(message).split())
        if response.status_code == 401:
            raise ServerError(self.url, "unauthorized: set --api-key or QWEN2VL_API_KEY")
        if response.status_code == 400 and code == TOO_LONG:
            raise UsageError(", ".join(m.source for m in request.media) or "the prompt", message)
        raise ServerError(self.url, f"HTTP {response.status_code}: {message}")

    def stream(self, request: ChatRequest) -> Iterator[TextDelta | Completion]:
        """Server-sent events -> TextDelta pieces, then one Completion (usage from the server)."""
        start = time.perf_counter()
        text, first, usage, finish = [], None, {}, "stop"
        try:
            with http(self.url).stream("POST", self.url + "/chat/completions", json=self.body(request, True),
                                       headers=self._headers(), timeout=self.timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response, request)
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
        except TransportError as exc:
            raise ServerError(self.url, f"cannot reach the server ({exc})") from None
        yield Completion("".join(text), usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), finish,
                         first, time.perf_counter() - start)

    def complete(self, request: ChatRequest) -> Completion:
        """One non-streamed request, retried with exponential backoff on transient failures (a 429's
        Retry-After is honoured)."""
        start = time.perf_counter()
        for attempt in range(RETRIES + 1):
            wait = None
            try:
                response = http(self.url).post(self.url + "/chat/completions", json=self.body(request, False),
                                               headers=self._headers(), timeout=self.timeout)
                if response.status_code not in RETRY_STATUSES or attempt == RETRIES:
                    self._raise_for(response, request)
                    body = response.json()
                    choice, usage = body["choices"][0], body.get("usage") or {}
                    return Completion(choice["message"]["content"] or "", usage.get("prompt_tokens", 0),
                                      usage.get("completion_tokens", 0), choice.get("finish_reason") or "stop",
                                      None, time.perf_counter() - start)
                retry_after = response.headers.get("retry-after", "")
                wait = min(60.0, float(retry_after)) if retry_after.isdigit() else None
            except (TransportError, ValueError, KeyError) as exc:
                if attempt == RETRIES:
                    reason = exc if isinstance(exc, TransportError) else type(exc).__name__
                    raise ServerError(self.url, f"no answer after {RETRIES + 1} tries ({reason})") from None
            time.sleep(wait if wait is not None else min(30.0, 0.5 * 2 ** attempt) * (0.5 + random.random()))
        raise ServerError(self.url, "no answer")  # pragma: no cover - the loop returns or raises

    def generate_batch(self, requests: list[ChatRequest]) -> list[Completion]:
        """Up to `concurrency` requests in flight at once."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.complete, requests))

    def submit(self, request: ChatRequest, emit, stream: bool = False, prepared=None) -> "_Call":
        """Send `request` when one of `concurrency` connections is free; `emit` gets its Completion or error."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor  # not on a one-liner's way (~12 ms of its imports)

            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="qwen2vl-client")
        call = _Call()

        def run() -> None:
            if call.cancelled:
                return
            try:
                emit(self.complete(request))
            except BaseException as exc:  # noqa: BLE001 - the caller's to report
                emit(exc)

        self._pool.submit(run)
        return call


class _Call:
    """A submitted request to a server: cancel() drops it if it has not been sent."""

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

