"""The OpenAI chat-completions protocol: requests become the same ChatRequest the CLI builds (media
through the same resolvers), answers become OpenAI-shaped JSON; every bad request is a RequestError."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import Qwen2VLError
from ..session import ChatRequest, Completion, GenerationOptions, Media
from ..sources import FetchLimits, ImageOptions, display_name

MAX_TOKENS_LIMIT = 32768
IMAGE_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_KEYS = ("fps", "nframes", "min_frames", "max_frames", "total_pixels", "video_start", "video_end",
              *IMAGE_KEYS)


class RequestError(Exception):
    """A request the server refuses: HTTP status plus an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.code, self.param, self.kind = status, code, param, kind

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.code, self.param)


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class MediaPolicy:
    """What a request may make the server read."""

    limits: FetchLimits
    allowed_local: Path | None = None  # --allowed-local-media-path; None: no local files at all


@dataclass
class ParsedRequest:
    request: ChatRequest
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, kind, low=None, high=None, where: str = ""):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise RequestError(f"{where}{key} must be a{'n integer' if kind is int else ' number'}", param=key)
    value = kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"{where}{key} must be between {low} and {high}", param=key)
    return value


def generation_from(body: dict) -> GenerationOptions:
    """Sampling fields; with no temperature the answer is greedy, as on the command line."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", int, 1, MAX_TOKENS_LIMIT)
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    return GenerationOptions(
        max_new_tokens=max_tokens or GenerationOptions.max_new_tokens,
        temperature=_number(body, "temperature", float, 0.0, 2.0),
        top_p=_number(body, "top_p", float, 0.0, 1.0),
        top_k=_number(body, "top_k", int, -1, 1_000_000) if body.get("top_k") not in (None, -1, 0) else None,
        repetition_penalty=_number(body, "repetition_penalty", float, 0.0, 10.0),
        seed=_number(body, "seed", int),
    )


def media_options(kwargs: dict):
    """mm_processor_kwargs -> (ImageOptions, VideoOptions), checked."""
    from ..video import VideoOptions

    if not isinstance(kwargs, dict):
        raise RequestError("mm_processor_kwargs must be an object", param="mm_processor_kwargs")
    unknown = set(kwargs) - set(VIDEO_KEYS)
    if unknown:
        raise RequestError(f"mm_processor_kwargs: unknown {', '.join(sorted(unknown))}", param="mm_processor_kwargs")
    where = "mm_processor_kwargs."
    values = {key: _number(kwargs, key, float if key in ("fps", "video_start", "video_end") else int, 0,
                           None, where) for key in VIDEO_KEYS}
    images = ImageOptions(values["min_pixels"], values["max_pixels"], values["resized_height"], values["resized_width"])
    try:
        videos = VideoOptions(fps=values["fps"], nframes=values["nframes"], min_frames=values["min_frames"],
                              **({"max_frames": values["max_frames"]} if values["max_frames"] else {}),
                              start=values["video_start"], end=values["video_end"], min_pixels=values["min_pixels"],
                              max_pixels=values["max_pixels"], resized_height=values["resized_height"],
                              resized_width=values["resized_width"],
                              **({"total_pixels": values["total_pixels"]} if values["total_pixels"] else {}))
    except Qwen2VLError as exc:
        raise RequestError(f"mm_processor_kwargs: {exc}", param="mm_processor_kwargs") from None
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


def resolve_part_media(kind: str, url: str, images: ImageOptions, videos, policy: MediaPolicy) -> Media:
    """One image_url / video_url part -> Media, through the command line's resolvers."""
    from ..sources import resolve_image
    from ..video import resolve_video

    if not isinstance(url, str) or not url:
        raise RequestError(f"{kind}_url.url must be a non-empty string", param=f"{kind}_url")
    source = url if url.startswith(("http://", "https://", "data:")) else check_local(url, policy)
    try:
        if kind == "image":
            image = resolve_image(source, images, policy.limits)
            return Media("image", display_name(url), image, facts={"width": image.size[0], "height": image.size[1]})
        video = resolve_video(source, videos, policy.limits)
        return Media("video", display_name(url), video.frames, metadata=video.metadata, facts=video.facts)
    except Qwen2VLError as exc:
        raise RequestError(str(exc), code="invalid_media") from None


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
    images, videos = media_options(body.get("mm_processor_kwargs") or {})
    conversation, media, prompt = [], [], ""
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer"):
            raise RequestError(f"{where} needs a role of system, user or assistant", param=where)
        role = "system" if message["role"] == "developer" else message["role"]
        content = message.get("content")
        if isinstance(content, str):
            conversation.append({"role": role, "content": content})
            prompt = content if role == "user" else prompt
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or a list of parts", param=where)
        parts = []
        for number, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
                prompt = part["text"] if role == "user" else prompt
            elif kind in ("image_url", "video_url") and role == "system":
                raise RequestError(f"{where}.content[{number}]: a system message takes text only "
                                   "(put images and videos in a user message)", param=where)
            elif kind in ("image_url", "video_url"):
                ref = part.get(kind)
                url = ref.get("url") if isinstance(ref, dict) else ref
                item = resolve_part_media(kind[:5], url, images, videos, policy)
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
    request = ChatRequest(prompt=prompt, media=media, generation=generation_from(body),
                          vision_ids=bool(body.get("add_vision_id", False)), conversation=conversation)
    return ParsedRequest(request, stream, bool(isinstance(options, dict) and options.get("include_usage")))


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_body(request_id: str, model: str, completion: Completion) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                     "finish_reason": completion.finish_reason, "logprobs": None}],
        "usage": usage_body(completion),
    }


def usage_body(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def chunk_body(request_id: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               usage: dict | None = None) -> dict:
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if usage:
        body["usage"] = usage
    return body
