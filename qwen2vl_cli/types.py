"""The data every part shares: what model to load (ModelSpec), how to decode (GenerationOptions), a request
(Media, ChatRequest), what comes back (TextDelta, Completion), and the Session protocol that the local engine
(engine.ModelSession) and the remote client (client.RemoteSession) both implement. Plain data: no torch here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Protocol

DEFAULT_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
DEFAULT_MAX_NEW_TOKENS = 512
DEVICES = ("auto", "cuda", "cpu", "mps")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
MAX_STOP_STRINGS = 16  # stop strings of one request at most (the CLI's --stop and the API's `stop`)


def default_model() -> str:
    """The model used when --model is not given: $QWEN2VL_MODEL, else Qwen2-VL-2B-Instruct."""
    return os.environ.get("QWEN2VL_MODEL") or DEFAULT_MODEL


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load, and where and how."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "auto"
    quantize: str | None = None  # "4bit" or "8bit": quantize on load with bitsandbytes
    named: bool = field(default=True, compare=False)  # by --model or $QWEN2VL_MODEL (else a server's only model answers)

    def settings(self) -> dict:
        """How the model is loaded (what a session reports in /health and is matched on)."""
        return {"device": self.device, "dtype": self.dtype, "attn": self.attn, "quantize": self.quantize}


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings; greedy unless a sampling option is given."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings (not included)
    frequency_penalty: float | None = None  # OpenAI's: minus penalty x times a token was generated so far
    presence_penalty: float | None = None  # OpenAI's: minus penalty once a token has been generated

    @property
    def penalized(self) -> bool:
        """Any penalty that changes the logits (the fast path takes none of them)."""
        return (self.repetition_penalty not in (None, 1.0) or bool(self.frequency_penalty)
                or bool(self.presence_penalty))

    @property
    def sampling(self) -> bool:
        if self.temperature is not None:
            return self.temperature > 0
        return self.top_p is not None or self.top_k is not None


@dataclass
class Media:
    """One image or video of a conversation, decoded and sized for the processor."""

    kind: Literal["image", "video"]
    source: str
    data: Any
    metadata: Any = None  # video: the sampling metadata the processor needs
    facts: dict = field(default_factory=dict)  # what the model sees: sizes, frames, tokens
    notes: list[str] = field(default_factory=list)  # what was reduced to fit, for stderr


@dataclass
class ChatRequest:
    """One conversation turn: media and a prompt, optionally a system message.

    `conversation` holds a whole multi-turn chat instead (the server's requests), with the media
    objects in place; `media` then lists them in order.
    """

    prompt: str
    media: list[Media] = field(default_factory=list)
    system: str | None = None
    vision_ids: bool = False
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    conversation: list[dict] | None = None

    def messages(self) -> list[dict]:
        """The conversation in the form qwen-vl-utils and the chat template take."""
        if self.conversation is not None:
            return self.conversation
        content: list[dict] = [{"type": m.kind, m.kind: m.data} for m in self.media]
        content.append({"type": "text", "text": self.prompt})
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": content})
        return messages


@dataclass
class TextDelta:
    """A piece of the answer, as it is generated."""

    text: str


@dataclass
class Completion:
    """The whole answer with its usage and timings (seconds)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    first_token_s: float | None
    total_s: float


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string starts in `text`, or None."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (not shown yet)."""
    return max((n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:n])), default=0)


class Session(Protocol):
    """What the commands and the server use to answer: the local engine and a remote server alike."""

    device: str | None  # "cuda", "cpu", ...; "remote" for a server
    load_s: float

    @property
    def loaded(self) -> bool:
        """Ready to answer without loading (or reaching the server) first."""

    def load(self) -> "Session":
        """Be ready to answer (load the model, or reach the server); raise ModelLoadError when it cannot."""

    def describe_weights(self) -> str:
        """One --verbose line: the weights that answer, the path they answer by, where the load's time went (for a
        server: which one, and what it says of itself)."""

    def image_media(self, image) -> Media:
        """An image read and checked (sources.read_image: a SourceImage), in the form this session takes."""

    def video_media(self, video) -> Media:
        """A video sampled and sized already (video.resolve_video), in the form this session takes."""

    def stream(self, request: ChatRequest) -> Iterator[TextDelta | Completion]:
        """One answer: TextDelta pieces as they come, then one Completion."""

    def generate_batch(self, requests: list[ChatRequest]) -> list[Completion]:
        """Several answers, each as its own Completion."""

    def prepare_one(self, request: ChatRequest) -> Any:
        """The request's tensors, made ahead of submitting it (None where the other side makes them)."""

    def submit(self, request: ChatRequest, emit, stream: bool = False, prepared: Any = None) -> Any:
        """Queue a request: `emit` gets TextDelta pieces (when streamed), then a Completion, or an exception;
        the returned handle's cancel() withdraws it."""
