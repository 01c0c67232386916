"""The OpenAI chat-completions protocol: requests become the same ChatRequest the CLI builds (media
through the same resolvers), answers become OpenAI-shaped JSON; every bad request is a RequestError."""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import Qwen2VLError
from ..types import MAX_STOP_STRINGS, ChatRequest, Completion, GenerationOptions, Media
from ..sources import IMAGE_MAX_PIXELS, PATCH_FACTOR, FetchLimits, ImageOptions, display_name, encodable
from ..video import MAX_FRAMES

MAX_TOKENS_LIMIT = 32768
IMAGE_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_KEYS = ("fps", "nframes", "min_frames", "max_frames", "total_pixels", "video_start", "video_end",
              *IMAGE_KEYS)
MAX_FPS = 60.0
MAX_CHOICES = 16  # `n` at most (each choice is a request of its own in the engine, and counts against --max-queue)
# Every field of a chat-completions body this server reads; any other is refused (400), not ignored.
FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
          "stream", "stream_options", "seed", "stop", "frequency_penalty", "presence_penalty", "repetition_penalty",
          "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls",
          "functions", "function_call", "logit_bias", "user", "metadata", "store", "service_tier",
          "mm_processor_kwargs", "chat_template_kwargs", "add_vision_id"}


class RequestError(Exception):
    """A request the server refuses: HTTP status plus an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param, self.kind, self.headers = status, code, param, kind, headers

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.code, self.param)


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class MediaPolicy:
    """What a request may make the server read, and how much of it."""

    limits: FetchLimits  # its policy says which URLs are fetched
    allowed_local: Path | None = None  # --allowed-local-media-path; None: no local files at all
    max_images: int = 32  # --max-images, per request
    max_videos: int = 4  # --max-videos, per request
    max_prompt_tokens: int = MAX_TOKENS_LIMIT  # --max-prompt-tokens: bounds the pixel settings too
    as_sent: bool = False  # the client sized its media already (SIZED_HEADER): take those on the grid as they are


@dataclass
class ParsedRequest:
    request: ChatRequest
    stream: bool
    include_usage: bool
    characters: int = 0  # of the conversation's text, for a bound before tokenizing
    n: int = 1  # choices: the request answered n times (seeded ones with seed, seed + 1, ...)

    def choices(self) -> list[ChatRequest]:
        """The request once per choice; with a seed, choice i samples with seed + i (wrapped within 64 bits)."""
        seed = self.request.generation.seed
        if self.n == 1 or seed is None:
            return [self.request] * self.n
        return [replace(self.request, generation=replace(self.request.generation,
                                                           seed=(seed + i + 2 ** 63) % 2 ** 64 - 2 ** 63))
                for i in range(self.n)]


def _number(body: dict, key: str, kind, low=None, high=None, where: str = ""):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise RequestError(f"{where}{key} must be a{'n integer' if kind is int else ' number'}", param=key)
    value = kind(value)
    if not math.isfinite(value):  # JSON's NaN and Infinity, as Python's json reads them
        raise RequestError(f"{where}{key} must be a finite number", param=key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"{where}{key} must be between {low} and {high}", param=key)
    return value


def _positive(value, key: str):
    if value == 0:
        raise RequestError(f"{key} must be above 0", param=key)
    return value


def refuse_unsupported(body: dict) -> None:
    """Fields that would change the answer and that this server cannot honour: a 400 each, never ignored."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise RequestError(f"unsupported parameter{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
                           param=unknown[0])
    refusals = (
        ("logprobs", bool(body.get("logprobs")) or bool(body.get("top_logprobs")), "logprobs are not supported"),
        ("top_logprobs", bool(body.get("top_logprobs")), "logprobs are not supported"),
        ("response_format", body.get("response_format") not in (None, {"type": "text"}),
         "only response_format {\"type\": \"text\"} is supported (no structured output yet)"),
        ("tools", bool(body.get("tools")) or bool(body.get("functions")), "tools and function calling are not supported"),
        ("tool_choice", body.get("tool_choice") not in (None, "none") or body.get("function_call") not in (None, "none"),
         "tools and function calling are not supported"),
        ("logit_bias", bool(body.get("logit_bias")), "logit_bias is not supported"),
    )
    for param, refused, message in refusals:
        if refused:
            raise RequestError(message, param=param)


def stop_strings(value) -> tuple[str, ...]:
    """`stop`: a string or a list of non-empty strings."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(item, str) and item for item in stops)):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                           param="stop")
    return tuple(unicode_text(stop, "stop") for stop in stops)


def unicode_text(text: str, where: str) -> str:
    """`text`, or a 400 where it is not Unicode a tokenizer takes (sources.encodable; it was a 500)."""
    if not encodable(text):
        raise RequestError(f"{where}: not valid Unicode (an unpaired surrogate escape)", param=where)
    return text


def generation_from(body: dict) -> GenerationOptions:
    """Sampling fields; with no temperature the answer is greedy, as on the command line."""
    refuse_unsupported(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", int, 1, MAX_TOKENS_LIMIT)
    return GenerationOptions(
        max_new_tokens=max_tokens or GenerationOptions.max_new_tokens,
        temperature=_number(body, "temperature", float, 0.0, 2.0),
        top_p=_number(body, "top_p", float, 0.0, 1.0),
        top_k=_number(body, "top_k", int, -1, 1_000_000) if body.get("top_k") not in (None, -1, 0) else None,
        repetition_penalty=_positive(_number(body, "repetition_penalty", float, 0.0, 10.0), "repetition_penalty"),
        seed=_number(body, "seed", int, -2 ** 63, 2 ** 64 - 1),  # any 64-bit seed, as vLLM takes
        stop=stop_strings(body.get("stop")),
        frequency_penalty=_number(body, "frequency_penalty", float, -2.0, 2.0),
        presence_penalty=_number(body, "presence_penalty", float, -2.0, 2.0),
    )


def media_options(kwargs: dict, policy: MediaPolicy, param: str = "mm_processor_kwargs"):
    """mm_processor_kwargs -> (ImageOptions, VideoOptions), checked: within the model's own limits (an
    image at most 16384 tokens, at most 768 frames) and this server's prompt limit. `param`: where they were
    given (an image_url's own sizing keys, as qwen-vl-utils takes them per image, go through here too)."""
    from ..video import VideoOptions

    if not isinstance(kwargs, dict):
        raise RequestError(f"{param} must be an object", param=param)
    unknown = set(kwargs) - set(VIDEO_KEYS)
    if unknown:
        raise RequestError(f"{param}: unknown {', '.join(sorted(unknown))}", param=param)
    where = f"{param}."
    pixels = min(IMAGE_MAX_PIXELS, policy.max_prompt_tokens * PATCH_FACTOR ** 2)
    high = {"fps": MAX_FPS, "nframes": MAX_FRAMES, "min_frames": MAX_FRAMES, "max_frames": MAX_FRAMES,
            "min_pixels": pixels, "max_pixels": IMAGE_MAX_PIXELS, "resized_height": 32768, "resized_width": 32768,
            "total_pixels": 2 * policy.max_prompt_tokens * PATCH_FACTOR ** 2, "video_start": None, "video_end": None}
    low = {"max_pixels": 1, "resized_height": 1, "resized_width": 1}  # 0 would be no size at all
    values = {key: _number(kwargs, key, float if key in ("fps", "video_start", "video_end") else int,
                           low.get(key, 0), high[key], where) for key in VIDEO_KEYS}
    if (values["resized_height"] is None) != (values["resized_width"] is None):
        raise RequestError(f"{where}resized_height and {where}resized_width: give both or neither", param=param)
    if None not in (values["min_pixels"], values["max_pixels"]) and values["min_pixels"] > values["max_pixels"]:
        raise RequestError(f"{where}min_pixels {values['min_pixels']} is larger than {where}max_pixels "
                           f"{values['max_pixels']}", param="min_pixels")
    if (values["resized_height"] or 0) * (values["resized_width"] or 0) > pixels:
        raise RequestError(f"{where}resized_height x resized_width must be at most {pixels} pixels", param=param)
    images = ImageOptions(values["min_pixels"], values["max_pixels"], values["resized_height"], values["resized_width"])
    try:
        videos = VideoOptions(fps=values["fps"], nframes=values["nframes"], min_frames=values["min_frames"],
                              **({"max_frames": values["max_frames"]} if values["max_frames"] else {}),
                              start=values["video_start"], end=values["video_end"], min_pixels=values["min_pixels"],
                              max_pixels=values["max_pixels"], resized_height=values["resized_height"],
                              resized_width=values["resized_width"],
                              **({"total_pixels": values["total_pixels"]} if values["total_pixels"] else {}))
    except Qwen2VLError as exc:
        raise RequestError(f"{param}: {exc}", param=param) from None
    return images, videos


def check_local(url: str, policy: MediaPolicy) -> str:
    """A file:// URL or path is read only below --allowed-local-media-path (no '..', no symlink escape)."""
    from ..sources import file_url_to_path

    if policy.allowed_local is None:
        raise RequestError("local files are not allowed; send the image as a data URI or an http(s) URL "
                           "(or start the server with --allowed-local-media-path DIR)", status=403,
                           code="local_media_forbidden")
    try:
        path = file_url_to_path(url) if url.startswith("file://") else Path(url)
    except Qwen2VLError as exc:
        raise RequestError(str(exc)) from None
    real = os.path.realpath(path)
    root = os.path.realpath(policy.allowed_local)
    if os.path.commonpath([real, root]) != root:
        raise RequestError(f"{url}: outside --allowed-local-media-path", status=403, code="local_media_forbidden")
    return real


def resolve_part_media(kind: str, url: str, images: ImageOptions, videos, policy: MediaPolicy,
                       as_sent: bool = False) -> Media:
    """One image_url / video_url part -> Media, through the command line's resolvers. Errors name the
    media as the client did, never by the server's own paths. `as_sent`: sized by qwen2vl's client already
    (SIZED_HEADER, and no sizing of the part's own): taken as it is where on the grid."""
    from ..sources import FetchRefused, read_image
    from ..video import frames_as_sent, is_frame_list_uri, resolve_video

    if not isinstance(url, str) or not url:
        raise RequestError(f"{kind}_url.url must be a non-empty string", param=f"{kind}_url")
    source = url if url.startswith(("http://", "https://", "data:")) else check_local(url, policy)
    name = display_name(url)
    try:
        if kind == "image":
            image = read_image(source, images, policy.limits, sized=as_sent and source.startswith("data:"))
            return Media("image", name, image.sized(), facts=image.facts)
        sent = frames_as_sent(source) if as_sent and is_frame_list_uri(source) else None
        video = sent or resolve_video(source, videos, policy.limits)
        return Media("video", name, video.frames, metadata=video.metadata, facts=video.facts)
    except FetchRefused as exc:
        raise RequestError(str(exc), status=403, code="fetch_forbidden") from None
    except Qwen2VLError as exc:
        raise RequestError(f"{name}: {exc.reason}", code="invalid_media") from None


def parse_chat_request(body, served_model: str, policy: MediaPolicy) -> ParsedRequest:
    """Validate an OpenAI chat-completions body and resolve its media."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise RequestError(f"model {model!r} is not served here (this server serves {served_model!r})",
                           status=404, code="model_not_found", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    generation = generation_from(body)
    vision_ids = vision_ids_from(body)
    count_media(messages, policy)  # before a byte of any of them is fetched or decoded
    kwargs = body.get("mm_processor_kwargs") or {}
    images, videos = media_options(kwargs, policy)
    conversation, media, prompt = [], [], ""
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer"):
            raise RequestError(f"{where} needs a role of system, user or assistant", param=where)
        role = "system" if message["role"] == "developer" else message["role"]
        content = message.get("content")
        if isinstance(content, str):
            conversation.append({"role": role, "content": unicode_text(content, f"{where}.content")})
            prompt = content if role == "user" else prompt
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or a list of parts", param=where)
        parts = []
        for number, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": unicode_text(part["text"], f"{where}.content[{number}].text")})
                prompt = part["text"] if role == "user" else prompt
            elif kind == "text":
                raise RequestError(f"{where}.content[{number}]: a text part needs a 'text' string", param=where)
            elif kind in ("image_url", "video_url") and role == "system":
                raise RequestError(f"{where}.content[{number}]: a system message takes text only "
                                   "(put images and videos in a user message)", param=where)
            elif kind in ("image_url", "video_url"):
                ref = part.get(kind)
                url = ref.get("url") if isinstance(ref, dict) else ref
                # qwen-vl-utils' per-image sizing keys, beside the url (what qwen2vl's client sends with an
                # image's own bytes: the size the model sees it at)
                sizing = {key: ref[key] for key in IMAGE_KEYS if key in ref} if kind == "image_url" and isinstance(
                    ref, dict) else {}
                own = media_options({**kwargs, **sizing}, policy, f"{where}.content[{number}].image_url")[0] \
                    if sizing else images
                item = resolve_part_media(kind[:5], url, own, videos, policy, policy.as_sent and not sizing)
                media.append(item)
                parts.append({"type": item.kind, item.kind: item.data})
            else:
                raise RequestError(f"{where}.content[{number}]: unsupported part (text, image_url, video_url)",
                                   param=where)
        if role == "system":  # the chat template takes a system message as plain text
            conversation.append({"role": role, "content": "".join(p.get("text", "") for p in parts)})
        else:
            conversation.append({"role": role, "content": parts})
    stream = bool(body.get("stream", False))
    options = body.get("stream_options") or {}
    request = ChatRequest(prompt=prompt, media=media, generation=generation, vision_ids=vision_ids,
                          conversation=conversation)
    characters = sum(len(m["content"]) if isinstance(m["content"], str)
                     else sum(len(p.get("text", "")) for p in m["content"] if p.get("type") == "text")
                     for m in conversation)
    n = _number(body, "n", int, 1, MAX_CHOICES) or 1
    return ParsedRequest(request, stream, bool(isinstance(options, dict) and options.get("include_usage")),
                         characters, n)


def vision_ids_from(body: dict) -> bool:
    """"Picture 1:" labels: chat_template_kwargs {"add_vision_id": true} (vLLM's form), or a top-level
    add_vision_id (older qwen2vl clients). Other template arguments are refused."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"add_vision_id"}:
        raise RequestError("chat_template_kwargs: only add_vision_id is supported", param="chat_template_kwargs")
    return bool(kwargs.get("add_vision_id", body.get("add_vision_id", False)))


def count_media(messages: list, policy: MediaPolicy) -> None:
    """At most --max-images images and --max-videos videos in one request."""
    parts = [part for message in messages if isinstance(message, dict) and isinstance(message.get("content"), list)
             for part in message["content"] if isinstance(part, dict)]
    for kind, limit, flag in (("image_url", policy.max_images, "--max-images"),
                              ("video_url", policy.max_videos, "--max-videos")):
        count = sum(part.get("type") == kind for part in parts)
        if count > limit:
            raise RequestError(f"{count} {kind[:5]}s in one request, over this server's limit of {limit} ({flag})",
                               param="messages")


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_body(request_id: str, model: str, completions: list[Completion]) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": index, "message": {"role": "assistant", "content": completion.text},
                     "finish_reason": completion.finish_reason, "logprobs": None}
                    for index, completion in enumerate(completions)],
        "usage": usage_body(completions),
    }


def usage_body(completions: list[Completion]) -> dict:
    """The prompt once (as vLLM counts it for n choices), the tokens of every choice."""
    prompt, generated = completions[0].prompt_tokens, sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def chunk_body(request_id: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               usage: dict | None = None, index: int = 0) -> dict:
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [] if usage else [{"index": index, "delta": delta, "finish_reason": finish_reason,
                                          "logprobs": None}]}
    if usage:
        body["usage"] = usage
    return body
